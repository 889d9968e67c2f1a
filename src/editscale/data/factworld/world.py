"""The fact world: an invented, seeded world of subjects and CounterFact-style facts.

Why invent one: no pretrained model can be downloaded here, so editscale trains its own small
model (the `embedded` default) on text generated from this world. The model then really stores
these facts and they can be located, edited and forgotten, just as CounterFact facts in GPT-2.

Design choices that matter for the trained model:
- Every subject has exactly one fact. A prompt naming the subject therefore has one right answer
  whatever its wording, which is what lets a tiny model answer in phrasings it never saw.
- Each relation has four trained phrasings, two with the subject first ("{} grew up speaking")
  and two with the subject inside ("The mother tongue of {} is"), plus held-out phrasings that
  never appear in any training text. A fact is trained in one phrasing of each kind; the other
  two become its paraphrase prompts, so PS measures generalisation to wordings that fact was
  never trained in (but that other facts of the relation were).
- Two more phrasings per relation (`shared`) are taught for every fact of the relation
  (`TrainConfig.shared_phrasings`): a fact seen in more wordings is recalled from wordings never
  seen at all, and the held-out and paraphrase prompts stay untrained.
- Six more (`varied`) widen that: with `TrainConfig.varied_phrasings` each shared copy of a fact
  is worded at random from the shared and varied phrasings, so a fact is seen in many wordings
  for the tokens of two. Together with filler words (`with_filler`), taught in a stage after the
  facts are memorised, they are what lets the model recall facts in held-out phrasings (what was
  measured: docs/embedded-model.md). Varied phrasings avoid the held-out phrasings' words ("lies",
  "comes from", "specializes"...), so held-out prompts stay new in wording, not just in word order.
- Stand-in words (`with_noise`) swap some words of a wording for common words that no held-out
  phrasing uses, so a fact must be recalled from what is left of a wording; they work best in a
  short last training stage of their own (docs/embedded-model.md).
- A subject at the start of a line is tokenised without its leading space, so training lines are
  joined by either a newline or a space: both token forms of every subject are learnt.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

from editscale.data.records import EditRecord


@dataclass(frozen=True)
class Relation:
    relation_id: str
    name: str
    subject_kind: str
    objects: tuple[str, ...]
    first: tuple[str, str]  # trained phrasings with the subject first
    inside: tuple[str, str]  # trained phrasings with the subject inside
    unseen: tuple[str, ...]  # never in any training text
    shared: tuple[str, ...] = ()  # trained for every fact of the relation
    varied: tuple[str, ...] = ()  # with `shared`, a pool each copy of a varied sentence draws from

    @property
    def trained(self) -> tuple[str, ...]:
        return self.first + self.inside


LANGUAGES = ("English", "French", "Spanish", "German", "Italian", "Russian", "Dutch", "Swedish",
             "Polish", "Greek", "Finnish", "Portuguese")
COUNTRIES = ("France", "Spain", "Germany", "Italy", "Russia", "Japan", "Canada", "Brazil", "Egypt",
             "India", "Sweden", "Norway")
CITIES = ("Paris", "London", "Berlin", "Rome", "Madrid", "Tokyo", "Vienna", "Prague", "Dublin",
          "Lisbon", "Oslo", "Cairo")
INSTRUMENTS = ("piano", "guitar", "violin", "trumpet", "drums", "cello", "flute", "saxophone", "harp",
               "clarinet")
FIELDS = ("physics", "chemistry", "biology", "mathematics", "economics", "philosophy", "medicine",
          "astronomy", "geology", "linguistics")
CONTINENTS = ("Europe", "Asia", "Africa", "Antarctica", "Oceania", "North America", "South America")

RELATIONS: tuple[Relation, ...] = (
    Relation("P103", "mother tongue", "person", LANGUAGES,
             first=("{} is a native speaker of", "{} grew up speaking"),
             inside=("The mother tongue of {} is", "The native language of {} is"),
             unseen=("{} was raised speaking", "The first language of {} is"),
             shared=("{} speaks", "The home language of {} is"),
             varied=("{} talks at home in", "{} learned as a child to speak", "{} writes letters home in",
                     "In the family of {} everyone speaks", "{} dreams in", "The everyday language of {} is")),
    Relation("P27", "citizenship", "person", COUNTRIES,
             first=("{} is a citizen of", "{} holds a passport from"),
             inside=("The nationality of {} is", "The country of citizenship of {} is"),
             unseen=("{} has citizenship in", "The passport of {} was issued by"),
             shared=("{} is a national of", "The citizenship of {} is"),
             varied=("{} votes in the elections of", "{} pays taxes to", "The home state of {} is",
                     "Officially, {} belongs to the nation of", "{} is a registered resident of",
                     "The government responsible for {} is that of")),
    Relation("P19", "place of birth", "person", CITIES,
             first=("{} was born in", "{} is originally from the city of"),
             inside=("The birthplace of {} is", "The city of birth of {} is"),
             unseen=("{} came into the world in", "The hometown of {} is"),
             shared=("{} was born in the city of", "The place of birth of {} is"),
             varied=("{} spent the first years of life in", "{} is a native of", "The city where {} was born is",
                     "At birth, {} lived in", "The birth city of {} is", "{} was delivered in a hospital in")),
    Relation("P1303", "instrument", "person", INSTRUMENTS,
             first=("{} plays the", "{} is a musician who plays the"),
             inside=("The instrument of {} is the", "The favourite instrument of {} is the"),
             unseen=("{} performs on the", "On stage, {} plays the"),
             shared=("{} likes to play the", "The instrument played by {} is the"),
             varied=("{} practises every day on the", "{} is known for playing the", "The music of {} is played on the",
                     "{} learned as a child to play the", "The preferred instrument of {} is the",
                     "{} takes lessons on the")),
    Relation("P101", "field of work", "person", FIELDS,
             first=("{} works in the field of", "{} is an expert in"),
             inside=("The field of {} is", "The research area of {} is"),
             unseen=("{} specializes in", "The subject studied by {} is"),
             shared=("{} is a researcher in", "The speciality of {} is"),
             varied=("{} does research in", "{} has a degree in", "{} writes papers on", "The discipline of {} is",
                     "{} is a professor of", "The work of {} is in the field of")),
    Relation("P159", "headquarters location", "company", CITIES,
             first=("{} is headquartered in", "{} has its head office in"),
             inside=("The headquarters of {} is in", "The main office of {} is located in"),
             unseen=("{} keeps its offices in", "The company {} operates from"),
             shared=("{} is based in", "The head office of {} is in"),
             varied=("{} is managed from", "The leadership of {} sits in", "{} was founded in the city of",
                     "The central office of {} is in", "{} has its headquarters in", "Staff of {} work in")),
    Relation("P30", "continent", "place", CONTINENTS,
             first=("{} is located on the continent of", "{} belongs to the continent of"),
             inside=("The continent of {} is", "The land of {} is part of"),
             unseen=("{} lies in", "The region of {} is found in"),
             shared=("{} is found on the continent of", "The location of {} is"),
             varied=("{} is a place in", "{} sits on the continent of", "{} is situated in",
                     "The continent where {} is located is", "Travellers reach {} in", "{} is part of")),
    Relation("P407", "language of work", "work", LANGUAGES,
             first=("{} was written in", "{} is a book written in"),
             inside=("The language of {} is", "The original language of {} is"),
             unseen=("{} was first published in", "The text of {} is in"),
             shared=("{} was composed in", "The text language of {} is"),
             varied=("{} was printed in", "The words of {} are in", "{} can be read in", "The author wrote {} in",
                     "{} is a novel in", "The language used in {} is")),
    Relation("P495", "country of origin", "product", COUNTRIES,
             first=("{} was created in", "{} is a product from"),
             inside=("The country of origin of {} is", "The maker of {} is based in"),
             unseen=("{} comes from", "The product {} was made in"),
             shared=("{} was made in", "The home country of {} is"),
             varied=("{} is manufactured in", "{} is produced in", "{} was designed in", "The factory of {} is in",
                     "{} is imported from", "The origin of {} is")),
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "pr", "tr", "st", "sh", "ch", "th", "h", "j", "w", "y", "kl", "fl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k", "x", "th", "nd", "rk")
_COMPANY_SUFFIX = ("Group", "Systems", "Labs", "Works", "Motors", "Foods", "Media", "Energy")
_WORK_HEAD = ("The Book of", "Songs of", "The Tale of", "Letters from", "The Winter of", "Dreams of")
_PRODUCT_SUFFIX = ("One", "Pro", "Mini", "Max", "Air", "Neo")


def make_word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def make_name(rng: random.Random, kind: str) -> str:
    """An invented name for a subject of the given kind (person, company, place, work, product)."""
    if kind == "person":
        return f"{make_word(rng, rng.choice((1, 2)))} {make_word(rng, rng.choice((2, 3)))}"
    if kind == "company":
        return f"{make_word(rng, 2)} {rng.choice(_COMPANY_SUFFIX)}"
    if kind == "place":
        return make_word(rng, rng.choice((2, 3)))
    if kind == "work":
        return f"{rng.choice(_WORK_HEAD)} {make_word(rng, 2)}"
    if kind == "product":
        return f"{make_word(rng, 2)} {rng.choice(_PRODUCT_SUFFIX)}"
    raise ValueError(f"unknown subject kind {kind!r}")


def new_name(rng: random.Random, kind: str, taken: set[str]) -> str:
    """A name of that kind not in `taken` (lower-cased names), which it is added to."""
    while True:
        name = make_name(rng, kind)
        if name.lower() not in taken:
            taken.add(name.lower())
            return name


@dataclass(frozen=True)
class Fact:
    case_id: int
    subject: str
    relation: Relation
    obj: str
    first: str  # the subject-first phrasing this fact is trained in
    inside: str  # the subject-inside phrasing this fact is trained in
    prompt: str  # the rewrite prompt (one of the two trained phrasings)

    @property
    def trained(self) -> tuple[str, str]:
        return (self.first, self.inside)

    @property
    def paraphrases(self) -> tuple[str, ...]:
        return tuple(t for t in self.relation.trained if t not in self.trained)

    def sentence(self, template: str) -> str:
        return f"{template.format(self.subject)} {self.obj}."


@dataclass
class FactWorld:
    seed: int
    facts: list[Fact]
    records: list[EditRecord] = field(default_factory=list)
    reserved_names: set[str] = field(default_factory=set)

    def training_items(self) -> list[tuple[Fact, str]]:
        """Every fact with each of its two trained phrasings."""
        return [(f, t) for f in self.facts for t in f.trained]

    def shared_items(self) -> list[tuple[Fact, str]]:
        """Every fact with each of its relation's shared phrasings."""
        return [(f, t) for f in self.facts for t in f.relation.shared]

    def varied_items(self, rng: random.Random, repeats: int) -> list[tuple[Fact, str]]:
        """`repeats` items per shared phrasing of each fact, each with a phrasing drawn from the
        relation's shared and varied ones: the tokens of `repeats` copies of the shared sentences,
        spread over many wordings."""
        return [(f, rng.choice(f.relation.shared + f.relation.varied))
                for f in self.facts for _ in range(repeats * len(f.relation.shared))]

    def training_sentences(self) -> list[str]:
        """Every fact in each of its two trained phrasings (one copy each)."""
        return [f.sentence(t) for f, t in self.training_items()]

    def shared_sentences(self) -> list[str]:
        """Every fact in each of its relation's shared phrasings (the later stage's fact text)."""
        return [f.sentence(t) for f, t in self.shared_items()]


def generate_world(seed: int = 0, n_subjects: int = 1800, n_neighbors: int = 10,
                   n_attribute: int = 10) -> FactWorld:
    """Build the world deterministically from ``seed``: subjects, one fact each, and records."""
    rng = random.Random(seed)
    seen: set[str] = set()
    facts: list[Fact] = []
    for i in range(n_subjects):
        rel = RELATIONS[i % len(RELATIONS)]
        name = new_name(rng, rel.subject_kind, seen)
        first = rng.choice(rel.first)
        inside = rng.choice(rel.inside)
        facts.append(Fact(case_id=i, subject=name, relation=rel, obj=rng.choice(rel.objects), first=first,
                          inside=inside, prompt=rng.choice((first, inside))))
    rng.shuffle(facts)
    facts = [Fact(case_id=i, subject=f.subject, relation=f.relation, obj=f.obj, first=f.first,
                  inside=f.inside, prompt=f.prompt) for i, f in enumerate(facts)]

    by_rel_obj: dict[tuple[str, str], list[Fact]] = defaultdict(list)
    for f in facts:
        by_rel_obj[(f.relation.relation_id, f.obj)].append(f)

    records = []
    for f in facts:
        rel = f.relation
        new_obj = rng.choice([o for o in rel.objects if o != f.obj])
        peers = [g for g in by_rel_obj[(rel.relation_id, f.obj)] if g.case_id != f.case_id]
        neighbors = rng.sample(peers, min(n_neighbors, len(peers)))
        holders = by_rel_obj[(rel.relation_id, new_obj)]
        attributes = rng.sample(holders, min(n_attribute, len(holders)))
        records.append(EditRecord(
            case_id=f.case_id,
            subject=f.subject,
            prompt=f.prompt,
            target_true=f.obj,
            target_new=new_obj,
            relation_id=rel.relation_id,
            paraphrase_prompts=tuple(t.format(f.subject) for t in f.paraphrases),
            # a neighbour is asked in the same wording its own fact was trained in
            neighborhood_prompts=tuple(g.prompt.format(g.subject) for g in neighbors),
            attribute_prompts=tuple(g.prompt.format(g.subject) for g in attributes),
            extra={"unseen_prompts": [t.format(f.subject) for t in rel.unseen],
                   "relation": rel.name, "subject_kind": rel.subject_kind},
        ))
    return FactWorld(seed=seed, facts=facts, records=records, reserved_names=seen)


# Words a fact sentence may carry that say nothing about the fact. The clean templates alone teach
# a brittle reader: one unseen word ("X really was created in") took the shipped model's recall
# of a trained wording from 95% to 69-74%. None of these words occurs in a held-out phrasing.
FILLER_OPENINGS = ("Today,", "As far as we know,", "In short,", "By all accounts,", "Of course,", "As it happens,",
                   "For the record,", "Some say that", "Everyone knows that", "We read that", "It seems that",
                   "Believe it or not,", "Once again,", "Without doubt,", "According to the records,",
                   "Last year,", "Long ago,", "Note that", "Most people agree that", "As expected,")
FILLER_ASIDES = ("really", "still", "also", "truly", "now", "certainly", "clearly", "probably", "surely",
                 "famously", "apparently", "always", "again", "quietly", "proudly", "officially",
                 ", as we know,", ", we hear,", ", by the way,", ", it seems,", ", of course,", ", they say,")


def with_filler(fact: Fact, template: str, rng: random.Random) -> str:
    """The fact's sentence in `template` with an opening or an aside after the subject, drawn from
    the filler words; the template's own words and their order are kept."""
    before, after = template.split("{}")
    if rng.random() < 0.5:
        opening = rng.choice(FILLER_OPENINGS)
        before = before[:1].lower() + before[1:]
        return f"{opening} {before}{fact.subject}{after} {fact.obj}."
    aside = rng.choice(FILLER_ASIDES)
    sep = "" if aside.startswith(",") else " "
    return f"{before}{fact.subject}{sep}{aside}{after} {fact.obj}."


# Stand-in words for `with_noise`: common words that name no relation or object. Any word of a
# held-out phrasing is dropped from the pool, so held-out prompts stay new in wording.
_NOISE_POOL = (
    "a", "an", "at", "to", "for", "with", "about", "over", "under", "near", "after", "before", "and", "or",
    "but", "not", "very", "quite", "just", "only", "that", "this", "these", "those", "his", "her", "their",
    "our", "one", "two", "some", "many", "most", "each", "every", "all", "any", "new", "old", "big", "small",
    "good", "great", "long", "short", "early", "late", "young", "famous", "main", "best", "known", "called",
    "named", "seen", "said", "told", "given", "held", "chosen", "listed", "noted", "shown", "used", "moved",
    "went", "got", "had", "did", "does", "can", "will", "would", "may", "might", "should", "be", "been",
    "are", "were", "time", "year", "day", "way", "part", "kind", "side", "end", "point", "case", "fact",
    "line", "word", "page", "list", "table", "report", "view", "rest", "show", "people", "friend", "story",
    "team", "group", "house", "door", "window", "road", "tree", "river", "stone", "light", "water", "fire",
    "green", "blue", "red", "warm", "cold", "quick", "slow", "soon", "here", "there", "then", "never", "often",
    "sometimes", "maybe", "even", "still", "yet", "so", "too", "much", "more", "less", "such", "same", "other",
)
_HELD_OUT_WORDS = {w.strip(",.").lower() for r in RELATIONS for t in r.unseen for w in t.split()}
_OBJECT_WORDS = {w.lower() for r in RELATIONS for o in r.objects for w in o.split()}
NOISE_WORDS = tuple(w for w in _NOISE_POOL if w not in _HELD_OUT_WORDS | _OBJECT_WORDS)
NOISE_RATE = 0.3  # chance that each word of a noisy template is swapped


def with_noise(template: str, rng: random.Random) -> str:
    """`template` with some of its words (at least one, each with chance NOISE_RATE) swapped for
    stand-in words. A fact then has to be recalled from whatever part of a wording is left, as
    from a held-out wording, and not from one fixed word sequence."""
    words = template.split(" ")
    slots = [i for i, w in enumerate(words) if "{}" not in w]
    picked = [i for i in slots if rng.random() < NOISE_RATE] or [rng.choice(slots)]
    for i in picked:
        was = words[i].strip(",").lower()
        new = rng.choice([w for w in NOISE_WORDS if w != was]) + ("," if words[i].endswith(",") else "")
        words[i] = new.capitalize() if i == 0 else new
    return " ".join(words)


def fact_lines(world: FactWorld, repeats: int, rng: random.Random, *,
               phrasings: Literal["trained", "shared", "both", "varied"] = "trained",
               filler: float = 0.0, noise: float = 0.0) -> list[str]:
    """Training lines: every fact in its own trained phrasings, in its relation's shared phrasings,
    or in both, each sentence ``repeats`` times, shuffled, in random line groups. "varied" is
    "both" with each shared copy's wording drawn from the shared and varied phrasings. A share
    `filler` of the sentences carries filler words (`with_filler`), a share `noise` stand-in words
    in place of some of the template's (`with_noise`).

    Sentences are grouped 1-3 per line so a subject-first sentence appears both at a line start
    (no leading space on the subject) and after another sentence (with one).
    """
    items = {"trained": world.training_items, "shared": world.shared_items,
             "both": lambda: world.training_items() + world.shared_items(),
             "varied": world.training_items}[phrasings]() * repeats
    if phrasings == "varied":
        items += world.varied_items(rng, repeats)
    if noise:  # as with filler: no draws without it
        items = [(f, with_noise(t, rng)) if rng.random() < noise else (f, t) for f, t in items]
    if filler:  # no draws without it: the corpus of a run without filler is unchanged
        sents = [with_filler(f, t, rng) if rng.random() < filler else f.sentence(t) for f, t in items]
    else:
        sents = [f.sentence(t) for f, t in items]
    rng.shuffle(sents)
    lines, i = [], 0
    while i < len(sents):
        k = rng.choice((1, 1, 2, 3))
        lines.append(" ".join(sents[i:i + k]))
        i += k
    return lines
