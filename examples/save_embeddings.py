"""Save held-out embeddings of main-job checkpoints, for `reprmetrics report` and `reprmetrics compare`.

Loads each SimCLR checkpoint that `python examples/ssl_digits.py` wrote (a Lightning .ckpt) and
embeds the 500 held-out digits with one tap (backbone or projector), in eval mode:

- ``NAME.npy`` (or ``.safetensors``, key ``embeddings``): the (500, D) embeddings of the images;
- with ``--views``, also ``NAME_views.npy``: the (500, 2, D) embeddings of the two fixed augmented
  views the monitor's validation pass uses, so ``reprmetrics report NAME.npy --views NAME_views.npy``
  adds LiDAR and alignment.

NAME is the checkpoint's file name without ``.ckpt``. For example::

    python examples/ssl_digits.py
    python examples/save_embeddings.py runs/ssl_digits/version_0/checkpoints/*.ckpt --out-dir embeddings
    reprmetrics report embeddings/*.npy --plot spectra.png
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*is deprecated.*")

from digits_ssl import SimCLR, digit_splits, fixed_views  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="SimCLR .ckpt files of examples/ssl_digits.py")
    parser.add_argument(
        "--tap", choices=("backbone", "projector"), default="backbone", help="which embeddings (default: backbone)"
    )
    parser.add_argument("--out-dir", default="embeddings", help="where the files go (default: embeddings/)")
    parser.add_argument("--format", choices=("npy", "safetensors"), default="npy", help="file format (default: npy)")
    parser.add_argument(
        "--views", action="store_true", help="also save the (N, 2, D) embeddings of the two fixed held-out views"
    )
    return parser.parse_args(argv)


@torch.no_grad()
def embed(model: SimCLR, images: torch.Tensor, tap: str) -> torch.Tensor:
    features = model.backbone(images)
    return features if tap == "backbone" else model.projector(features)


def save(array: torch.Tensor, path: Path, fmt: str) -> Path:
    if fmt == "npy":
        path = path.with_suffix(".npy")
        np.save(path, array.numpy())
    else:
        from safetensors.torch import save_file

        path = path.with_suffix(".safetensors")
        save_file({"embeddings": array.contiguous()}, str(path))
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = digit_splits().held_out_images
    views = fixed_views(images) if args.views else None
    written = []
    for checkpoint in args.checkpoints:
        model = SimCLR.load_from_checkpoint(checkpoint, map_location="cpu").eval()
        name = Path(checkpoint).name.removesuffix(".ckpt")
        written.append(save(embed(model, images, args.tap), out_dir / name, args.format))
        if views is not None:
            stacked = torch.stack([embed(model, view, args.tap) for view in views], dim=1)
            written.append(save(stacked, out_dir / f"{name}_views", args.format))
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
