"""Few-shot prompt formats of the paper's four downstream tasks (paper tables 4-7, spec section 9.7).

A task prompt is a run of demonstration blocks followed by the query; a block is the query with
its answer word and a blank line. Keeping the format as data lets the GLUE tasks and the
embedded model's skill tasks share one definition, and lets a user add a task without code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


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


SST2_FORMAT = FewShotFormat(
    name="sst2",
    query="Review : {sentence}\nSentiment :",
    marker="Sentiment :",
    label_words={1: "positive", 0: "negative"},
    parse_order=(("positive", 1), ("negative", 0)),
)
MRPC_FORMAT = FewShotFormat(
    name="mrpc",
    query="Are the sentences paraphrases of each other.\nSentence 1: {sentence1}\nSentence 2: {sentence2}\n"
          "Answer:",
    marker="Answer:",
    label_words={1: "Yes", 0: "No"},
    parse_order=(("Yes", 1), ("No", 0)),
)
COLA_FORMAT = FewShotFormat(
    name="cola",
    query="Is this sentence linguistically acceptable?\nSentence : {sentence}\nAnswer :",
    marker="Answer :",
    label_words={1: "Yes", 0: "No"},
    parse_order=(("Yes", 1), ("No", 0)),
)
# The paper's RTE parser tests "False" first, then "True". Which gold label "True" stands for is a
# property of the task (GLUE RTE's is inverted in the paper's code, spec pitfall 15), not the format.
RTE_FORMAT = FewShotFormat(
    name="rte",
    query="{sentence1}\nquestion: {sentence2} True or False?\nanswer:",
    marker="answer:",
    label_words={1: "True", 0: "False"},
    parse_order=(("False", 0), ("True", 1)),
)

FORMATS: dict[str, FewShotFormat] = {f.name: f for f in (SST2_FORMAT, MRPC_FORMAT, COLA_FORMAT, RTE_FORMAT)}
