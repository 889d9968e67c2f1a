"""EMMET: equality-constrained mass model editing (Gupta et al. 2024), as its code computes it
(scalable-model-editing/unified-model-editing; docs/protocol.md §5)."""

from pathlib import Path

from editscale.methods.emmet.config import EmmetConfig
from editscale.methods.emmet.editor import EmmetEditor

EmmetEditor.presets_dir = Path(__file__).parent / "presets"

__all__ = ["EmmetConfig", "EmmetEditor"]
