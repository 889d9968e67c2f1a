"""The command line: the documented contract, options generated from RunConfig, and errors that are
one line, never a traceback. Commands run in-process; one test runs the installed entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

import runner_stubs  # noqa: F401 - registers the stub method the runs use
from editscale import cli
from editscale.embedded import checkpoint_dir
from editscale.run.config import RunConfig

needs_embedded = pytest.mark.skipif(
    not (checkpoint_dir() / "model.safetensors").exists(),
    reason="the embedded checkpoint is not installed (train it: editscale train-embedded --install)")


def test_models_lists_families_and_presets(run_cli) -> None:
    code, out, err = run_cli("models")
    assert code == 0, err
    for name in ("gpt2", "gptj", "gpt_neox", "llama", "gpt2-xl", "EleutherAI/gpt-j-6b", "embedded"):
        assert name in out


def test_methods_lists_every_method_and_its_presets(run_cli) -> None:
    code, out, err = run_cli("methods")
    assert code == 0, err
    for name in ("rome", "r-rome", "memit", "emmet", "alphaedit", "encore", "ultraedit", "ft-c", "gpt2-xl",
                 "meta-llama-3-8b"):
        assert name in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert "yes" in rows["encore"].split("│")[4] and "-" in rows["ultraedit"].split("│")[4]  # mpes / norm_anchor


def test_malformed_counterfact_record_is_named(run_cli, tmp_path: Path) -> None:
    good = {"case_id": 3, "requested_rewrite": {"prompt": "{} plays the", "subject": "Ann Lee",
            "relation_id": "P1303", "target_new": {"str": "piano", "id": "Q1"},
            "target_true": {"str": "violin", "id": "Q2"}},
            "paraphrase_prompts": ["x"], "neighborhood_prompts": ["y"]}
    bad = json.loads(json.dumps(good))
    bad["case_id"] = 7
    del bad["requested_rewrite"]["target_new"]["str"]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([good, bad]))
    code, out, err = run_cli("validate-data", "--dataset", "counterfact", "--data-path", str(path))
    assert code == 2 and "Traceback" not in err
    assert "#1" in err and "case_id=7" in err and "target_new.str" in err
    path.write_text(json.dumps([good]))
    code, out, err = run_cli("validate-data", "--dataset", "counterfact", "--data-path", str(path))
    assert code == 0 and "1 valid" in out, err


@pytest.mark.parametrize("args, needle", [
    (("facts", "--dataset", "nosuch"), "unknown dataset"),
    (("facts", "--model", "/nonexistent/model/dir"), "/nonexistent/model/dir"),
    (("skills", "--tasks", "sentiment,nosuch"), "unknown downstream task"),
    (("validate-data", "--dataset", "counterfact", "--data-path", "/nonexistent.json"), "does not exist"),
    (("run", "--out", "x", "--edits", "0"), "edits: Input should be greater than or equal to 1"),
    (("run", "--out", "x", "--forgetting", "sometimes"), "forgetting: Input should be 'paper' or 'probability'"),
    (("run", "--out", "x", "--set", "novalue"), "--set expects KEY=VALUE"),
    (("run", "--out", "x", "--no-such-option"), "No such option: --no-such-option"),
    (("zsre-check", "--out", "x", "--n", "many"), "Invalid value for '--n'"),
])
def test_bad_input_is_one_clear_line(run_cli, args: tuple[str, ...], needle: str) -> None:
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    assert "Traceback" not in err and needle in err


@needs_embedded
def test_facts_json_contract(run_cli) -> None:
    code, out, err = run_cli("facts", "--model", "embedded", "--n", "50", "--json")
    assert code == 0, err
    scores = json.loads(out)
    for key in ("known_rewrite", "known_paraphrase", "known_neighborhood", "known_unseen"):
        assert 0.0 <= scores[key] <= 1.0
    assert scores["n_records"] == 50


@needs_embedded
def test_skills_json_contract(run_cli) -> None:
    code, out, err = run_cli("skills", "--model", "embedded", "--n", "20", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert all(0.0 <= res[t]["f1"] <= 1.0 and res[t]["total"] == 20 for t in
               ("sentiment", "paraphrase", "acceptability", "entailment"))


def test_every_run_config_field_is_a_run_option() -> None:
    command = typer.main.get_command(cli.app).commands["run"]
    options = {opt for p in command.params for opt in p.opts}
    for name in RunConfig.model_fields:
        if name == "method_config":  # reached through --method-config FILE and --set KEY=VALUE
            assert {"--method-config", "--set"} <= options
        else:
            assert f"--{name.replace('_', '-')}" in options, name
    by_name = {p.name: p for p in command.params}
    assert by_name["edits"].help == RunConfig.model_fields["edits"].description
    assert by_name["edits"].show_default == "100"  # RunConfig's default, shown in --help


def test_options_reach_the_run_config_over_a_config_file(tmp_path: Path) -> None:
    seen = {}
    app = typer.Typer()

    @app.command()
    @cli.run_config_options
    def fake(options: dict, config: Path | None = None, set_: list[str] | None = typer.Option(None, "--set")) -> None:
        seen["cfg"] = cli.build_run_config(options, config=config, sets=set_)

    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"edits": 5, "sample": 3, "method_config": {"v_lr": 0.1}}))
    result = CliRunner().invoke(app, ["--config", str(tmp_path / "run.yaml"), "--sample", "4", "--downstream", "none",
                                      "--glue-dir", "/g", "--set", "v_lr=0.2", "--set", "layers=[2]"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.edits, cfg.sample, cfg.downstream, cfg.glue_dir) == (5, 4, [], "/g")
    assert cfg.method_config == {"v_lr": 0.2, "layers": [2]}
    assert cfg.batch_size == RunConfig().batch_size  # not given: RunConfig's default


def test_run_resume_skills_and_compare(run_cli, world, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDITSCALE_TASKS", world["tasks"])
    out = tmp_path / "run"
    args = ("run", "--out", str(out), "--model", world["model"], "--method", "stub", "--dataset", "counterfact",
            "--data-path", world["data"], "--edits", "4", "--eval-every", "2", "--control", "5", "--set",
            "layers=[1]", "--no-progress", "--downstream", "tiny_sentiment", "--downstream-n", "4",
            "--downstream-every", "2")
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    assert "mean ES" in stdout and "edits.jsonl" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["edits_done"] == 4 and set(summary["downstream_final_f1"]) == {"tiny_sentiment"}
    code, stdout, err = run_cli("skills", "--model", str(out), "--tasks", "tiny_sentiment", "--n", "4", "--json")
    assert code == 0, err
    assert "after 4 edits" in json.loads(stdout)["model"]
    code, stdout, err = run_cli("resume", str(out), "--no-progress")  # a finished run resumes to the same summary
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["mean_es"] == summary["mean_es"]
    code, stdout, err = run_cli(*args)  # the same command on the same directory: nothing left to do
    assert code == 0, err
    code, stdout, err = run_cli(*args[:-6], "--edits", "5")
    assert code == 2 and "holds another run" in err and "Traceback" not in err
    code, stdout, err = run_cli("run", "--out", str(tmp_path / "x"), "--set", "clamp_norm_factr=2")
    assert code == 2 and "clamp_norm_factr" in err and "Traceback" not in err
    code, stdout, err = run_cli("compare", str(out), "--json")
    assert code == 0, err
    (row,) = json.loads(stdout)
    assert row["method"] == "stub" and row["edits"] == 4 and set(row["f1"]) == {"tiny_sentiment"}
    assert (row["model"], row["model_path"], row["sample"]) == ("tiny-gpt2", world["model"], 0)
    code, stdout, err = run_cli("compare", str(out), "--markdown")
    assert code == 0, err
    header, rule, line = stdout.strip().splitlines()
    assert header.startswith("| run | method |") and "F1 tiny_sentiment" in header and rule.startswith("|---|")
    assert line.split(" | ")[1:6] == ["stub", "1", "tiny-gpt2", "0", "4"]
    assert "| model | sample | edits |" in header


@pytest.mark.slow
def test_the_installed_command_end_to_end(world, tmp_path: Path) -> None:
    """One real process: the module entry point runs FT-C on a tiny model (errors: test_bad_input_...)."""
    env = {**os.environ, "COLUMNS": "250"}
    exe = [sys.executable, "-m", "editscale.cli"]
    out = tmp_path / "run"
    res = subprocess.run([*exe, "run", "--out", str(out), "--model", world["model"], "--method", "ft-c",
                          "--dataset", "counterfact", "--data-path", world["data"], "--edits", "3", "--control", "3",
                          "--downstream", "none", "--set", "layers=[1]", "--set", "num_steps=2", "--no-progress"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "summary.json").read_text())["edits_done"] == 3
    assert "mean ES" in res.stdout
