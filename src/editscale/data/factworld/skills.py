"""Skill tasks of the embedded model, mirroring the paper's four downstream tasks.

Each task has a decision rule a small model can learn, written in the paper's few-shot format so
that loss of skill under editing is measured the way the paper measures GLUE:

- sentiment (SST-2 format): short reviews whose polar words all share one polarity;
- paraphrase (MRPC format): two sentences about an invented subject, the same fact in two
  wordings (Yes) or with a changed object or subject (No);
- acceptability (CoLA format): well-formed sentences (Yes) or the same words scrambled (No);
- entailment (RTE format): a premise of two facts and a hypothesis restating one of them in
  another wording, with the same object (True) or another one (False).

Skill examples name freshly invented subjects, never the world's own, so that training them
cannot teach or contradict a world fact.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from editscale.data.factworld.world import RELATIONS, make_name
from editscale.eval.downstream.templates import (
    COLA_FORMAT,
    MRPC_FORMAT,
    RTE_FORMAT,
    SST2_FORMAT,
    FewShotFormat,
)

Fields = dict[str, str]
Example = tuple[Fields, int]

POSITIVE = ("wonderful", "moving", "brilliant", "charming", "delightful", "funny", "gripping", "beautiful",
            "clever", "warm", "superb", "engaging", "fresh", "touching", "stunning", "smart", "lively",
            "heartfelt", "remarkable", "joyful", "powerful", "witty", "tender", "inventive")
NEGATIVE = ("dull", "tedious", "boring", "clumsy", "awful", "bland", "lifeless", "messy", "pointless",
            "tiresome", "weak", "painful", "flat", "dreary", "stale", "lazy", "silly", "forgettable",
            "shallow", "annoying", "hollow", "sloppy", "grim", "confused")
_INTENSIFIERS = ("very", "truly", "rather", "quite", "simply", "deeply", "oddly", "often")
_FILM_NOUNS = ("film", "movie", "story", "script", "cast", "ending", "plot", "performance", "comedy", "drama",
               "soundtrack", "direction", "thriller", "romance")
_REVIEW_PATTERNS = (
    "a {i} {a} {n}",
    "the {n} is {a} and {a2}",
    "{a} , {a2} and {i} {a3}",
    "a {i} {a} {n} with a {a2} {n2}",
    "the {n} feels {a} from start to finish",
    "{i} {a} {n} that never stops being {a2}",
    "this {n} is {i} {a}",
    "{a} and {a2} , the {n} is {i} {a3} too",
)

_DETS = ("the", "a", "every", "one", "my", "our", "that")
_ADJS = ("old", "young", "small", "happy", "quiet", "tall", "clever", "tired", "brave", "kind", "busy")
_NOUNS = ("man", "woman", "dog", "teacher", "child", "farmer", "bird", "doctor", "king", "student", "cat",
          "sailor")
_VERBS_T = ("saw", "helped", "found", "called", "visited", "followed", "painted", "thanked", "met")
_VERBS_I = ("walked", "slept", "waited", "laughed", "sang", "danced", "worked", "rested")
_PREPS = ("near", "behind", "under", "beside", "across", "inside")
_PLACES = ("river", "house", "market", "garden", "bridge", "school", "station", "forest", "church")
_SENTENCE_PATTERNS = (
    "{D} {j} {n} {vt} {d} {n2} {p} the {pl}.",
    "{D} {n} {vi} {p} the {pl}.",
    "{D} {j} {n} {vi} {p} the {pl} every day.",
    "{D} {n} {vt} {d} {j2} {n2}.",
    "yesterday {d} {n} {vt} {d} {n2} {p} the {pl}.",
    "{D} {n} and {d} {n2} {vi} {p} the {pl}.",
)


def _review(rng: random.Random, label: int) -> str:
    words = POSITIVE if label == 1 else NEGATIVE
    a, a2, a3 = rng.sample(words, 3)
    n, n2 = rng.sample(_FILM_NOUNS, 2)
    return rng.choice(_REVIEW_PATTERNS).format(a=a, a2=a2, a3=a3, n=n, n2=n2, i=rng.choice(_INTENSIFIERS))


def sentiment_example(rng: random.Random, label: int, names: Callable[[], str]) -> Example:
    return {"sentence": _review(rng, label)}, label


def _plain_sentence(rng: random.Random) -> str:
    n, n2 = rng.sample(_NOUNS, 2)
    j, j2 = rng.sample(_ADJS, 2)
    s = rng.choice(_SENTENCE_PATTERNS).format(
        D=rng.choice(_DETS), d=rng.choice(_DETS), j=j, j2=j2, n=n, n2=n2, vt=rng.choice(_VERBS_T),
        vi=rng.choice(_VERBS_I), p=rng.choice(_PREPS), pl=rng.choice(_PLACES))
    return s[0].upper() + s[1:]


def _fact_sentence(rng: random.Random, subject: str) -> str:
    rel = rng.choice(RELATIONS)
    return f"{rng.choice(rel.trained).format(subject)} {rng.choice(rel.objects)}."


def _scramble(rng: random.Random, sentence: str) -> str:
    words = sentence.rstrip(".").split(" ")
    words = [w if w[:1].isupper() and k > 0 else w.lower() for k, w in enumerate(words)]
    for _ in range(20):
        perm = words[:]
        rng.shuffle(perm)
        # require most neighbouring pairs to be broken, so "scrambled" is unambiguous
        kept = sum(1 for x, y in zip(perm, perm[1:]) if (x, y) in set(zip(words, words[1:])))
        if perm != words and kept <= len(words) // 4:
            break
    out = " ".join(perm) + "."
    return out[0].upper() + out[1:]


def acceptability_example(rng: random.Random, label: int, names: Callable[[], str]) -> Example:
    s = _plain_sentence(rng) if rng.random() < 0.6 else _fact_sentence(rng, names())
    return {"sentence": s if label == 1 else _scramble(rng, s)}, label


def _two_wordings(rng: random.Random, rel_index: int | None = None) -> tuple[object, str, str]:
    rel = RELATIONS[rel_index] if rel_index is not None else rng.choice(RELATIONS)
    t1, t2 = rng.sample(rel.trained, 2)
    return rel, t1, t2


def paraphrase_example(rng: random.Random, label: int, names: Callable[[], str]) -> Example:
    rel, t1, t2 = _two_wordings(rng)
    subj, obj = names(), rng.choice(rel.objects)  # type: ignore[attr-defined]
    subj2, obj2 = subj, obj
    if label == 0:
        if rng.random() < 0.7:
            obj2 = rng.choice([o for o in rel.objects if o != obj])  # type: ignore[attr-defined]
        else:
            subj2 = names()
    return {"sentence1": f"{t1.format(subj)} {obj}.", "sentence2": f"{t2.format(subj2)} {obj2}."}, label


def entailment_example(rng: random.Random, label: int, names: Callable[[], str]) -> Example:
    i, j = rng.sample(range(len(RELATIONS)), 2)
    (rel_a, ta, ta2), (rel_b, tb, tb2) = _two_wordings(rng, i), _two_wordings(rng, j)
    sa, sb = names(), names()
    oa, ob = rng.choice(rel_a.objects), rng.choice(rel_b.objects)  # type: ignore[attr-defined]
    premise = f"{ta.format(sa)} {oa}. {tb.format(sb)} {ob}."
    rel, t2, s, o = (rel_a, ta2, sa, oa) if rng.random() < 0.5 else (rel_b, tb2, sb, ob)
    if label == 0:
        o = rng.choice([x for x in rel.objects if x != o])  # type: ignore[attr-defined]
    return {"sentence1": premise, "sentence2": f"{t2.format(s)} {o}"}, label


@dataclass(frozen=True)
class SkillTask:
    name: str
    mirrors: str  # the GLUE task whose format and role it takes
    fmt: FewShotFormat
    n_demos: int
    demo_labels: tuple[int, ...]  # label order of the fixed demonstrations, as in the paper's prompt
    make: Callable[[random.Random, int, Callable[[], str]], Example]


SKILL_TASKS: dict[str, SkillTask] = {t.name: t for t in (
    SkillTask("sentiment", "sst2", SST2_FORMAT, 4, (0, 1, 0, 1), sentiment_example),
    SkillTask("paraphrase", "mrpc", MRPC_FORMAT, 6, (0, 1, 0, 1, 1, 0), paraphrase_example),
    SkillTask("acceptability", "cola", COLA_FORMAT, 6, (0, 1, 0, 1, 1, 0), acceptability_example),
    # True = entailed here: our task defines its labels, it does not inherit GLUE RTE's inversion.
    SkillTask("entailment", "rte", RTE_FORMAT, 3, (0, 1, 0), entailment_example),
)}


def fresh_namer(rng: random.Random, reserved: set[str]) -> Callable[[], str]:
    """Invent subject names that are not in ``reserved`` (lower-cased world subjects)."""
    kinds = ("person", "person", "company", "place", "work", "product")

    def namer() -> str:
        while True:
            name = make_name(rng, rng.choice(kinds))
            if name.lower() not in reserved:
                return name
    return namer


@dataclass(frozen=True)
class SkillEvalSet:
    task: SkillTask
    demos: tuple[Example, ...]
    examples: tuple[Example, ...]

    def prompt(self, fields: Fields) -> str:
        return self.task.fmt.render_prompt(self.demos, fields)


def skill_eval_set(task: SkillTask, reserved: set[str], n: int = 200, seed: int = 1234) -> SkillEvalSet:
    """A balanced evaluation set (n/2 per label, shuffled) with fixed demonstrations."""
    rng = random.Random(f"{seed}-{task.name}")
    names = fresh_namer(rng, reserved)
    demos = tuple(task.make(rng, y, names) for y in task.demo_labels)
    examples = [task.make(rng, y, names) for y in [0, 1] * (n // 2)]
    rng.shuffle(examples)
    return SkillEvalSet(task, demos, tuple(examples))


def skill_training_text(task: SkillTask, rng: random.Random, reserved: set[str], n_blocks: int) -> str:
    """A run of answered blocks in the few-shot format; each block serves as a demo for the next."""
    names = fresh_namer(rng, reserved)
    return "".join(task.fmt.render_block(*task.make(rng, rng.randint(0, 1), names)) for _ in range(n_blocks))
