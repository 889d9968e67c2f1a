"""The embedded default model: a small GPT-2 trained on the invented fact world (data/factworld).

This package owns what belongs to that model rather than to its data: the trainer (`train.py`,
`editscale train-embedded`), the model card and installing a checkpoint (`card.py`), and the
shipped weights (`checkpoint/`, loaded by `load_model("embedded")`).
"""

from __future__ import annotations

from pathlib import Path

from editscale.models.loading import embedded_checkpoint_dir


def checkpoint_dir() -> Path:
    """The directory of the shipped embedded checkpoint (inside the installed package)."""
    return embedded_checkpoint_dir()


__all__ = ["checkpoint_dir"]
