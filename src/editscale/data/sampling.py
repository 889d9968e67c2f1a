"""The paper's edit-order samples (docs/protocol.md §9.1; scalable-model-editing/gradual-catastrophic-forgetting:
``select_unique_subjects.py`` + ``create_samples.py``).

The paper's indices are **list positions** into the full dataset, where they equal ``case_id`` (CounterFact's
``counterfact.json`` or the three EasyEdit splits merged by ``case_id``; zsRE's MEND file, whose case_id is the
position). A run (:func:`edit_order`) therefore reads every sample as case ids, which holds for any file of
the dataset; :func:`select_sample` offers both readings and checks positions by default.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from editscale.data.records import EditRecord, read_json
from editscale.errors import EditscaleError, RecordError

log = logging.getLogger(__name__)

PAPER_SEED = 37
PAPER_N_SAMPLES = 10


def unique_subject_indices(records_or_subjects: Iterable[EditRecord | str]) -> list[int]:
    """Positions of the first record for each distinct ``subject.lower()``, in list order."""
    seen: set[str] = set()
    out: list[int] = []
    for i, item in enumerate(records_or_subjects):
        subject = item if isinstance(item, str) else item.subject
        key = subject.lower()
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def make_samples(indices: Iterable[int], n_samples: int = PAPER_N_SAMPLES, seed: int = PAPER_SEED
                 ) -> dict[str, list[int]]:
    """Seed once, then shuffle the same list in place ``n_samples`` times, keeping a copy after each.

    The shuffles are cumulative (each continues from the previous order and RNG state), exactly as the paper's
    ``create_samples.py`` does with ``random.seed(37)``; a private ``random.Random`` gives the same stream
    without touching the global one.
    """
    rng = random.Random(seed)
    order = list(indices)
    samples: dict[str, list[int]] = {}
    for n in range(n_samples):
        rng.shuffle(order)
        samples[str(n)] = list(order)
    return samples


def validate_samples(samples: Any, *, source: str | None = None) -> dict[str, list[int]]:
    """Check a ``{"0": [int, ...], ...}`` mapping: string keys, lists of distinct non-negative ints."""
    if not isinstance(samples, Mapping):
        raise RecordError(f"expected a JSON object of samples, got {type(samples).__name__}", source=source)
    if not samples:
        raise RecordError("holds no samples", source=source)
    out: dict[str, list[int]] = {}
    for key, idx in samples.items():
        field = f'sample "{key}"' if isinstance(key, str) and key.isprintable() else f"sample {key!r}"
        if not isinstance(key, str):
            raise RecordError(f"sample keys must be strings, got {key!r}", field=field, source=source)
        if not isinstance(idx, list):
            raise RecordError(f"expected a list of indices, got {type(idx).__name__}", field=field,
                              source=source)
        seen: dict[int, int] = {}
        for j, v in enumerate(idx):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise RecordError(f"entry {j} is not a non-negative integer: {v!r}", field=field,
                                  source=source)
            if v in seen:
                raise RecordError(f"index {v} appears twice (entries {seen[v]} and {j})", field=field,
                                  source=source)
            seen[v] = j
        out[key] = list(idx)
    return out


def load_sample_file(path: str | os.PathLike[str]) -> dict[str, list[int]]:
    """Read a sample file such as ``counterfact_sampled_unique_10_20391.json`` (validated)."""
    return validate_samples(read_json(path), source=str(path))


def load_selection_flags(path: str | os.PathLike[str]) -> list[int]:
    """Read a ``{"<case_id>": bool}`` selection file (scalable-model-editing/rebuilding-rome:
    ``data/disabling_edits_counterfact.json``); return the
    selected ids in ascending order."""
    raw = read_json(path)
    src = str(path)
    if not isinstance(raw, Mapping):
        raise RecordError(f"expected a JSON object, got {type(raw).__name__}", source=src)
    out = []
    for key, flag in raw.items():
        if not key.isdecimal() or len(key) > 18:
            raise RecordError(f"keys must be integer case_ids, got {key!r}", field=key if key.isprintable() else None,
                              source=src)
        if not isinstance(flag, bool):
            raise RecordError(f"expected true or false, got {flag!r}", case_id=key, source=src)
        if flag:
            out.append(int(key))
    return sorted(out)


def select_sample(
    records: Sequence[EditRecord],
    samples: Mapping[str, Sequence[int]],
    sample: str | int = "0",
    n: int | None = None,
    *,
    by: Literal["position", "case_id"] = "position",
    missing: Literal["error", "skip"] = "error",
    allow_repeated_subjects: bool = False,
) -> list[EditRecord]:
    """The records of ``samples[sample][:n]``, in sample order.

    ``by="position"`` (the paper's semantics) reads ``records[i]`` and checks that its ``case_id`` is ``i``,
    so a partial dataset cannot silently stand in for the full one. ``by="case_id"`` looks records up by
    id instead; with ``missing="skip"`` ids the dataset lacks are dropped (e.g. the 500-record subset holds
    only some of a sample's edits). Unless ``allow_repeated_subjects``, a subject (case-insensitive) edited
    twice in the selection is an error: the paper's samples never do that.
    """
    key = str(sample)
    if key not in samples:
        raise EditscaleError(f"no sample {key!r}; the file has {sorted(samples)}")
    order = list(samples[key])
    if n is not None:
        if n < 0:
            raise EditscaleError(f"n must be >= 0, got {n}")
        if n > len(order):
            raise EditscaleError(f"asked for {n} edits but sample {key!r} holds only {len(order)}")
        order = order[:n]

    chosen: list[EditRecord] = []
    if by == "position":
        for j, i in enumerate(order):
            if not 0 <= i < len(records):
                raise EditscaleError(f"sample {key!r} entry {j} is index {i}, outside the dataset's "
                                     f"{len(records)} records (is this the full dataset?)")
            rec = records[i]
            if rec.case_id != i:
                raise RecordError(
                    f"sample {key!r} entry {j} selects position {i}, whose case_id differs; sample indices "
                    "are positions in the full dataset (use by='case_id' for a partial one)",
                    index=i, case_id=rec.case_id, field="case_id",
                )
            chosen.append(rec)
    elif by == "case_id":
        by_id = {r.case_id: r for r in records}
        for j, i in enumerate(order):
            if i in by_id:
                chosen.append(by_id[i])
            elif missing == "error":
                raise EditscaleError(f"sample {key!r} entry {j} is case_id {i}, which the dataset lacks "
                                     "(pass missing='skip' to drop such entries)")
    else:
        raise EditscaleError(f"by must be 'position' or 'case_id', got {by!r}")

    if not allow_repeated_subjects:
        first: dict[str, int] = {}
        for rec in chosen:
            s = rec.subject.lower()
            if s in first:
                raise RecordError(f"subject {rec.subject!r} is edited twice in sample {key!r} (also "
                                  f"case_id={first[s]})", case_id=rec.case_id, field="subject")
            first[s] = rec.case_id
    return chosen


MISSING_IDS_SHOWN = 5


def edit_order(records: Sequence[EditRecord], *, sample: int, edits: int, sample_file: str | None = None,
               dataset: str = "the dataset", data_path: str | os.PathLike[str] | None = None,
               order: Literal["sample", "file"] = "sample", skip_missing: bool = False) -> list[EditRecord]:
    """A run's records in edit order; a run edits the first `edits` and draws control facts from the rest.

    `order="sample"`: sample `sample` of a sample file, or of the paper's recipe rebuilt over `records`
    (unique subjects, seed 37, cumulative shuffles). Either way a sample names **case ids**, never list
    positions, so a partial file or one whose case ids are not its positions (the ROME-schema subset, one
    EasyEdit split, zsRE after no-op records were skipped) selects exactly the records the sample names.
    Ids the dataset lacks are an error naming how many and which, or with `skip_missing` are dropped
    (logged). `order="file"`: the records as the file holds them, no sample.
    """
    if data_path is not None:
        dataset = f"{dataset} ({data_path})"
    if order == "file":
        if sample_file:
            raise EditscaleError(f"--order file edits the first records of the dataset in file order; it takes "
                                 f"no --sample-file (got {sample_file}); use --order sample")
        if sample:
            raise EditscaleError(f"--order file edits the first records of the dataset in file order; it takes "
                                 f"no --sample (got {sample}); use --order sample")
        if edits > len(records):
            raise EditscaleError(f"--edits {edits} is more than the {len(records)} records of {dataset}")
        return list(records)
    if order != "sample":
        raise EditscaleError(f"--order must be sample or file, got {order!r}")
    if sample_file:
        samples = load_sample_file(sample_file)
    else:
        # the recipe's positions are into `records`: turned into case ids here, so that every sample
        # (built or read from a file) means the same thing
        unique = unique_subject_indices(records)
        samples = {k: [records[i].case_id for i in v]
                   for k, v in make_samples(unique, n_samples=sample + 1).items()}
    key = str(sample)
    where = sample_file or "the recipe's samples"
    if key not in samples:
        held = sorted(samples, key=lambda k: (len(k), k))  # "2" before "10"
        shown = ", ".join(k if k.isprintable() else repr(k) for k in held)
        raise EditscaleError(f"{where}: no sample {key}; the file holds {shown}")
    wanted = samples[key]
    if edits > len(wanted):
        raise EditscaleError(f"--edits {edits} is more than sample {key} holds ({len(wanted)} records of {dataset})")
    present = {r.case_id for r in records}
    missing = [i for i in wanted if i not in present]
    if missing:
        shown = ", ".join(map(str, missing[:MISSING_IDS_SHOWN])) + (", ..." if len(missing) > MISSING_IDS_SHOWN else "")
        what = f"{len(missing)} of the {len(wanted)} case ids of sample {key} of {where}"
        if not skip_missing:
            raise EditscaleError(f"{what} are not in {dataset}: {shown}; sample files name case ids (pass "
                                 "--skip-missing to edit only the records the dataset holds)")
        log.warning(f"--skip-missing: skipped {what}, which {dataset} lacks: {shown}")
    chosen = select_sample(records, {key: wanted}, key, None, by="case_id", missing="skip")
    if edits > len(chosen):
        raise EditscaleError(f"--edits {edits} is more than the {len(chosen)} records of sample {key} of {where} "
                             f"that {dataset} holds ({len(missing)} of its case ids skipped)")
    return chosen
