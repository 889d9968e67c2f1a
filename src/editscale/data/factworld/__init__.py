"""The embedded default: an invented fact world, its skill tasks, and the model trained on them."""

from __future__ import annotations

from pathlib import Path

from editscale.data.factworld.world import FactWorld, generate_world

# The shipped model was trained on the world of this seed; `embedded` records come from it.
DEFAULT_WORLD_SEED = 0
DEFAULT_N_SUBJECTS = 1800


def checkpoint_dir() -> Path:
    """The directory of the shipped embedded checkpoint (inside the installed package)."""
    return Path(__file__).resolve().parent / "checkpoint"


def default_world() -> FactWorld:
    return generate_world(DEFAULT_WORLD_SEED, DEFAULT_N_SUBJECTS)


__all__ = ["FactWorld", "checkpoint_dir", "default_world", "generate_world"]
