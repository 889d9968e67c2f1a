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

import yaml

from editscale.data.factworld import default_world
from editscale.data.factworld.skills import SKILL_TASKS, skill_eval_set
from editscale.data.fewshot import TASKS_DIR, Example, FewShotFormat, format_from_spec
from editscale.data.glue import GLUE_TASK_FIELDS, build_paper_subsets, load_glue_jsonl
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
        path = Path(data_dir) / f"{task}.jsonl"
        if not path.exists():
            raise EditscaleError(f"GLUE subset {path} not found (expected {task}.jsonl in {data_dir})")
        subset = load_glue_jsonl(task, path)
    else:
        subset = build_paper_subsets()[task]  # online: rebuilt from the validation split, seed 37
    fields = GLUE_TASK_FIELDS[task]
    return [({f: getattr(ex, f) for f in fields}, ex.label) for ex in subset[:n]]


def _jsonl_examples(path: Path, fmt: FewShotFormat, n: int) -> list[Example]:
    if not path.exists():
        raise EditscaleError(f"task examples file {path} not found")
    out: list[Example] = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if "label" not in row or row["label"] not in fmt.label_words:
                raise RecordError(f"label must be one of {sorted(fmt.label_words)}", index=i, field="label",
                                  source=str(path))
            out.append(({k: str(v) for k, v in row.items() if k != "label"}, int(row["label"])))
    return out[:n]


def _parse_format(spec: Mapping[str, Any], where: str, known: Mapping[str, DownstreamTask]) -> FewShotFormat:
    if "like" in spec:
        if spec["like"] not in known:
            raise EditscaleError(f"{where}: format borrows from unknown task {spec['like']!r}")
        return known[spec["like"]].fmt
    try:
        return format_from_spec(str(spec.get("name", "")), spec)
    except (KeyError, TypeError, ValueError) as err:
        raise EditscaleError(f"{where}: format needs query, marker, label_words and parse_order ({err})") from err


def load_task_file(path: Path, known: Mapping[str, DownstreamTask] | None = None) -> DownstreamTask:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise EditscaleError(f"cannot read task file {path}: {err}") from err
    if not isinstance(doc, dict) or "name" not in doc or "format" not in doc or "source" not in doc:
        raise EditscaleError(f"{path}: a task file needs name, source and format")
    fmt = _parse_format({"name": doc["name"], **doc["format"]}, str(path), known or {})
    demos = tuple((dict(d["fields"]), int(d["label"])) for d in doc.get("demos", []))
    gold_to_label = {int(k): int(v) for k, v in (doc.get("gold_to_label") or {}).items()}
    return DownstreamTask(name=doc["name"], description=doc.get("description", ""), source=doc["source"], fmt=fmt,
                          demos=demos, gold_to_label=gold_to_label, path=str(path))


def _load_dir(folder: Path, known: dict[str, DownstreamTask]) -> dict[str, DownstreamTask]:
    # files that borrow a format ("like") are read after the ones they borrow from
    files = sorted(folder.glob("*.yaml"), key=lambda p: ("like:" in p.read_text(), p.name))
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
