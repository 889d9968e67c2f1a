"""RunConfig: everything that determines a run, resolved and written to DIR/config.yaml."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from editscale.errors import EditscaleError


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "embedded"
    method: str = "rome"
    dataset: str = "factworld"
    data_path: str | None = None
    sample: int = Field(0, ge=0, description="which of the paper-style shuffles of the unique subjects to edit")
    sample_file: str | None = Field(None, description="a sample-index file such as the paper's; else built")
    edits: int = Field(100, ge=1)
    batch_size: int = Field(1, ge=1, description="facts per edit call; a run is a sequence of batches")
    eval_every: int = Field(10, ge=1, description="forgetting checkpoint interval, in edits")
    checkpoint_every: int = Field(50, ge=1, description="edited-layer checkpoint interval, in edits")
    forgetting: Literal["paper", "probability"] = "paper"  # which criterion summary.json headlines
    control: int = Field(200, ge=0, description="never-edited facts the model knew, scored at checkpoints")
    on_nonfinite: Literal["stop", "skip"] = "stop"
    downstream: list[str] | None = Field(None, description="downstream tasks; None = the model's default set")
    downstream_every: int = Field(10, ge=0, description="downstream evaluation every K edits; 0 = never")
    downstream_mode: Literal["paper", "logprob"] = "paper"
    downstream_n: int = Field(200, ge=2, description="examples per downstream task")
    glue_dir: str | None = Field(None, description="folder of the paper's GLUE subsets (<task>.jsonl)")
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    stats_cache: str | None = None
    method_config: dict[str, Any] = Field(default_factory=dict, description="resolved method hyper-parameters")

    @classmethod
    def parse(cls, data: dict[str, Any], *, source: str) -> RunConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
            raise EditscaleError(f"{source}: invalid run config: {problems}") from err

    def identity(self) -> dict[str, Any]:
        """The fields that make two runs the same run (what `--out` on an existing DIR must match)."""
        return self.model_dump(exclude={"device", "stats_cache"})


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("editscale", "torch", "transformers", "tokenizers", "numpy", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def dump_config(cfg: RunConfig) -> str:
    doc = {"run": cfg.model_dump(), "versions": versions()}
    return yaml.safe_dump(doc, sort_keys=False)


def load_config(path: Path) -> RunConfig:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise EditscaleError(f"cannot read {path}: {err}") from err
    if not isinstance(doc, dict) or "run" not in doc:
        raise EditscaleError(f"{path} is not an editscale run config")
    return RunConfig.parse(doc["run"], source=str(path))
