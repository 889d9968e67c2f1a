"""r-ROME hyper-parameters (docs/protocol.md §3): ROME's, with the key-consistency fix as the default key mode."""

from __future__ import annotations

from typing import Literal

from editscale.methods.rome.config import RomeConfig


class RRomeConfig(RomeConfig):
    # r-ROME's two modes (docs/protocol.md §3, table). "original" is excluded: that is plain ROME, and the
    # `r-rome` name in a run's config must mean the fix really ran. r-ROME's JSONs leave the flags
    # unset, so the dataclass default (random-prefix keys) is what the r-ROME paper measured.
    key_mode: Literal["random_prefix", "prompt"] = "random_prefix"  # type: ignore[assignment]
