"""Failures a user met as tracebacks, each now one line that names the file or option and what to do:
an unusable --out, a damaged or missing model, a damaged checkpoint, a full disk at a checkpoint,
hub data asked for offline, few-shot prompts longer than the model's positions, and a run directory
left by a run that failed before its first edit."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

import runner_stubs  # noqa: F401 - registers the stub method the runs use
from editscale.data.fewshot import SST2_FORMAT
from editscale.errors import EditscaleError
from editscale.eval.downstream import fewshot as fewshot_module
from editscale.eval.downstream.fast import evaluate_fewshot_fast
from editscale.eval.downstream.fewshot import evaluate_fewshot, fit_demos, prompt_token_ids
from editscale.models.loading import load_model
from editscale.run import runner as runner_module
from editscale.run.checkpoint import load_checkpoint
from editscale.run.config import RunConfig
from editscale.run.runner import Runner
from editscale.run.store import RunStore
from tiny_models import byte_bpe_tokenizer, tiny_config

pytestmark = pytest.mark.usefixtures("tiny_tasks")


@pytest.fixture
def cli(run_cli, monkeypatch):
    """`run_cli` with an error console wide enough that rich never wraps a long message."""
    from rich.console import Console

    from editscale import cli as cli_module

    monkeypatch.setattr(cli_module, "err_console", Console(stderr=True, width=10_000))
    return run_cli


def config(world: dict[str, str], **kw) -> RunConfig:
    base = dict(model=world["model"], method="stub", dataset="counterfact", data_path=world["data"], edits=2,
                eval_every=2, checkpoint_every=2, control=3, downstream=[], health=False,
                method_config={"layers": [1]})
    return RunConfig(**{**base, **kw})


def quiet(cfg: RunConfig, out: Path) -> Runner:
    return Runner(cfg, out, progress=False, log=lambda s: None)


def run_args(world: dict[str, str], out: Path, *extra: str) -> tuple[str, ...]:
    return ("run", "--out", str(out), "--model", world["model"], "--method", "stub", "--dataset", "counterfact",
            "--data-path", world["data"], "--edits", "2", "--set", "layers=[1]", "--downstream", "none",
            "--control", "3", "--no-progress", *extra)


def one_line(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    # stderr also holds transformers' progress bar and the library's INFO log lines
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


@pytest.fixture
def no_loading(monkeypatch) -> None:
    """Fail the test if a run gets as far as loading its model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output location was checked")

    monkeypatch.setattr(runner_module, "load_model", refuse)


# ---------------------------------------------------------------------- 1. --out


def test_an_out_that_is_a_file_fails_before_loading(world, tmp_path: Path, cli, no_loading) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    line = one_line(*cli(*run_args(world, file))[::2])
    assert f"--out {file} is a file, not a directory" in line
    line = one_line(*cli(*run_args(world, file / "run"))[::2])
    assert f"{file} is a file" in line
    assert file.read_text() == "mine"


def test_an_out_that_cannot_be_written_fails_before_loading(world, tmp_path: Path, monkeypatch, cli,
                                                           no_loading) -> None:
    # root may write anywhere but to a read-only file system, which access() reports; both look alike to it
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (not (mode & os.W_OK and Path(p) == locked)
                                                            and real_access(p, mode, **kw)))
    line = one_line(*cli(*run_args(world, locked))[::2])
    assert f"--out {locked} is not writable" in line
    line = one_line(*cli(*run_args(world, locked / "a" / "b"))[::2])
    assert f"{locked / 'a' / 'b'} cannot be created: {locked} is not writable" in line
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_fails_before_loading(world, tmp_path: Path, cli, no_loading) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert "is not writable" in one_line(*cli(*run_args(world, locked / "run"))[::2])
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------------- 2. and 3. models


def test_a_truncated_safetensors_file_is_named(world, tmp_path: Path, cli) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(world["model"], broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(EditscaleError, match=f"{weights} is damaged or truncated .*copy or download it again"):
        load_model(broken)
    line = one_line(*cli("skills", "--model", str(broken), "--tasks", "tiny_sentiment", "--n", "4")[::2])
    assert str(weights) in line


def test_a_model_path_that_does_not_exist_says_so(world, tmp_path: Path, cli, monkeypatch) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(EditscaleError, match=f"model directory '{missing}' does not exist, .* no known preset"):
        load_model(missing)
    line = one_line(*cli("run", "--out", str(tmp_path / "out"), "--model", str(missing), "--edits", "2",
                             "--no-progress")[::2])
    assert f"model directory '{missing}' does not exist" in line and "hyper-parameters" not in line
    assert not (tmp_path / "out").exists()
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(EditscaleError, match="is a file; pass a model directory"):
        load_model(file)
    # a name the hub could serve is only refused offline, and only when the hub cache lacks it
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EditscaleError, match="not in the local hub cache"):
        load_model("someone/no-such-model-xyz")


# ---------------------------------------------------------------------- 4. and 5. checkpoints


def test_a_truncated_checkpoint_is_one_line_on_resume(world, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    quiet(config(world), out).run()
    weights = out / "checkpoint" / "weights.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    line = one_line(*cli("resume", str(out), "--no-progress")[::2])
    assert f"{weights}: the checkpoint is unreadable" in line and "damaged or truncated" in line


def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one(world, tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    real_save = safetensors.torch.save_file
    saves = []

    def save_until_full(tensors, path, *args, **kwargs):
        saves.append(path)
        if len(saves) > 1:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_until_full)
    out = tmp_path / "run"
    with pytest.raises(EditscaleError) as info:
        quiet(config(world, edits=4), out).run()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{out}: no space left on the device while writing a checkpoint")
    assert f"the previous checkpoint {out / 'checkpoint'} is kept" in message
    assert not (out / "checkpoint.tmp").exists()
    assert load_checkpoint(RunStore(out)).state["edits_done"] == 2
    saves.clear()
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert Runner.resume(out, progress=False, log=lambda s: None).run()["edits_done"] == 4

    # another OSError is no full disk: it is not dressed up as one
    def refuse(tensors, path, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    with pytest.raises(OSError, match="Input/output error"):
        RunStore(out).save_checkpoint({}, {})


# ---------------------------------------------------------------------- 6. hub data offline


@pytest.fixture
def offline_hub(monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")

    def unreachable(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.delenv("EDITSCALE_GLUE_DIR", raising=False)


def test_glue_offline_names_glue_dir(world, cli, offline_hub) -> None:
    line = one_line(*cli("skills", "--model", world["model"], "--tasks", "sst2", "--n", "4")[::2])
    assert "GLUE sst2 could not be loaded from the Hugging Face hub (Couldn't reach 'glue'" in line
    assert "pass --glue-dir DIR" in line and "sst2.jsonl" in line


def test_the_statistics_corpus_offline_names_stats_corpus(offline_hub) -> None:
    from editscale.data.corpora import all_documents

    with pytest.raises(EditscaleError, match="statistics corpus 'wikitext' could not be loaded .*--stats-corpus"):
        all_documents("wikitext")


# ---------------------------------------------------------------------- 7. prompts longer than the model


@pytest.fixture(scope="module")
def short_model():
    """A tiny GPT-2 with 180 positions and a byte-level BPE (about a token a character): three
    demonstrations and a long sentence overflow it."""
    tok = byte_bpe_tokenizer()
    config = tiny_config("gpt2", len(tok))
    config.n_positions = 180
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.requires_grad_(False)
    return model, tok


DEMOS = (({"sentence": "a warm and funny story"}, 1), ({"sentence": "the film was a dull mess"}, 0),
         ({"sentence": "great fun"}, 1))


def examples(tok) -> list:
    """Short sentences that fit with all demonstrations, and longer ones that fit with fewer."""
    rows = [({"sentence": s}, i % 2) for i, s in enumerate(
        ["fine", "bad", "Paris is located in France and the film was", "dull",
         "New York plays the Dutch piano and BBC One", "ok"])]
    lengths = [len(ids) for ids in prompt_token_ids(tok, [SST2_FORMAT.render_prompt(DEMOS, f) for f, _ in rows])]
    assert min(lengths) + 2 <= 180 < max(lengths) + 2  # both kinds are there
    return rows


@pytest.mark.parametrize("mode", ["paper", "logprob"])
@pytest.mark.parametrize("evaluate", [evaluate_fewshot, evaluate_fewshot_fast], ids=["naive", "fast"])
def test_long_prompts_drop_their_first_demonstrations(short_model, mode, evaluate, caplog, monkeypatch) -> None:
    model, tok = short_model
    monkeypatch.setattr(fewshot_module, "_REPORTED", set())
    rows = examples(tok)
    kept = fit_demos(model, tok, SST2_FORMAT, DEMOS, rows, mode=mode, task="tiny")
    assert kept is not None and set(kept) - {len(DEMOS)} and len(DEMOS) in kept
    with caplog.at_level(logging.INFO, logger="editscale"):
        out = evaluate(model, tok, SST2_FORMAT, DEMOS, rows, mode=mode, batch_size=4, task="tiny")
        again = evaluate(model, tok, SST2_FORMAT, DEMOS, rows, mode=mode, batch_size=4, task="tiny")
    said = [r.getMessage() for r in caplog.records if "few-shot task tiny" in r.getMessage()]
    assert len(said) == 1 and "exceed the model's 180 positions" in said[0]  # once, not per evaluation
    assert again["predictions"] == out["predictions"]
    assert out["total"] == len(rows) and out["shortened"] == sum(k < len(DEMOS) for k in kept)
    # each prompt is scored exactly as a task of its own demonstrations would score it
    for k in set(kept):
        group = [j for j, n in enumerate(kept) if n == k]
        alone = evaluate(model, tok, SST2_FORMAT, DEMOS[len(DEMOS) - k:], [rows[j] for j in group], mode=mode,
                         batch_size=4)
        assert [out["predictions"][j] for j in group] == alone["predictions"]
        assert [out["generations"][j] for j in group] == alone["generations"]


def test_prompts_that_fit_are_evaluated_as_before(short_model) -> None:
    model, tok = short_model
    rows = [r for r, n in zip(examples(tok), fit_demos(model, tok, SST2_FORMAT, DEMOS, examples(tok)), strict=True)
            if n == len(DEMOS)]
    assert fit_demos(model, tok, SST2_FORMAT, DEMOS, rows) is None
    out = evaluate_fewshot_fast(model, tok, SST2_FORMAT, DEMOS, rows, batch_size=4)
    assert "shortened" not in out and out["prefix_len"] > 0


def test_a_prompt_too_long_without_demonstrations_is_refused(short_model) -> None:
    model, tok = short_model
    rows = examples(tok) + [({"sentence": " ".join(["Paris is located in France"] * 12)}, 1)]
    with pytest.raises(EditscaleError, match=r"few-shot task sst2: example 6 is \d+ tokens even without "
                                             r"demonstrations .*beyond the model's 180 positions.*--n / "
                                             r"--downstream-n 6\)"):
        evaluate_fewshot_fast(model, tok, SST2_FORMAT, DEMOS, rows)


@pytest.mark.slow
def test_embedded_rte_is_fitted_or_refused(embedded_lm, shared_data, cli) -> None:
    from editscale.eval.downstream.suite import DownstreamSuite

    glue = shared_data / "glue"
    # RTE example 118 alone is longer than the embedded model's 512 positions
    line = one_line(*cli("skills", "--model", "embedded", "--tasks", "rte", "--glue-dir", str(glue))[::2])
    assert "few-shot task rte: example 118" in line and "--downstream-n 118" in line
    res = DownstreamSuite(["rte"], n=20, data_dir=glue).evaluate(embedded_lm.model, embedded_lm.tokenizer)["rte"]
    assert res["total"] == 20 and res["shortened"] > 0


# ---------------------------------------------------------------------- 8. a run that failed before its first edit


def test_a_run_without_edits_gives_way_to_the_corrected_one(world, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    # a GLUE task whose folder is missing fails after config.yaml, the control set and templates are written
    bad = run_args(world, out)[:-5] + ("--downstream", "sst2", "--glue-dir", str(tmp_path / "missing"),
                                       "--control", "3", "--no-progress")
    line = one_line(*cli(*bad)[::2])
    assert "GLUE subset" in line and (out / "config.yaml").exists() and (out / "control.json").exists()
    code, stdout, err = cli(*run_args(world, out))
    assert code == 0, err
    assert "replacing the config of a run that made no edit (differs in: downstream, glue_dir)" in stdout
    assert str(tmp_path / "missing") not in (out / "config.yaml").read_text()
    assert len(RunStore(out).rows("edits")) == 2
    # a directory holding edits is still another run's
    line = one_line(*cli(*run_args(world, out, "--seed", "5"))[::2])
    assert "holds another run (differs in: seed)" in line


def test_a_damaged_first_line_is_no_edit_but_a_checkpoint_is(world, tmp_path: Path) -> None:
    out = tmp_path / "run"
    quiet(config(world), out).run()
    with pytest.raises(EditscaleError, match="holds another run"):
        quiet(config(world, seed=5), out).run()
    (out / "edits.jsonl").write_text('{"index": 0, "torn')  # killed while writing the first row
    with pytest.raises(EditscaleError, match="holds another run"):
        quiet(config(world, seed=5), out).run()  # the checkpoint still holds edits
    shutil.rmtree(out / "checkpoint")
    assert quiet(config(world, seed=5), out).run()["edits_done"] == 2
