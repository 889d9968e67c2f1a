"""Skill tasks of the embedded model and the paper's few-shot formats."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from editscale.data.factworld.skills import (
    DENY_FRAMES,
    NEGATIVE,
    POSITIVE,
    SKILL_TASKS,
    STATE_FRAMES,
    Draw,
    _scramble,
    acceptability_example,
    entailment_example,
    fresh_namer,
    paraphrase_example,
    skill_eval_set,
    skill_training_text,
)
from editscale.data.factworld.world import RELATIONS, generate_world, make_name
from editscale.data.fewshot import COLA_FORMAT, FORMATS, MRPC_FORMAT, RTE_FORMAT, SST2_FORMAT


@pytest.fixture(scope="module")
def world():
    return generate_world(0)


@pytest.fixture(scope="module")
def eval_sets(world):
    return {name: skill_eval_set(task, world.reserved_names, n=200) for name, task in SKILL_TASKS.items()}


def fields_text(fields: dict[str, str]) -> str:
    return "\n".join(fields.values())


# ---------------------------------------------------------------------- evaluation sets


@pytest.mark.parametrize("name", list(SKILL_TASKS))
def test_eval_set_is_balanced_and_deterministic(name, world, eval_sets):
    es = eval_sets[name]
    assert len(es.examples) == 200
    assert Counter(y for _, y in es.examples) == {0: 100, 1: 100}
    assert [y for _, y in es.demos] == list(SKILL_TASKS[name].demo_labels)
    assert len(es.demos) == SKILL_TASKS[name].n_demos
    again = skill_eval_set(SKILL_TASKS[name], world.reserved_names, n=200)
    assert again.examples == es.examples and again.demos == es.demos
    other = skill_eval_set(SKILL_TASKS[name], world.reserved_names, n=200, seed=7)
    assert other.examples != es.examples
    small = skill_eval_set(SKILL_TASKS[name], world.reserved_names, n=40)
    assert Counter(y for _, y in small.examples) == {0: 20, 1: 20}
    # shuffled, not 0,1,0,1,...
    assert [y for _, y in es.examples] != [0, 1] * 100


def test_eval_sets_name_no_world_subject(world, eval_sets):
    names = sorted((f.subject for f in world.facts), key=len, reverse=True)
    pattern = re.compile(r"(?<![A-Za-z])(?:" + "|".join(map(re.escape, names)) + r")(?![a-z])")
    for es in eval_sets.values():
        for fields, _ in (*es.demos, *es.examples):
            text = fields_text(fields)
            assert pattern.search(text) is None, text
            assert pattern.search(text.lower()) is None


def test_fresh_namer_skips_reserved_names():
    kinds = ("person", "person", "company", "place", "work", "product")
    probe = random.Random(5)
    first = make_name(probe, probe.choice(kinds))  # what the namer would invent first
    second = make_name(probe, probe.choice(kinds))
    assert fresh_namer(random.Random(5), set())() == first
    namer = fresh_namer(random.Random(5), {first.lower()})
    assert namer() == second


# ---------------------------------------------------------------------- the paper's prompt formats


def test_sst2_prompt_is_the_paper_template(eval_sets):
    es = eval_sets["sentiment"]
    fields, _ = es.examples[0]
    words = {0: "negative", 1: "positive"}
    expected = "".join(f"Review : {f['sentence']}\nSentiment : {words[y]}\n\n" for f, y in es.demos)
    expected += f"Review : {fields['sentence']}\nSentiment :"
    prompt = es.prompt(fields)
    assert prompt == expected
    assert prompt.endswith("\nSentiment :")
    assert prompt.split("\n\n")[0].endswith("Sentiment : negative")


def test_mrpc_cola_rte_prompts_are_the_paper_templates(eval_sets):
    es = eval_sets["paraphrase"]
    f, _ = es.examples[0]
    yn = {0: "No", 1: "Yes"}
    block = "Are the sentences paraphrases of each other.\nSentence 1: {}\nSentence 2: {}\nAnswer:"
    expected = "".join(block.format(d["sentence1"], d["sentence2"]) + f" {yn[y]}\n\n" for d, y in es.demos)
    assert es.prompt(f) == expected + block.format(f["sentence1"], f["sentence2"])
    assert es.prompt(f).endswith("\nAnswer:")

    es = eval_sets["acceptability"]
    f, _ = es.examples[0]
    block = "Is this sentence linguistically acceptable?\nSentence : {}\nAnswer :"
    expected = "".join(block.format(d["sentence"]) + f" {yn[y]}\n\n" for d, y in es.demos)
    assert es.prompt(f) == expected + block.format(f["sentence"])
    assert es.prompt(f).endswith("\nAnswer :")

    es = eval_sets["entailment"]
    f, _ = es.examples[0]
    tf = {0: "False", 1: "True"}
    block = "{}\nquestion: {} True or False?\nanswer:"
    expected = "".join(block.format(d["sentence1"], d["sentence2"]) + f" {tf[y]}\n\n" for d, y in es.demos)
    assert es.prompt(f) == expected + block.format(f["sentence1"], f["sentence2"])
    assert es.prompt(f).endswith("True or False?\nanswer:")


def test_paper_sst2_context_renders_exactly():
    demos = [({"sentence": "excruciatingly unfunny and pitifully unromantic"}, 0),
             ({"sentence": "rich veins of funny stuff in this movie"}, 1)]
    assert SST2_FORMAT.render_prompt(demos, {"sentence": "a gem"}) == (
        "Review : excruciatingly unfunny and pitifully unromantic\nSentiment : negative\n\n"
        "Review : rich veins of funny stuff in this movie\nSentiment : positive\n\n"
        "Review : a gem\nSentiment :")
    assert COLA_FORMAT.render_block({"sentence": "You will Bob believe."}, 0) == (
        "Is this sentence linguistically acceptable?\nSentence : You will Bob believe.\nAnswer : No\n\n")
    assert set(FORMATS) == {"sst2", "mrpc", "cola", "rte"}


def test_skill_training_text_is_answered_blocks(world):
    for task in SKILL_TASKS.values():
        text = skill_training_text(task, random.Random(0), world.reserved_names, 25)
        assert text == skill_training_text(task, random.Random(0), world.reserved_names, 25)
        blocks = text.split("\n\n")
        assert blocks[-1] == "" and len(blocks) == 26
        for b in blocks[:-1]:
            head, answer = b.rsplit(task.fmt.marker, 1)
            assert answer.strip() in task.fmt.label_words.values()
            assert task.fmt.parse(b) in (0, 1)
        assert text.count(task.fmt.marker) == 25


# ---------------------------------------------------------------------- parsing predictions


def test_parse_reads_the_last_piece_after_the_marker():
    assert SST2_FORMAT.parse("Review : x\nSentiment : positive\n\nReview : y\nSentiment : negative") == 0
    assert SST2_FORMAT.parse("Review : x\nSentiment : negative\n\nReview : y\nSentiment : positive\n") == 1
    assert SST2_FORMAT.parse("Review : y\nSentiment : neutral") == -1
    # the query's own words before the marker do not count
    assert SST2_FORMAT.parse("Review : a positive film\nSentiment : meh") == -1
    # without a marker the whole text is searched
    assert SST2_FORMAT.parse("negative!") == 0


def test_parse_tests_substrings_in_a_fixed_order():
    assert SST2_FORMAT.parse("Sentiment : negative positive") == 1  # positive is tested first
    assert MRPC_FORMAT.parse("Answer: No Yes") == 1
    assert MRPC_FORMAT.parse("Answer: Not sure") == 0  # substring search: "No" inside "Not"
    assert MRPC_FORMAT.parse("Answer: yes") == -1  # case-sensitive
    assert COLA_FORMAT.parse("Answer : Yes\n\nIs") == 1
    assert COLA_FORMAT.parse("Answer: Yes") == 1  # no "Answer :" marker: the whole text is searched
    assert COLA_FORMAT.parse("Answer : maybe") == -1
    # RTE checks False before True
    assert RTE_FORMAT.parse("question: a True or False?\nanswer: True False") == 0
    assert RTE_FORMAT.parse("question: a True or False?\nanswer: True\n") == 1
    assert RTE_FORMAT.parse("question: a True or False?\nanswer: unknown") == -1
    # the marker of another task is not this task's marker
    assert RTE_FORMAT.parse("Answer: True\nanswer: False") == 0
    assert COLA_FORMAT.parse("Answer : No\n\nSentence : x\nAnswer : Yes") == 1


# ---------------------------------------------------------------------- the examples themselves


def test_sentiment_polar_words_match_the_label(eval_sets):
    pos, neg = set(POSITIVE), set(NEGATIVE)
    for fields, y in eval_sets["sentiment"].examples:
        words = set(fields["sentence"].split())
        assert words & (pos if y == 1 else neg)
        assert not words & (neg if y == 1 else pos)


def _words(sentence: str) -> Counter:
    return Counter(sentence.rstrip(".").lower().split(" "))


def test_scrambled_sentences_use_the_same_words_in_another_order():
    n_checked = 0
    for k in range(400):
        # the same seeds give the same sentence; label 0 then scrambles it
        good, y1 = acceptability_example(Draw(random.Random(k), set()), 1)
        bad, y0 = acceptability_example(Draw(random.Random(k), set()), 0)
        assert (y1, y0) == (1, 0)
        s, t = good["sentence"], bad["sentence"]
        assert t != s
        assert t.endswith(".") and t[0].isupper()
        assert _words(t) == _words(s)
        assert t.lower() != s.lower()
        n_checked += 1
    assert n_checked == 400


def test_scramble_direct():
    rng = random.Random(0)
    for s in ["The old man saw a dog near the river.", "Paris plays the piano.", "A b c d."]:
        for _ in range(30):
            t = _scramble(rng, s)
            assert t.lower() != s.lower()
            assert _words(t) == _words(s)


_FACT_PATTERNS = [
    (rel.relation_id, t, re.compile(re.escape(t.split("{}")[0]) + "(.+)" + re.escape(t.split("{}")[1]) + " ("
                                    + "|".join(map(re.escape, rel.objects)) + ")"))
    for rel in RELATIONS for t in rel.trained
]


def _parse_fact(sentence: str):
    """(relation_id, template, subject, object) of '<template with subject> <object>[.]'; shortest subject."""
    sentence = sentence.rstrip(".")
    best = None
    for rid, t, pattern in _FACT_PATTERNS:
        m = pattern.fullmatch(sentence)
        if m and (best is None or len(m.group(1)) < len(best[2])):
            best = (rid, t, m.group(1), m.group(2))
    assert best is not None, sentence
    return best


def _unframe(sentence: str) -> tuple[str, bool]:
    """(the fact sentence inside a frame, whether the frame denies it)."""
    for frames, denied in ((DENY_FRAMES, True), (STATE_FRAMES, False)):
        for f in frames:
            head = f.split("{}")[0]
            if head and sentence.startswith(head):
                core = sentence[len(head):]
                return (core if core.split(" ")[0] != "the" else "The" + core[3:]), denied
    return sentence, False


def test_paraphrase_examples():
    draw = Draw(random.Random(2), set())
    framed = Counter()
    for k in range(300):
        y = k % 2
        fields, label = paraphrase_example(draw, y)
        draw.end_block()
        assert label == y
        r1, t1, s1, o1 = _parse_fact(fields["sentence1"])
        core, denied = _unframe(fields["sentence2"])
        r2, t2, s2, o2 = _parse_fact(core)
        assert r1 == r2 and t1 != t2  # the same relation in two wordings
        assert (s1, o1) == (s2, o2)  # the same fact, stated or denied
        assert denied == (y == 0)
        framed[y] += core != fields["sentence2"]
    # stated sentences are framed too, so that a frame alone does not give the label away
    assert framed[0] == 150 and 30 < framed[1] < 120


def _objects(fields: dict[str, str]) -> set[str]:
    sentences = [p for text in fields.values() for p in text.rstrip(".").split(". ")]
    return {_parse_fact(_unframe(p)[0])[3] for p in sentences}


def _object_words(objects: set[str]) -> set[str]:
    return {w for o in objects for w in o.split()}


@pytest.mark.parametrize("task", ["paraphrase", "entailment"])
def test_comparison_examples_never_reuse_a_demonstration_object(eval_sets, task):
    # otherwise "was this object mentioned before?" would not decide the example (module docstring)
    es = eval_sets[task]
    demo_words = _object_words(set().union(*(_objects(f) for f, _ in es.demos)))
    for fields, _ in es.examples:
        assert not _object_words(_objects(fields)) & demo_words, fields


@pytest.mark.parametrize("make", [paraphrase_example, entailment_example])
def test_training_blocks_avoid_the_objects_of_recent_blocks(make):
    draw = Draw(random.Random(3), set(), memory=4)
    history: list[set[str]] = []
    for k in range(400):
        fields, _ = make(draw, k % 2)
        draw.end_block()
        words = _object_words(_objects(fields))
        for earlier in history[-4:]:
            assert not words & earlier, (k, fields)
        history.append(words)
    # further back, objects come round again: the pools are small
    assert any(history[k] & history[k - 6] for k in range(6, len(history)))


def test_entailment_examples(eval_sets):
    for fields, y in eval_sets["entailment"].examples:
        premise = fields["sentence1"]
        facts = [_parse_fact(p) for p in premise.split(". ")]
        assert len(facts) == 2 and facts[0][0] != facts[1][0]
        core, denied = _unframe(fields["sentence2"])
        rel, t, subj, obj = _parse_fact(core)
        (match,) = [f for f in facts if f[0] == rel and f[2] == subj]
        assert t != match[1] and obj == match[3]  # one premise fact restated in another wording
        assert denied == (y == 0)
