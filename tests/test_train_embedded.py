"""The embedded model's trainer on a tiny configuration: streams, checkpoint files, resume, config guard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import editscale.embedded.train as train_mod
from editscale.data.factworld.skills import SKILL_TASKS
from editscale.data.factworld.world import generate_world
from editscale.embedded.train import (
    Stage,
    TrainConfig,
    build_streams,
    corpus_texts,
    lr_at,
    sample_batch,
    sample_mixed,
    stage_streams,
    train,
    train_tokenizer,
)

TINY = TrainConfig(n_subjects=90, n_layer=1, n_embd=32, n_head=2, n_positions=512, block_size=64, batch_size=4,
                   steps=6, warmup=2, eval_every=1000, save_every=3, fact_repeats=1, skill_blocks=50,
                   vocab_size=400)


@pytest.fixture
def stub_eval(monkeypatch):
    """quick_eval runs only at eval_every and the last step; a stub keeps these tests fast."""
    calls = []

    def fake(model, tokenizer, world, **kw):
        calls.append(world)
        return {"stub": 1.0}

    monkeypatch.setattr(train_mod, "quick_eval", fake)
    return calls


@pytest.fixture(scope="module")
def small_streams():
    cfg = TINY.model_copy(update={"skill_blocks": 20})
    world = generate_world(cfg.world_seed, cfg.n_subjects)
    facts, skills, texts = corpus_texts(world, cfg)
    tok = train_tokenizer(texts, cfg.vocab_size)
    return cfg, tok, facts, skills, build_streams(tok, world, cfg)


class Interrupted(Exception):
    pass


def kill_before(monkeypatch, step: int):
    """Make training die as it starts `step` (after the state of the step before was saved);
    return the real lr_at so that a test can put it back and resume."""
    real_lr_at = train_mod.lr_at

    def dying_lr_at(s, cfg):
        if s == step:
            raise Interrupted
        return real_lr_at(s, cfg)

    monkeypatch.setattr(train_mod, "lr_at", dying_lr_at)
    return real_lr_at


def _decoded_ends(tok, ids: np.ndarray) -> list[str]:
    """The decoded text before each token, and the full text, from per-token decoding (byte-level, ASCII)."""
    pieces = [tok.decode([int(i)]) for i in ids]
    out, acc = [], ""
    for p in pieces:
        out.append(acc)
        acc += p
    out.append(acc)
    return out


# ---------------------------------------------------------------------- streams


def test_answer_tokens_get_the_answer_weight(small_streams):
    cfg, tok, _, skills, streams = small_streams
    assert set(streams) == {"facts", *SKILL_TASKS}
    for name, task in SKILL_TASKS.items():
        s = streams[name]
        before = _decoded_ends(tok, s.ids)
        assert before[-1] == skills[name]  # the stream is exactly the task's training text
        marker = task.fmt.marker
        expected = [i for i in range(len(s.ids)) if before[i].endswith(marker)]
        assert len(expected) == cfg.skill_blocks
        assert np.flatnonzero(s.weights > 1).tolist() == expected
        assert np.all(s.weights[expected] == cfg.answer_weight)
        assert set(np.unique(s.weights).tolist()) == {1.0, cfg.answer_weight}
        # the weighted token is the first token of the answer word (" positive", " No", ...)
        text = before[-1]
        answers = {text[len(before[i]):].split("\n")[0] for i in expected}
        assert answers == {" " + w for w in task.fmt.label_words.values()}, answers
        assert all(tok.decode([int(s.ids[i])]).startswith(" ") for i in expected)
    assert np.all(streams["facts"].weights == 1.0)


def test_windows_start_at_line_and_block_boundaries(small_streams):
    _, tok, _, _, streams = small_streams
    for name, boundary in [("facts", "\n"), *[(n, "\n\n") for n in SKILL_TASKS]]:
        s = streams[name]
        before = _decoded_ends(tok, s.ids)
        assert s.starts[0] == 0
        assert np.all(np.diff(s.starts) > 0) and s.starts[-1] < len(s.ids) - 2
        for i in s.starts[1:]:
            assert before[i].endswith(boundary), (name, before[i][-20:])
        # every boundary not at the very end is a start
        n_boundaries = sum(1 for i in range(1, len(s.ids) - 2) if before[i].endswith(boundary)
                           and not before[i - 1].endswith(boundary))
        assert len(s.starts) == n_boundaries + 1


def test_sample_batch_rows_are_windows_of_a_stream(small_streams):
    cfg, _, _, _, streams = small_streams
    x, w = sample_batch(streams, cfg, np.random.default_rng(0))
    assert x.shape == w.shape == (cfg.batch_size, cfg.block_size + 1)
    for row, wrow in zip(x.numpy(), w.numpy()):
        hits = [(n, st) for n, s in streams.items() for st in s.starts
                if np.array_equal(s.ids[st:st + len(row)], row[: len(s.ids[st:st + len(row)])])]
        assert hits
        name, st = hits[0]
        n = len(streams[name].ids[st:st + len(row)])
        assert np.array_equal(wrow[:n], streams[name].weights[st:st + n])
        assert np.all(wrow[n:] == 0)  # padding past a stream's end is never trained on


def test_skill_mix_sets_the_share_of_each_skill(small_streams):
    cfg, _, _, _, streams = small_streams
    mix = {name: 0.0 for name in SKILL_TASKS} | {"paraphrase": 3.0, "entailment": 1.0}
    mixed = cfg.model_copy(update={"skill_mix": mix, "batch_size": 400, "block_size": 23})
    x, _ = sample_batch(streams, mixed, np.random.default_rng(0))
    windows = {name: {tuple(s.ids[st:st + 24]) for st in s.starts} for name, s in streams.items()}
    counts = {name: sum(tuple(row) in w for row in x.numpy().tolist()) for name, w in windows.items()}
    assert sum(counts.values()) == 400  # each row is a window of exactly one stream
    assert counts["sentiment"] == counts["acceptability"] == 0
    assert counts["facts"] > 100 and 2 * counts["entailment"] < counts["paraphrase"]
    with pytest.raises(ValueError, match="skill_mix needs a share"):
        TrainConfig(skill_mix={"paraphrase": 1.0})


def test_train_config_from_yaml(tmp_path):
    from editscale.embedded.train import load_train_config
    from editscale.errors import EditscaleError

    good = tmp_path / "probe.yaml"
    good.write_text("fact_share: 0.0\nsteps: 40\nstages:\n  - {steps: 5, mix: {facts: 1.0}}\n")
    cfg = load_train_config(good, TINY)
    assert (cfg.fact_share, cfg.steps, cfg.n_embd, cfg.stages[0].steps) == (0.0, 40, TINY.n_embd, 5)
    bad = tmp_path / "typo.yaml"
    bad.write_text("fact_shares: 0.0\n")
    with pytest.raises(EditscaleError, match="typo.yaml: invalid TrainConfig: fact_shares"):
        load_train_config(bad, TINY)
    bad.write_text("stages:\n  - {steps: 5, mix: {facts: 1.0}, lr_typo: 1}\n")
    with pytest.raises(EditscaleError, match="stages.0.lr_typo"):
        load_train_config(bad, TINY)


def test_shared_phrasings_join_the_fact_stream():
    world = generate_world(TINY.world_seed, TINY.n_subjects)
    plain, _, _ = corpus_texts(world, TINY)
    both, _, _ = corpus_texts(world, TINY.model_copy(update={"shared_phrasings": True}))
    sentences = sorted(s for line in both.splitlines() for s in _sentences(line))
    assert sentences == sorted(world.training_sentences() + world.shared_sentences())
    assert sorted(s for line in plain.splitlines() for s in _sentences(line)) == sorted(world.training_sentences())


def test_varied_phrasings_word_the_shared_copies_and_need_them():
    world = generate_world(TINY.world_seed, TINY.n_subjects)
    cfg = TINY.model_copy(update={"shared_phrasings": True, "varied_phrasings": True})
    varied, _, _ = corpus_texts(world, cfg)
    sentences = [s for line in varied.splitlines() for s in _sentences(line)]
    assert len(sentences) == len(world.training_sentences()) + len(world.shared_sentences())
    assert set(world.training_sentences()) <= set(sentences)
    pooled = {f.sentence(t) for f in world.facts for t in f.relation.varied}
    assert set(sentences) & pooled
    with pytest.raises(ValueError, match="needs shared_phrasings"):
        TrainConfig(varied_phrasings=True)
    noisy, _, _ = corpus_texts(world, cfg.model_copy(update={"filler": 0.5}))
    noisy_sentences = [s for line in noisy.splitlines() for s in _sentences(line)]
    assert len(noisy_sentences) == len(sentences)
    assert 0.3 < sum(s not in set(sentences) for s in noisy_sentences) / len(sentences) < 0.7


def test_lr_schedule():
    cfg = TINY.model_copy(update={"steps": 100, "warmup": 10})
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / 10)
    assert lr_at(9, cfg) == pytest.approx(cfg.lr)
    assert lr_at(10, cfg) == pytest.approx(cfg.lr)
    assert lr_at(100, cfg) == pytest.approx(cfg.min_lr)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# ---------------------------------------------------------------------- training runs


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def test_train_writes_a_checkpoint_and_resumes_after_a_kill(tmp_path, monkeypatch, stub_eval):
    out = tmp_path / "run"
    real_lr_at = kill_before(monkeypatch, 3)  # killed while starting step 4, after step 3's state was saved
    logs: list[str] = []
    with pytest.raises(Interrupted):
        train(TINY, out, progress=False, log=logs.append)
    assert not (out / "checkpoint").exists()
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 3
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert not any("resumed" in m for m in logs)
    assert stub_eval == []  # eval_every=1000: no evaluation before the last step

    monkeypatch.setattr(train_mod, "lr_at", real_lr_at)
    logs.clear()
    final = train(TINY, out, progress=False, log=logs.append)
    assert final == out / "checkpoint"
    assert any(m.startswith("resumed at step 3") for m in logs), logs
    assert len(stub_eval) == 1 and len(stub_eval[0].records) == TINY.n_subjects  # once, at the last step
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "training.json"):
        assert (final / f).is_file(), f
    info = json.loads((final / "training.json").read_text())
    assert info["steps"] == 6 and info["config"] == TINY.model_dump()
    assert [h["step"] for h in info["history"]] == [6] and info["history"][0]["stub"] == 1.0
    config = json.loads((final / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"]) == (1, 32, 2)
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 6

    # the checkpoint loads and the tokenizer round-trips its training text
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size == len(tok) <= TINY.vocab_size
    text = "The mother tongue of Danielle is French."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert torch.isfinite(model(input_ids=torch.tensor([ids])).logits).all()

    # killed and resumed = trained in one go
    straight = train(TINY, tmp_path / "straight", progress=False, log=lambda m: None)
    a, b = _weights(final), _weights(straight)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    init = train_mod.build_model(TINY, len(tok), tok.eos_token_id).state_dict()
    assert not torch.equal(init["transformer.h.0.mlp.c_fc.weight"], a["transformer.h.0.mlp.c_fc.weight"])

    # rerunning a finished run does no more steps and keeps the result
    logs.clear()
    train(TINY, out, progress=False, log=logs.append)
    assert any(m.startswith("resumed at step 6") for m in logs)
    for k, v in _weights(final).items():
        assert torch.equal(v, a[k])


def test_another_config_on_the_same_directory_is_refused(tmp_path, stub_eval):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text(json.dumps(TINY.model_dump()))
    for other in (TINY.model_copy(update={"lr": 1e-3}), TINY.model_copy(update={"steps": 5}),
                  TINY.model_copy(update={"steps": 7, "lr": 1e-3})):
        with pytest.raises(ValueError, match="another config"):
            train(other, out, progress=False, log=lambda m: None)
    assert json.loads((out / "train_config.json").read_text()) == TINY.model_dump()  # left untouched
    assert not (out / "tokenizer").exists() and not (out / "train_state.pt").exists()


def test_a_finished_run_can_be_extended_with_more_steps(tmp_path, stub_eval):
    out = tmp_path / "run"
    train(TINY, out, progress=False, log=lambda m: None)
    logs: list[str] = []
    final = train(TINY.model_copy(update={"steps": 8}), out, progress=False, log=logs.append)
    assert any("extending the run: steps 6 -> 8" in m for m in logs)
    info = json.loads((final / "training.json").read_text())
    assert info["steps"] == 8
    assert any(h.get("extended") == "steps 6 -> 8" for h in info["history"])


def test_quick_eval_reports_knowledge_and_skills(small_streams):
    cfg, tok, _, _, _ = small_streams
    world = generate_world(cfg.world_seed, cfg.n_subjects)
    # a 400-token vocabulary makes few-shot prompts long: give the model room for them
    model = train_mod.build_model(cfg.model_copy(update={"n_positions": 1024}), len(tok), tok.eos_token_id)
    model.train()
    out = train_mod.quick_eval(model, tok, world, n_facts=12, n_skill=8)
    assert model.training  # restored
    assert out["n_records"] == 12 and out["n_rewrite_prompts"] == 12
    for key in ("known_rewrite", "known_paraphrase", "known_neighborhood", "known_unseen",
                *(f"f1_{n}" for n in SKILL_TASKS)):
        assert 0.0 <= out[key] <= 1.0, key


# ---------------------------------------------------------------------- later stages

STAGE = Stage(steps=4, mix={"facts": 1, "phrasings": 1, "paraphrase": 2}, lr=1e-3, warmup=1,
              answer_weight=10.0, context_weight=0.1, phrasing_repeats=1)


def test_stage_streams_reweight_skills_and_add_the_shared_phrasings(small_streams):
    cfg, tok, _, _, streams = small_streams
    world = generate_world(cfg.world_seed, cfg.n_subjects)
    out = stage_streams(tok, world, cfg, STAGE, 1, streams)
    assert set(out) == {"facts", "phrasings", "paraphrase"}
    assert out["facts"] is streams["facts"]
    para, base = out["paraphrase"], streams["paraphrase"]
    assert np.array_equal(para.ids, base.ids)
    assert np.array_equal(para.weights == 10.0, base.weights > 1) and np.allclose(np.unique(para.weights), [0.1, 10.0])
    text = _decoded_ends(tok, out["phrasings"].ids)[-1]
    assert sorted(s for line in text.splitlines() for s in _sentences(line)) == sorted(world.shared_sentences())
    assert not set(world.shared_sentences()) & set(world.training_sentences())
    with pytest.raises(ValueError, match="stage 1: unknown streams in mix: typo"):
        stage_streams(tok, world, cfg, STAGE.model_copy(update={"mix": {"typo": 1.0}}), 1, streams)
    x, w = sample_mixed(out, {"paraphrase": 1.0}, cfg, np.random.default_rng(0))
    assert x.shape == (cfg.batch_size, cfg.block_size + 1) and np.isin(w.numpy(), np.float32([0.0, 0.1, 10.0])).all()

    # a varied stage: trained sentences too, shared copies worded from the pool, half with filler
    varied = STAGE.model_copy(update={"phrasings": "varied", "filler": 0.5, "phrasing_repeats": 2})
    text = _decoded_ends(tok, stage_streams(tok, world, cfg, varied, 1, streams)["phrasings"].ids)[-1]
    sents = [s for line in text.splitlines() for s in _sentences(line)]
    assert len(sents) == 2 * (len(world.training_sentences()) + len(world.shared_sentences()))
    clean = set(world.training_sentences()) | {f.sentence(t) for f in world.facts
                                               for t in f.relation.shared + f.relation.varied}
    assert 0.35 < sum(s not in clean for s in sents) / len(sents) < 0.65
    assert {f.sentence(t) for f in world.facts for t in f.relation.varied} & set(sents)


def _sentences(line: str) -> list[str]:
    return [p.strip() + "." for p in line.split(".") if p.strip()]


def test_stage_schedule_and_what_extends_a_run():
    cfg = TINY.model_copy(update={"stages": [STAGE, STAGE.model_copy(update={"steps": 3})]})
    assert cfg.total_steps == 6 + 4 + 3
    assert [cfg.stage_at(s)[:1] + cfg.stage_at(s)[2:] for s in (0, 5, 6, 9, 10, 12)] == [
        (0, 0), (0, 5), (1, 0), (1, 3), (2, 0), (2, 2)]
    assert lr_at(6, cfg) == pytest.approx(STAGE.lr)  # warm-up of one step, then cosine within the stage
    assert lr_at(9, cfg) == pytest.approx(STAGE.min_lr + 0.5 * (STAGE.lr - STAGE.min_lr) * (1 + np.cos(np.pi * 2 / 3)))
    one = TINY.model_copy(update={"stages": [STAGE]})
    assert one.extends(TINY) and cfg.extends(one) and cfg.extends(TINY)
    assert TINY.model_copy(update={"steps": 8}).extends(TINY)
    assert not TINY.extends(one) and not one.extends(cfg)
    assert not TINY.model_copy(update={"steps": 8, "stages": [STAGE]}).extends(TINY)
    assert not one.model_copy(update={"lr": 1e-3}).extends(TINY)
    assert not TINY.model_copy(update={"stages": [STAGE.model_copy(update={"lr": 1.0})]}).extends(one)


def test_a_run_extended_by_a_stage_resumes_mid_stage(tmp_path, monkeypatch, stub_eval):
    staged = TINY.model_copy(update={"stages": [STAGE]})
    out = tmp_path / "run"
    train(TINY, out, progress=False, log=lambda m: None)
    real_lr_at = kill_before(monkeypatch, 9)  # killed inside the stage, after step 9's state was saved
    logs: list[str] = []
    with pytest.raises(Interrupted):
        train(staged, out, progress=False, log=logs.append)
    assert any("extending the run: stages 0 -> 1" in m for m in logs)
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 9
    monkeypatch.setattr(train_mod, "lr_at", real_lr_at)
    final = train(staged, out, progress=False, log=lambda m: None)
    info = json.loads((final / "training.json").read_text())
    assert info["steps"] == 10 and info["config"]["stages"] == [STAGE.model_dump()]
    assert [h.get("extended") for h in info["history"] if "extended" in h] == ["stages 0 -> 1"]
    assert [(h["step"], h["stage"]) for h in info["history"] if "stub" in h] == [(6, 0), (10, 1)]

    # the same two commands without a kill give the same weights
    other = tmp_path / "straight"
    train(TINY, other, progress=False, log=lambda m: None)
    straight = train(staged, other, progress=False, log=lambda m: None)
    # ... and the same weights as one command with the stage from the start: a first stage may be
    # trained alone and its stages added later without changing what is trained
    one_go = train(staged, tmp_path / "one_go", progress=False, log=lambda m: None)
    a, b, c = _weights(final), _weights(straight), _weights(one_go)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=1e-6, msg=k)


def test_a_stage_continues_a_finished_checkpoint(tmp_path, stub_eval):
    first = train(TINY, tmp_path / "first", progress=False, log=lambda m: None)
    staged = TINY.model_copy(update={"stages": [STAGE]})
    logs: list[str] = []
    final = train(staged, tmp_path / "next", init_from=first, progress=False, log=logs.append)
    assert any(f"initialised from {first} at step 6" in m for m in logs)
    info = json.loads((final / "training.json").read_text())
    assert info["steps"] == 10 and info["config"]["stages"] == [STAGE.model_dump()]
    (note,) = [h for h in info["history"] if "initialised_from" in h]
    assert note["step"] == 6 and note["initialised_from"] == str(first)
    assert [(h["step"], h["stage"]) for h in info["history"] if "stub" in h] == [(6, 0), (10, 1)]
    assert (final / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    # the stage trained on: the weights moved away from the checkpoint's
    a, b = _weights(first), _weights(final)
    assert any(not torch.equal(a[k], b[k]) for k in a)

    # a config that does not continue the checkpoint's is refused, naming it
    with pytest.raises(ValueError, match="does not continue"):
        train(TINY.model_copy(update={"lr": 1.0}), tmp_path / "bad", init_from=first, progress=False,
              log=lambda m: None)
    with pytest.raises(ValueError, match="no training.json"):
        train(staged, tmp_path / "bad2", init_from=tmp_path, progress=False, log=lambda m: None)
