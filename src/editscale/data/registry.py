"""The dataset registry: a dataset's name -> a loader of its validated `EditRecord`s."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from editscale.data.records import EditRecord
from editscale.errors import EditscaleError, UnknownNameError


def _factworld(data_path: Path | None) -> list[EditRecord]:
    from editscale.data.factworld import default_world

    if data_path is not None:
        raise EditscaleError("the factworld dataset is generated from its seed; it takes no --data-path")
    return default_world().records


def _counterfact(data_path: Path | None) -> list[EditRecord]:
    from editscale.data.counterfact import load_counterfact

    # with no path the published file is downloaded once into the cache
    return load_counterfact(path=data_path)


def _zsre(data_path: Path | None) -> list[EditRecord]:
    from editscale.data.zsre import load_zsre

    if data_path is None:
        raise EditscaleError("zsre needs --data-path pointing at a MEND-format file (zsre_mend_eval.json)")
    return load_zsre(data_path)


# Loaders import their module when called: `editscale --help` need not build the fact world.
DATASETS: dict[str, Callable[[Path | None], list[EditRecord]]] = {
    "factworld": _factworld,
    "counterfact": _counterfact,
    "zsre": _zsre,
}


def load_records(dataset: str, *, data_path: Path | str | None = None, limit: int | None = None
                 ) -> list[EditRecord]:
    """Records of a named dataset, validated; ``limit`` keeps the first ones."""
    if dataset not in DATASETS:
        raise UnknownNameError(f"unknown dataset '{dataset}'; known datasets: {', '.join(DATASETS)}")
    if data_path is not None and not Path(data_path).exists():
        raise EditscaleError(f"--data-path {data_path} does not exist")
    if limit is not None and limit < 0:
        raise EditscaleError(f"the number of records must be >= 0, got {limit}")
    records = DATASETS[dataset](Path(data_path) if data_path is not None else None)
    return records[:limit] if limit is not None else records
