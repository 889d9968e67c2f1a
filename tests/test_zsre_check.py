"""zsRE locality scored by agreement, the completion-prompt loader, and `editscale zsre-check`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editscale.data.zsre import (
    load_completion_prompts,
    pair_completion_prompts,
    parse_completion_prompts,
    parse_zsre,
)
from editscale.errors import EditscaleError, RecordError
from editscale.eval.proficiency import edit_scores, locality_answers
from editscale.models.adapter import ModelAdapter
from editscale.run.store import RunStore
from test_zsre import mend_record
from tiny_models import byte_bpe_tokenizer, tiny_config


def long_tiny_gpt2(tok):
    """The tiny GPT-2 with room for real zsRE questions, which its byte-level BPE spells nearly letter by letter."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("gpt2", len(tok))
    config.n_positions = 512
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    tok = byte_bpe_tokenizer()
    return ModelAdapter(long_tiny_gpt2(tok), tok)


def agreement_by_hand(adapter: ModelAdapter, prompt: str, answer: str, before: torch.nn.Module) -> float:
    """Share of the answer's tokens whose teacher-forced argmax is the same under both models."""
    tok = adapter.tokenizer
    prefix = tok(prompt)["input_ids"]
    target = tok(" " + answer)["input_ids"]
    ids = torch.tensor([prefix + target[:-1]])
    positions = range(len(prefix) - 1, len(prefix) - 1 + len(target))
    with torch.no_grad():
        a = before(ids).logits[0].argmax(-1)
        b = adapter.model(ids).logits[0].argmax(-1)
    return sum(int(a[p] == b[p]) for p in positions) / len(target)


def test_zsre_ns_is_answer_agreement_before_and_after_the_edit(adapter: ModelAdapter) -> None:
    import copy

    records = parse_zsre([mend_record("Watts Humphrey"), mend_record("Ada Lovelace", alt="Oxford")])
    assert all(r.extra["ns"] == "agreement" for r in records)
    before = locality_answers(adapter, records)
    assert set(before) == {0, 1}
    # unchanged model: every answer token agrees
    assert [s.ns for s in edit_scores(adapter, records, before=before)] == [1.0, 1.0]
    unedited = copy.deepcopy(adapter.model)
    saved = adapter.snapshot([0, 1])
    try:
        g = torch.Generator().manual_seed(0)
        for layer in (0, 1):
            w = adapter.get_mlp_out_weight(layer)
            adapter.set_mlp_out_weight(layer, w + 0.5 * torch.randn(w.shape, generator=g))
        scores = edit_scores(adapter, records, before=before)
        for rec, s in zip(records, scores, strict=True):
            want = agreement_by_hand(adapter, rec.neighborhood_prompts[0], rec.extra["neighborhood_target"], unedited)
            assert s.ns == pytest.approx(want)
        assert any(s.ns < 1.0 for s in scores)  # the perturbation changed some answer token
    finally:
        adapter.restore(saved)


def test_agreement_needs_the_answers_before_the_edit(adapter: ModelAdapter) -> None:
    records = parse_zsre([mend_record()])
    with pytest.raises(ValueError, match="before=locality_answers"):
        edit_scores(adapter, records)


def test_completion_prompts_load_and_pair(tmp_path: Path) -> None:
    records = parse_zsre([mend_record("A b"), mend_record("C d")])
    prompts = parse_completion_prompts([
        {"case_index": 1, "question": "What university did C d attend?", "text_completion_prompt": "C d attended"},
        {"case_index": 7, "question": "What is X?", "text_completion_prompt": "X is"}])
    pairs = pair_completion_prompts(records, prompts)
    assert [(r.case_id, p.prompt) for r, p in pairs] == [(1, "C d attended")]

    wrong = parse_completion_prompts([{"case_index": 0, "question": "Who is Y?", "text_completion_prompt": "Y is"}])
    with pytest.raises(RecordError, match="were made for another file") as e:
        pair_completion_prompts(records, wrong, source="p.json")
    assert "p.json" in str(e.value) and "'question'" in str(e.value)
    with pytest.raises(EditscaleError, match="no record of the dataset has a completion prompt"):
        pair_completion_prompts(records, parse_completion_prompts(
            [{"case_index": 9, "question": "Q?", "text_completion_prompt": "Q"}]))


@pytest.mark.parametrize(("raw", "field"), [
    ([{"case_index": "0", "question": "Q?", "text_completion_prompt": "Q"}], "case_index"),
    ([{"case_index": 0, "text_completion_prompt": "Q"}], "question"),
    ([{"case_index": 0, "question": "Q?", "text_completion_prompt": 3}], "text_completion_prompt"),
    ([{"case_index": 0, "question": "Q?", "text_completion_prompt": "Q"}] * 2, "case_index"),
])
def test_completion_prompt_errors_name_record_and_field(tmp_path: Path, raw: list, field: str) -> None:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(RecordError) as e:
        load_completion_prompts(path)
    assert "prompts.json" in str(e.value) and f"'{field}'" in str(e.value)


def test_shared_completion_prompts_are_for_the_eval_split(shared_data: Path) -> None:
    from editscale.data.zsre import load_zsre

    prompts = load_completion_prompts(shared_data / "zsre" / "zsre_text_completion_prompts.json")
    assert sorted(prompts) == list(range(280))
    assert prompts[0].prompt == "The university Watts Humphrey attended is"
    train = load_zsre(shared_data / "zsre" / "zsre_mend_train_1k.json", skip_noop=True)
    with pytest.raises(RecordError, match="made for another file"):
        pair_completion_prompts(train, prompts)


def test_factworld_qa_pairs_every_fact_with_its_trained_phrasing() -> None:
    from editscale.data.factworld import default_world
    from editscale.data.factworld.qa import completion_prompts
    from editscale.data.registry import load_records

    world = default_world()
    records = load_records("factworld-qa")
    pairs = pair_completion_prompts(records, parse_completion_prompts(completion_prompts(world)))
    assert len(pairs) == len(world.facts) == len(records)
    for (rec, prompt), fact in zip(pairs[:50], world.facts, strict=False):
        assert rec.subject == fact.subject and rec.target_true == fact.obj and rec.rewrite_prompt.endswith("?")
        assert prompt.prompt == fact.inside.format(fact.subject)
        assert not rec.neighborhood_prompts[0].endswith(f"{fact.subject}?")


def _common_span(a: str, b: str) -> str:
    """The longest run of words two phrasings share: the subject of a question and its completion."""
    wa, wb = a.rstrip("?").split(), b.split()
    best: list[str] = []
    for i in range(len(wa)):
        for j in range(len(wb)):
            k = 0
            while i + k < len(wa) and j + k < len(wb) and wa[i + k] == wb[j + k]:
                k += 1
            if k > len(best):
                best = wa[i:i + k]
    return " ".join(best)


def test_zsre_check_runs_on_the_shared_prompts_with_a_tiny_model(run_cli, shared_data: Path, tmp_path: Path) -> None:
    """The published completion prompts are for zsre_mend_eval.json, which the shared folder lacks: the
    test writes a MEND-format file for their questions (answers taken from the train split's records)."""
    prompts_path = shared_data / "zsre" / "zsre_text_completion_prompts.json"
    prompts = json.loads(prompts_path.read_text())[:6]
    train = json.loads((shared_data / "zsre" / "zsre_mend_train_1k.json").read_text())
    mend = []
    for p, t in zip(prompts, train, strict=False):
        subject = _common_span(p["question"], p["text_completion_prompt"])
        assert subject and subject in p["question"]
        mend.append({**t, "subject": subject, "src": p["question"], "rephrase": p["question"]})
    data = tmp_path / "zsre_eval_like.json"
    data.write_text(json.dumps(mend))

    model_dir = tmp_path / "tiny"
    tok = byte_bpe_tokenizer()
    long_tiny_gpt2(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    args = ["zsre-check", "--out", str(tmp_path / "check"), "--model", str(model_dir), "--methods", "ft-c",
            "--dataset", "zsre", "--data-path", str(data), "--prompts", str(prompts_path), "--n", "3",
            "--max-new-tokens", "4", "--no-progress"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "not retrieved as completion" in out and "ft-c" in out
    rows = RunStore(tmp_path / "check" / "ft-c").rows("zsre_check")
    assert [r["case_id"] for r in rows] == [0, 1, 2]
    assert rows[0]["completion"] == "The university Watts Humphrey attended is"
    assert all(r["status"] == "ok" and isinstance(r["completion_retrieved"], bool) for r in rows)
    assert (tmp_path / "check" / "ft-c" / "config.yaml").exists()
    # a second call keeps the rows and checks nothing again
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert len(RunStore(tmp_path / "check" / "ft-c").rows("zsre_check")) == 3


@pytest.mark.slow
def test_zsre_check_on_the_embedded_fact_world(run_cli, embedded_lm, embedded_stats: Path, tmp_path: Path) -> None:
    code, out, err = run_cli("zsre-check", "--out", str(tmp_path), "--methods", "rome", "--n", "3",
                             "--stats-cache", str(embedded_stats), "--json", "--no-progress")
    assert code == 0, err
    (summary,) = json.loads(out)
    assert summary["method"] == "rome" and summary["facts"] == 3
    rows = RunStore(tmp_path / "rome").rows("zsre_check")
    assert all(r["question"].endswith("?") and not r["completion"].endswith("?") for r in rows)
    qa = [r for r in rows if r["qa_es"]]
    assert summary["qa_success"] == len(qa)
    if qa:
        assert summary["not_retrieved"] == pytest.approx(sum(not r["completion_retrieved"] for r in qa) / len(qa))
