"""`retest`, `analyze`, `report` on a tiny model with the stub editor (tests/runner_stubs.py): a
chosen edit is re-applied alone to the unedited model and its distance recorded; the HTML report
is self-contained; the commands' one-line answers."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

import runner_stubs
from editscale.models.loading import load_model
from editscale.report.html import build_report
from editscale.run.config import RunConfig
from editscale.run.retest import retest
from editscale.run.runner import Runner
from editscale.run.store import RunStore

LAYERS = [0, 1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = runner_stubs.make_world(tmp_path_factory.mktemp("world"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITSCALE_TASKS", world["tasks"])
        yield world


@pytest.fixture(scope="module")
def run_dir(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "stub-run"
    cfg = RunConfig(model=world["model"], method="stub", dataset="counterfact", data_path=world["data"], edits=12,
                    eval_every=3, checkpoint_every=6, control=5, downstream=["tiny_sentiment"], downstream_n=4,
                    downstream_every=6, method_config={"layers": LAYERS})
    Runner(cfg, out, progress=False, log=lambda s: None).run()
    return out


def single_edit_distance(case_id: int, layer: int, d_model: int, d_mlp: int, scale: float = 0.02) -> float:
    """The stub's delta for one request (tests/runner_stubs.py), as ||ΔW||_F / numel."""
    g = torch.Generator().manual_seed(1000 * case_id + layer)
    u, v = torch.randn(d_model, generator=g), torch.randn(d_mlp, generator=g)
    return float((scale * torch.outer(u, v)).double().norm()) / (d_model * d_mlp)


def test_retest_reapplies_a_chosen_edit_as_the_first_edit(world, run_dir: Path) -> None:
    rows = retest(str(run_dir), [7], baseline=2, seed=1, progress=False, log=lambda s: None)
    kinds = [r["kind"] for r in rows]
    assert kinds == ["unedited", "candidate", "baseline", "baseline"]
    edits = RunStore(run_dir).rows("edits")
    adapter = load_model(world["model"]).adapter
    d_model, d_mlp = adapter.d_model, adapter.d_mlp
    for r in rows[1:]:
        case = edits[r["index"]]["case_id"]
        assert r["case_ids"] == [case]
        for layer in LAYERS:
            # alone on the unedited model: the distance of this edit's delta only, whatever came before
            assert r["distance"][str(layer)] == pytest.approx(single_edit_distance(case, layer, d_model, d_mlp),
                                                              rel=1e-4)
        assert r["in_run"]["distance_after"] > r["distance_max"]
        assert {"es", "ps", "ns", "control_known_pct", "f1", "text_nll", "generations", "disabling"} <= set(r)
    assert rows[1]["index"] == 7 and 7 not in [r["index"] for r in rows[2:]]
    # a rerun measures nothing again
    n = len(RunStore(run_dir).rows("retest"))
    again = retest(str(run_dir), [7], baseline=2, seed=1, progress=False, log=lambda s: None)
    assert again == rows and len(RunStore(run_dir).rows("retest")) == n


def test_a_huge_first_edit_is_disabling(run_dir: Path) -> None:
    rows = retest(str(run_dir), [2], baseline=0, method_config={"scale": 50.0}, downstream=False,
                  progress=False, log=lambda s: None)
    (cand,) = [r for r in rows if r["kind"] == "candidate"]
    assert cand["method"] == "stub scale=50.0" and cand["disabling"]
    assert any("control recall" in w for w in cand["why"])
    # the same edit at the run's scale was not disabling, and its rows stay apart from these
    normal = [r for r in RunStore(run_dir).rows("retest") if r["method"] == "stub" and r["kind"] == "candidate"]
    assert normal and not any(r["disabling"] for r in normal)


def test_analyze_command_writes_analysis_json(run_dir: Path, run_cli) -> None:
    code, stdout, _ = run_cli("analyze", str(run_dir), "--json", "--jump-factor", "3")
    out = json.loads(stdout)
    assert code == 0
    assert out["rule"]["jump_factor"] == 3.0 and out["edits_done"] == 12 and out["collapse_index"] is None
    assert json.loads((run_dir / "analysis.json").read_text()) == out


def test_retest_without_candidates_says_what_to_pass(run_dir: Path, run_cli) -> None:
    code, _, err = run_cli("retest", str(run_dir))
    assert code == 2
    assert "no disabling candidate" in err and "--edits" in err and "Traceback" not in err


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href", "action", "poster", "data") and v is not None:
                self.refs.append((tag, k, v))


def test_the_report_is_self_contained(run_dir: Path, tmp_path: Path, run_cli) -> None:
    code, out, _ = run_cli("report", str(run_dir), "--out", str(tmp_path / "rep"))
    assert code == 0 and "report.html" in out
    page = (tmp_path / "rep" / "report.html").read_text()
    parser = _Refs()
    parser.feed(page)
    assert parser.refs, "the report embeds its figures"
    images = [v for tag, k, v in parser.refs if tag == "img"]
    assert len(images) >= 3
    for tag, k, v in parser.refs:
        assert v.startswith(("data:", "#")), f"<{tag} {k}={v[:60]}> leaves the file"
    assert not re.search(r"https?://|url\(|@import", page)
    for v in images:
        header, data = v.split(",", 1)
        assert header == "data:image/png;base64"
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    figures = sorted(p.name for p in (tmp_path / "rep" / "figures").iterdir())
    assert "distance.png" in figures and "distance.svg" in figures
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "figures/distance.png" in md and "stub-run" in md
    assert "Table 2" in page and "Table 3" in page and "stub-run" in page


def test_build_report_on_several_runs_and_a_run_in_progress(run_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.yaml", "edits.jsonl", "forgetting.jsonl", "downstream.jsonl", "health.jsonl"):
        text = (run_dir / name).read_text()
        if name == "edits.jsonl":
            text = "".join(text.splitlines(keepends=True)[:5])
        (partial / name).write_text(text)
    files = build_report([run_dir, partial], tmp_path / "both")
    page = files.html.read_text()
    assert "5 (running)" in page and files.html.stat().st_size < 5e6
