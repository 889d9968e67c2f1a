"""AlphaEdit: null-space constrained knowledge editing (Fang et al. 2025), as its code computes it
(docs/protocol.md §6)."""

from pathlib import Path

from editscale.methods.alphaedit.config import AlphaEditConfig
from editscale.methods.alphaedit.editor import AlphaEditEditor

AlphaEditEditor.presets_dir = Path(__file__).parent / "presets"

__all__ = ["AlphaEditConfig", "AlphaEditEditor"]
