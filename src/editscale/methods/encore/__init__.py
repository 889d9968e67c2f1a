"""ENCORE: MEMIT with most-probable early stopping and a norm-constrained update (Gupta et al. 2025,
arXiv 2502.01636), as its code computes it (docs/protocol.md §4.6)."""

from pathlib import Path

from editscale.methods.encore.config import EncoreConfig
from editscale.methods.encore.editor import EncoreEditor

EncoreEditor.presets_dir = Path(__file__).parent / "presets"

__all__ = ["EncoreConfig", "EncoreEditor"]
