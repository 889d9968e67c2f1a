"""The dataset registry: a dataset's name -> a loader of its validated `EditRecord`s."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from editscale.data.records import EditRecord, NoopHandler, NoopRecordError, is_noop
from editscale.errors import EditscaleError, UnknownNameError

log = logging.getLogger(__name__)

# A loader gets the data path and the handler of no-op records (None: it raises on the first one).
Loader = Callable[[Path | None, NoopHandler | None], list[EditRecord]]


def _factworld(data_path: Path | None, on_noop: NoopHandler | None) -> list[EditRecord]:
    from editscale.data.factworld import default_world

    if data_path is not None:
        raise EditscaleError("the factworld dataset is generated from its seed; it takes no --data-path")
    return default_world().records


def _factworld_insert(data_path: Path | None, on_noop: NoopHandler | None) -> list[EditRecord]:
    from editscale.data.factworld import default_world
    from editscale.data.factworld.insert import insertion_records

    if data_path is not None:
        raise EditscaleError("the factworld-insert dataset is generated from its seed; it takes no --data-path")
    return insertion_records(default_world())


def _factworld_qa(data_path: Path | None, on_noop: NoopHandler | None) -> list[EditRecord]:
    from editscale.data.factworld import default_world
    from editscale.data.factworld.qa import qa_mend_records
    from editscale.data.zsre import parse_zsre

    if data_path is not None:
        raise EditscaleError("the factworld-qa dataset is generated from its seed; it takes no --data-path")
    return parse_zsre(qa_mend_records(default_world()), source="factworld-qa", on_noop=on_noop)


def _counterfact(data_path: Path | None, on_noop: NoopHandler | None) -> list[EditRecord]:
    from editscale.data.counterfact import load_counterfact

    # with no path the published file is downloaded once into the cache
    return load_counterfact(path=data_path, on_noop=on_noop)


def _zsre(data_path: Path | None, on_noop: NoopHandler | None) -> list[EditRecord]:
    from editscale.data.zsre import load_zsre

    if data_path is None:
        raise EditscaleError("zsre needs --data-path pointing at a MEND-format file (zsre_mend_eval.json)")
    return load_zsre(data_path, on_noop=on_noop)


# Loaders import their module when called: `editscale --help` need not build the fact world.
DATASETS: dict[str, Loader] = {
    "factworld": _factworld,
    "factworld-insert": _factworld_insert,
    "factworld-qa": _factworld_qa,
    "counterfact": _counterfact,
    "zsre": _zsre,
}

NOOP_IDS_SHOWN = 5
STRICT_HINT = "--strict refuses no-op records; without it they are skipped"


@dataclass(frozen=True)
class LoadedDataset:
    """A dataset's kept records, and the no-op records (target_new already true) that were skipped."""

    dataset: str
    source: str
    records: list[EditRecord]
    noops: list[NoopRecordError] = field(default_factory=list)

    def noop_line(self) -> str | None:
        """One line saying how many no-op records were skipped and which, or None when none were."""
        if not self.noops:
            return None
        ids = ", ".join(str(e.case_id) for e in self.noops[:NOOP_IDS_SHOWN])
        more = ", ..." if len(self.noops) > NOOP_IDS_SHOWN else ""
        return (f"skipped {len(self.noops)} no-op {self.dataset} record(s) of {self.source} whose new target is "
                f"already a true answer: case_id {ids}{more} (--strict refuses them)")

def _world_facts() -> list[EditRecord]:
    from editscale.data.factworld import default_world

    return default_world().records


# Datasets whose control facts come from elsewhere than their own unedited records: insertion
# facts are about subjects the model never saw, so the facts it knows are the world's.
CONTROL_POOLS: dict[str, Callable[[], list[EditRecord]]] = {"factworld-insert": _world_facts}


def control_pool(dataset: str, order: list[EditRecord], edits: int) -> list[EditRecord]:
    """Candidates for a run's never-edited control facts: the sample's records after the edited
    ones, or the dataset's own pool (`CONTROL_POOLS`)."""
    return CONTROL_POOLS[dataset]() if dataset in CONTROL_POOLS else order[edits:]


def records_by_id(dataset: str, records: list[EditRecord]) -> dict[int, EditRecord]:
    """A dataset's records and its control pool by case_id (a run's control.json names either)."""
    pool = CONTROL_POOLS[dataset]() if dataset in CONTROL_POOLS else []
    return {r.case_id: r for r in [*pool, *records]}


def load_dataset(dataset: str, *, data_path: Path | str | None = None, limit: int | None = None,
                 strict: bool = False) -> LoadedDataset:
    """Records of a named dataset, validated; ``limit`` keeps the first ones.

    A record that asks to edit a fact to the answer it already has (target_new equals target_true;
    for zsRE, ``alt`` is one of the true answers) is skipped and listed in ``noops``; with ``strict``
    it is an error naming the record instead."""
    if dataset not in DATASETS:
        raise UnknownNameError(f"unknown dataset '{dataset}'; known datasets: {', '.join(DATASETS)}")
    if data_path is not None and not Path(data_path).exists():
        raise EditscaleError(f"--data-path {data_path} does not exist")
    if limit is not None and limit < 0:
        raise EditscaleError(f"the number of records must be >= 0, got {limit}")
    noops: list[NoopRecordError] = []
    try:
        records = DATASETS[dataset](Path(data_path) if data_path is not None else None,
                                    None if strict else noops.append)
        # generated datasets are not validated by a loader: the same rule holds for them
        kept = []
        for i, rec in enumerate(records):
            if not is_noop(rec):
                kept.append(rec)
                continue
            err = NoopRecordError(f"target_new equals target_true ({rec.target_new!r}); nothing to edit",
                                  index=i, case_id=rec.case_id, field="target_new", source=dataset)
            if strict:
                raise err
            noops.append(err)
    except NoopRecordError as e:
        raise NoopRecordError(f"{e.detail} ({STRICT_HINT})", index=e.index, case_id=e.case_id, field=e.field,
                              source=e.source) from None
    source = str(data_path) if data_path is not None else f"the {dataset} dataset"
    return LoadedDataset(dataset, source, kept[:limit] if limit is not None else kept, noops)


def load_records(dataset: str, *, data_path: Path | str | None = None, limit: int | None = None,
                 strict: bool = False) -> list[EditRecord]:
    """Records of a named dataset, validated; ``limit`` keeps the first ones. No-op records are
    skipped with a warning that counts them (`load_dataset`), or refused with ``strict``."""
    loaded = load_dataset(dataset, data_path=data_path, limit=limit, strict=strict)
    line = loaded.noop_line()
    if line is not None:
        log.warning(line)
    return loaded.records


def training_records(dataset: str, n: int, *, data_path: Path | str | None = None,
                     exclude: set[int] | None = None) -> list[EditRecord]:
    """Up to `n` records for training an editor network (MEND) that a run of `dataset` never edits.

    The fact world's datasets have their own: insertion facts generated after the evaluation ones
    (`factworld.insert.training_records`). Other datasets have no training split: their records
    whose case_id is not in `exclude` (the evaluation sample) are used, in file order.
    """
    if dataset in ("factworld", "factworld-insert", "factworld-qa"):
        from editscale.data.factworld import default_world
        from editscale.data.factworld.insert import training_records as world_training

        return world_training(default_world(), n)
    excluded = exclude or set()
    kept = [r for r in load_records(dataset, data_path=data_path) if r.case_id not in excluded]
    if not kept:
        raise EditscaleError(f"no {dataset} records left to train on after excluding {len(excluded)} case ids")
    return kept[:n]
