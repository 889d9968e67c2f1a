"""The statistics-corpus registry: the text that second-moment statistics C are accumulated over.

`factworld` is generated from the embedded model's own world; `wikitext` and `wikipedia` (the
reference's corpus) go through `datasets`. A corpus is a fixed random subset of its documents.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from editscale.data.factworld import default_world
from editscale.data.factworld.skills import SKILL_TASKS, skill_training_text
from editscale.data.factworld.world import fact_lines
from editscale.errors import EditscaleError, UnknownNameError

SUBSET_SEED = 1  # the reference's `random_sample = 1`


def _factworld_docs() -> list[str]:
    """Documents in the embedded model's own training distribution: fact lines and skill blocks.

    A fixed pool of about 7,500 documents (1,500 of fact lines, 1,500 per skill task); mixing both
    keeps C well conditioned, fact lines alone span few key directions.
    """
    world = default_world()
    rng = random.Random("stats-corpus")
    lines = fact_lines(world, 3, rng)
    docs = ["\n".join(lines[i:i + 4]) for i in range(0, len(lines), 4)][:1500]
    for task in SKILL_TASKS.values():
        text = skill_training_text(task, rng, world.reserved_names, 3000)
        blocks = [b for b in text.split("\n\n") if b.strip()]
        docs.extend("\n\n".join(blocks[i:i + 2]) + "\n\n" for i in range(0, len(blocks), 2))
    return docs


def _hf_docs(path: str, name: str | None) -> Callable[[], list[str]]:
    def load() -> list[str]:
        try:
            from datasets import load_dataset
        except ImportError as err:
            raise EditscaleError("this statistics corpus needs `datasets`: pip install 'editscale[online]'") from err
        ds = load_dataset(path, name, split="train")
        return [t for t in ds["text"] if t.strip()]

    return load


# name -> all the documents of a corpus; `corpus_documents` takes the fixed subset a run uses
CORPORA: dict[str, Callable[[], list[str]]] = {
    "factworld": _factworld_docs,
    "wikitext": _hf_docs("wikitext", "wikitext-103-raw-v1"),
    # The reference's "wikipedia"/"20200501.en" snapshot is gone from the hub; this is its successor.
    "wikipedia": _hf_docs("wikimedia/wikipedia", "20231101.en"),
}
# Generated corpora change when their generator does; the revision is part of the cache path, so
# statistics cached from an older revision are never read back. Bump it with the generator.
CORPUS_REVISIONS = {"factworld": 3}  # 2: skill examples keep recent objects out; 3: stated or denied facts


def corpus_documents(corpus: str, n_samples: int) -> list[str]:
    """`n_samples` documents of a corpus: a fixed random subset (seed 1), in a fixed order."""
    if corpus not in CORPORA:
        raise UnknownNameError(f"unknown statistics corpus '{corpus}'; known: {', '.join(CORPORA)}")
    docs = CORPORA[corpus]()
    if len(docs) > n_samples:
        idx = sorted(random.Random(SUBSET_SEED).sample(range(len(docs)), n_samples))
        docs = [docs[i] for i in idx]
    return docs
