"""MEMIT: mass-editing memory in a transformer (Meng et al. 2023), as the paper's code computes it
(docs/protocol.md §4)."""

from pathlib import Path

from editscale.methods.memit.config import MemitConfig
from editscale.methods.memit.editor import MemitEditor

MemitEditor.presets_dir = Path(__file__).parent / "presets"

__all__ = ["MemitConfig", "MemitEditor"]
