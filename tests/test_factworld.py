"""The invented fact world: determinism, record invariants, and what is (not) in the training text."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from editscale.data.factworld.skills import SKILL_TASKS, skill_training_text
from editscale.data.factworld.world import (
    FILLER_ASIDES,
    FILLER_OPENINGS,
    NOISE_WORDS,
    RELATIONS,
    EditRecord,
    fact_lines,
    generate_world,
    with_filler,
    with_noise,
)
from editscale.data.records import EditRecord as RecordType
from editscale.data.records import validate_records

REL_BY_ID = {r.relation_id: r for r in RELATIONS}


@pytest.fixture(scope="module")
def world():
    return generate_world(0)


@pytest.fixture(scope="module")
def fact_text(world) -> str:
    """The richest fact text: trained phrasings, and shared copies worded from the varied pools."""
    return "\n".join(fact_lines(world, 2, random.Random("facts"), phrasings="varied")) + "\n"


@pytest.fixture(scope="module")
def filler_text(world) -> str:
    """Fact text with filler words in half its sentences."""
    return "\n".join(fact_lines(world, 2, random.Random("filler"), phrasings="varied", filler=0.5)) + "\n"


@pytest.fixture(scope="module")
def trained_sentences(world) -> set[str]:
    return set(world.training_sentences())


@pytest.fixture(scope="module")
def skill_texts(world) -> dict[str, str]:
    rng = random.Random("skills")
    return {name: skill_training_text(task, rng, world.reserved_names, 300) for name, task in SKILL_TASKS.items()}


def split_sentences(line: str) -> list[str]:
    """A fact line is 1-3 sentences joined by one space; no name, phrasing or object holds a '.'."""
    parts = line.split(". ")
    return [p if p.endswith(".") else p + "." for p in parts]


# ---------------------------------------------------------------------- determinism and size


def test_same_seed_same_world_other_seed_other_world(world):
    again = generate_world(0)
    assert again.records == world.records
    assert [(f.subject, f.obj, f.first, f.inside, f.prompt) for f in again.facts] == \
        [(f.subject, f.obj, f.first, f.inside, f.prompt) for f in world.facts]
    other = generate_world(1)
    assert other.records != world.records
    assert {r.subject for r in other.records} != {r.subject for r in world.records}


def test_size_and_unique_subjects(world):
    subjects = [r.subject for r in world.records]
    assert len(subjects) >= 1500
    assert len({s.lower() for s in subjects}) == len(subjects)
    assert world.reserved_names == {s.lower() for s in subjects}
    assert [r.case_id for r in world.records] == list(range(len(world.records)))
    assert [f.subject for f in world.facts] == subjects


def test_records_validate_and_cover_relations(world):
    assert validate_records(world.records) == world.records
    assert len({r.relation_id for r in world.records}) >= 8
    for r in world.records[:200]:
        assert isinstance(r, RecordType) and EditRecord is RecordType
        assert RecordType.from_dict(r.to_dict()) == r


def test_targets_differ_and_belong_to_the_relation(world):
    for r in world.records:
        rel = REL_BY_ID[r.relation_id]
        assert r.target_true != r.target_new
        assert r.target_true in rel.objects and r.target_new in rel.objects
        assert r.prompt in rel.trained
        assert r.extra["relation"] == rel.name and r.extra["subject_kind"] == rel.subject_kind


def test_counterfactuals_are_spread_over_objects(world):
    # new objects are drawn from the relation's other objects, not always the same one
    for rel in RELATIONS:
        news = Counter(r.target_new for r in world.records if r.relation_id == rel.relation_id)
        assert len(news) >= len(rel.objects) - 1


# ---------------------------------------------------------------------- the training text


def test_fact_lines_hold_every_trained_sentence_once_per_repeat(world):
    lines = fact_lines(world, 2, random.Random(7))
    assert lines == fact_lines(world, 2, random.Random(7))
    got = Counter(s for line in lines for s in split_sentences(line))
    assert got == Counter(world.training_sentences() * 2)
    assert {len(split_sentences(line)) for line in lines} == {1, 2, 3}
    assert all("\n" not in line for line in lines)


def test_varied_copies_spread_each_fact_over_its_relation_pool(world):
    rng = random.Random(5)
    got = Counter(s for line in fact_lines(world, 3, rng, phrasings="varied") for s in split_sentences(line))
    trained = Counter(world.training_sentences() * 3)
    varied = got - trained
    assert got - varied == trained  # the trained copies are all there, untouched
    for rel in RELATIONS:
        # a pool is new wordings only: never a trained (paraphrase-test) or held-out one
        assert not set(rel.varied) & set(rel.trained + rel.unseen + rel.shared)
    by_subject = Counter()
    used = {rel.relation_id: set() for rel in RELATIONS}
    pools = {rel.relation_id: rel.shared + rel.varied for rel in RELATIONS}
    for f in world.facts:
        for t in pools[f.relation.relation_id]:
            n = varied[f.sentence(t)]
            by_subject[f.subject] += n
            if n:
                used[f.relation.relation_id].add(t)
    assert sum(by_subject.values()) == sum(varied.values())  # nothing outside the pools
    assert set(by_subject.values()) == {3 * 2}  # as many copies as 3 repeats of 2 shared phrasings
    assert all(used[r] == set(pools[r]) for r in used)


def test_filler_keeps_the_fact_and_its_wording_and_avoids_held_out_words(world, filler_text):
    rng = random.Random(11)
    f = world.facts[0]
    for t in f.relation.trained:
        before, after = t.split("{}")
        for _ in range(20):
            s = with_filler(f, t, rng)
            assert s.endswith(f"{after} {f.obj}.") and f.subject in s
            head, tail = s.split(f.subject)
            assert head.lower().endswith(before.lower())  # the template's own opening words kept
            assert tail.endswith(f"{after} {f.obj}.")
    sents = [s for line in filler_text.splitlines() for s in split_sentences(line)]
    plain = set(world.training_sentences()) | {g.sentence(t) for g in world.facts
                                               for t in g.relation.shared + g.relation.varied}
    share = sum(s not in plain for s in sents) / len(sents)
    assert 0.45 < share < 0.55
    # a held-out phrasing's own words (those no trained wording of any relation uses) stay unseen
    def words(t: str) -> set[str]:
        return set(re.findall(r"[a-z]+", t.lower()))
    taught = set().union(*(words(t) for r in RELATIONS for t in r.trained + r.shared + r.varied))
    held_out = set().union(*(words(t) for r in RELATIONS for t in r.unseen)) - taught
    fillers = set().union(*(words(t) for t in FILLER_OPENINGS + FILLER_ASIDES))
    assert held_out and not held_out & fillers


def test_noise_swaps_template_words_for_stand_ins_that_no_held_out_wording_or_object_uses(world):
    rng = random.Random(5)
    for r in RELATIONS:
        for t in r.trained + r.shared + r.varied:
            for _ in range(10):
                noisy = with_noise(t, rng)
                old, new = t.split(" "), noisy.split(" ")
                assert len(new) == len(old) and new.index("{}") == old.index("{}")
                swapped = [(a, b) for a, b in zip(old, new) if a != b]
                assert swapped  # at least one word is swapped
                assert all(b.lower().strip(",") in NOISE_WORDS for _, b in swapped)
    held_out = {w.strip(",").lower() for r in RELATIONS for t in r.unseen for w in t.split()}
    objects = {w.lower() for r in RELATIONS for o in r.objects for w in o.split()}
    assert len(NOISE_WORDS) > 100 and not set(NOISE_WORDS) & (held_out | objects)
    # in fact lines: about the asked share of the sentences is changed
    lines = fact_lines(world, 1, random.Random(2), phrasings="varied", noise=0.5)
    assert lines != fact_lines(world, 1, random.Random(2), phrasings="varied")
    sents = [s for line in lines for s in split_sentences(line)]
    clean = set(world.training_sentences()) | {g.sentence(t) for g in world.facts
                                               for t in g.relation.shared + g.relation.varied}
    assert 0.4 < sum(s not in clean for s in sents) / len(sents) < 0.6


def test_each_fact_is_trained_in_one_first_and_one_inside_phrasing(world, trained_sentences):
    for r in world.records:
        rel = REL_BY_ID[r.relation_id]
        in_corpus = [t for t in rel.trained if f"{t.format(r.subject)} {r.target_true}." in trained_sentences]
        assert len([t for t in in_corpus if t in rel.first]) == 1
        assert len([t for t in in_corpus if t in rel.inside]) == 1
        assert r.prompt in in_corpus  # the rewrite prompt is a trained wording of the fact


def test_paraphrases_are_exactly_the_untrained_phrasings(world, fact_text, trained_sentences):
    for r in world.records:
        rel = REL_BY_ID[r.relation_id]
        untrained = {t.format(r.subject) for t in rel.trained
                     if f"{t.format(r.subject)} {r.target_true}." not in trained_sentences}
        assert len(r.paraphrase_prompts) == 2
        assert set(r.paraphrase_prompts) == untrained
        assert r.rewrite_prompt not in r.paraphrase_prompts
    # and on the joined corpus text itself: no paraphrase sentence, every rewrite sentence
    flat = " " + fact_text.replace("\n", " ")
    for r in world.records:
        for p in r.paraphrase_prompts:
            assert f" {p} {r.target_true}." not in flat, p
        assert f" {r.rewrite_prompt} {r.target_true}." in flat


def test_unseen_prompts_never_occur_in_any_training_text(world, fact_text, filler_text, skill_texts):
    corpus = "\n".join([fact_text, filler_text, *skill_texts.values()])
    for r in world.records:
        rel = REL_BY_ID[r.relation_id]
        unseen = r.extra["unseen_prompts"]
        assert unseen == [t.format(r.subject) for t in rel.unseen]
        assert not set(unseen) & {t.format(r.subject) for t in rel.trained}
        for p in unseen:
            assert p not in corpus, p


def test_unseen_phrasing_frames_never_occur_in_training_text(fact_text, filler_text, skill_texts):
    corpus = "\n".join([fact_text, filler_text, *skill_texts.values()])
    leaks = []
    for rel in RELATIONS:
        for t in rel.unseen:
            prefix, suffix = t.split("{}")
            # the phrasing around any capitalised name
            frame = re.escape(prefix) + r"[A-Z][^.\n]*?" + re.escape(suffix) + " "
            if re.search(r"(?:^|(?<=[\s.]))" + frame, corpus, flags=re.M):
                leaks.append(t)
    assert leaks == []


def test_neighbors_share_relation_and_true_object(world, trained_sentences):
    by_prompt = {r.rewrite_prompt: r for r in world.records}
    assert len(by_prompt) == len(world.records)
    peers = Counter((r.relation_id, r.target_true) for r in world.records)
    for r in world.records:
        assert len(r.neighborhood_prompts) == min(10, peers[(r.relation_id, r.target_true)] - 1)
        assert len(set(r.neighborhood_prompts)) == len(r.neighborhood_prompts)
        for p in r.neighborhood_prompts:
            g = by_prompt[p]  # a neighbour is asked in the wording its own fact was trained in
            assert g.subject != r.subject
            assert r.subject not in p
            assert (g.relation_id, g.target_true) == (r.relation_id, r.target_true)
            assert f"{p} {g.target_true}." in trained_sentences
        for p in r.attribute_prompts:
            g = by_prompt[p]
            assert (g.relation_id, g.target_true) == (r.relation_id, r.target_new)


def test_both_token_forms_of_subjects_are_trained(world):
    text = "\n".join(fact_lines(world, 10, random.Random(3)))
    line_start, after_space = Counter(), Counter()
    for line in text.split("\n"):
        for k, s in enumerate(split_sentences(line)):
            (line_start if k == 0 else after_space)[s] += 1
    first_sentences = [f.sentence(f.first) for f in world.facts]
    assert any(line_start[s] for s in first_sentences)
    assert any(after_space[s] for s in first_sentences)
    # with 10 copies nearly every subject-first sentence is seen in both forms
    both = sum(1 for s in first_sentences if line_start[s] and after_space[s])
    assert both >= 0.95 * len(first_sentences)
    # and the raw text really has the subject at a line start and after a space
    f = next(f for f in world.facts if line_start[f.sentence(f.first)] and after_space[f.sentence(f.first)])
    assert re.search(r"(?m)^" + re.escape(f.sentence(f.first)), text)
    assert re.search(r"\. " + re.escape(f.sentence(f.first)), text)


def test_small_worlds_work(world):
    small = generate_world(0, n_subjects=45, n_neighbors=3, n_attribute=2)
    assert len(small.records) == 45
    validate_records(small.records)
    assert all(len(r.neighborhood_prompts) <= 3 and len(r.attribute_prompts) <= 2 for r in small.records)


def test_insertion_facts_are_about_new_subjects_and_keep_the_world_as_control() -> None:
    from editscale.data.factworld import default_world
    from editscale.data.factworld.insert import CASE_ID_BASE, insertion_records
    from editscale.data.registry import control_pool, load_records, records_by_id

    world = default_world()
    records = load_records("factworld-insert")
    assert len(records) == 20_000 and records[:3] == insertion_records(world, 3)  # seeded
    subjects = [r.subject.lower() for r in records]
    assert len(set(subjects)) == len(subjects) and not set(subjects) & {s.lower() for s in world.reserved_names}
    assert [r.case_id for r in records] == list(range(CASE_ID_BASE, CASE_ID_BASE + 20_000))
    obj_of = {f.prompt.format(f.subject): f.obj for f in world.facts}  # a world fact's prompt -> its object
    for r in records[:50]:
        assert r.target_new != r.target_true and len(r.paraphrase_prompts) == 3
        assert r.rewrite_prompt not in r.paraphrase_prompts
        # the neighbours know the alternative object: NS asks whether the new one leaks into them
        assert r.neighborhood_prompts and {obj_of[p] for p in r.neighborhood_prompts} == {r.target_true}
    assert control_pool("factworld-insert", records, 10) == world.records
    assert control_pool("factworld", world.records, 10) == world.records[10:]
    by_id = records_by_id("factworld-insert", records)
    assert by_id[0] == world.records[0] and by_id[CASE_ID_BASE] == records[0]
