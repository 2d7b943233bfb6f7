"""Every reprmetrics metric on generated embeddings: healthy, dimensionally collapsed, fully collapsed.

    python examples/metrics_table.py [--samples 4096] [--dim 128] [--batch 256]

Prints a table: how each label-free metric reads each kind of representation. The embeddings are
streamed through the Metric classes in batches, as a training loop would feed them. The two "views"
that LiDAR and alignment need are each embedding plus independent noise of 5 % of its scale.
"""

from __future__ import annotations

import argparse

import torch

from reprmetrics import (
    Alignment,
    AlphaReQ,
    CodingRate,
    IsoScore,
    LiDAR,
    LocalIntrinsicDimension,
    NESum,
    NormalizedStd,
    RankMe,
    SIGReg,
    TwoNN,
    Uniformity,
    WassersteinUniformity,
)


def generated_embeddings(n: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    decay = torch.arange(1, d + 1, dtype=torch.float32).pow(-0.5)  # λ_k ∝ 1/k, like trained encoders
    low_rank = torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g)
    return {
        "healthy (λ_k ∝ 1/k)": torch.randn(n, d, generator=g) * decay,
        "dimensional collapse (rank 8 + noise)": low_rank + 1e-2 * torch.randn(n, d, generator=g),
        "complete collapse (one point + 1e-3 noise)": torch.randn(1, d, generator=g)
        + 1e-3 * torch.randn(n, d, generator=g),
    }


def metric_set(d: int) -> dict[str, object]:
    return {
        "RankMe ↑": RankMe(),
        "α-ReQ ≈1": AlphaReQ(fit_range=(11, min(100, d))),
        "LiDAR ↑": LiDAR(),
        "norm. std ↑": NormalizedStd(),
        "uniformity ↓": Uniformity(),
        "alignment ↓": Alignment(),
        "LID ↑": LocalIntrinsicDimension(),
        "TwoNN ↑": TwoNN(),
        "NESum ↑": NESum(),
        "coding rate ↑": CodingRate(),
        "W-uniformity ↓": WassersteinUniformity(),
        "SIGReg ↓": SIGReg(),
        "IsoScore ↑": IsoScore(),
    }


def feed(metric: object, batch: torch.Tensor, generator: torch.Generator) -> None:
    if isinstance(metric, (LiDAR, Alignment)):
        scale = 0.05 * batch.std()
        views = [batch + scale * torch.randn(batch.shape, generator=generator) for _ in range(2)]
        metric.update(torch.stack(views, dim=1)) if isinstance(metric, LiDAR) else metric.update(*views)
    else:
        metric.update(batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)

    rows = []
    generator = torch.Generator().manual_seed(1)
    for label, z in generated_embeddings(args.samples, args.dim).items():
        metrics = metric_set(args.dim)
        for batch in z.split(args.batch):
            for m in metrics.values():
                feed(m, batch, generator)
        rows.append((label, {name: m.compute().item() for name, m in metrics.items()}))

    names = list(rows[0][1])
    width = max(len(label) for label, _ in rows)
    print(f"{args.samples} × {args.dim} embeddings, streamed in batches of {args.batch}\n")
    print(f"{'embeddings':<{width}} | " + " | ".join(f"{n:>14}" for n in names))
    print("-" * width + "-|-" + "-|-".join("-" * 14 for _ in names))
    for label, values in rows:
        print(
            f"{label:<{width}} | " + " | ".join(f"{values[n]:>14.{3 if abs(values[n]) < 1e5 else 0}f}" for n in names)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
