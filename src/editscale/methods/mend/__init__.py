"""MEND: model editor networks with gradient decomposition (Mitchell et al. 2022, arXiv 2110.11309),
trained per model by `editscale train-mend` (docs/protocol.md §6.2)."""

from pathlib import Path

from editscale.methods.mend.config import MendConfig, MendTrainConfig
from editscale.methods.mend.editor import MendEditor

MendEditor.presets_dir = Path(__file__).parent / "presets"

__all__ = ["MendConfig", "MendEditor", "MendTrainConfig"]
