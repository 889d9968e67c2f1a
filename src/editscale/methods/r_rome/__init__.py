"""r-ROME: ROME with consistent keys (Gupta et al. 2024, docs/protocol.md §3)."""

from pathlib import Path

from editscale.methods.r_rome.config import RRomeConfig
from editscale.methods.r_rome.editor import RRomeEditor

RRomeEditor.presets_dir = Path(__file__).parent / "presets"

__all__ = ["RRomeConfig", "RRomeEditor"]
