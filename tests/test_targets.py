"""v*/z: the loss may be read off an earlier block (`v_loss_layer`), through the final norm and the
unembedding as MEMIT's compute_z does; unset or the last block, it is the model's own logits."""

from __future__ import annotations

import pytest
import torch

from editscale.errors import EditscaleError
from editscale.methods.rome import RomeConfig
from editscale.methods.solver.targets import optimize_target, optimize_targets
from editscale.models.adapter import ModelAdapter
from tiny_models import byte_bpe_tokenizer, tiny_model, tokenizer_for

TEMPLATES = ["{}", "Paris is nice. {}"]


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    tok = byte_bpe_tokenizer()
    return ModelAdapter(tiny_model("gpt2", len(tok)), tok)  # 2 blocks


def target(adapter: ModelAdapter, layer: int, loss_layer: int | None, site: str = "mlp"):
    return optimize_target(adapter, layer, "{} plays the", "Danielle Darrieux", "violin", TEMPLATES, site=site,
                           steps=5, loss_layer=loss_layer)


def test_block_hidden_is_the_final_norm_of_a_block_output(adapter: ModelAdapter) -> None:
    batch = adapter.encode(["Paris is nice.", "Danielle Darrieux plays the"])
    with torch.no_grad():
        states = adapter.model(**batch, output_hidden_states=True).hidden_states
        torch.testing.assert_close(adapter.block_hidden(batch, 0), adapter.module("final_norm")(states[1]))
        torch.testing.assert_close(adapter.block_hidden(batch, 1), adapter.final_hidden(batch))


def test_the_last_block_is_the_models_own_logits(adapter: ModelAdapter) -> None:
    a, b = target(adapter, 0, None), target(adapter, 0, 1)
    assert torch.equal(a.v_star, b.v_star) and a.loss_last == b.loss_last


@pytest.mark.parametrize("site", ["mlp", "block"])
def test_an_earlier_loss_layer_is_honoured(adapter: ModelAdapter, site: str) -> None:
    a, b = target(adapter, 0, None, site), target(adapter, 0, 0, site)
    assert a.loss_first != b.loss_first and not torch.equal(a.v_star, b.v_star)
    # the first loss is the NLL of the target read off block 0 (plus KL and weight decay, both 0 at delta = 0)
    prompts = [t.format("Danielle Darrieux plays the") for t in TEMPLATES]
    ids = adapter.target_ids("violin")
    rows = [adapter.tokenizer(p)["input_ids"] + ids[:-1] for p in prompts]
    with torch.no_grad():
        logp = torch.log_softmax(adapter.unembed(adapter.block_hidden(adapter.pad(rows), 0)).float(), dim=-1)
    nll = -sum(sum(logp[i, len(r) - len(ids) + j, t] for j, t in enumerate(ids)) / len(ids)
               for i, r in enumerate(rows)) / len(rows)
    assert b.loss_first == pytest.approx(float(nll), rel=1e-5)


def test_full_logits_give_the_same_target_the_reference_way(adapter: ModelAdapter) -> None:
    fast = target(adapter, 0, None)
    full = optimize_target(adapter, 0, "{} plays the", "Danielle Darrieux", "violin", TEMPLATES, steps=5,
                           full_logits=True)
    torch.testing.assert_close(full.v_star, fast.v_star, rtol=1e-5, atol=1e-6)
    assert full.steps == fast.steps and full.loss_last == pytest.approx(fast.loss_last, rel=1e-5)
    with pytest.raises(EditscaleError, match="full_logits"):
        optimize_target(adapter, 1, "{} plays the", "Danielle Darrieux", "violin", TEMPLATES, steps=1,
                        loss_layer=0, full_logits=True)


def test_a_loss_layer_before_the_edit_is_refused(adapter: ModelAdapter) -> None:
    with pytest.raises(EditscaleError, match="v_loss_layer 0 must lie between the edited layer 1"):
        target(adapter, 1, 0)
    with pytest.raises(EditscaleError, match="v_loss_layer 2"):
        target(adapter, 0, 2)


def test_the_config_passes_it_on() -> None:
    assert RomeConfig(layers=[1], v_loss_layer=3).target_options()["loss_layer"] == 3
    assert RomeConfig(layers=[1]).target_options()["loss_layer"] is None


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "gpt_neox", "llama", "qwen2"])
@pytest.mark.parametrize("site", ["mlp", "block"])
def test_each_step_runs_only_the_rows_from_the_subject_on_with_the_same_result(model_type: str, site: str) -> None:
    # "{}" puts the subject first (an empty prefix for BPE rows); the long template pads the others
    tok = tokenizer_for(model_type)
    adapter = ModelAdapter(tiny_model(model_type, len(tok)), tok)
    templates = ["{}", "Paris is nice and the weather is good today. {}", "Hi. {}"]
    kwargs = dict(site=site, steps=4, templates=templates)
    for prompt, subject in (("{} plays the", "Danielle Darrieux"), ("The instrument of {}, is", "Danielle")):
        widths: dict[bool, list[int]] = {True: [], False: []}
        for full_logits in (True, False):
            hook = adapter.module("block", 1).register_forward_hook(
                lambda m, a, o, seen=widths[full_logits]: seen.append(a[0].shape[1]))
            try:
                out = optimize_target(adapter, 0, prompt, subject, "violin", full_logits=full_logits, **kwargs)
            finally:
                hook.remove()
            if full_logits:
                full = out
        torch.testing.assert_close(out.v_star, full.v_star, rtol=1e-5, atol=1e-6)
        assert out.steps == full.steps and out.loss_last == pytest.approx(full.loss_last, rel=1e-5)
        # one pass over the prefixes, then every step over the suffixes only: fewer columns than whole rows
        prefix, *steps = widths[False]
        assert len(steps) == len(widths[True]) == full.steps + 1
        assert len(set(steps)) == 1 and steps[0] < widths[True][0] and prefix > 0


@pytest.mark.parametrize("site", ["mlp", "block"])
def test_requests_sharing_passes_each_get_their_own_target(adapter: ModelAdapter, site: str) -> None:
    requests = [("{} plays the", "Danielle Darrieux", "violin"), ("The capital of {} is", "France", "Rome"),
                ("{} was born in", "Pablo", "the city of Lyon")]
    # few steps: on this random model Adam's steps amplify the rounding of different padding widths
    alone = [optimize_target(adapter, 0, *r, TEMPLATES, site=site, steps=3) for r in requests]
    shared = optimize_targets(adapter, 0, requests, TEMPLATES, site=site, steps=3)
    for a, b in zip(alone, shared, strict=True):
        assert float((b.v_star - a.v_star).norm() / a.v_star.norm()) < 1e-5
        torch.testing.assert_close(b.v0, a.v0, rtol=1e-5, atol=1e-6)
        assert b.steps == a.steps and b.loss_last == pytest.approx(a.loss_last, rel=1e-5)
        assert b.loss_first == pytest.approx(a.loss_first, rel=1e-5)


def test_a_request_that_stops_early_is_frozen_while_the_others_go_on(adapter: ModelAdapter,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import editscale.methods.solver.targets as targets

    requests = [("{} plays the", "Danielle Darrieux", "violin"), ("{} was born in", "Pablo", "the city of Lyon")]
    # no KL or weight decay and a small rate: both losses fall smoothly, the second's below the first's
    options = dict(steps=5, lr=0.05, weight_decay=0.0, kl_factor=0.0)
    free = [optimize_target(adapter, 0, *r, TEMPLATES, **options) for r in requests]
    threshold = (free[1].loss_first + free[1].loss_last) / 2  # the second stops halfway, the first never
    assert free[0].loss_last > threshold
    monkeypatch.setattr(targets, "EARLY_STOP_LOSS", threshold)
    alone = [optimize_target(adapter, 0, *r, TEMPLATES, **options) for r in requests]
    shared = optimize_targets(adapter, 0, requests, TEMPLATES, **options)
    assert alone[1].steps < alone[0].steps == 4 and [s.steps for s in shared] == [a.steps for a in alone]
    for a, b in zip(alone, shared, strict=True):
        assert float((b.v_star - a.v_star).norm() / a.v_star.norm()) < 1e-5


def test_mpes_stops_on_the_nth_iteration_where_the_target_is_most_probable_on_every_prefixed_row(embedded_lm) -> None:
    adapter = embedded_lm.adapter
    templates = ["{}", "The weather is nice. {}", "Hello there, friend. {}"]
    prompt, subject, target = "The native language of {} is", "Jeis Zirirum", "English"  # factworld-insert 100000
    ids = adapter.target_ids(target)
    options = dict(steps=20, weight_decay=0.05, clamp_norm_factor=1.5)

    def most_probable(delta: torch.Tensor) -> bool:
        # checked here on whole rows, by the model's own logits with delta added at the subject token
        rows = [adapter.tokenizer(t.format(prompt.format(subject)))["input_ids"] + ids[:-1] for t in templates[1:]]
        lookup = adapter.subject_token_indices([t.format(prompt) for t in templates[1:]], [subject] * 2)
        with torch.no_grad(), adapter.intervene("mlp", 1, lookup, delta):
            logits = adapter.model(**adapter.pad(rows)).logits
        return all(int(logits[i, len(r) - len(ids) + j].argmax()) == t
                   for i, r in enumerate(rows) for j, t in enumerate(ids))

    for patience in (1, 2):
        stopped = optimize_target(adapter, 1, prompt, subject, target, templates, mpes=patience, **options)
        assert stopped.stop == "mpes" and stopped.steps < options["steps"] - 1
        # the same trajectory cut after s steps (no MPES): most probable on exactly `patience` of them
        hits = [most_probable(optimize_target(adapter, 1, prompt, subject, target, templates, **{
            **options, "steps": s + 1}).delta) for s in range(stopped.steps + 1)]
        assert hits[-1] and sum(hits) == patience
        torch.testing.assert_close(stopped.delta, optimize_target(adapter, 1, prompt, subject, target, templates, **{
            **options, "steps": stopped.steps + 1}).delta)
