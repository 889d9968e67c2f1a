"""Every form an edit dataset comes in loads, validates and runs with default options: the shared real
files (skipped when the shared folder is absent), and tiny hand-written files for what a run does with
them: sample files name case ids (missing ones are an error, or skipped with --skip-missing),
--order file, and no-op records (skipped with a count, refused with --strict).

Runs use the tiny random GPT-2 and the stub editor of runner_stubs, so they take seconds."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import runner_stubs
from editscale.data import registry
from editscale.data.records import EditRecord, NoopRecordError
from editscale.data.registry import load_dataset, load_records
from editscale.data.sampling import edit_order
from editscale.errors import EditscaleError, RecordError
from editscale.run.store import RunStore
from tiny_models import byte_bpe_tokenizer, tiny_config

# The edit datasets of shared/data (MANIFEST.md). Not here, because they are not edit records: the
# sample files (paper_samples_indices.json, ume_sampled_unique_*.json, ume_zsre_sampled_unique_*.json),
# the selection flags (disabling_edits_counterfact.json), the prompt lists (cf_generation_prompts.json,
# zsre_text_completion_prompts.json) and counterfact_qna.json (questions and new answers keyed by
# case_index, with no true answer).
SHARED_DATASETS = [
    ("counterfact", "counterfact/counterfact_subset.json", 500, 0),
    ("counterfact", "counterfact/easyedit_format/counterfact-train.json", 10000, 0),
    ("counterfact", "counterfact/easyedit_format/counterfact-val.json", 1919, 0),
    ("counterfact", "counterfact/easyedit_format/counterfact-edit.json", 10000, 0),
    ("counterfact", "counterfact/easyedit_format", 21919, 0),  # the three splits merged by case_id
    ("zsre", "zsre/zsre_mend_train_1k.json", 977, 23),
]
COMPANIONS = [
    ("counterfact", "counterfact/paper_samples_indices.json", "sample file"),
    ("counterfact", "counterfact/ume_sampled_unique_cf_10_20000.json", "sample file"),
    ("counterfact", "counterfact/disabling_edits_counterfact.json", "selection file"),
    ("counterfact", "counterfact/cf_generation_prompts.json", "list of strings"),
    ("counterfact", "counterfact/counterfact_qna.json", "no true target"),
    ("zsre", "zsre/ume_zsre_sampled_unique_10_10000.json", "sample file"),
    ("zsre", "zsre/zsre_text_completion_prompts.json", "no true target"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """The stub runs' tiny GPT-2, with room for real prompts: the tiny byte-level BPE spells their words
    letter by letter, past the 64 positions of the runner's own tiny model."""
    made = runner_stubs.make_world(tmp_path_factory.mktemp("world"), n_records=12)
    tok = byte_bpe_tokenizer()
    config = tiny_config("gpt2", len(tok))
    config.n_positions = 512
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(made["model"])
    return made


def run_args(world: dict[str, str], out: Path, dataset: str, data_path: Path | str, *extra: str) -> list[str]:
    return ["run", "--out", str(out), "--model", world["model"], "--method", "stub", "--set", "layers=[0, 1]",
            "--dataset", dataset, "--data-path", str(data_path), "--edits", "2", "--downstream", "none",
            "--no-progress", *extra]


def edited_ids(out: Path) -> list[int]:
    return [r["case_id"] for r in RunStore(out).rows("edits")]


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    # the console wraps long lines (the message itself is one); a run's model-loading bar may come first
    text = " ".join(err.split())
    assert "error:" in text and "Traceback" not in err
    return text[text.index("error:"):]


# ---------------------------------------------------------------------------------------------- shared files


@pytest.mark.parametrize(("dataset", "rel", "n", "noops"), SHARED_DATASETS, ids=[r for _, r, _, _ in SHARED_DATASETS])
def test_shared_dataset_validates_and_runs(run_cli, world, shared_data: Path, tmp_path: Path, dataset: str,
                                          rel: str, n: int, noops: int) -> None:
    path = shared_data / rel
    code, out, err = run_cli("validate-data", "--dataset", dataset, "--data-path", str(path))
    assert code == 0, err
    assert f"ok: {n} valid {dataset} records" in out and f"{noops} no-op records skipped" in out

    code, out, err = run_cli(*run_args(world, tmp_path / "run", dataset, path))
    assert code == 0, err
    ids = edited_ids(tmp_path / "run")
    held = {r.case_id for r in load_records(dataset, data_path=path)}
    assert len(ids) == 2 and set(ids) <= held


@pytest.mark.parametrize(("dataset", "rel", "why"), COMPANIONS, ids=[r for _, r, _ in COMPANIONS])
def test_shared_companion_files_are_named_for_what_they_are(run_cli, shared_data: Path, dataset: str, rel: str,
                                                            why: str) -> None:
    code, _, err = run_cli("validate-data", "--dataset", dataset, "--data-path", str(shared_data / rel))
    line = one_line_error(code, err)
    assert rel.split("/")[-1] in line and why in line


def test_shared_zsre_noops_are_skipped_or_refused(run_cli, shared_data: Path) -> None:
    path = shared_data / "zsre" / "zsre_mend_train_1k.json"
    loaded = load_dataset("zsre", data_path=path)
    assert len(loaded.records) == 977 and len(loaded.noops) == 23
    assert [e.case_id for e in loaded.noops[:3]] == [88, 101, 115]
    code, _, err = run_cli("validate-data", "--dataset", "zsre", "--data-path", str(path), "--strict")
    line = one_line_error(code, err)
    assert "zsre_mend_train_1k.json, record #88, case_id=88, field 'alt'" in line and "--strict" in line


def test_shared_rome_subset_with_the_papers_sample_file(run_cli, world, shared_data: Path, tmp_path: Path) -> None:
    data = shared_data / "counterfact" / "counterfact_subset.json"
    samples = shared_data / "counterfact" / "paper_samples_indices.json"
    code, _, err = run_cli(*run_args(world, tmp_path / "a", "counterfact", data, "--sample-file", str(samples)))
    line = one_line_error(code, err)
    assert "19933 of the 20391 case ids of sample 0" in line and "14434, 2473, 4093, 12675, 19240, ..." in line
    assert "--skip-missing" in line

    code, _, err = run_cli(*run_args(world, tmp_path / "b", "counterfact", data, "--sample-file", str(samples),
                                     "--skip-missing"))
    assert code == 0, err
    # the first edits of sample 0 that the subset holds, in the sample's order
    assert edited_ids(tmp_path / "b") == [16617, 7055]


def test_shared_easyedit_splits_follow_the_papers_sample(shared_data: Path) -> None:
    merged = load_records("counterfact", data_path=shared_data / "counterfact" / "easyedit_format")
    samples = str(shared_data / "counterfact" / "paper_samples_indices.json")
    from_file = edit_order(merged, sample=0, edits=3, sample_file=samples)
    rebuilt = edit_order(merged, sample=0, edits=3)
    assert [r.case_id for r in from_file[:3]] == [r.case_id for r in rebuilt[:3]] == [14434, 2473, 4093]
    # one split alone: the sample's ids, not its positions
    edit = load_records("counterfact", data_path=shared_data / "counterfact" / "easyedit_format" /
                        "counterfact-edit.json")
    kept = edit_order(edit, sample=0, edits=3, sample_file=samples, skip_missing=True)
    assert {r.case_id for r in kept} <= {r.case_id for r in edit}
    assert [r.case_id for r in kept] == [i for i in json.loads(Path(samples).read_text())["0"]
                                         if i in {r.case_id for r in edit}]


# ---------------------------------------------------------------------------------------------- tiny files


def rome(case_id: int, subject: str, new: str = "English", true: str = "French") -> dict[str, Any]:
    return {"case_id": case_id, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "subject": subject, "relation_id": "P103",
        "target_new": {"str": new, "id": "Q1"}, "target_true": {"str": true, "id": "Q2"}},
        "paraphrase_prompts": [f"{subject} speaks"], "neighborhood_prompts": ["Michel Rocard speaks"]}


def easyedit(case_id: int, subject: str, new: str = "Sega", true: str = "BBC") -> dict[str, Any]:
    return {"case_id": case_id, "prompt": f"{subject}, by", "target_new": new, "subject": subject,
            "ground_truth": true, "rephrase_prompt": f"{subject} is owned by", "locality_prompt": "BBC Radio, by",
            "locality_ground_truth": true}


def mend(subject: str, alt: str = "Oxford", answers: tuple[str, ...] = ("Cambridge",)) -> dict[str, Any]:
    return {"subject": subject, "src": f"What university did {subject} attend?", "pred": answers[0],
            "rephrase": f"Which university did {subject} go to?", "alt": alt, "answers": list(answers),
            "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def partial(tmp_path: Path) -> Path:
    """A ROME-schema file whose case ids are not its positions, in no particular order."""
    return write(tmp_path / "partial.json", [rome(i, f"Person {i}") for i in (30, 10, 20, 40, 50, 60)])


def test_sample_files_name_case_ids_not_positions(partial: Path, tmp_path: Path) -> None:
    records = load_records("counterfact", data_path=partial)
    samples = write(tmp_path / "s.json", {"0": [20, 30, 10], "1": [0, 1, 2]})
    order = edit_order(records, sample=0, edits=2, sample_file=str(samples))
    assert [r.case_id for r in order] == [20, 30, 10]
    # positions 0-2 of this file are case ids 30, 10, 20: read as ids, sample 1 names none of them
    with pytest.raises(EditscaleError, match="3 of the 3 case ids of sample 1"):
        edit_order(records, sample=1, edits=2, sample_file=str(samples))
    # the recipe's samples are case ids too: every record of a sample is one the file holds
    built = edit_order(records, sample=2, edits=6)
    assert sorted(r.case_id for r in built) == [10, 20, 30, 40, 50, 60]


def test_missing_case_ids_are_an_error_naming_how_many_and_which(partial: Path, tmp_path: Path) -> None:
    records = load_records("counterfact", data_path=partial)
    samples = write(tmp_path / "s.json", {"0": [10, 1, 20, 2, 3, 4, 5, 6, 7, 30]})
    with pytest.raises(EditscaleError) as ei:
        edit_order(records, sample=0, edits=2, sample_file=str(samples), dataset="counterfact", data_path=partial)
    msg = str(ei.value)
    assert msg == (f"7 of the 10 case ids of sample 0 of {samples} are not in counterfact ({partial}): "
                   "1, 2, 3, 4, 5, ...; sample files name case ids (pass --skip-missing to edit only the records "
                   "the dataset holds)")


def test_skip_missing_drops_them_with_a_count_logged(partial: Path, tmp_path: Path, caplog) -> None:
    records = load_records("counterfact", data_path=partial)
    samples = write(tmp_path / "s.json", {"0": [10, 1, 20, 2, 30]})
    with caplog.at_level(logging.WARNING, logger="editscale"):
        order = edit_order(records, sample=0, edits=3, sample_file=str(samples), dataset="counterfact",
                           skip_missing=True)
    assert [r.case_id for r in order] == [10, 20, 30]
    assert f"--skip-missing: skipped 2 of the 5 case ids of sample 0 of {samples}, which counterfact lacks: 1, 2" \
        in caplog.text
    with pytest.raises(EditscaleError, match="--edits 4 is more than the 3 records of sample 0"):
        edit_order(records, sample=0, edits=4, sample_file=str(samples), skip_missing=True)


def test_skip_missing_and_order_file_through_the_cli(run_cli, world, partial: Path, tmp_path: Path) -> None:
    samples = write(tmp_path / "s.json", {"0": [99, 50, 98, 10]})
    code, _, err = run_cli(*run_args(world, tmp_path / "a", "counterfact", partial, "--sample-file", str(samples)))
    assert "2 of the 4 case ids of sample 0" in one_line_error(code, err)
    code, _, err = run_cli(*run_args(world, tmp_path / "b", "counterfact", partial, "--sample-file", str(samples),
                                     "--skip-missing"))
    assert code == 0, err
    assert edited_ids(tmp_path / "b") == [50, 10]

    code, _, err = run_cli(*run_args(world, tmp_path / "c", "counterfact", partial, "--order", "file"))
    assert code == 0, err
    assert edited_ids(tmp_path / "c") == [30, 10]
    assert RunStore(tmp_path / "c").read_json("control.json") is not None


def test_order_file_edits_the_first_records_in_file_order(partial: Path, tmp_path: Path) -> None:
    records = load_records("counterfact", data_path=partial)
    assert [r.case_id for r in edit_order(records, sample=0, edits=2, order="file")] == [30, 10, 20, 40, 50, 60]
    with pytest.raises(EditscaleError, match="--order file .* no --sample-file"):
        edit_order(records, sample=0, edits=2, order="file", sample_file=str(tmp_path / "s.json"))
    with pytest.raises(EditscaleError, match="--order file .* no --sample"):
        edit_order(records, sample=3, edits=2, order="file")
    with pytest.raises(EditscaleError, match="--edits 7 is more than the 6 records"):
        edit_order(records, sample=0, edits=7, order="file")


NOOP_FILES = {
    "rome": ("counterfact", [rome(5, "Ana"), rome(6, "Bo", new="French"), rome(7, "Cy")], 6,
             "record #1, case_id=6, field 'requested_rewrite.target_new.str': target_new equals target_true"),
    "easyedit": ("counterfact", [easyedit(5, "Ana"), easyedit(6, "Bo", new="BBC"), easyedit(7, "Cy")], 6,
                 "record #1, case_id=6, field 'target_new': target_new equals target_true"),
    "zsre": ("zsre", [mend("Ana"), mend("Bo", alt="Yale", answers=("Harvard", "Yale")), mend("Cy")], 1,
             "record #1, case_id=1, field 'alt': alt 'Yale' is one of the true answers"),
}


@pytest.mark.parametrize("form", list(NOOP_FILES))
def test_noop_records_are_skipped_with_a_count(form: str, tmp_path: Path, caplog) -> None:
    dataset, raw, noop_id, _ = NOOP_FILES[form]
    path = write(tmp_path / "d.json", raw)
    loaded = load_dataset(dataset, data_path=path)
    assert noop_id not in [r.case_id for r in loaded.records] and len(loaded.records) == 2
    assert [e.case_id for e in loaded.noops] == [noop_id]
    assert loaded.noop_line() == (f"skipped 1 no-op {dataset} record(s) of {path} whose new target is already a "
                                  f"true answer: case_id {noop_id} (--strict refuses them)")
    with caplog.at_level(logging.WARNING, logger="editscale"):
        assert len(load_records(dataset, data_path=path)) == 2
    assert "skipped 1 no-op" in caplog.text


@pytest.mark.parametrize("form", list(NOOP_FILES))
def test_strict_refuses_noop_records_naming_the_record(form: str, tmp_path: Path) -> None:
    dataset, raw, _, where = NOOP_FILES[form]
    path = write(tmp_path / "d.json", raw)
    with pytest.raises(NoopRecordError) as ei:
        load_records(dataset, data_path=path, strict=True)
    msg = str(ei.value)
    assert msg.startswith(f"{path}, {where}") and "\n" not in msg
    assert msg.endswith("(--strict refuses no-op records; without it they are skipped)")


def test_noop_count_shows_the_first_few_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "d.json", [rome(i, f"P{i}", new="French") for i in range(8)] + [rome(8, "Q")])
    line = load_dataset("counterfact", data_path=path).noop_line()
    assert line is not None and "skipped 8 no-op" in line and "case_id 0, 1, 2, 3, 4, ..." in line


def test_noop_records_of_a_generated_dataset_are_skipped_too(monkeypatch) -> None:
    made = [EditRecord(case_id=i, subject=f"S{i}", prompt="{} lives in", target_true="Oslo",
                       target_new="Oslo" if i == 1 else "Rome") for i in range(3)]
    monkeypatch.setitem(registry.DATASETS, "generated", lambda path, on_noop: list(made))
    loaded = load_dataset("generated")
    assert [r.case_id for r in loaded.records] == [0, 2] and [e.case_id for e in loaded.noops] == [1]
    with pytest.raises(NoopRecordError, match="generated, record #1, case_id=1, field 'target_new'"):
        load_dataset("generated", strict=True)


def test_validate_data_reports_skipped_noops_and_strict_refuses(run_cli, tmp_path: Path) -> None:
    path = write(tmp_path / "d.json", [mend("Ana"), mend("Bo", alt="Cambridge"), mend("Cy")])
    code, out, err = run_cli("validate-data", "--dataset", "zsre", "--data-path", str(path))
    assert code == 0, err
    out = " ".join(out.split())
    assert f"ok: 2 valid zsre records in {path}; 1 no-op records skipped" in out
    assert "skipped 1 no-op zsre record(s)" in out and "case_id 1 " in out
    code, _, err = run_cli("validate-data", "--dataset", "zsre", "--data-path", str(path), "--strict")
    assert f"{path}, record #1, case_id=1, field 'alt'" in one_line_error(code, err)


def test_a_run_skips_noop_records_unless_strict(run_cli, world, tmp_path: Path) -> None:
    path = write(tmp_path / "d.json", [rome(5, "Ana", new="French"), rome(6, "Bo"), rome(7, "Cy"), rome(8, "Di")])
    code, _, err = run_cli(*run_args(world, tmp_path / "a", "counterfact", path, "--order", "file"))
    assert code == 0, err
    assert edited_ids(tmp_path / "a") == [6, 7]
    code, _, err = run_cli(*run_args(world, tmp_path / "b", "counterfact", path, "--order", "file", "--strict"))
    line = one_line_error(code, err)
    assert f"{path}, record #0, case_id=5, field 'requested_rewrite.target_new.str'" in line


def test_zsre_case_ids_stay_file_positions_after_skipping(tmp_path: Path) -> None:
    path = write(tmp_path / "z.json", [mend("Ana"), mend("Bo", alt="Cambridge"), mend("Cy"), mend("Di")])
    records = load_records("zsre", data_path=path)
    assert [r.case_id for r in records] == [0, 2, 3]
    # a sample file of positions into the whole file still names the right records
    samples = write(tmp_path / "s.json", {"0": [3, 0, 2]})
    assert [r.subject for r in edit_order(records, sample=0, edits=2, sample_file=str(samples))] == ["Di", "Ana", "Cy"]


def test_a_sample_file_given_as_data_path_says_so(tmp_path: Path) -> None:
    samples = write(tmp_path / "s.json", {"0": [1, 2]})
    with pytest.raises(RecordError, match="looks like a sample file .* pass it as --sample-file"):
        load_records("counterfact", data_path=samples)
    with pytest.raises(RecordError, match="looks like a sample file"):
        load_records("zsre", data_path=samples)


def test_duplicate_case_ids_are_named_by_file_position_after_skipping(tmp_path: Path) -> None:
    raw = [rome(1, "Ana", new="French"), rome(2, "Bo"), rome(2, "Cy")]
    with pytest.raises(RecordError, match=r"record #2, case_id=2, field 'case_id': duplicate case_id \(first seen "
                                          r"at record #1\)"):
        load_records("counterfact", data_path=write(tmp_path / "d.json", copy.deepcopy(raw)))
