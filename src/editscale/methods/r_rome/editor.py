"""r-ROME (Gupta et al. 2024, docs/protocol.md §3): ROME anchored on the template-averaged key everywhere.

    ΔW = (v* − W k̄ − b) (C⁻¹ k̄)ᵀ / ((C⁻¹ k̄)ᵀ k̄)            key_mode "random_prefix" (the default)

The denominator k̄ᵀC⁻¹k̄/‖C⁻¹k̄‖ is positive for SPD C, which is what removes the disabling edits.
All of the maths is RomeEditor's (it switches on `key_mode`); this class only changes the name,
the config class and the presets.
"""

from __future__ import annotations

from editscale.methods.base import register
from editscale.methods.r_rome.config import RRomeConfig
from editscale.methods.rome.editor import RomeEditor


@register
class RRomeEditor(RomeEditor):
    name = "r-rome"
    config_class = RRomeConfig
    config: RRomeConfig

    summary = "ROME with the key-consistency fix (Gupta et al. 2024): k̄ in direction, denominator and residual"
