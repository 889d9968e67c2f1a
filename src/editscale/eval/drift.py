"""How far an edited layer has moved from its original weights (docs/protocol.md §8.6, §10.13)."""

from __future__ import annotations

import torch


def layer_drift(original: torch.Tensor, current: torch.Tensor) -> dict[str, float]:
    """dist: ||ΔW||_F / numel (the paper's Table 2 normalisation), fro: ||ΔW||_F, rel: ||ΔW||_F / ||W0||_F."""
    diff = current.detach().double().cpu() - original.detach().double().cpu()
    fro = float(diff.norm())
    base = float(original.double().norm())
    return {"dist": fro / original.numel(), "fro": fro, "rel": fro / base if base else float("inf")}
