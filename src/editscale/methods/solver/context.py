"""EditContext: the inputs that make two edits comparable, held explicitly instead of in globals.

The reference keeps context templates, inverse covariances and statistics in process-global caches
(docs/protocol.md §10.16). Here one EditContext object owns them for a run: templates are seeded and can
be passed in; statistics can be passed in per layer or are computed through the on-disk cache;
factorisations of C (or its inverse, for `numerics: reference`) are cached on the object, so a second
run in the same process starts clean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editscale.errors import EditscaleError
from editscale.methods.config import Numerics, TargetConfig
from editscale.methods.solver import stats as stats_mod
from editscale.methods.solver.anchor import reference_norm
from editscale.methods.solver.templates import DEFAULT_LENGTH_PARAMS, generate_context_templates
from editscale.models.adapter import ModelAdapter


@dataclass
class EditContext:
    model_name: str  # the base model's id: statistics are cached under it
    seed: int = 0
    # context templates by kind ("rome", "memit"); a missing kind is generated on first use, seeded
    templates: dict[str, list[str]] = field(default_factory=dict)
    mom2: dict[int, torch.Tensor] = field(default_factory=dict)  # explicit C per layer
    stats_cache_dir: Path | None = None
    progress: bool = True
    # NAS reference norms by "<site> layer <l>" (solver/anchor.py); a missing one is taken on first
    # use, from `sample_requests()`: (prompt, subject, target) of the run's dataset records, which
    # methods that take statistics from a sample of requests draw from (UltraEdit's warm start too)
    anchor_norms: dict[str, float] = field(default_factory=dict)
    sample_requests: Callable[[], Sequence[tuple[str, str, str]]] | None = field(default=None, repr=False)
    _cholesky: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _inverse: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # numerics "reference"
    _cond: dict[int, float] = field(default_factory=dict, repr=False)

    def context_templates(self, adapter: ModelAdapter,
                          length_params: Sequence[Sequence[int]] = DEFAULT_LENGTH_PARAMS) -> list[str]:
        """ROME's templates (docs/protocol.md §2.2)."""
        return self.template_set("rome", lambda: generate_context_templates(adapter, length_params, seed=self.seed))

    def template_set(self, kind: str, make: Callable[[], list[str]]) -> list[str]:
        # Generated once and then fixed: the runner calls Editor.prepare() on the unedited model.
        if kind not in self.templates:
            self.templates[kind] = make()
        return self.templates[kind]

    def anchor_norm(self, adapter: ModelAdapter, layer: int, *, site: str, samples: int, trim: float,
                    **target_options: Any) -> float:
        """The NAS reference norm for a layer: given, or taken once (the runner calls Editor.prepare()
        on the unedited model) from `sample_requests`."""
        key = f"{site} layer {layer}"
        if key not in self.anchor_norms:
            if self.sample_requests is None:
                raise EditscaleError("norm_anchor needs records to take its reference norm from: give the "
                                     "EditContext sample_requests (a run passes its dataset's) or anchor_norms")
            self.anchor_norms[key] = reference_norm(adapter, layer, self.sample_requests(), site=site,
                                                    samples=samples, trim=trim, seed=self.seed, **target_options)
        return self.anchor_norms[key]

    def anchor_options(self, adapter: ModelAdapter, cfg: TargetConfig, layer: int, site: str) -> dict[str, Any]:
        """`optimize_targets` keyword arguments for NAS at a layer: none when `cfg.norm_anchor` is off."""
        if not cfg.norm_anchor:
            return {}
        norm = self.anchor_norm(adapter, layer, site=site, **cfg.anchor_options(), **cfg.target_options())
        return {"anchor": norm, "anchor_outlier": cfg.norm_anchor_outlier}

    def second_moment(self, adapter: ModelAdapter, layer: int, *, corpus: str, n_samples: int,
                      dtype: str) -> torch.Tensor:
        if layer not in self.mom2:
            self.mom2[layer] = stats_mod.second_moment(
                adapter, layer, model_name=self.model_name, corpus=corpus, n_samples=n_samples, dtype=dtype,
                cache_dir=self.stats_cache_dir, progress=self.progress)
        return self.mom2[layer]

    def solve_mom2(self, adapter: ModelAdapter, layer: int, rhs: torch.Tensor, *, corpus: str, n_samples: int,
                   dtype: str, numerics: Numerics = "default") -> torch.Tensor:
        """C⁻¹ rhs. "default": in fp64 by a cached Cholesky factor (solve, not inverse: docs/protocol.md
        §10.15), returned in fp64. "reference": as kmeng01/rome `rome/compute_u.py` computes ROME's u, by
        `torch.inverse` of C as held (in `mom2_dtype`), cast to fp32, cached per layer, times the fp32
        rhs, returned in fp32 (docs/protocol.md §10.15)."""
        if numerics == "reference":
            inv = self._inverse_mom2(adapter, layer, corpus=corpus, n_samples=n_samples, dtype=dtype)
            out = inv @ rhs.float().reshape(inv.shape[0], -1).to(inv.device)
            return out.reshape(rhs.shape).cpu()
        if numerics != "default":
            raise EditscaleError(f"unknown numerics '{numerics}': default or reference")
        if layer not in self._cholesky:
            c = self.second_moment(adapter, layer, corpus=corpus, n_samples=n_samples, dtype=dtype).double()
            self._cholesky[layer] = torch.linalg.cholesky(c)
            self._cond[layer] = stats_mod.condition_number(c)
        chol = self._cholesky[layer]
        out = torch.cholesky_solve(rhs.double().reshape(chol.shape[0], -1).cpu(), chol)
        return out.reshape(rhs.shape)

    def _inverse_mom2(self, adapter: ModelAdapter, layer: int, *, corpus: str, n_samples: int,
                      dtype: str) -> torch.Tensor:
        """The reference's C⁻¹ (kmeng01/rome `rome/compute_u.py: get_inv_cov`): `torch.inverse` of the
        statistics in the dtype they are held in, then cast to fp32; computed once per layer, on the device
        the model runs on, as the reference inverts where its model is (the GPU)."""
        if layer not in self._inverse:
            c = self.second_moment(adapter, layer, corpus=corpus, n_samples=n_samples, dtype=dtype)
            self._inverse[layer] = torch.inverse(c.to(adapter.device)).float()
            self._cond.setdefault(layer, stats_mod.condition_number(c))
        return self._inverse[layer]

    def mom2_condition(self, layer: int) -> float:
        return self._cond.get(layer, float("nan"))
