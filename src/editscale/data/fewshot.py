"""Few-shot prompt formats of the paper's four downstream tasks (paper tables 4-7, docs/protocol.md §8.5).

A task prompt is a run of demonstration blocks followed by the query; a block is the query with
its answer word and a blank line. Keeping the format as data lets the GLUE tasks and the
embedded model's skill tasks share one definition, and lets a user add a task without code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Example = tuple[Mapping[str, str], int]  # (fields, gold label)
TASKS_DIR = Path(__file__).parent / "tasks"  # the built-in task files (eval.downstream.registry reads them)


@dataclass(frozen=True)
class FewShotFormat:
    name: str
    query: str  # str.format template over the example's fields, ending in the answer marker
    marker: str  # the answer marker; the prediction is read after its last occurrence
    label_words: Mapping[int, str]  # gold label -> the word a demonstration is answered with
    parse_order: tuple[tuple[str, int], ...]  # substrings tested in this order -> predicted label

    def render_query(self, fields: Mapping[str, str]) -> str:
        return self.query.format(**fields)

    def render_block(self, fields: Mapping[str, str], label: int) -> str:
        return f"{self.render_query(fields)} {self.label_words[label]}\n\n"

    def render_prompt(self, demos: Sequence[tuple[Mapping[str, str], int]], fields: Mapping[str, str]) -> str:
        return "".join(self.render_block(f, y) for f, y in demos) + self.render_query(fields)

    def parse(self, generated: str) -> int:
        """Read a prediction from decoded text as the paper's code does; -1 means invalid."""
        answer = generated.split(self.marker)[-1].strip()
        for word, label in self.parse_order:
            if word in answer:
                return label
        return -1


def format_from_spec(name: str, spec: Mapping[str, Any]) -> FewShotFormat:
    """A format from its task-file form: query, marker, label_words, parse_order."""
    words = list(spec["label_words"].values()) + [w for w, _ in spec["parse_order"]]
    if any(isinstance(w, bool) for w in words):
        # YAML 1.1 reads yes/no/true/false unquoted as booleans
        raise ValueError("a label word was read as a boolean: quote yes/no/true/false in the task file")
    return FewShotFormat(name=name, query=spec["query"], marker=spec["marker"],
                         label_words={int(k): str(v) for k, v in spec["label_words"].items()},
                         parse_order=tuple((str(w), int(y)) for w, y in spec["parse_order"]))


def _builtin_format(name: str) -> FewShotFormat:
    # The paper's strings live once, in the task files (tasks/<name>.yaml), not here as well.
    doc = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())
    return format_from_spec(name, doc["format"])


SST2_FORMAT = _builtin_format("sst2")
MRPC_FORMAT = _builtin_format("mrpc")
COLA_FORMAT = _builtin_format("cola")
# The paper's RTE parser tests "False" first, then "True". Which gold label "True" stands for is a
# property of the task (GLUE RTE's is inverted in the paper's code, docs/protocol.md §10.12), not the format.
RTE_FORMAT = _builtin_format("rte")

FORMATS: dict[str, FewShotFormat] = {f.name: f for f in (SST2_FORMAT, MRPC_FORMAT, COLA_FORMAT, RTE_FORMAT)}
