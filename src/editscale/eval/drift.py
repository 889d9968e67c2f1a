"""How far an edited layer has moved from its original weights (docs/protocol.md §8.6, §10.13)."""

from __future__ import annotations

import torch

from editscale.models.adapter import EditedParams, ModelAdapter


def layer_drift(original: torch.Tensor, current: torch.Tensor) -> dict[str, float]:
    """dist: ||ΔW||_F / numel (the paper's Table 2 normalisation), fro: ||ΔW||_F, rel: ||ΔW||_F / ||W0||_F."""
    diff = current.detach().double().cpu() - original.detach().double().cpu()
    fro = float(diff.norm())
    base = float(original.double().norm())
    return {"dist": fro / original.numel(), "fro": fro, "rel": fro / base if base else float("inf")}


def edited_drift(adapter: ModelAdapter, original: EditedParams) -> dict[str, dict[str, float]]:
    """`layer_drift` of every edited weight of `original` against the live model: output maps by
    layer ("17"), input maps as "mlp_in.<layer>"."""
    out = {str(layer): layer_drift(w, adapter.get_mlp_out_weight(layer)) for layer, w in original.weights.items()}
    out.update({f"mlp_in.{layer}": layer_drift(w, adapter.get_weight("mlp_in", layer))
                for layer, w in original.in_weights.items()})
    return out
