"""The downstream task registry: one YAML file per task in `data/tasks/`, or in a user's own folder.

A task file gives the few-shot format (query template, answer marker, label words, the order the
paper's parser tests them), the fixed demonstrations, where the examples come from, and, for
GLUE RTE, the gold-label mapping the paper's code gets wrong. Adding a task is adding a file:

    name: mytask
    source: {kind: jsonl, path: /data/mytask.jsonl}     # or {kind: glue, task: sst2}
    format: {query: "Review : {sentence}\\nSentiment :", marker: "Sentiment :",
             label_words: {1: positive, 0: negative}, parse_order: [[positive, 1], [negative, 0]]}
    demos: [{fields: {sentence: great fun}, label: 1}, {fields: {sentence: dull}, label: 0}]

`format: {like: sst2}` borrows another task's format (the embedded skills borrow GLUE's).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from editscale.config_files import read_yaml_mapping
from editscale.data.factworld import default_world
from editscale.data.factworld.skills import SKILL_TASKS, skill_eval_set
from editscale.data.fewshot import TASKS_DIR, Example, FewShotFormat, format_from_spec
from editscale.data.glue import GLUE_TASK_FIELDS, build_paper_subsets, find_glue_file, load_glue_file
from editscale.errors import EditscaleError, RecordError, UnknownNameError


@dataclass(frozen=True)
class DownstreamTask:
    name: str
    description: str
    source: Mapping[str, Any]
    fmt: FewShotFormat
    demos: tuple[Example, ...] = ()
    gold_to_label: Mapping[int, int] = field(default_factory=dict)  # the fix applied in logprob mode
    path: str = ""

    def examples(self, *, n: int = 200, data_dir: Path | str | None = None, seed: int = 1234
                 ) -> tuple[tuple[Example, ...], list[Example]]:
        """(demos, examples) of the task; GLUE gold labels as GLUE has them (mapping is the caller's)."""
        kind = self.source.get("kind")
        if kind == "factworld":
            return _factworld_examples(self.source["skill"], n, seed)
        if kind == "glue":
            return self.demos, _glue_examples(self.source["task"], n, data_dir)
        if kind == "jsonl":
            return self.demos, _jsonl_examples(Path(self.source["path"]), self.fmt, n)
        raise EditscaleError(f"{self.path}: unknown task source kind {kind!r} (factworld, glue or jsonl)")


def _factworld_examples(skill: str, n: int, seed: int) -> tuple[tuple[Example, ...], list[Example]]:

    if n < 2 or n % 2:
        raise EditscaleError(f"the number of examples must be an even number >= 2 (balanced labels), got {n}")
    es = skill_eval_set(SKILL_TASKS[skill], default_world().reserved_names, n=n, seed=seed)
    return es.demos, list(es.examples)


def default_glue_dir() -> Path | None:
    """Where the paper's GLUE subsets are looked for: $EDITSCALE_GLUE_DIR, else none (use `datasets`)."""
    env = os.environ.get("EDITSCALE_GLUE_DIR")
    return Path(env) if env else None


def _glue_examples(task: str, n: int, data_dir: Path | str | None) -> list[Example]:

    data_dir = data_dir or default_glue_dir()
    if data_dir is not None:
        # <task>.jsonl, or the paper's own <task>.pkl (read with every pickled global refused)
        subset = load_glue_file(task, find_glue_file(task, data_dir))
    else:
        subset = build_paper_subsets()[task]  # online: rebuilt from the validation split, seed 37
    fields = GLUE_TASK_FIELDS[task]
    return [({f: getattr(ex, f) for f in fields}, ex.label) for ex in subset[:n]]


def _jsonl_examples(path: Path, fmt: FewShotFormat, n: int) -> list[Example]:
    if not path.exists():
        raise EditscaleError(f"task examples file {path} not found")
    out: list[Example] = []

    def bad(msg: str, i: int, field: str | None = None) -> RecordError:
        return RecordError(msg, index=i, field=field, source=str(path))

    with open(path, "rb") as f:
        for i, raw_line in enumerate(f):
            try:
                line = raw_line.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
            except UnicodeDecodeError as err:
                raise bad(f"not UTF-8 text ({err.reason})", i) from None
            except json.JSONDecodeError as err:
                raise bad(f"invalid JSON at column {err.colno}: {err.msg}", i) from None
            except RecursionError:
                raise bad("JSON nested too deeply", i) from None
            if not isinstance(row, dict):
                raise bad(f"expected a JSON object, got {type(row).__name__}", i)
            label = row.get("label")
            if isinstance(label, bool) or not isinstance(label, int) or label not in fmt.label_words:
                raise bad(f"label must be one of {sorted(fmt.label_words)}, got {label!r}", i, "label")
            fields = {}
            for k, v in row.items():
                if k == "label":
                    continue
                if isinstance(v, (dict, list)):
                    raise bad(f"expected a text, got {type(v).__name__}", i, k)
                fields[k] = str(v)
            out.append((fields, label))
    return out[:n]


def _parse_format(spec: Mapping[str, Any], where: str, known: Mapping[str, DownstreamTask]) -> FewShotFormat:
    if "like" in spec:
        like = spec["like"]
        if not isinstance(like, str) or like not in known:
            raise EditscaleError(f"{where}: format borrows from unknown task {like!r}")
        return known[like].fmt
    try:
        return format_from_spec(str(spec.get("name", "")), spec)
    except ValueError as err:
        raise EditscaleError(f"{where}: format: {err}") from err


SOURCE_KEYS = {"factworld": "skill", "glue": "task", "jsonl": "path"}


def _check_source(source: Any, where: str) -> Mapping[str, Any]:
    kinds = ", ".join(SOURCE_KEYS)
    if not isinstance(source, Mapping) or not isinstance(source.get("kind"), str) or source["kind"] not in SOURCE_KEYS:
        kind = source.get("kind") if isinstance(source, Mapping) else source
        raise EditscaleError(f"{where}: source: the kind must be one of {kinds}, got {kind!r}")
    key = SOURCE_KEYS[source["kind"]]
    value = source.get(key)
    allowed = {"factworld": SKILL_TASKS, "glue": GLUE_TASK_FIELDS}.get(source["kind"])
    if not isinstance(value, str) or not value.strip() or (allowed is not None and value not in allowed):
        choice = f"one of {', '.join(sorted(allowed))}" if allowed is not None else "a file path"
        raise EditscaleError(f"{where}: source.{key}: expected {choice}, got {value!r}")
    return source


def _task_label(value: Any, where: str) -> int:
    if not isinstance(value, bool) and isinstance(value, (int, str)):
        try:
            return int(value)
        except ValueError:
            pass
    raise EditscaleError(f"{where}: expected an integer label, got {value!r}")


def _demos(doc: Mapping[str, Any], fmt: FewShotFormat, where: str) -> tuple[Example, ...]:
    demos = doc.get("demos") or []
    if not isinstance(demos, list):
        raise EditscaleError(f"{where}: demos: expected a list, got {type(demos).__name__}")
    out = []
    for i, d in enumerate(demos):
        fields = d.get("fields") if isinstance(d, Mapping) else None
        if not isinstance(fields, Mapping) or any(isinstance(v, (Mapping, list)) for v in fields.values()):
            raise EditscaleError(f"{where}: demos[{i}].fields: expected a mapping of field names to texts")
        label = _task_label(d.get("label"), f"{where}: demos[{i}].label")
        if label not in fmt.label_words:
            raise EditscaleError(f"{where}: demos[{i}].label: {label} has no label word "
                                 f"(label_words has {sorted(fmt.label_words)})")
        out.append(({str(k): str(v) for k, v in fields.items()}, label))
    return tuple(out)


def load_task_file(path: Path, known: Mapping[str, DownstreamTask] | None = None) -> DownstreamTask:
    where = str(path)
    doc = read_yaml_mapping(path, "task file")
    if "name" not in doc or "format" not in doc or "source" not in doc:
        raise EditscaleError(f"{path}: a task file needs name, source and format")
    name, description = doc["name"], doc.get("description") or ""
    if not isinstance(name, str) or not name.strip():
        raise EditscaleError(f"{path}: name: expected a non-empty string, got {name!r}")
    if not isinstance(description, str):
        raise EditscaleError(f"{path}: description: expected a string, got {description!r}")
    if not isinstance(doc["format"], Mapping):
        raise EditscaleError(f"{path}: format: expected a mapping, got {type(doc['format']).__name__}")
    source = _check_source(doc["source"], where)
    fmt = _parse_format({"name": name, **doc["format"]}, where, known or {})
    gold = doc.get("gold_to_label") or {}
    if not isinstance(gold, Mapping):
        raise EditscaleError(f"{path}: gold_to_label: expected a mapping of gold labels to labels")
    gold_to_label = {_task_label(k, f"{path}: gold_to_label"): _task_label(v, f"{path}: gold_to_label[{k!r}]")
                     for k, v in gold.items()}
    return DownstreamTask(name=name, description=description, source=source, fmt=fmt,
                          demos=_demos(doc, fmt, where), gold_to_label=gold_to_label, path=where)


def _load_dir(folder: Path, known: dict[str, DownstreamTask]) -> dict[str, DownstreamTask]:
    # files that borrow a format ("like") are read after the ones they borrow from
    files = sorted(folder.glob("*.yaml"), key=lambda p: (b"like:" in p.read_bytes(), p.name))
    for path in files:
        task = load_task_file(path, known)
        known[task.name] = task
    return known


@cache
def builtin_tasks() -> dict[str, DownstreamTask]:
    return _load_dir(TASKS_DIR, {})


def task_registry(extra_dirs: Sequence[Path | str] = ()) -> dict[str, DownstreamTask]:
    """Built-in tasks plus the task files in `extra_dirs` and $EDITSCALE_TASKS (path-separated)."""
    tasks = dict(builtin_tasks())
    dirs = list(extra_dirs) + [d for d in os.environ.get("EDITSCALE_TASKS", "").split(os.pathsep) if d]
    for d in dirs:
        _load_dir(Path(d), tasks)
    return tasks


def get_tasks(names: Sequence[str], extra_dirs: Sequence[Path | str] = ()) -> list[DownstreamTask]:
    tasks = task_registry(extra_dirs)
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise UnknownNameError(f"unknown downstream task(s) {', '.join(unknown)}; known: {', '.join(sorted(tasks))}")
    return [tasks[n] for n in names]
