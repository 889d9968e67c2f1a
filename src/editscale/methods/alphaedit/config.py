"""AlphaEdit hyper-parameters (docs/protocol.md §6); per-model published defaults live in presets/<model>.yaml.

There is no mom2_update_weight: the reference's JSON carries one, but its solve ignores it.
"""

from __future__ import annotations

from typing import Literal

from editscale.methods.solver.spread import SpreadConfig


class AlphaEditConfig(SpreadConfig):
    # eigen-directions of the unscaled C with a value below this span the projector's null space
    nullspace_threshold: float = 2e-2
    L2: float = 10.0  # ridge of the solve (named as in the reference)
    # The reference solves in float32 on the GPU; float64 is offered for tight checks (docs/protocol.md §10.15).
    solve_dtype: Literal["float32", "float64"] = "float32"
