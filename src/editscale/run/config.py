"""RunConfig: every option of a run, in one place. The CLI's `run` options are generated from its
fields, a YAML file holds any of them (`editscale run --config run.yaml`), and a run writes the
resolved config with its seed and package versions to DIR/config.yaml."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from editscale.config_files import read_yaml_mapping, validate
from editscale.errors import EditscaleError


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("embedded", description="Preset name, hub name or local directory of the model to edit.")
    method: str = Field("rome", description="Editing method (see `editscale methods`).")
    dataset: str = Field("factworld", description="Dataset of the facts to edit: factworld, counterfact or zsre.")
    data_path: str | None = Field(None, description="Local dataset file (counterfact: else the published URL).")
    sample: int = Field(0, ge=0, description="Which shuffle of the unique subjects to edit, in order.")
    sample_file: str | None = Field(None, description="A sample-index file such as the paper's; else the "
                                                      "samples are built by the paper's recipe.")
    edits: int = Field(100, ge=1, description="Number of facts to edit.")
    batch_size: int = Field(1, ge=1, description="Facts per edit call (a sequence of batches when > 1).")
    eval_every: int = Field(10, ge=1, description="Forgetting and control facts every K edits.")
    checkpoint_every: int = Field(50, ge=1, description="Save the edited layers every C edits.")
    forgetting: Literal["paper", "probability"] = Field(
        "paper", description="Headline forgetting criterion: paper (greedy, sticky) or probability.")
    control: int = Field(200, ge=0, description="Never-edited facts the model knew, scored with forgetting.")
    health: bool = Field(True, description="Loss on a fixed text and greedy continuations of fixed prompts "
                                           "at every forgetting checkpoint (health.jsonl).")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="stop or skip when an update is NaN/inf.")
    downstream: list[str] | None = Field(None, description="Downstream tasks, comma-separated; 'none' = off "
                                                           "(default: the model's four).")
    downstream_every: int = Field(10, ge=0, description="Downstream evaluation every K edits (0 = never).")
    downstream_mode: Literal["paper", "logprob"] = Field("paper", description="paper (greedy, parsed) or logprob.")
    downstream_n: int = Field(200, ge=2, description="Examples per downstream task.")
    glue_dir: str | None = Field(None, description="Folder of the paper's GLUE subsets (<task>.jsonl).")
    seed: int = Field(0, description="Seed of the context templates.")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda:0.")
    dtype: str = Field("float32", description="Model dtype (edited matrices and solves stay fp32 or fp64).")
    stats_cache: str | None = Field(None, description="Covariance statistics cache directory "
                                                      "(default: $EDITSCALE_CACHE/stats).")
    method_config: dict[str, Any] = Field(
        default_factory=dict, description="Method hyper-parameters over the method's preset for the model; "
                                          "a run's config.yaml holds the resolved set.")

    @classmethod
    def parse(cls, data: dict[str, Any], *, source: str) -> RunConfig:
        return validate(cls, data, source=source)

    def identity(self) -> dict[str, Any]:
        """The fields that make two runs the same run (what `--out` on an existing DIR must match)."""
        return self.model_dump(exclude={"device", "stats_cache"})


class RetestRule(BaseModel):
    """When `editscale retest` calls a single update disabling (run/retest.py): any one of these."""

    model_config = ConfigDict(extra="forbid")

    control_floor: float = Field(0.5, ge=0, le=1, description="Disabling when control-fact recall falls "
                                                              "below this share of the unedited model's.")
    nll_rise: float = Field(1.0, gt=0, description="Disabling when the loss on the fixed text rises by this "
                                                   "many nats per token or more.")
    f1_floor: float = Field(0.5, ge=0, le=1, description="Disabling when the mean downstream F1 falls below "
                                                         "this share of the unedited model's.")


def resolve_config(cfg: RunConfig) -> RunConfig:
    """`cfg` with its method hyper-parameters resolved: the method's preset for the model, then
    `cfg.method_config` over it, validated. Resolving a resolved config changes nothing."""
    # Imported here, not at the top: the CLI builds its options from RunConfig, and `editscale
    # --help` should not wait for torch and the models.
    from editscale.methods.base import resolve_method_config
    from editscale.models.loading import model_key

    method_cfg = resolve_method_config(cfg.method, model_key(cfg.model), cfg.method_config)
    return cfg.model_copy(update={"method_config": method_cfg.model_dump(mode="json")})


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


def read_config_file(path: Path | str) -> dict[str, Any]:
    """The RunConfig fields a YAML file sets: a mapping of fields, or a run's config.yaml."""
    doc = read_yaml_mapping(path, "run config")
    fields = doc["run"] if "run" in doc and isinstance(doc["run"], dict) else doc
    RunConfig.parse(fields, source=str(path))  # names the bad field and the file
    return fields


def load_config(path: Path) -> RunConfig:
    """A run directory's config.yaml."""
    if not path.exists():
        raise EditscaleError(f"cannot read {path}: no such file")
    doc = read_yaml_mapping(path, "run config")
    if "run" not in doc:
        raise EditscaleError(f"{path} is not an editscale run config")
    return RunConfig.parse(doc["run"], source=str(path))
