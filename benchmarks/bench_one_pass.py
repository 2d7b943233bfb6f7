"""The default set in one pass per batch, against the hardware-bound floor of one float64 Gram pass.

- Ours: ``reprmetrics.evaluate`` with the default metric set on float32 embeddings, batches of 4,096
  rows: one finite mask, one float64 conversion, one normalisation and one update per shared statistic
  per batch (the rows' centred moments, the normalised rows' centred moments, a bounded sample), then
  the compute phase (eigendecompositions, uniformity and LID on 8,192 sampled rows).
- Baseline: the least any exact second-moment metric must do on the same batches: convert each batch
  to float64 and ``addmm_`` it into a D×D accumulator (one GEMM), then one ``eigvalsh``.

The ratio says how close the whole default set comes to that floor (goal ≤ 3×).
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case

_BATCH = 4_096


def _batches(n: int, d: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    scale = torch.arange(1, d + 1, dtype=torch.float32).pow(-0.5)
    return [(torch.randn(min(_BATCH, n - s), d, generator=g) * scale).to(device) for s in range(0, n, _BATCH)]


def _default_set(batches: list[torch.Tensor]) -> dict[str, float]:
    from reprmetrics import evaluate

    return evaluate(iter(batches), batch_size=_BATCH)


def _gram_pass(batches: list[torch.Tensor]) -> float:
    d = batches[0].shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=batches[0].device)
    for batch in batches:
        x = batch.to(torch.float64)
        gram.addmm_(x.T, x)
    return float(torch.linalg.eigvalsh(gram)[-1])


def cases(device: torch.device, quick: bool) -> list[Case]:
    n, d = (100_000, 128) if quick else (500_000, 128)
    return [
        Case(
            name="evaluate default set vs one float64 Gram pass",
            ours=_default_set,
            baseline=_gram_pass,
            baseline_name="float64 addmm_ of every batch + one eigvalsh (the floor of any exact second moment)",
            make_input=lambda: _batches(n, d, device),
            input_desc=f"{n:,} × {d} float32, batches of {_BATCH:,}",
            repeats=3,
            notes="goal ≤ 3× the Gram pass",
        )
    ]
