"""Few-shot prompt formats of the paper's four downstream tasks (paper tables 4-7, docs/protocol.md §8.5).

A task prompt is a run of demonstration blocks followed by the query; a block is the query with
its answer word and a blank line. Keeping the format as data lets the GLUE tasks and the
embedded model's skill tasks share one definition, and lets a user add a task without code.
"""

from __future__ import annotations

import string
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


def _label(value: Any, what: str) -> int:
    """A gold label: an integer, or a string of one (YAML keys may be either); never a boolean."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what}: expected an integer label, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what}: expected an integer label, got {value!r}") from None


def _word(value: Any, what: str) -> str:
    if isinstance(value, bool):
        # YAML 1.1 reads yes/no/true/false unquoted as booleans
        raise ValueError("a label word was read as a boolean: quote yes/no/true/false in the task file")
    if not isinstance(value, (str, int, float)) or not str(value).strip():
        raise ValueError(f"{what}: expected a non-empty word, got {value!r}")
    return str(value)


def format_from_spec(name: str, spec: Mapping[str, Any]) -> FewShotFormat:
    """A format from its task-file form: query, marker, label_words, parse_order. A ValueError names
    the key that is missing or malformed."""
    for key in ("query", "marker", "label_words", "parse_order"):
        if key not in spec:
            raise ValueError(f"missing {key} (a format needs query, marker, label_words and parse_order)")
    for key in ("query", "marker"):
        if not isinstance(spec[key], str) or not spec[key].strip():
            raise ValueError(f"{key}: expected a non-empty string, got {spec[key]!r}")
    try:
        list(string.Formatter().parse(spec["query"]))
    except ValueError as err:
        raise ValueError(f"query: not a valid template ({err}): {spec['query']!r}") from None
    words, order = spec["label_words"], spec["parse_order"]
    if not isinstance(words, Mapping) or not words:
        raise ValueError(f"label_words: expected a mapping of labels to words, got {words!r}")
    if not isinstance(order, list) or not order:
        raise ValueError(f"parse_order: expected a list of [word, label] pairs, got {order!r}")
    label_words = {_label(k, "label_words"): _word(v, f"label_words[{k!r}]") for k, v in words.items()}
    pairs = []
    for i, pair in enumerate(order):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"parse_order[{i}]: expected a [word, label] pair, got {pair!r}")
        pairs.append((_word(pair[0], f"parse_order[{i}]"), _label(pair[1], f"parse_order[{i}]")))
    return FewShotFormat(name=name, query=spec["query"], marker=spec["marker"], label_words=label_words,
                         parse_order=tuple(pairs))


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
