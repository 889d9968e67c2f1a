"""UltraEdit: training-, subject- and memory-free lifelong editing (Gu et al. 2025, arXiv 2505.14679),
a closed-form update per batch from each edited module's inputs and output gradients
(docs/protocol.md §6.1)."""

from pathlib import Path

from editscale.methods.ultraedit.config import UltraEditConfig
from editscale.methods.ultraedit.editor import UltraEditEditor

UltraEditEditor.presets_dir = Path(__file__).parent / "presets"

__all__ = ["UltraEditConfig", "UltraEditEditor"]
