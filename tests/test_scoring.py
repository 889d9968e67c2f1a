"""Batched scoring and decoding against naive one-row-at-a-time computations on a tiny random GPT-2."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from editscale.data.fewshot import MRPC_FORMAT, SST2_FORMAT
from editscale.data.records import EditRecord
from editscale.eval.downstream.fewshot import evaluate_fewshot, fewshot_metrics
from editscale.eval.knowledge import knowledge_scores, record_prompts, score_prompt_pairs
from editscale.eval.scoring import greedy_generate, score_continuations
from editscale.models.adapter import ModelAdapter
from tiny_models import byte_bpe_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_bpe_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=4,
                                   n_inner=64, bos_token_id=0, eos_token_id=0))
    # larger weights than the default init, so logits are far from uniform and argmaxes are well separated
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    return m.eval()


@torch.no_grad()
def naive_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Log-softmax [len, vocab] of one unpadded row, without attention mask."""
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def naive_score(model, prefix: list[int], target: list[int]) -> tuple[float, float, list[int]]:
    lp = naive_logprobs(model, prefix + target)
    token_lp = [lp[len(prefix) - 1 + j, t].item() for j, t in enumerate(target)]
    argmax = [int(lp[len(prefix) - 1 + j].argmax()) for j in range(len(target))]
    return -sum(token_lp) / len(token_lp), -sum(token_lp), argmax


@torch.no_grad()
def naive_greedy(model, prompt: list[int], n_new: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n_new):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_score_continuations_matches_naive(model):
    g = torch.Generator().manual_seed(1)
    v = model.config.vocab_size

    def rand(n):
        return torch.randint(1, v, (n,), generator=g).tolist()

    rows = [(rand(3), rand(1)), (rand(11), rand(4)), (rand(1), rand(2)), (rand(7), rand(3)), (rand(20), rand(1))]
    for batch_size in (2, 64):
        for pad_id in (0, v - 1):
            got = score_continuations(model, rows, pad_id=pad_id, batch_size=batch_size)
            assert len(got) == len(rows)
            for (prefix, target), s in zip(rows, got):
                mean, total, argmax = naive_score(model, prefix, target)
                assert s.mean_nll == pytest.approx(mean, abs=1e-5)
                assert s.sum_nll == pytest.approx(total, abs=1e-5)
                assert s.mean_nll == pytest.approx(s.sum_nll / len(target), abs=1e-6)
                assert list(s.argmax_ids) == argmax
                assert s.greedy_match == (argmax == target)


def test_rows_that_begin_another_are_read_off_it_and_each_cell_goes_through_the_head_once(model):
    g = torch.Generator().manual_seed(3)
    v = model.config.vocab_size
    prompts = [torch.randint(1, v, (n,), generator=g).tolist() for n in (6, 9, 4)]
    one, two, three = [11], [14, 15], [14, 15, 16]
    # each prompt against targets that begin one another (a CounterFact pair with a one-token target is
    # the common case), a duplicate row, and a row whose prompt is another's plus a target's first token
    rows = [(p, t) for p in prompts for t in (one, two, three)] + [(prompts[0], two), (prompts[1] + three[:1], [3])]
    fed, heads = [], []
    hook = model.transformer.h[0].register_forward_hook(lambda m, a, o: fed.append(a[0].shape[0]))
    original = model.lm_head.forward
    model.lm_head.forward = lambda x: (heads.append(x.numel() // x.shape[-1]), original(x))[1]
    try:
        got = score_continuations(model, rows, pad_id=0)
    finally:
        hook.remove()
        model.lm_head.forward = original
    assert sum(fed) == len(prompts)  # one row per prompt: its longest fed target serves the others
    assert sum(heads) == 3 * len(prompts)  # the positions after the prompt's last token and the 14 and 15
    for (prefix, target), s in zip(rows, got):
        mean, total, argmax = naive_score(model, prefix, target)
        assert s.mean_nll == pytest.approx(mean, abs=1e-5) and list(s.argmax_ids) == argmax


def test_greedy_match_is_true_only_for_the_teacher_forced_argmax(model):
    prefix = [5, 17, 42, 8]
    target = naive_greedy(model, prefix, 3)  # greedy continuation = teacher-forced argmax at every step
    wrong = target[:-1] + [(target[-1] + 1) % model.config.vocab_size]
    short = [9]
    right, bad, other = score_continuations(model, [(prefix, target), (prefix, wrong), (short + prefix, target)],
                                            pad_id=0)
    assert right.greedy_match and list(right.argmax_ids) == target
    assert not bad.greedy_match and list(bad.argmax_ids) == target  # same prefix path up to the last token
    assert bad.sum_nll > right.sum_nll
    assert math.isfinite(other.mean_nll)


def test_greedy_generate_matches_naive_decoding(model):
    g = torch.Generator().manual_seed(2)
    v = model.config.vocab_size
    prompts = [torch.randint(1, v, (n,), generator=g).tolist() for n in (1, 6, 3, 12, 4)]
    expected = [naive_greedy(model, p, 5) for p in prompts]
    for batch_size in (2, 32):
        for pad_id in (0, 7):
            assert greedy_generate(model, prompts, 5, pad_id=pad_id, batch_size=batch_size) == expected


# ---------------------------------------------------------------------- knowledge scores


def make_records() -> list[EditRecord]:
    return [
        EditRecord(0, "Paris", "{} is located in the country of", "France", "Spain", "P17",
                   paraphrase_prompts=("The city of Paris is in", "Paris belongs to"),
                   neighborhood_prompts=("London is located in the country of", "New York is located in",
                                         "Madrid is in"),
                   extra={"unseen_prompts": ["Paris lies in"]}),
        EditRecord(1, "Toko Yasuda", "{} plays the", "piano", "guitar", "P1303",
                   paraphrase_prompts=("Toko Yasuda is a musician who plays the",),
                   neighborhood_prompts=("BBC One plays the", "Apple A5 plays the")),
        EditRecord(2, "Danielle Darrieux", "The mother tongue of {} is", "French", "English", "P103",
                   paraphrase_prompts=("Danielle Darrieux speaks", "Danielle Darrieux grew up speaking"),
                   neighborhood_prompts=("The mother tongue of Edwin of Northumbria is",),
                   extra={"unseen_prompts": ["The first language of Danielle Darrieux is", "Danielle Darrieux, in"]}),
    ]


def naive_mean_nll(model, tok, prompt: str, target: str) -> float:
    prefix = tok(prompt, add_special_tokens=False)["input_ids"]
    tgt = tok(" " + target, add_special_tokens=False)["input_ids"]
    return naive_score(model, prefix, tgt)[0]


def test_score_prompt_pairs_matches_naive(model, tok):
    adapter = ModelAdapter(model, tok)
    prompts = ["Paris is located in", "The mother tongue of Danielle Darrieux is", "BBC One", "Apple A5 was"]
    a = ["France", "English", "Dutch", "Google"]
    b = ["Spain", "Christianity", "London", "Apple"]
    ref = [(naive_mean_nll(model, tok, p, x), naive_mean_nll(model, tok, p, y)) for p, x, y in zip(prompts, a, b)]
    for batch_size in (1, 3, 128):
        got = score_prompt_pairs(adapter, prompts, a, b, batch_size=batch_size)
        assert len(got) == len(prompts)
        for (ga, gb), (ra, rb) in zip(got, ref):
            assert ga == pytest.approx(ra, abs=1e-5) and gb == pytest.approx(rb, abs=1e-5)


def test_knowledge_scores_counts_and_fractions(model, tok):
    adapter = ModelAdapter(model, tok)
    records = make_records()
    out = knowledge_scores(adapter, records)
    assert out["n_records"] == 3
    assert out["n_rewrite_prompts"] == 3
    assert out["n_paraphrase_prompts"] == 5
    assert out["n_neighborhood_prompts"] == 6
    assert out["n_unseen_prompts"] == 3
    for group in ("rewrite", "paraphrase", "neighborhood", "unseen"):
        hits = [naive_mean_nll(model, tok, p, r.target_true) < naive_mean_nll(model, tok, p, r.target_new)
                for r in records for p in record_prompts(r)[group]]
        assert 0.0 <= out[f"known_{group}"] <= 1.0
        assert out[f"known_{group}"] == pytest.approx(sum(hits) / len(hits))
    assert knowledge_scores(adapter, records, batch_size=2) == pytest.approx(out)
    # a group no record has is left out rather than reported as 0
    no_unseen = knowledge_scores(adapter, records[1:2])
    assert "known_unseen" not in no_unseen and "n_unseen_prompts" not in no_unseen
    assert no_unseen["n_neighborhood_prompts"] == 2


# ---------------------------------------------------------------------- few-shot metrics


def test_fewshot_metrics_keep_invalid_predictions():
    from sklearn.metrics import f1_score, matthews_corrcoef  # here: collecting the suite need not load scipy

    labels = [0, 1, 0, 1]
    preds = [0, -1, 1, 1]
    m = fewshot_metrics(labels, preds)
    # class 0: P=1, R=1/2, F1=2/3; class 1: P=1/2, R=1/2 (the invalid answer is a miss), F1=1/2
    assert m["f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["f1"] == pytest.approx(f1_score(labels, preds, average="weighted", zero_division=0))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(labels, preds))
    assert (m["correct"], m["incorrect"], m["invalid"], m["total"]) == (2, 1, 1, 4)
    assert m["accuracy"] == 0.5
    # dropping the invalid prediction would give another (higher) F1
    assert m["f1"] < f1_score([0, 0, 1], [0, 1, 1], average="weighted")


def test_fewshot_metrics_match_sklearn_on_unbalanced_labels():
    from sklearn.metrics import f1_score, matthews_corrcoef

    labels = [1, 1, 1, 0, 0, 1, 0, 1, 1, 0]
    preds = [1, -1, 0, 0, -1, 1, 1, 1, -1, 0]
    m = fewshot_metrics(labels, preds)
    assert m["f1"] == pytest.approx(f1_score(labels, preds, average="weighted", zero_division=0))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(labels, preds))
    assert (m["correct"], m["incorrect"], m["invalid"], m["total"]) == (5, 2, 3, 10)
    assert m["accuracy"] == pytest.approx(0.5)
    perfect = fewshot_metrics([0, 1, 1], [0, 1, 1])
    assert perfect["f1"] == 1.0 and perfect["mcc"] == pytest.approx(1.0) and perfect["invalid"] == 0
    all_invalid = fewshot_metrics([0, 1], [-1, -1])
    assert all_invalid["f1"] == 0.0 and all_invalid["invalid"] == 2 and all_invalid["accuracy"] == 0.0


def test_evaluate_fewshot_parses_greedy_generations(model, tok):
    demos = [({"sentence1": "Paris plays the piano.", "sentence2": "Paris plays the guitar."}, 0)]
    examples = [({"sentence1": "BBC One", "sentence2": "BBC One"}, 1),
                ({"sentence1": "New York is", "sentence2": "Spain"}, 0),
                ({"sentence1": "Apple A5", "sentence2": "Apple"}, 1)]
    out = evaluate_fewshot(model, tok, MRPC_FORMAT, demos, examples, batch_size=2)
    for (fields, _), gen, pred in zip(examples, out["generations"], out["predictions"]):
        prompt = MRPC_FORMAT.render_prompt(demos, fields)
        ids = naive_greedy(model, tok(prompt, add_special_tokens=False)["input_ids"], 3)
        assert gen == tok.decode(ids, skip_special_tokens=True)
        assert pred == MRPC_FORMAT.parse(prompt + gen)
    assert out["total"] == 3
    assert out["correct"] + out["incorrect"] + out["invalid"] == 3
    assert out["f1"] == pytest.approx(fewshot_metrics([1, 0, 1], out["predictions"])["f1"])
    assert SST2_FORMAT.parse(SST2_FORMAT.render_prompt([], {"sentence": "x"}) + " positive") == 1
