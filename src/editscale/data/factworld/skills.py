"""Skill tasks of the embedded model, mirroring the paper's four downstream tasks.

Each task has a decision rule a small model can learn, written in the paper's few-shot format so
that loss of skill under editing is measured the way the paper measures GLUE:

- sentiment (SST-2 format): short reviews whose polar words all share one polarity;
- paraphrase (MRPC format): a fact about an invented subject, and the same fact in another wording,
  stated (Yes) or denied (No);
- acceptability (CoLA format): well-formed sentences (Yes) or the same words scrambled (No);
- entailment (RTE format): a premise of two facts and a hypothesis restating one of them in
  another wording, stated (True) or denied (False).

Skill examples name freshly invented subjects, never the world's own, so that training them
cannot teach or contradict a world fact.

A denial decides the two comparison tasks because it is a contradiction a small model does learn to
read off the query, as it reads the polar words of a review; both parts still state one fact in two
wordings. (Deciding them by a changed object or name, an in-context copy test, stayed at chance:
docs/embedded-model.md says what was tried.) Examples still draw
their objects through `Draw`, which keeps the objects of recent blocks (in training text) or of
the demonstrations (in an evaluation prompt) out of the next example, so a query never repeats a
demonstration's fact.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from editscale.data.factworld.world import RELATIONS, Relation, make_name
from editscale.data.fewshot import (
    COLA_FORMAT,
    MRPC_FORMAT,
    RTE_FORMAT,
    SST2_FORMAT,
    FewShotFormat,
)

Fields = dict[str, str]
Example = tuple[Fields, int]


class Draw:
    """The random source of skill examples: fresh subject names, and relation objects that share no
    word with the objects of the last `memory` blocks (or, once `freeze()` is called, with those of
    the blocks drawn so far: a prompt's demonstrations)."""

    def __init__(self, rng: random.Random, reserved: set[str], memory: int = 10):
        self.rng = rng
        self.name = fresh_namer(rng, reserved)
        self._recent: deque[set[str]] = deque(maxlen=memory)
        self._block: set[str] = set()
        self._frozen: set[str] | None = None

    def _used(self) -> set[str]:
        used = set(self._block)
        for words in (self._recent if self._frozen is None else (self._frozen,)):
            used |= words
        return used

    def _free(self, rel: Relation) -> list[str]:
        used = self._used()
        return [o for o in rel.objects if not used & set(o.split())]

    def relation(self, k: int, exclude: tuple[Relation, ...] = ()) -> Relation:
        """A random relation with at least k objects free to draw (any relation if none has)."""
        ok = [r for r in RELATIONS if r not in exclude and len(self._free(r)) >= k]
        return self.rng.choice(ok or [r for r in RELATIONS if r not in exclude])

    def objects(self, rel: Relation, k: int) -> list[str]:
        """k distinct objects of `rel`, none sharing a word with a recent block's objects."""
        free = self._free(rel)
        picked = self.rng.sample(free if len(free) >= k else list(rel.objects), k)
        for o in picked:
            self._block |= set(o.split())
        return picked

    def end_block(self) -> None:
        if self._frozen is None:
            self._recent.append(self._block)
        self._block = set()

    def freeze(self) -> None:
        """From now on every block avoids the objects drawn so far, and only those."""
        self._frozen = set().union(*self._recent, self._block)
        self._block = set()

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


def sentiment_example(draw: Draw, label: int) -> Example:
    return {"sentence": _review(draw.rng, label)}, label


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


def acceptability_example(draw: Draw, label: int) -> Example:
    rng = draw.rng
    s = _plain_sentence(rng) if rng.random() < 0.6 else _fact_sentence(rng, draw.name())
    return {"sentence": s if label == 1 else _scramble(rng, s)}, label


# Frames that state (label 1) or deny (label 0) the fact sentence they wrap; half of the stated
# ones are framed too, so that "a frame is there" does not give the label away.
STATE_FRAMES = ("{}", "{}", "{}", "It is true that {}", "It is a fact that {}", "Indeed , {}")
DENY_FRAMES = ("It is not true that {}", "It is false that {}", "It is wrong to say that {}",
               "It is untrue that {}")


def _stated_or_denied(rng: random.Random, template: str, subject: str, obj: str, label: int) -> str:
    """The fact `template` states of subject and object, framed as stated or denied; the relation
    wording's own leading "The" is lower-cased inside a frame (a subject's is a name's)."""
    framed = rng.choice(STATE_FRAMES if label == 1 else DENY_FRAMES)
    if framed != "{}" and template.startswith("The "):
        template = "the" + template[3:]
    return framed.format(f"{template.format(subject)} {obj}")


def paraphrase_example(draw: Draw, label: int) -> Example:
    rng = draw.rng
    rel = draw.relation(1)
    t1, t2 = rng.sample(rel.trained, 2)
    subj, (obj,) = draw.name(), draw.objects(rel, 1)
    return {"sentence1": f"{t1.format(subj)} {obj}.",
            "sentence2": _stated_or_denied(rng, t2, subj, obj, label) + "."}, label


def entailment_example(draw: Draw, label: int) -> Example:
    rng = draw.rng
    rel_a = draw.relation(1)
    (oa,) = draw.objects(rel_a, 1)
    rel_b = draw.relation(1, exclude=(rel_a,))  # chosen after rel_a's object is taken
    (ob,) = draw.objects(rel_b, 1)
    sa, sb = draw.name(), draw.name()
    ta, ta2 = rng.sample(rel_a.trained, 2)
    tb, tb2 = rng.sample(rel_b.trained, 2)
    premise = f"{ta.format(sa)} {oa}. {tb.format(sb)} {ob}."
    t2, s, o = (ta2, sa, oa) if rng.random() < 0.5 else (tb2, sb, ob)
    return {"sentence1": premise, "sentence2": _stated_or_denied(rng, t2, s, o, label)}, label


@dataclass(frozen=True)
class SkillTask:
    name: str
    mirrors: str  # the GLUE task whose format and role it takes
    fmt: FewShotFormat
    n_demos: int
    demo_labels: tuple[int, ...]  # label order of the fixed demonstrations, as in the paper's prompt
    make: Callable[[Draw, int], Example]


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


def _block(task: SkillTask, draw: Draw, label: int) -> Example:
    example = task.make(draw, label)
    draw.end_block()
    return example


def skill_eval_set(task: SkillTask, reserved: set[str], n: int = 200, seed: int = 1234) -> SkillEvalSet:
    """A balanced evaluation set (n/2 per label, shuffled) with fixed demonstrations."""
    rng = random.Random(f"{seed}-{task.name}")
    draw = Draw(rng, reserved, memory=task.n_demos)
    demos = tuple(_block(task, draw, y) for y in task.demo_labels)
    draw.freeze()  # every query is asked after the same demonstrations, so avoids their objects
    examples = [_block(task, draw, y) for y in [0, 1] * (n // 2)]
    rng.shuffle(examples)
    return SkillEvalSet(task, demos, tuple(examples))


def skill_training_text(task: SkillTask, rng: random.Random, reserved: set[str], n_blocks: int) -> str:
    """A run of answered blocks in the few-shot format; each block serves as a demo for the next."""
    draw = Draw(rng, reserved)
    return "".join(task.fmt.render_block(*_block(task, draw, rng.randint(0, 1))) for _ in range(n_blocks))
