"""UltraEdit hyper-parameters (docs/protocol.md §6.1); per-model defaults live in presets/<model>.yaml."""

from __future__ import annotations

from pydantic import Field

from editscale.methods.config import MethodConfig


class UltraEditConfig(MethodConfig):
    # the blocks whose MLP output projection is edited (editscale's edit surface; UltraEdit's GPT-J
    # configuration edits the same module, fc_out, of blocks 18-26)
    layers: list[int]
    lr: float = Field(default=1e-6, gt=0)  # η in v = −η ‖k̂‖² ĝ
    ridge: float = Field(default=1.0, gt=0)  # the solve's identity term, fixed to 1 in the reference
    chunk: int = Field(default=10, ge=1)  # requests per forward/backward (the reference's mini-batch)
    # Requests whose features start the normaliser before the first edit (0: none, as the reference).
    # Without them a run's first single edit is standardised by its own 1-3 rows and writes ~nothing.
    warm_start: int = Field(default=0, ge=0)
