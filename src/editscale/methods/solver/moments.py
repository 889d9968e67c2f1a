"""Running feature statistics for methods that standardise gradient features over everything seen
so far (UltraEdit's lifelong normaliser, MEND's input normalisation)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class RunningMoments:
    """Count, mean and sum of squared deviations of feature rows, merged batch by batch (Chan et al.);
    equal, up to rounding, to the row-by-row Welford updates of the reference codes."""

    def __init__(self, size: int) -> None:
        self.n = torch.zeros((), dtype=torch.float64)
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)

    def merged(self, rows: torch.Tensor) -> RunningMoments:
        """A new object holding these statistics merged with `rows` [m, size]."""
        x = rows.to(torch.float64)
        m = x.shape[0]
        out = RunningMoments(self.mean.shape[0])
        total = self.n + m
        batch_mean = x.mean(dim=0)
        diff = batch_mean - self.mean
        out.n = total
        out.mean = self.mean + diff * (m / total)
        out.m2 = self.m2 + ((x - batch_mean) ** 2).sum(dim=0) + diff**2 * (self.n * m / total)
        return out

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / (self.n - 1).clamp(min=1)).sqrt()

    def standardise(self, rows: torch.Tensor, eps: float) -> torch.Tensor:
        return (rows.to(torch.float64) - self.mean) / (self.std + eps)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.n": self.n.clone(), f"{prefix}.mean": self.mean.clone(), f"{prefix}.m2": self.m2.clone()}

    def load(self, state: Mapping[str, torch.Tensor], prefix: str) -> None:
        self.n = state[f"{prefix}.n"].to(torch.float64).clone()
        self.mean = state[f"{prefix}.mean"].to(torch.float64).clone()
        self.m2 = state[f"{prefix}.m2"].to(torch.float64).clone()
