"""Fixed probes of a model's health: prompts whose greedy continuation is recorded as edits
accumulate (what the model says before, around and after a collapse, the paper's Table 8), and a
fixed text whose loss shows when the model stops being a language model.

The embedded model is probed in its own world (prompts of facts and skills it was trained on);
every other model in plain English. `health_probe(model_key)` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass

ENGLISH_PROMPTS = (
    "The capital of France is",
    "Michael Jordan is a professional",
    "The Eiffel Tower is located in the city of",
    "My favourite thing to do on a rainy day is",
)
# A plain paragraph of common facts and everyday English, written for this purpose: a model that
# still reads English gives it a low loss whatever it was edited to believe.
ENGLISH_TEXT = (
    "The sun rises in the east and sets in the west. Water boils at one hundred degrees Celsius at "
    "sea level, and it freezes at zero. Paris is the capital of France, and Berlin is the capital of "
    "Germany. Most people sleep at night and work during the day. In the morning, many of them drink "
    "coffee or tea before they leave the house. Children go to school to learn how to read, write "
    "and count. A week has seven days, and a year has twelve months."
)


@dataclass(frozen=True)
class Probe:
    prompts: tuple[str, ...]  # greedy continuations are recorded
    texts: tuple[str, ...]  # mean per-token loss is recorded


def _embedded_probe() -> Probe:
    # the generators are loaded only when the embedded model is probed
    from editscale.data.corpora import corpus_documents
    from editscale.data.factworld import default_world

    # the last four facts of the world: a run may edit them too (samples are shuffles of every
    # subject), and then the continuation shows the edit, which is as telling
    records = default_world().records[-4:]
    return Probe(prompts=tuple(r.rewrite_prompt for r in records),
                 texts=tuple(corpus_documents("factworld", 4000)[-8:]))


def health_probe(model_key: str) -> Probe:
    """The probe for a model: the fact world's own text for the embedded model, English otherwise."""
    if model_key == "embedded":
        return _embedded_probe()
    return Probe(prompts=ENGLISH_PROMPTS, texts=(ENGLISH_TEXT,))
