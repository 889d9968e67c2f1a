"""A run directory cannot be corrupted silently: checkpoint checksums (tensors, runner state and the
rows a checkpoint covers) are verified on resume, one writer at a time holds DIR/.lock, and a
garbage JSONL line is named by file and line. Stub editor on a tiny GPT-2, as in test_runner_unit."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import runner_stubs
from editscale.errors import EditscaleError
from editscale.run.checkpoint import load_checkpoint, load_run_model
from editscale.run.runner import Runner
from editscale.run.store import RunStore
from editscale.run.summary import summarize
from test_runner_unit import config, quiet, without_timings

CHANGED = "the checkpoint was changed after it was written"


pytestmark = pytest.mark.usefixtures("tiny_tasks")


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory) -> Path:
    """One finished 8-edit run (checkpoints after 3, 6 and 8 edits) that each test copies and damages."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITSCALE_TASKS", world["tasks"])
        quiet(config(world), out).run()
    return out


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def resume(out: Path, log: list[str] | None = None) -> dict:
    return Runner.resume(out, progress=False, log=(log.append if log is not None else lambda s: None)).run()


def one_line_error(call) -> str:
    with pytest.raises(EditscaleError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message


def rewrite_lines(path: Path, change) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(change(lines)))


# ---------------------------------------------------------------------- checksums


def test_the_checkpoint_carries_checksums_and_a_clean_run_verifies(run_dir: Path) -> None:
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    sums = state["checksums"]
    assert set(sums["tensors"]) == {"layer0", "layer1", "bias0", "bias1", "editor.applied"}
    assert {name: s["rows"] for name, s in sums["rows"].items()} == {"edits": 8, "forgetting": 4, "downstream": 3,
                                                                     "health": 5}
    ckpt = load_checkpoint(RunStore(run_dir))
    assert ckpt is not None and set(ckpt.state) == {"edits_done", "history", "skipped", "tracker"}
    before = {name: RunStore(run_dir).rows(name) for name in ("edits", "forgetting")}
    assert resume(run_dir)["edits_done"] == 8
    assert {name: RunStore(run_dir).rows(name) for name in before} == before


def test_resume_after_a_crash_verifies_the_covered_rows_and_drops_the_rest(world, finished, tmp_path: Path,
                                                                          monkeypatch) -> None:
    """Rows written after the last checkpoint (and a torn line) are not covered: resume drops them
    and ends with the rows of an uninterrupted run."""
    out = tmp_path / "crashed"
    compute = runner_stubs.StubEditor.compute

    def crash_at_the_sixth(self, requests):
        if float(self.applied) == 5:
            raise RuntimeError("killed")
        return compute(self, requests)

    monkeypatch.setattr(runner_stubs.StubEditor, "compute", crash_at_the_sixth)
    with pytest.raises(RuntimeError, match="killed"):
        quiet(config(world), out).run()
    monkeypatch.setattr(runner_stubs.StubEditor, "compute", compute)
    assert load_checkpoint(RunStore(out)).edits_done == 3 and len(RunStore(out).rows("edits")) == 5
    with open(out / "edits.jsonl", "a") as f:
        f.write('{"index": 5, "sta')  # torn mid-write
    log: list[str] = []
    assert resume(out, log)["edits_done"] == 8
    assert log == [f"resuming {out} after edit 3"]
    for name in ("edits", "forgetting", "downstream", "health"):
        assert without_timings(RunStore(out).rows(name)) == without_timings(RunStore(finished).rows(name)), name


def test_a_changed_tensor_value_fails_resume_in_one_line(run_dir: Path) -> None:
    path = run_dir / "checkpoint" / "weights.safetensors"
    tensors = load_file(str(path))
    tensors["layer1"][3, 5] += 1e-3
    save_file(tensors, str(path))  # a valid file, only one value differs
    assert one_line_error(lambda: resume(run_dir)) == \
        f"{path}: tensor layer1 does not match its checksum; {CHANGED}"
    with RunStore(run_dir).lock(lambda s: None):  # the failed run let go of the directory
        pass
    tensors.pop("layer1")
    save_file(tensors, str(path))
    assert one_line_error(lambda: load_checkpoint(RunStore(run_dir))) == f"{path}: tensor layer1 is missing; {CHANGED}"


def test_a_changed_state_fails_to_load(run_dir: Path) -> None:
    path = run_dir / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    state["edits_done"] = 7
    path.write_text(json.dumps(state))
    assert one_line_error(lambda: load_checkpoint(RunStore(run_dir))) == \
        f"{path}: the runner state does not match its checksum; {CHANGED}"


def test_a_changed_or_removed_covered_row_fails_resume(run_dir: Path) -> None:
    path = run_dir / "edits.jsonl"

    def change_es(lines: list[str]) -> list[str]:
        row = json.loads(lines[1])
        row["es"] = 1.0 - row["es"]
        return [lines[0], json.dumps(row) + "\n", *lines[2:]]

    saved = path.read_text()
    rewrite_lines(path, change_es)
    assert one_line_error(lambda: resume(run_dir)) == \
        f"{path}: the first 8 rows, which the checkpoint covers, do not match their checksum; " \
        "a row was changed after the checkpoint was written"
    path.write_text(saved)
    rewrite_lines(run_dir / "health.jsonl", lambda lines: lines[:-1])
    assert one_line_error(lambda: load_checkpoint(RunStore(run_dir))) == \
        f"{run_dir / 'health.jsonl'}: holds 4 complete rows where the checkpoint covers 5; " \
        "rows were removed after the checkpoint was written"


def test_a_checkpoint_without_checksums_still_loads_unverified(run_dir: Path, caplog) -> None:
    state_path = run_dir / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    del state["checksums"]  # as an older editscale wrote it
    state_path.write_text(json.dumps(state))
    weights = run_dir / "checkpoint" / "weights.safetensors"
    tensors = load_file(str(weights))
    tensors["layer0"][0, 0] = 5.0
    save_file(tensors, str(weights))
    with caplog.at_level(logging.INFO, logger="editscale.run.store"):
        ckpt = load_checkpoint(RunStore(run_dir))
    assert ckpt is not None and ckpt.edits_done == 8 and float(ckpt.params.weights[0][0, 0]) == 5.0
    assert "without checksums" in caplog.text and "unverified" in caplog.text
    assert resume(run_dir)["edits_done"] == 8


# ---------------------------------------------------------------------- the writer's lock


def test_a_second_writer_fails_at_once_and_readers_need_no_lock(world, run_dir: Path) -> None:
    (run_dir / ".lock").unlink()
    store = RunStore(run_dir)
    # readers: rows, the checkpoint, the model at the checkpoint, the summary; none takes the lock
    assert len(store.rows("edits")) == 8 and load_checkpoint(store).edits_done == 8
    assert load_run_model(run_dir)[1].endswith("after 8 edits")
    assert summarize(store, quiet(config(world), run_dir).cfg)["edits_done"] == 8
    assert not (run_dir / ".lock").exists()
    with store.lock(lambda s: None):
        assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"
        assert one_line_error(lambda: quiet(config(world), run_dir).run()) == \
            f"{run_dir} is being written by process {os.getpid()}; wait for it or stop it"
        assert one_line_error(lambda: resume(run_dir)).startswith(f"{run_dir} is being written by process")
        assert len(store.rows("edits")) == 8 and load_checkpoint(store).edits_done == 8  # readers still read
    assert (run_dir / ".lock").read_text() == ""
    assert resume(run_dir)["edits_done"] == 8


def test_a_fresh_run_is_not_refused_for_its_own_lock_file(world, tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    with pytest.raises(EditscaleError, match="unknown dataset"):
        quiet(config(world, dataset="wiki"), out).run()  # fails after taking the lock: DIR holds only .lock
    assert [p.name for p in out.iterdir()] == [".lock"]
    assert quiet(config(world, edits=2, downstream=[], health=False), out).run()["edits_done"] == 2
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(EditscaleError, match="not an editscale run directory"):
        quiet(config(world, edits=2), other).run()
    assert not (other / ".lock").exists()  # a directory that is not a run's gets no lock file


@pytest.mark.slow
def test_the_lock_names_another_process_and_dies_with_it(world, run_dir: Path) -> None:
    script = ("import sys, time; from editscale.run.store import RunStore;"
              "lock = RunStore(sys.argv[1]).lock(); lock.__enter__(); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert one_line_error(lambda: resume(run_dir)) == \
            f"{run_dir} is being written by process {proc.pid}; wait for it or stop it"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (run_dir / ".lock").read_text() == f"{proc.pid}\n"  # no cleanup ran, yet the kernel let go
    with RunStore(run_dir).lock(lambda s: None):
        assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"


# ---------------------------------------------------------------------- garbage rows


def test_a_garbage_row_is_named_by_file_and_line(run_dir: Path) -> None:
    store = RunStore(run_dir)
    path = run_dir / "forgetting.jsonl"
    rewrite_lines(path, lambda lines: [*lines[:2], "}{ not json\n", *lines[2:]])
    assert one_line_error(lambda: store.rows("forgetting")) == \
        f"{path}:3: not a JSON row (Expecting value at column 1); the file was damaged or edited"
    rewrite_lines(path, lambda lines: [*lines[:2], "[1, 2]\n", *lines[3:]])
    assert one_line_error(lambda: list(store.iter_rows("forgetting"))) == \
        f"{path}:3: not a JSON object but list; the file was damaged or edited"
    path.write_bytes(path.read_bytes().replace(b"[1, 2]", b'"\xff"'))
    assert one_line_error(lambda: store.rows("forgetting")).startswith(f"{path}:3: not UTF-8 text")
    (run_dir / "control.json").write_text("[1, 2")
    assert one_line_error(lambda: store.read_json("control.json")).startswith(
        f"{run_dir / 'control.json'}: not valid JSON")


def test_resume_names_a_garbage_row_past_the_checkpoint(run_dir: Path) -> None:
    path = run_dir / "edits.jsonl"
    with open(path, "a") as f:
        f.write("garbage\n" + json.dumps({"index": 9}) + "\n")
    assert one_line_error(lambda: resume(run_dir)) == \
        f"{path}:9: not a JSON row (Expecting value at column 1); the file was damaged or edited"


def test_truncation_keeps_the_bytes_of_the_rows_it_keeps(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "r")
    store.create()
    covered = '{"index": 0, "x": 1.50}\n{"index":1}\n'  # not as json.dumps would write them
    (store.root / "edits.jsonl").write_text(covered)
    store.save_checkpoint({"layer0": torch.ones(2)}, {"edits_done": 2})
    store.append("edits", {"index": 2})  # past the checkpoint
    store.truncate("edits", "index", 2)
    assert (store.root / "edits.jsonl").read_text() == covered
    assert store.load_checkpoint()[1] == {"edits_done": 2}
    (store.root / "edits.jsonl").write_text('{"idx": 0}\n')
    assert one_line_error(lambda: store.truncate("edits", "index", 2)) == \
        f"{store.root / 'edits.jsonl'}:1: the row has no 'index'; the file was damaged or edited"
