"""The invented fact world of the embedded default model, and its skill tasks (pure generators).

The model trained on them, its trainer and its card live in `editscale.embedded`.
"""

from __future__ import annotations

from editscale.data.factworld.world import FactWorld, generate_world

# The shipped model was trained on the world of this seed; `embedded` records come from it.
DEFAULT_WORLD_SEED = 0
DEFAULT_N_SUBJECTS = 1800


def default_world() -> FactWorld:
    return generate_world(DEFAULT_WORLD_SEED, DEFAULT_N_SUBJECTS)


__all__ = ["FactWorld", "default_world", "generate_world"]
