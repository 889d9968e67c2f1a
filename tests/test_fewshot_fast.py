"""The shared-prefix few-shot evaluator must give exactly what the naive one gives."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from transformers import AutoModelForCausalLM

import editscale.data.factworld as factworld
from editscale.data.fewshot import MRPC_FORMAT, RTE_FORMAT, SST2_FORMAT, FewShotFormat
from editscale.errors import EditscaleError
from editscale.eval.downstream.fast import evaluate_fewshot_fast, prefix_split
from editscale.eval.downstream.fewshot import evaluate_fewshot, prompt_token_ids
from tiny_models import tiny_config, tokenizer_for

WORDS = ("Paris is located in France", "the film was a dull mess", "Apple developed the piano",
         "New York plays the Dutch piano", "BBC One is a twin city of London", "a warm and funny story",
         "English", "Toko Yasuda was developed by Google in Spain and is located in the country of France",
         "The mother tongue of Danielle Darrieux is English", "Edwin", "The headquarters of Apple are in London",
         "In Paris, the official language is Dutch, and the headquarters of BBC One are in Spain")


def sentence(i: int) -> str:
    # Lengths vary a lot between examples so padding and per-row positions matter.
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 3)) + "."


def task(fmt: FewShotFormat, n: int = 12) -> tuple[list, list]:
    def fields(i: int) -> dict[str, str]:
        if fmt is SST2_FORMAT:
            return {"sentence": sentence(i)}
        return {"sentence1": sentence(i), "sentence2": sentence(i + 5)}

    demos = [(fields(100 + i), i % 2) for i in range(2)]
    examples = [(fields(i), (i * 7 + 3) % 5 % 2) for i in range(n)]
    return demos, examples


@cache
def tiny(model_type: str):
    tok = tokenizer_for(model_type)
    config = tiny_config(model_type, len(tok))
    # The few-shot prompts are a few hundred tokens; GPT-2's learned positions must cover them.
    for attr in ("n_positions", "max_position_embeddings"):
        if hasattr(config, attr):
            setattr(config, attr, 2048)
    # Default-initialised tiny models barely look at their input (nearly the same tokens for every
    # prompt); larger weights make outputs depend on the context, so exactness is really tested.
    config.initializer_range = 0.5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.requires_grad_(False)
    return model, tok


FORMATS = [SST2_FORMAT, MRPC_FORMAT, RTE_FORMAT]


@pytest.mark.parametrize("mode", ["paper", "logprob"])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "llama"])
def test_fast_equals_naive_on_tiny_models(model_type, fmt, mode):
    model, tok = tiny(model_type)
    demos, examples = task(fmt)
    naive = evaluate_fewshot(model, tok, fmt, demos, examples, mode=mode, batch_size=5)
    fast = evaluate_fewshot_fast(model, tok, fmt, demos, examples, mode=mode, batch_size=5)
    assert fast["predictions"] == naive["predictions"]
    assert fast["f1"] == pytest.approx(naive["f1"], abs=1e-6)
    assert fast["invalid"] == naive["invalid"]
    assert fast["prefix_len"] > 0
    if mode == "paper":
        assert fast["generations"] == naive["generations"]
        assert len(set(fast["generations"])) > 1  # the model's output does depend on the example
    else:
        assert fast["invalid"] == 0
        for a, b in zip(fast["label_logprobs"], naive["label_logprobs"]):
            assert a.keys() == b.keys()
            assert all(a[y] == pytest.approx(b[y], abs=1e-5) for y in a)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_fast_generation_equals_single_prompt_generation(model_type):
    # Against the naive path run one prompt at a time: no padding at all on that side.
    model, tok = tiny(model_type)
    demos, examples = task(MRPC_FORMAT, n=7)
    single = evaluate_fewshot(model, tok, MRPC_FORMAT, demos, examples, batch_size=1)
    fast = evaluate_fewshot_fast(model, tok, MRPC_FORMAT, demos, examples, batch_size=4, gen_len=5)
    five = evaluate_fewshot(model, tok, MRPC_FORMAT, demos, examples, batch_size=1, gen_len=5)
    assert fast["generations"] == five["generations"]
    assert single["predictions"] == evaluate_fewshot_fast(model, tok, MRPC_FORMAT, demos, examples,
                                                          batch_size=4)["predictions"]


def test_prefix_split_is_on_token_ids():
    _, tok = tiny("gpt2")
    demos, examples = task(RTE_FORMAT)
    fields = [f for f, _ in examples]
    split = prefix_split(RTE_FORMAT, demos, fields, tok)
    naive_ids = prompt_token_ids(tok, [RTE_FORMAT.render_prompt(demos, f) for f in fields])
    assert split.ids == naive_ids
    assert split.prefix_len > 0
    for row, suffix in zip(split.ids, split.suffixes):
        assert row == split.prefix + suffix and len(suffix) >= 1
    # Longest: some two prompts differ at the first token after the prefix.
    assert len({row[split.prefix_len] for row in split.ids}) > 1
    # Identical prompts still leave one token per example to run.
    same = prefix_split(RTE_FORMAT, demos, [fields[0]] * 3, tok)
    assert same.prefix_len == len(same.ids[0]) - 1


@pytest.mark.parametrize("mode", ["paper", "logprob"])
def test_shared_prefix_is_run_once(mode):
    model, tok = tiny("gpt2")
    demos, examples = task(SST2_FORMAT)
    calls: list[tuple[int, int]] = []

    def hook(module, args, kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = evaluate_fewshot_fast(model, tok, SST2_FORMAT, demos, examples, mode=mode, batch_size=5, gen_len=3)
    finally:
        handle.remove()
    prefix_len = out["prefix_len"]
    assert prefix_len > 0 and out["forward_calls"] == len(calls)
    assert calls[0] == (1, prefix_len)  # the prefix, once, batch 1
    assert all(width < prefix_len for _, width in calls[1:])  # nothing else re-runs it
    n_chunks = 3  # 12 examples in chunks of 5
    if mode == "paper":
        assert len(calls) == 1 + n_chunks * 3  # suffix pass + 2 single-token steps per chunk


def test_unknown_mode_is_refused():
    model, tok = tiny("gpt2")
    demos, examples = task(SST2_FORMAT, n=2)
    with pytest.raises(EditscaleError, match="mode"):
        evaluate_fewshot_fast(model, tok, SST2_FORMAT, demos, examples, mode="sample")
    with pytest.raises(EditscaleError, match="mode"):
        evaluate_fewshot(model, tok, SST2_FORMAT, demos, examples, mode="sample")


@pytest.mark.parametrize("mode", ["paper", "logprob"])
@pytest.mark.parametrize("name", ["sentiment", "paraphrase"])
def test_fast_equals_naive_on_embedded_skills(name, mode, embedded_lm):
    from editscale.data.factworld.skills import SKILL_TASKS, skill_eval_set

    lm = embedded_lm
    es = skill_eval_set(SKILL_TASKS[name], factworld.default_world().reserved_names, n=12, seed=1234)
    naive = evaluate_fewshot(lm.model, lm.tokenizer, es.task.fmt, es.demos, es.examples, mode=mode, batch_size=16)
    fast = evaluate_fewshot_fast(lm.model, lm.tokenizer, es.task.fmt, es.demos, es.examples, mode=mode,
                                 batch_size=16)
    assert fast["predictions"] == naive["predictions"]
    assert fast["f1"] == pytest.approx(naive["f1"], abs=1e-6)
    assert fast["prefix_len"] > 0


def test_prompts_get_the_tokenizers_bos_as_the_paper_tokenises_them() -> None:
    from editscale.eval.downstream.fewshot import prompt_token_ids
    from tiny_models import byte_bpe_tokenizer, sentencepiece_tokenizer

    sp = sentencepiece_tokenizer()
    assert prompt_token_ids(sp, ["Review : fine"])[0][0] == sp.bos_token_id  # Llama style: BOS first
    bpe = byte_bpe_tokenizer()
    assert prompt_token_ids(bpe, ["Review : fine"])[0] == bpe("Review : fine", add_special_tokens=False)["input_ids"]
