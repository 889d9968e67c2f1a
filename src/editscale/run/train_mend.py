"""`editscale train-mend`: train MEND's editor network for one model (methods/mend/train.py) on
records a run never edits, into the directory `--method mend` finds by default."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from editscale.data.registry import training_records
from editscale.data.sampling import load_sample_file
from editscale.methods.base import get_method, preset_mapping, preset_slug, resolve_method_config
from editscale.methods.mend.config import MendConfig, MendTrainConfig, train_defaults
from editscale.methods.mend.train import MendTrainer
from editscale.methods.mend.weights import default_weights_dir
from editscale.methods.solver.stats import model_fingerprint
from editscale.models.loading import load_model, model_depth, model_key
from editscale.run.runner import set_threads


def train_mend(model: str, *, dataset: str = "factworld-insert", data_path: str | None = None,
               exclude_sample: str | None = None, out: Path | None = None,
               method_given: dict[str, Any] | None = None, train_given: dict[str, Any] | None = None,
               device: str = "cpu", threads: int | None = None, progress: bool = True,
               log: Callable[[str], None] = print) -> tuple[Path, dict[str, float]]:
    """Train (or resume training) the network; returns its directory and the last validation row.

    Hyper-parameters: the method's preset for the model, then `method_given`; training settings: the
    reference's defaults, then training/<model>.yaml, then `train_given`. Without `out` the network
    goes where `--method mend` looks for it: `$EDITSCALE_CACHE/mend/<model>-<weight fingerprint>`.
    """
    set_threads(threads)
    key = model_key(model)
    depth = model_depth(model) if preset_mapping(get_method("mend"), key) is None else {}
    cfg = resolve_method_config("mend", key, method_given, **depth)
    assert isinstance(cfg, MendConfig)
    train = MendTrainConfig.parse({**train_defaults(preset_slug(key)), **(train_given or {})},
                                  source="MEND training config")
    lm = load_model(model, device=device)
    if out is None:
        out = default_weights_dir(preset_slug(key), model_fingerprint(lm.model))
    exclude = ({i for ids in load_sample_file(exclude_sample).values() for i in ids} if exclude_sample else None)
    records = training_records(dataset, train.records, data_path=data_path, exclude=exclude)
    log(f"training MEND for {key} on {len(records)} {dataset} training records "
        f"({', '.join(f'{r} {layer}' for r, layer in cfg.sites())}) into {out}")
    trainer = MendTrainer(lm.adapter, key, cfg, train, records, out)
    return out, trainer.run(progress=progress, say=log)
