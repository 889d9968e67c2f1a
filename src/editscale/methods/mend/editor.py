"""MEND's edit (docs/protocol.md §6.2): one forward and backward pass of the edit loss, the trained
network turns each edited map's gradient factors into an update of rank at most the number of
positions with a gradient, applied to the MLP input and output maps of the chosen blocks."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from editscale.errors import EditscaleError
from editscale.methods.base import Editor, EditRequest, EditResult, preset_slug, register
from editscale.methods.config import MethodConfig
from editscale.methods.mend.config import MendConfig
from editscale.methods.mend.network import MendNetwork
from editscale.methods.mend.weights import default_weights_dir, load_network
from editscale.methods.solver.gradients import trace_edit_loss
from editscale.methods.solver.stats import model_fingerprint
from editscale.models.adapter import ModelAdapter

log = logging.getLogger(__name__)


@register
class MendEditor(Editor):
    name = "mend"
    config_class = MendConfig
    config: MendConfig

    summary = "a trained hyper-network maps the edit's gradient to a low-rank update (Mitchell et al. 2022)"

    def __init__(self, adapter: ModelAdapter, config: MethodConfig, context: Any) -> None:
        super().__init__(adapter, config, context)
        for layer in self.config.in_layers:
            if not 0 <= layer < adapter.n_layers:
                raise EditscaleError(f"mend: in_layer {layer} is outside the model's 0..{adapter.n_layers - 1}")
        self.network: MendNetwork | None = None
        self.weights_meta: dict[str, Any] = {}

    @property
    def in_layers(self) -> list[int]:
        return list(self.config.in_layers)

    def weights_path(self) -> Path:
        """The network this editor loads: the config's `weights`, else train-mend's cache entry for
        this model (found by the unedited weights' fingerprint, so prepare() must see the base model)."""
        if self.config.weights:
            return Path(self.config.weights).expanduser()
        path = default_weights_dir(preset_slug(self.context.model_name), model_fingerprint(self.adapter.model))
        if not path.exists():
            raise EditscaleError(f"mend needs a trained network for {self.context.model_name}: run "
                                 f"`editscale train-mend --model {self.context.model_name}` or pass --mend-weights DIR")
        return path

    def prepare(self) -> None:
        path = self.weights_path()
        self.network, self.weights_meta = load_network(self.adapter, self.config, path)
        meta = self.weights_meta
        if meta.get("complete") is False:
            where = f"{meta.get('steps_done')} of {meta.get('steps_planned')} steps"
            if not self.config.weights:  # found in the cache, not chosen: a training still under way
                raise EditscaleError(f"the MEND network for {self.context.model_name} in {path} is still training "
                                     f"({where}); let `editscale train-mend` finish, or pass --mend-weights {path} "
                                     "to edit with it as it is")
            log.warning("editing with the MEND network in %s as it is: trained %s", path, where)
        self.network.eval()  # the input statistics stay as trained

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        if not requests:
            raise EditscaleError(f"{self.name}: no requests to edit")
        self.ensure_prepared()
        assert self.network is not None
        cfg = self.config
        t0 = time.perf_counter()
        total: dict[tuple[str, int], torch.Tensor] = {}
        rows = 0
        t_trace = 0.0
        with torch.no_grad():
            for start in range(0, len(requests), cfg.chunk):
                t = time.perf_counter()
                with torch.enable_grad():
                    trace = trace_edit_loss(self.adapter, self.network.sites, requests[start:start + cfg.chunk])
                t_trace += time.perf_counter() - t
                factors = self.network.factors(trace)
                rows += int(factors[self.network.sites[0]][0].shape[0])
                for site, delta in self.network.deltas_from(factors, cfg.lr_scale).items():
                    total[site] = total[site] + delta if site in total else delta
        deltas = {layer: d.float() for (role, layer), d in total.items() if role == "mlp_out"}
        in_deltas = {layer: d.float() for (role, layer), d in total.items() if role == "mlp_in"}
        norms = {f"update_norm_{role}{layer}": float(d.norm()) for (role, layer), d in total.items()}
        diagnostics = {"rows": float(rows), "update_norm": sum(v**2 for v in norms.values()) ** 0.5, **norms}
        return EditResult(deltas, diagnostics, {"gradients": t_trace, "update": time.perf_counter() - t0 - t_trace},
                          in_deltas=in_deltas)
