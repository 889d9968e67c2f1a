"""ROME: rank-one model editing (Meng et al. 2022), as the paper's code computes it (docs/protocol.md §2)."""

from pathlib import Path

from editscale.methods.rome.config import RomeConfig
from editscale.methods.rome.editor import RomeEditor

RomeEditor.presets_dir = Path(__file__).parent / "presets"

__all__ = ["RomeConfig", "RomeEditor"]
