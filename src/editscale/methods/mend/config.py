"""MEND hyper-parameters (docs/protocol.md §6.2). `MendConfig` is what an edit run needs (which maps,
the network's shape, where its weights are); `MendTrainConfig` is how `editscale train-mend` trains
the network, with per-model defaults in training/<model>.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from editscale.config_files import read_yaml_mapping, validate
from editscale.methods.config import MethodConfig
from editscale.methods.solver.gradients import Site


class MendConfig(MethodConfig):
    # blocks whose MLP output map is edited, and blocks whose MLP input map is (MEND edits both maps
    # of the last three blocks)
    layers: list[int]
    in_layers: list[int] = Field(default_factory=list)
    # the order of the two maps of a block in the network's step sizes and modes: the reference's
    # gpt2-xl config lists c_proj (out) before c_fc (in), its GPT-J config fc_in before fc_out
    order: Literal["out_first", "in_first"] = "out_first"
    rank: int = Field(default=1920, ge=1)  # of the network's low-rank blocks
    n_hidden: int = Field(default=1, ge=0)  # blocks = n_hidden + 1
    # the trained network: a directory written by `editscale train-mend`, or a published mend-*.pt
    # file or a directory holding one; None: the cache entry train-mend writes for this model
    weights: str | None = None
    lr_scale: float = 1.0  # multiplies every learned step size, as the reference's baseline option
    chunk: int = Field(default=16, ge=1)  # requests per forward/backward pass of a batch

    @field_validator("layers")
    @classmethod
    def _some_layer(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"MEND needs one or more distinct layers, got {v}")
        return v

    def sites(self) -> list[Site]:
        """The edited maps in the network's order."""
        out: list[Site] = []
        for layer in sorted({*self.layers, *self.in_layers}):
            pair = [("mlp_out", layer)] if layer in self.layers else []
            if layer in self.in_layers:
                pair = [("mlp_in", layer), *pair] if self.order == "in_first" else [*pair, ("mlp_in", layer)]
            out.extend(pair)
        return out


class MendTrainConfig(BaseModel):
    """How the editor network is trained (the reference's `trainer.py` and `config/alg/mend.yaml`):
    each step edits `edits_per_step` training facts with the current network and minimises
    cedit · L_edit + cloc · L_loc, L_edit being the edited model's loss on a paraphrase of the fact and
    L_loc the KL divergence of its next-token distributions from the unedited model's on unrelated
    prompts."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=100_000, ge=1)  # optimiser steps (each over `accumulate` edits)
    lr: float = Field(default=1e-6, gt=0)  # Adam on the network
    lr_lr: float = Field(default=1e-4, gt=0)  # Adam on the step sizes α
    edit_lr: float = 1e-4  # α at initialisation
    cedit: float = Field(default=0.1, ge=0)
    cloc: float = Field(default=1.0, ge=0)
    accumulate: int = Field(default=10, ge=1)  # edits whose gradients make one step
    grad_clip: float = Field(default=100.0, gt=0)
    loc_prompts: int = Field(default=4, ge=1)  # unrelated prompts per edit for L_loc
    records: int = Field(default=10_000, ge=2)  # training facts drawn from the dataset's training records
    val_records: int = Field(default=100, ge=1)  # held out from those, for the validation line
    val_every: int = Field(default=200, ge=1)  # steps
    checkpoint_every: int = Field(default=100, ge=1)  # steps
    seed: int = 0

    @classmethod
    def parse(cls, data: dict[str, Any], *, source: str = "config") -> MendTrainConfig:
        return validate(cls, data, source=source)

    @model_validator(mode="after")
    def _val_fits(self) -> MendTrainConfig:
        if self.val_records >= self.records:
            raise ValueError(f"val_records ({self.val_records}) must be fewer than records ({self.records})")
        return self


TRAINING_DIR = Path(__file__).parent / "training"


def train_defaults(model_slug: str) -> dict[str, Any]:
    """The training preset for a model (training/<slug>.yaml), or {} for the reference's defaults."""
    path = TRAINING_DIR / f"{model_slug}.yaml"
    return read_yaml_mapping(path, "MEND training preset") if path.exists() else {}
