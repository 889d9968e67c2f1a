"""FT-C: constrained fine-tuning baseline (Zhu et al. 2020, as the ROME/MEMIT code runs it; docs/protocol.md §7)."""

from pathlib import Path

from editscale.methods.ft_c.config import FtcConfig
from editscale.methods.ft_c.editor import FtcEditor

FtcEditor.presets_dir = Path(__file__).parent / "presets"

__all__ = ["FtcConfig", "FtcEditor"]
