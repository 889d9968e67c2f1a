"""MEND's editor network (Mitchell et al. 2022, arXiv 2110.11309, §3): it maps the rank-1 factors of
a layer's fine-tuning gradient to the factors of a weight edit.

For an edited linear map W (canonical [out, in]) and one edit's loss, the gradient is
∇W = Σ_t δ_t x_tᵀ over the positions t, with x_t the map's input and δ_t the gradient at its output.
MEND standardises each pair, runs [x̂_t ‖ δ̂_t] through a small residual MLP with low-rank weights,
splits the result into (x̃_t, δ̃_t), and edits

    W ← W + α · Σ_t δ̃_t x̃_tᵀ        (rank ≤ the number of positions with a non-zero gradient)

with one learned step size α per edited map. The "+" follows the reference code (its learned α and
network absorb the sign the paper writes as θ − α∇̃), so published weights load unchanged.

Maps of one shape share a network; each map has its own "mode": a learned scale and shift of every
block's pre-activation. The module and buffer names are the reference's (`algs/mend.py`,
`nn.py::IDMLP`/`LRLinear` of eric-mitchell/mend), so a published checkpoint's state dict loads
into `MendNetwork` after its `gtn.` prefix is renamed (methods/mend/weights.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from editscale.methods.solver.gradients import Site, Trace

NORM_EPS = 1e-7  # the reference's ε in (x − μ) / (σ + ε)


class LowRankBlock(nn.Module):
    """z ← z + relu(scale[m] ⊙ (U V z + b) + shift[m]): the identity at initialisation (U = 0)."""

    def __init__(self, dim: int, rank: int, n_modes: int) -> None:
        super().__init__()
        mid = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, mid))
        self.v = nn.Parameter(torch.randn(mid, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_shift = nn.Embedding(n_modes, dim)
        self.mode_scale = nn.Embedding(n_modes, dim)
        nn.init.zeros_(self.mode_shift.weight)
        nn.init.ones_(self.mode_scale.weight)

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (z @ self.v.T) @ self.u.T + self.bias
        m = torch.tensor(mode, device=z.device)
        pre = pre * self.mode_scale(m) + self.mode_shift(m)
        return z + pre.clamp(min=0)  # clamp, not relu: the reference's choice (a gradient at 0)


class _Mlp(nn.Module):
    def __init__(self, dim: int, rank: int, n_hidden: int, n_modes: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([LowRankBlock(dim, rank, n_modes) for _ in range(n_hidden + 1)])

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        for layer in self.layers:
            z = layer(z, mode)
        return z


class GradientMap(nn.Module):
    """The network shared by the edited maps of one shape (x_dim = in, delta_dim = out), with the
    running statistics that standardise its inputs (updated only while training)."""

    def __init__(self, x_dim: int, delta_dim: int, rank: int, n_hidden: int, n_modes: int) -> None:
        super().__init__()
        self.x_dim, self.delta_dim = x_dim, delta_dim
        for side, dim in (("u", x_dim), ("v", delta_dim)):
            self.register_buffer(f"{side}_mean", torch.zeros(dim))
            self.register_buffer(f"{side}_std", torch.ones(dim))
            self.register_buffer(f"{side}_s", torch.zeros(dim))  # sum of squared deviations
        self.register_buffer("k", torch.zeros(1))  # rows seen
        self.mlp = _Mlp(x_dim + delta_dim, rank, n_hidden, n_modes)

    @torch.no_grad()
    def observe(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        """Merge rows into the running mean and deviation (the reference's per-row Welford update,
        batched); the standard deviations become sqrt(s / (k − 1))."""
        m = x.shape[0]
        if m == 0:
            return
        k = float(self.k)
        total = k + m
        for side, rows in (("u", x), ("v", delta)):
            rows = rows.double()
            mean, s = getattr(self, f"{side}_mean").double(), getattr(self, f"{side}_s").double()
            batch_mean = rows.mean(dim=0)
            diff = batch_mean - mean
            new_s = s + ((rows - batch_mean) ** 2).sum(dim=0) + diff**2 * (k * m / total)
            getattr(self, f"{side}_mean").copy_(mean + diff * (m / total))
            getattr(self, f"{side}_s").copy_(new_s)
            if total > 1:
                getattr(self, f"{side}_std").copy_((new_s / (total - 1)).sqrt())
        self.k.fill_(total)

    def forward(self, x: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat = (x - self.u_mean) / (self.u_std + NORM_EPS)
        d_hat = (delta - self.v_mean) / (self.v_std + NORM_EPS)
        out = self.mlp(torch.cat([x_hat, d_hat], dim=-1), mode)
        return out[:, :self.x_dim], out[:, self.x_dim:]


def shape_key(x_dim: int, delta_dim: int) -> str:
    """The reference's name of a shape group: str of the (in, out) tuple, e.g. "(6400, 1600)"."""
    return str((x_dim, delta_dim))


class MendNetwork(nn.Module):
    """One `GradientMap` per shape of the edited maps, and the step sizes α (one per map, in `sites`
    order, which is also the order of the modes within a shape)."""

    def __init__(self, sites: Sequence[Site], shapes: Sequence[tuple[int, int]], *, rank: int, n_hidden: int,
                 edit_lr: float) -> None:
        super().__init__()
        self.sites = list(sites)
        self.shapes = [tuple(s) for s in shapes]  # per site (in, out)
        groups: dict[str, list[Site]] = {}
        for site, (x_dim, d_dim) in zip(self.sites, self.shapes, strict=True):
            groups.setdefault(shape_key(x_dim, d_dim), []).append(site)
        self.modes = {site: members.index(site) for members in groups.values() for site in members}
        self.mend = nn.ModuleDict({
            key: GradientMap(*self.shapes[self.sites.index(members[0])], rank, n_hidden, len(members))
            for key, members in groups.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(self.sites),), float(edit_lr)))

    def gradient_map(self, site: Site) -> GradientMap:
        return self.mend[shape_key(*self.shapes[self.sites.index(site)])]  # type: ignore[return-value]

    def observe(self, trace: Trace) -> None:
        """Update the input statistics with a trace's rows (training only, as the reference)."""
        for site in self.sites:
            self.gradient_map(site).observe(*trace.nonzero(site))

    def factors(self, trace: Trace) -> dict[Site, tuple[torch.Tensor, torch.Tensor]]:
        """Per site the transformed factors (x̃ [N, in], δ̃ [N, out]) of the trace's non-zero rows."""
        out = {}
        for site in self.sites:
            x, delta = trace.nonzero(site)
            out[site] = self.gradient_map(site)(x, delta, self.modes[site])
        return out

    def deltas(self, trace: Trace, scale: float = 1.0) -> dict[Site, torch.Tensor]:
        """The edit of every site, canonical [out, in]: α · scale · Σ_t δ̃_t x̃_tᵀ (differentiable)."""
        return self.deltas_from(self.factors(trace), scale)

    def deltas_from(self, factors: dict[Site, tuple[torch.Tensor, torch.Tensor]],
                    scale: float = 1.0) -> dict[Site, torch.Tensor]:
        """`deltas` of factors already computed (`factors`)."""
        return {site: self.edit_lrs[i] * scale * (factors[site][1].T @ factors[site][0])
                for i, site in enumerate(self.sites)}
