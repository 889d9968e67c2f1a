"""The command line: the documented contract, and errors that are one line, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from editscale.data.factworld import checkpoint_dir


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # wide columns: rich wraps tables to 80 columns when stdout is not a terminal
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "editscale.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_models_lists_families_and_presets() -> None:
    res = run_cli("models")
    assert res.returncode == 0, res.stderr
    for name in ("gpt2", "gptj", "gpt_neox", "llama", "gpt2-xl", "EleutherAI/gpt-j-6b", "embedded"):
        assert name in res.stdout


def test_malformed_counterfact_record_is_named(tmp_path: Path) -> None:
    good = {"case_id": 3, "requested_rewrite": {"prompt": "{} plays the", "subject": "Ann Lee",
            "relation_id": "P1303", "target_new": {"str": "piano", "id": "Q1"},
            "target_true": {"str": "violin", "id": "Q2"}},
            "paraphrase_prompts": ["x"], "neighborhood_prompts": ["y"]}
    bad = json.loads(json.dumps(good))
    bad["case_id"] = 7
    del bad["requested_rewrite"]["target_new"]["str"]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([good, bad]))
    res = run_cli("validate-data", "--dataset", "counterfact", "--data-path", str(path))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "#1" in res.stderr and "case_id=7" in res.stderr and "target_new.str" in res.stderr

    path.write_text(json.dumps([good]))
    res = run_cli("validate-data", "--dataset", "counterfact", "--data-path", str(path))
    assert res.returncode == 0, res.stderr
    assert "1 valid" in res.stdout


@pytest.mark.parametrize("args, needle", [
    (("facts", "--dataset", "nosuch"), "unknown dataset"),
    (("facts", "--model", "/nonexistent/model/dir"), "/nonexistent/model/dir"),
    (("skills", "--tasks", "sentiment,nosuch"), "unknown downstream task"),
    (("validate-data", "--dataset", "counterfact", "--data-path", "/nonexistent.json"), "does not exist"),
])
def test_bad_input_is_one_clear_line(args: tuple[str, ...], needle: str) -> None:
    res = run_cli(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert needle in res.stderr


needs_embedded = pytest.mark.skipif(
    not (checkpoint_dir() / "model.safetensors").exists(),
    reason="the embedded checkpoint is not installed (train it: editscale train-embedded --install)")


@needs_embedded
def test_facts_json_contract() -> None:
    res = run_cli("facts", "--model", "embedded", "--n", "50", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("known_rewrite", "known_paraphrase", "known_neighborhood", "known_unseen"):
        assert 0.0 <= out[key] <= 1.0
    assert out["n_records"] == 50


@needs_embedded
def test_skills_json_contract() -> None:
    res = run_cli("skills", "--model", "embedded", "--n", "20", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) >= {"sentiment", "paraphrase", "acceptability", "entailment"}
    assert all(0.0 <= out[t]["f1"] <= 1.0 and out[t]["total"] == 20 for t in
               ("sentiment", "paraphrase", "acceptability", "entailment"))


@pytest.mark.skipif(not (checkpoint_dir() / "model.safetensors").exists(), reason="embedded checkpoint absent")
def test_run_then_resume_and_methods(tmp_path: Path) -> None:
    out = tmp_path / "run"
    fast = ("--set", "v_num_grad_steps=4", "--set", "context_template_length_params=[[5, 2]]",
            "--set", "mom2_n_samples=200", "--stats-cache", str(tmp_path / "stats"), "--no-progress",
            "--downstream", "sentiment", "--downstream-n", "10", "--downstream-every", "2")
    res = run_cli("run", "--out", str(out), "--edits", "4", "--eval-every", "2", "--control", "5", *fast)
    assert res.returncode == 0, res.stderr
    assert "mean ES" in res.stdout and "edits.jsonl" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["edits_done"] == 4 and set(summary["downstream_final_f1"]) == {"sentiment"}
    res = run_cli("skills", "--model", str(out), "--tasks", "sentiment", "--n", "10", "--json")
    assert res.returncode == 0, res.stderr
    assert "after 4 edits" in json.loads(res.stdout)["model"]
    res = run_cli("resume", str(out), "--no-progress")  # a finished run resumes to the same summary
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "summary.json").read_text())["mean_es"] == summary["mean_es"]
    res = run_cli("run", "--out", str(out), "--edits", "5", "--eval-every", "2", "--control", "5", *fast)
    assert res.returncode == 2 and "holds another run" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("run", "--out", str(tmp_path / "x"), "--set", "clamp_norm_factr=2")
    assert res.returncode == 2 and "clamp_norm_factr" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("compare", str(out), "--json")
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)
    assert row["method"] == "rome" and row["edits"] == 4 and set(row["f1"]) == {"sentiment"}
    res = run_cli("compare", str(out), "--markdown")
    assert res.returncode == 0, res.stderr
    header, rule, line = res.stdout.strip().splitlines()
    assert header.startswith("| run | method |") and "F1 sentiment" in header and rule.startswith("|---|")
    assert line.split(" | ")[1:4] == ["rome", "1", "4"]
    res = run_cli("methods")
    assert res.returncode == 0
    for name in ("rome", "r-rome", "memit", "emmet", "alphaedit", "ft-c", "gpt2-xl"):
        assert name in res.stdout
