"""The paper's balanced GLUE subsets (docs/protocol.md §8.5): SST-2, MRPC, CoLA and RTE, 100 examples per label.

The 200-example files the paper evaluated on are authoritative; :func:`load_glue_jsonl` reads their JSONL
form, :func:`load_glue_pickle` the paper's own ``glue_eval/dataset/<task>.pkl`` (a pickle of a list of dicts,
read without running anything it holds), and :func:`load_glue_file` either by its suffix.
:func:`build_paper_subsets` rebuilds them from the GLUE validation split with the paper's recipe.

Caveat when rebuilding: the paper's MRPC ``idx`` values (up to 4049) are row numbers in the original
MSRP train file, as the old script-based ``datasets`` GLUE loader numbered them; the parquet GLUE on the
Hub numbers validation rows 0..407. The rows and their order are the same, so the same examples are
drawn, but their ``idx`` differ.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editscale.errors import EditscaleError, RecordError, UnknownNameError

# Text fields per task; the order is the order of evaluation (sst2, mrpc, cola, rte) the paper used.
GLUE_TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "cola": ("sentence",),
    "rte": ("sentence1", "sentence2"),
}
PAPER_TASK_ORDER = ("sst2", "mrpc", "cola", "rte")
PAPER_GLUE_SEED = 37
PAPER_PER_LABEL = 100

# (path, name, split) -> rows with the GLUE columns; ``datasets.load_dataset`` fits this signature.
SplitLoader = Callable[..., Iterable[Mapping[str, Any]]]


@dataclass(frozen=True)
class GlueExample:
    idx: int  # row index in the GLUE split the example came from
    label: int
    sentence: str | None = None
    sentence1: str | None = None
    sentence2: str | None = None


def _check_task(task: str) -> tuple[str, ...]:
    if task not in GLUE_TASK_FIELDS:
        raise UnknownNameError(f"unknown GLUE task {task!r}; expected one of {sorted(GLUE_TASK_FIELDS)}")
    return GLUE_TASK_FIELDS[task]


def example_from_row(task: str, row: Any, *, source: str | None = None) -> GlueExample:
    """Build a :class:`GlueExample` from a GLUE row (dict with the task's text fields, ``label``, ``idx``).

    Only labels 0/1 are accepted: all four tasks are binary, and the test split's ``-1`` must not slip in.
    """
    fields = _check_task(task)

    def bad(msg: str, field: str | None) -> RecordError:
        return RecordError(msg, field=field, source=source)

    if not isinstance(row, Mapping):
        raise bad(f"expected a JSON object, got {type(row).__name__}", None)
    for name in ("idx", "label"):
        if name not in row or row[name] is None:
            raise bad("missing required field", name)
        v = row[name]
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(f"expected an integer, got {v!r}", name)
    if row["idx"] < 0:
        raise bad(f"expected a non-negative integer, got {row['idx']!r}", "idx")
    if row["label"] not in (0, 1):
        raise bad(f"expected label 0 or 1, got {row['label']!r}", "label")
    texts: dict[str, str] = {}
    for name in fields:
        if name not in row or row[name] is None:
            raise bad("missing required field", name)
        v = row[name]
        if not isinstance(v, str) or not v.strip():
            raise bad(f"expected a non-empty string, got {v!r}", name)
        texts[name] = v
    return GlueExample(idx=row["idx"], label=row["label"], **texts)


def _check_unique_idx(examples: Sequence[GlueExample], where: Callable[[int], str]) -> None:
    seen: dict[int, int] = {}
    for i, ex in enumerate(examples):
        if ex.idx in seen:
            raise RecordError(f"duplicate idx {ex.idx} (first at {where(seen[ex.idx])})", field="idx",
                              source=where(i))
        seen[ex.idx] = i


def load_glue_jsonl(task: str, path: str | os.PathLike[str]) -> list[GlueExample]:
    """Read a JSONL file of one GLUE task (one example per line, e.g. ``glue/sst2.jsonl``), in file order."""
    _check_task(task)
    examples: list[GlueExample] = []
    lines: list[int] = []
    try:
        with open(path, "rb") as fh:
            for lineno, raw_line in enumerate(fh, start=1):
                where = f"{path}, line {lineno}"
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RecordError(f"not UTF-8 text: {e.reason} at column {e.start + 1}", source=where) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"invalid JSON at column {e.colno}: {e.msg}", source=where) from None
                except RecursionError:
                    raise RecordError("JSON nested too deeply", source=where) from None
                examples.append(example_from_row(task, row, source=where))
                lines.append(lineno)
    except OSError as e:
        raise EditscaleError(f"cannot read {path}: {e.strerror or e}") from None
    if not examples:
        raise RecordError("holds no examples", source=str(path))
    _check_unique_idx(examples, lambda i: f"{path}, line {lines[i]}")
    return examples


class _Refused:
    """Stands in for a global (class or function) a pickle names: the name is never looked up, so nothing
    in the file runs. Calling it (REDUCE) or building it (BUILD) gives itself; the loader then names the
    record that holds it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> _Refused:
        return self

    def __setstate__(self, state: Any) -> None:
        pass


class _DataOnlyUnpickler(pickle.Unpickler):
    """Reads pickles of plain data (lists, dicts, str, int...): every global is refused. Extension codes
    (copyreg) end here too; persistent ids are refused by the base class."""

    def find_class(self, module: str, name: str) -> Any:
        return _Refused(f"{module}.{name}")


def _refused_in(obj: Any) -> _Refused | None:
    """The first refused global inside ``obj``; containers are walked once each (a pickle may hold cycles),
    without recursion (it may nest deeper than Python's recursion limit)."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if isinstance(item, _Refused):
            return item
        if isinstance(item, (list, tuple, dict, set, frozenset)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend([v for kv in item.items() for v in kv] if isinstance(item, dict) else item)
    return None


def _refusal(found: _Refused) -> str:
    return (f"holds the pickled global {found.name}, which is refused: only lists, dicts, strings and numbers "
            "are read (nothing in the file was run)")


def read_data_pickle(path: str | os.PathLike[str]) -> Any:
    """The plain data a pickle file holds, read with every global refused; errors name the file.

    A refused global is not an error here but a stand-in that :func:`load_glue_pickle` reports with the
    record holding it; any other use should check with :func:`_refused_in`."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise EditscaleError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return _DataOnlyUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways (EOF, bad opcodes, type errors)
        reason = str(e).splitlines()[0] if str(e).strip() else ""
        raise RecordError(f"not a readable pickle of plain data ({type(e).__name__}{': ' + reason if reason else ''})",
                          source=str(path)) from None


def load_glue_pickle(task: str, path: str | os.PathLike[str]) -> list[GlueExample]:
    """Read the paper's own subset file (scalable-model-editing/gradual-catastrophic-forgetting:
    ``glue_eval/dataset/<task>.pkl``): a pickle of a list of dicts with the keys of the JSONL form.

    The unpickler refuses every global, so a pickle that names a class or function (``os.system``) is an
    error naming the record that holds it, and nothing in it runs."""
    _check_task(task)
    raw = read_data_pickle(path)
    if isinstance(raw, _Refused):
        raise RecordError(_refusal(raw), source=str(path))
    if not isinstance(raw, (list, tuple)):
        raise RecordError(f"expected a pickled list of examples, got {type(raw).__name__}", source=str(path))
    examples: list[GlueExample] = []
    for i, row in enumerate(raw):
        found = _refused_in(row)
        if found is not None:
            field = None
            if isinstance(row, dict):
                field = next((str(k) for k, v in row.items() if _refused_in([k, v]) is not None), None)
            raise RecordError(_refusal(found), index=i, field=field, source=str(path))
        examples.append(example_from_row(task, row, source=f"{path}, record #{i}"))
    if not examples:
        raise RecordError("holds no examples", source=str(path))
    _check_unique_idx(examples, lambda i: f"{path}, record #{i}")
    return examples


GLUE_SUFFIXES = (".jsonl", ".pkl")


def load_glue_file(task: str, path: str | os.PathLike[str]) -> list[GlueExample]:
    """One task's subset from ``<task>.jsonl`` or the paper's ``<task>.pkl``, chosen by the suffix."""
    if Path(path).suffix.lower() == ".pkl":
        return load_glue_pickle(task, path)
    return load_glue_jsonl(task, path)


def find_glue_file(task: str, folder: str | os.PathLike[str]) -> Path:
    """``<task>.jsonl`` in ``folder``, else the paper's ``<task>.pkl``; an error naming both when neither is there."""
    _check_task(task)
    for suffix in GLUE_SUFFIXES:
        path = Path(folder) / f"{task}{suffix}"
        if path.is_file():
            return path
    raise EditscaleError(f"GLUE subset for {task} not found: expected {task}.jsonl or {task}.pkl in {folder}")


def offline_hint(task: str) -> str:
    return (f"pass --glue-dir DIR, a folder holding the paper's subsets as <task>.jsonl or the paper's <task>.pkl "
            f"({task}.jsonl or {task}.pkl here), or set EDITSCALE_GLUE_DIR")


def build_glue_subset(task: str, examples: Iterable[GlueExample], rng: random.Random,
                      per_label: int = PAPER_PER_LABEL) -> list[GlueExample]:
    """The paper's recipe (scalable-model-editing/gradual-catastrophic-forgetting:
    ``glue_eval/dataset/create_glue_subset.py``) for one task.

    Bucket the examples by label in dataset order, shuffle each bucket (in order of first label
    appearance), keep the first ``per_label`` of each, concatenate, shuffle. ``rng`` is advanced, so the
    caller decides whether tasks share one random stream (the paper's do).
    """
    _check_task(task)
    buckets: dict[int, list[GlueExample]] = {}
    for ex in examples:
        buckets.setdefault(ex.label, []).append(ex)
    if not buckets:
        raise EditscaleError(f"{task}: no examples to draw a subset from")
    short = {label: len(b) for label, b in buckets.items() if len(b) < per_label}
    if short:
        raise EditscaleError(f"{task}: fewer than {per_label} examples for label(s) {short}; the subset "
                             "would not be balanced")
    subset: list[GlueExample] = []
    for bucket in buckets.values():
        rng.shuffle(bucket)
        subset += bucket[:per_label]
    rng.shuffle(subset)
    return subset


def load_glue_from_datasets(task: str, split: str = "validation", loader: SplitLoader | None = None
                            ) -> list[GlueExample]:
    """A GLUE split through Hugging Face ``datasets`` (``load_dataset("glue", task, split=split)``), in
    dataset order. ``loader`` replaces ``datasets.load_dataset`` (tests, local mirrors)."""
    _check_task(task)
    if loader is None:
        try:
            from datasets import load_dataset
        except ImportError:
            raise EditscaleError(
                "loading GLUE from the Hub needs the optional 'datasets' package: "
                f"pip install 'editscale[online]'; or {offline_hint(task)}"
            ) from None
        loader = load_dataset
    try:
        rows = loader("glue", task, split=split)
    # Offline mode and an unreachable hub both end here: datasets raises ConnectionError, and
    # huggingface_hub's HTTP errors and datasets' DatasetNotFoundError are OSErrors too.
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EditscaleError(f"GLUE {task} could not be loaded from the Hugging Face hub ({reason}); "
                             f"{offline_hint(task)}") from err
    source = f"glue/{task}[{split}]"
    examples = [example_from_row(task, row, source=f"{source} row {i}") for i, row in enumerate(rows)]
    if not examples:
        raise EditscaleError(f"{source} is empty")
    _check_unique_idx(examples, lambda i: f"{source} row {i}")
    return examples


def build_paper_subsets(load_split: Callable[[str], Iterable[GlueExample]] | None = None,
                        seed: int = PAPER_GLUE_SEED, per_label: int = PAPER_PER_LABEL,
                        tasks: Sequence[str] = PAPER_TASK_ORDER) -> dict[str, list[GlueExample]]:
    """Rebuild all four subsets with ONE generator seeded once and carried across the tasks in order, as
    the paper's script did with ``random.seed(37)`` at the top. ``load_split(task)`` yields the
    validation examples in dataset order (default: :func:`load_glue_from_datasets`)."""
    load = load_split or load_glue_from_datasets
    rng = random.Random(seed)
    return {task: build_glue_subset(task, load(task), rng, per_label) for task in tasks}
