"""RunConfig: every option of a run, in one place. The CLI's `run` options are generated from its
fields, a YAML file holds any of them (`editscale run --config run.yaml`), and a run writes the
resolved config with its seed and package versions to DIR/config.yaml."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from editscale.config_files import read_yaml_mapping, validate
from editscale.errors import EditscaleError


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("embedded", description="Preset name, hub name or local directory of the model to edit.")
    method: str = Field("rome", description="Editing method (see `editscale methods`).")
    dataset: str = Field("factworld", description="Dataset of the facts to edit: factworld, factworld-insert "
                                                   "(20,000 facts about new subjects), factworld-qa (the "
                                                   "world asked as zsRE questions), counterfact or zsre.")
    data_path: str | None = Field(None, description="Local dataset file (counterfact: else the published URL).")
    sample: int = Field(0, ge=0, description="Which shuffle of the unique subjects to edit, in order.")
    sample_file: str | None = Field(None, description="A sample-index file such as the paper's; else the "
                                                      "samples are built by the paper's recipe.")
    order: Literal["sample", "file"] = Field(
        "sample", description="sample: the records of --sample (or --sample-file), whose entries are case ids; "
                              "file: the first --edits records in file order.")
    skip_missing: bool = Field(False, description="Skip the case ids of the sample file that the dataset lacks, "
                                                  "with a count logged (default: an error naming them).")
    strict: bool = Field(False, description="Refuse a dataset with no-op records (target_new already the true "
                                            "answer) instead of skipping them with a count logged.")
    edits: int = Field(100, ge=1, description="Number of facts to edit.")
    batch_size: int = Field(1, ge=1, description="Facts per edit call (a sequence of batches when > 1).")
    eval_every: int = Field(10, ge=1, description="Forgetting and control facts every K edits.")
    checkpoint_every: int = Field(50, ge=1, description="Save the edited layers every C edits.")
    forgetting: Literal["paper", "probability"] = Field(
        "paper", description="Headline forgetting criterion: paper (greedy, sticky) or probability.")
    forgetting_sample: int | None = Field(
        None, ge=1, description="Re-test a fixed seeded subset of K edits (plus the last interval's) at each "
                                "forgetting checkpoint instead of all; the percentages are then over the subset.")
    control: int = Field(200, ge=0, description="Never-edited facts the model knew, scored with forgetting.")
    generation: Literal["off", "edits", "all"] = Field(
        "all", description="Generated answers judged against target_new, without teacher forcing "
                           "(docs/protocol.md §8.8): edits (after each edit), all (also at forgetting "
                           "checkpoints), off.")
    health: bool = Field(True, description="Loss on a fixed text and greedy continuations of fixed prompts "
                                           "at every forgetting checkpoint (health.jsonl).")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="stop or skip when an update is NaN/inf.")
    downstream: list[str] | None = Field(None, description="Downstream tasks, comma-separated; 'none' = off "
                                                           "(default: the model's four).")
    downstream_every: int = Field(10, ge=0, description="Downstream evaluation every K edits (0 = never).")
    downstream_mode: Literal["paper", "logprob"] = Field("paper", description="paper (greedy, parsed) or logprob.")
    downstream_n: int = Field(200, ge=2, description="Examples per downstream task.")
    glue_dir: str | None = Field(None, description="Folder of the paper's GLUE subsets (<task>.jsonl or "
                                                  "<task>.pkl).")
    seed: int = Field(0, description="Seed of the context templates.")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda:0.")
    dtype: str = Field("float32", description="Model dtype (edited matrices and solves stay fp32 or fp64).")
    device_map: str | None = Field(None, description="Place the model over GPUs, CPU and disk with accelerate "
                                                     "(then --device is ignored): auto, balanced, balanced_low_0, "
                                                     "sequential, or a JSON/YAML file of module name -> device.")
    max_memory: str | None = Field(None, description="Memory per device for --device-map, e.g. 0=20GiB,cpu=60GiB "
                                                     "or a JSON mapping.")
    offload_folder: str | None = Field(None, description="Folder for weights --device-map offloads to disk (needed "
                                                         "when the checkpoint is not safetensors).")
    templates: str | None = Field(None, description="Context templates to edit with: a JSON file of kind (rome, "
                                                    "memit) -> templates, e.g. another run's templates.json, or one "
                                                    "list (default: generated from the model with --seed).")
    stats: str | None = Field(None, description="Covariance statistics to edit with instead of the cache's: a file "
                                                "when the method edits one layer, else a folder of one per layer "
                                                "(this cache's .safetensors or the reference's layer_stats .npz).")
    stats_cache: str | None = Field(None, description="Covariance statistics cache directory "
                                                      "(default: $EDITSCALE_CACHE/stats).")
    stats_corpus: str | None = Field(None, description="Corpus of the covariance statistics, over the method's "
                                                       "mom2_dataset: factworld, wikitext, wikipedia, or a local "
                                                       ".txt/.jsonl/.parquet file or folder of them.")
    stats_samples: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, description="Documents of the covariance statistics, over the method's mom2_n_samples; 'auto' stops "
                          "when C has converged (docs/protocol.md §2.5.1).")
    mend_weights: str | None = Field(None, description="MEND's trained network: a directory written by "
                                                       "`editscale train-mend`, or a published mend-*.pt file "
                                                       "(default: train-mend's cache entry for the model).")
    numerics: Literal["default", "reference"] = Field(
        "default", description="reference: the reference code's linear algebra (ROME, r-ROME: its fp32 inverse "
                               "of C; MEMIT, ENCORE: already the same; other methods refuse it). "
                               "docs/protocol.md §10.15.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads of the run (default: the CPUs this "
                                                        "process may use); summary.json records the number used.")
    method_config: dict[str, Any] = Field(
        default_factory=dict, description="Method hyper-parameters over the method's preset for the model; "
                                          "a run's config.yaml holds the resolved set.")

    @classmethod
    def parse(cls, data: dict[str, Any], *, source: str) -> RunConfig:
        return validate(cls, data, source=source)

    def identity(self) -> dict[str, Any]:
        """The fields that make two runs the same run (what `--out` on an existing DIR must match).
        `generation` adds measurements and changes no edit or other score, so it is not one of them."""
        return self.model_dump(exclude={"device", "device_map", "max_memory", "offload_folder", "stats_cache",
                                        "threads", "generation"})


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
    """`cfg` with its method hyper-parameters resolved: the method's preset for the model (a model
    without one: the generic preset, docs/protocol.md §2.8.1), then `cfg.method_config` over it, then
    `stats_corpus` / `stats_samples` (methods without statistics ignore them), validated. Resolving a
    resolved config changes nothing."""
    # Imported here, not at the top: the CLI builds its options from RunConfig, and `editscale
    # --help` should not wait for torch and the models.
    from editscale.data.corpora import resolve_corpus
    from editscale.methods.base import get_method, list_methods, preset_mapping, resolve_method_config
    from editscale.models.loading import model_depth, model_key

    given, update = dict(cfg.method_config), {}
    method_cls = get_method(cfg.method)
    if "mom2_dataset" in method_cls.config_class.model_fields:
        if cfg.stats_corpus is not None:
            update["stats_corpus"] = given["mom2_dataset"] = resolve_corpus(cfg.stats_corpus)
        if cfg.stats_samples is not None:
            given["mom2_n_samples"] = cfg.stats_samples
    if cfg.stats is not None:
        if "mom2_dataset" not in method_cls.config_class.model_fields:
            raise EditscaleError(f"--stats is for methods that use covariance statistics, not {cfg.method}")
        if not Path(cfg.stats).exists():
            raise EditscaleError(f"--stats {cfg.stats} does not exist")
    if cfg.templates is not None:
        from editscale.methods.solver.templates import load_templates_file

        load_templates_file(cfg.templates)  # a bad file is refused before the model loads
    if cfg.mend_weights is not None:
        if "weights" not in method_cls.config_class.model_fields:
            raise EditscaleError(f"--mend-weights is for --method mend, not {cfg.method}")
        given["weights"] = cfg.mend_weights
    has_numerics = "numerics" in method_cls.config_class.model_fields
    if cfg.numerics == "reference" and not has_numerics:
        with_it = [m for m in list_methods() if "numerics" in get_method(m).config_class.model_fields]
        raise EditscaleError(f"--numerics reference is not defined for --method {cfg.method} "
                             f"(only for {', '.join(with_it)})")
    if has_numerics and (cfg.numerics == "reference" or "numerics" in cfg.model_fields_set):
        given["numerics"] = cfg.numerics  # given explicitly, `default` too: it overrides a method config file
    key = model_key(cfg.model)
    depth = model_depth(cfg.model) if preset_mapping(method_cls, key) is None else {}
    method_cfg = resolve_method_config(cfg.method, key, given, **depth)
    if has_numerics:  # a method config's own `numerics: reference` shows in the run's field too
        update["numerics"] = method_cfg.numerics
    return cfg.model_copy(update={**update, "method_config": method_cfg.model_dump(mode="json")})


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS keeps one (taskset, a batch
    scheduler or a container narrows it), else every CPU of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("editscale", "torch", "transformers", "tokenizers", "numpy", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def dump_config(cfg: RunConfig, *, inputs: dict[str, Any] | None = None) -> str:
    """config.yaml: the resolved options, the package versions and, once the editor is built, where
    its templates and statistics came from (`inputs`)."""
    doc: dict[str, Any] = {"run": cfg.model_dump(), "versions": versions()}
    if inputs is not None:
        doc["inputs"] = inputs
    return yaml.safe_dump(doc, sort_keys=False)


def read_config_file(path: Path | str) -> dict[str, Any]:
    """The RunConfig fields a YAML file sets: a mapping of fields, or a run's config.yaml."""
    doc = read_yaml_mapping(path, "run config")
    fields = doc["run"] if "run" in doc and isinstance(doc["run"], dict) else doc
    RunConfig.parse(fields, source=str(path))  # names the bad field and the file
    return fields


def load_config(path: Path) -> RunConfig:
    """A run directory's config.yaml."""
    return load_config_and_versions(path)[0]


def load_config_and_versions(path: Path) -> tuple[RunConfig, dict[str, str]]:
    """A run directory's config.yaml: the config and the package versions it was run with."""
    if not path.exists():
        raise EditscaleError(f"cannot read {path}: no such file")
    doc = read_yaml_mapping(path, "run config")
    if "run" not in doc:
        raise EditscaleError(f"{path} is not an editscale run config")
    fields = doc["run"]
    if isinstance(fields, dict) and "generation" not in fields:
        fields = {**fields, "generation": "off"}  # written before generated answers existed: resumes as it started
    cfg = RunConfig.parse(fields, source=str(path))
    return cfg.model_copy(update={"method_config": _complete(cfg, path)}), dict(doc.get("versions") or {})


def _complete(cfg: RunConfig, path: Path) -> dict[str, Any]:
    """A stored run's method hyper-parameters with every field its config class has now. A field
    added after the run was written takes its class default, the behaviour before the field
    existed, not a preset's value: so a run resumes as it started after editscale is upgraded."""
    from editscale.methods.base import get_method

    cls = get_method(cfg.method).config_class
    return cls.parse(cfg.method_config, source=f"{path} (method_config)").model_dump(mode="json")
