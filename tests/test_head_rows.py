"""The output head applied only at the read positions (scoring.HeadRows, ModelAdapter.hidden_before_head)
gives what the full logits give, on tiny models of every family, and really skips the other positions."""

from __future__ import annotations

import pytest
import torch

from editscale.data.fewshot import MRPC_FORMAT
from editscale.eval.downstream.fast import evaluate_fewshot_fast
from editscale.eval.scoring import HeadRows, greedy_generate, score_continuations
from editscale.models.adapter import ModelAdapter
from tiny_models import tiny_config

FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2"]
VOCAB = 97


def tiny(model_type: str) -> torch.nn.Module:
    config = tiny_config(model_type, VOCAB)
    # larger weights than the default init, so logits are far from uniform and argmaxes well separated
    config.initializer_range = 0.5
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    model.requires_grad_(False)
    return model


def rows(seed: int = 1) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return [(rand(3), rand(1)), (rand(11), rand(4)), (rand(1), rand(2)), (rand(7), rand(3)), (rand(20), rand(1))]


@torch.no_grad()
def full_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len, vocab] of one unpadded row through the model's own forward, every position projected."""
    return model(input_ids=torch.tensor([ids])).logits[0].float()


class HeadCounter:
    """Counts the hidden-state rows the output head projects (its input's leading elements)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows: list[int] = []
        self.handle = model.get_output_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.rows.append(args[0].shape[:-1].numel())

    def __enter__(self) -> HeadCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_scores_equal_full_logits(model_type):
    model = tiny(model_type)
    data = rows()
    with HeadCounter(model) as heads:
        got = score_continuations(model, data, pad_id=0, batch_size=3)
    # two chunks (3 + 2 rows); the head saw exactly the scored positions: one per target token
    assert sum(heads.rows) == sum(len(t) for _, t in data)
    for (prefix, target), s in zip(data, got):
        lp = torch.log_softmax(full_logits(model, prefix + target), dim=-1)
        at = [len(prefix) - 1 + j for j in range(len(target))]
        token_lp = [lp[p, t].item() for p, t in zip(at, target)]
        assert s.mean_nll == pytest.approx(-sum(token_lp) / len(target), abs=1e-5)
        assert list(s.argmax_ids) == [int(lp[p].argmax()) for p in at]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_equals_full_logits_decoding(model_type):
    model = tiny(model_type)
    prompts = [p for p, _ in rows(2)]
    expected = []
    for p in prompts:
        ids = list(p)
        for _ in range(4):
            ids.append(int(full_logits(model, ids)[-1].argmax()))
        expected.append(ids[len(p):])
    with HeadCounter(model) as heads:
        assert greedy_generate(model, prompts, 4, pad_id=0, batch_size=2) == expected
    assert max(heads.rows) <= 2  # one row per prompt of a chunk, per step


@pytest.mark.parametrize("model_type", FAMILIES)
def test_hidden_before_head_is_what_the_head_reads(model_type):
    model = tiny(model_type)
    adapter = ModelAdapter(model, tokenizer=None)
    ids = torch.tensor([[5, 9, 14, 3, 40, 41], [7, 8, 9, 0, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[6], [3]])).long()
    with torch.no_grad(), HeadCounter(model) as heads:
        hidden = adapter.hidden_before_head(input_ids=ids, attention_mask=mask)
    assert heads.rows == [0]  # the model's own head projected nothing
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        picked = adapter.unembed(hidden[torch.tensor([0, 0, 1]), torch.tensor([5, 2, 2])])
    assert torch.allclose(picked, full[[0, 0, 1], [5, 2, 2]], atol=1e-5)


def test_unknown_family_falls_back_to_full_logits():
    class Wrapped(torch.nn.Module):  # no config.model_type: no role table
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    model = tiny("gpt2")
    head = HeadRows(Wrapped(model))
    assert head.adapter is None
    data = rows()
    a = score_continuations(Wrapped(model), data, pad_id=0)
    b = score_continuations(model, data, pad_id=0)
    assert [s.argmax_ids for s in a] == [s.argmax_ids for s in b]
    assert [s.mean_nll for s in a] == pytest.approx([s.mean_nll for s in b], abs=1e-5)


@pytest.mark.parametrize("model_type", ["gpt_neox", "qwen2"])
def test_fewshot_fast_projects_one_row_per_example_and_step(model_type):
    from transformers import PreTrainedTokenizerFast

    from tiny_models import byte_bpe_tokenizer

    tok: PreTrainedTokenizerFast = byte_bpe_tokenizer()
    config = tiny_config(model_type, len(tok))
    config.initializer_range = 0.5
    config.max_position_embeddings = 2048
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    demos = [({"sentence1": "Paris is located in France.", "sentence2": "BBC One plays the piano."}, 1),
             ({"sentence1": "Apple developed the piano.", "sentence2": "New York is in Spain."}, 0)]
    examples = [({"sentence1": "The mother tongue of Edwin is English" + " and Dutch" * i,
                  "sentence2": "Toko Yasuda plays the piano."}, i % 2) for i in range(5)]
    with HeadCounter(model) as heads:
        fast = evaluate_fewshot_fast(model, tok, MRPC_FORMAT, demos, examples, batch_size=3, gen_len=3)
    # chunks of 3 and 2 examples, 3 generated tokens each: every pass's own head call projects
    # nothing (7 passes: the prefix, then a suffix pass and 2 steps per chunk) and one row per
    # example goes through the head per generated token
    assert heads.rows.count(0) == 7
    assert sorted(r for r in heads.rows if r) == [2, 2, 2, 3, 3, 3]
    # and the tokens are those of plain full-logits decoding of each whole prompt
    ids = [list(tok(MRPC_FORMAT.render_prompt(demos, f))["input_ids"]) for f, _ in examples]
    expected = []
    for p in ids:
        row = list(p)
        for _ in range(3):
            row.append(int(full_logits(model, row)[-1].argmax()))
        expected.append(tok.decode(row[len(p):], skip_special_tokens=True))
    assert fast["generations"] == expected


def test_length_batches_keep_short_rows_apart_from_long_ones():
    from editscale.eval.scoring import length_batches

    lengths = [40, 38, 10, 9, 9, 8, 8, 8, 7, 7, 7, 6, 6]  # sorted, as score_continuations passes them
    assert length_batches(lengths, 64) == [(0, 2), (2, 13)]
    spans = length_batches([10] * 200, 64)
    assert spans[0][0] == 0 and spans[-1][1] == 200
    assert all(b - a <= 64 and a < b for a, b in spans) and all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    assert length_batches([], 8) == []
