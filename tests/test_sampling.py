from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from editscale.data.counterfact import load_counterfact
from editscale.data.records import EditRecord
from editscale.data.sampling import (
    load_sample_file,
    load_selection_flags,
    make_samples,
    select_sample,
    unique_subject_indices,
    validate_samples,
)
from editscale.errors import EditscaleError, RecordError


def rec(case_id: int, subject: str) -> EditRecord:
    return EditRecord(case_id=case_id, subject=subject, prompt="{} speaks", target_true="French",
                      target_new="English")


def test_unique_subjects_keep_first_occurrence_case_insensitively() -> None:
    subjects = ["Paris", "Rome", "paris", "Berlin", "ROME", "Oslo"]
    assert unique_subject_indices(subjects) == [0, 1, 3, 5]
    assert unique_subject_indices([rec(i, s) for i, s in enumerate(subjects)]) == [0, 1, 3, 5]


def test_make_samples_replays_the_reference_recipe_without_touching_global_random() -> None:
    indices = list(range(0, 300, 3))
    state = random.getstate()
    samples = make_samples(indices, n_samples=4, seed=37)
    assert random.getstate() == state

    # The reference script: seed the global generator once, shuffle the same list in place n times.
    random.seed(37)
    selected = list(indices)
    expected = {}
    for n in range(4):
        random.shuffle(selected)
        expected[str(n)] = list(selected)
    random.setstate(state)

    assert samples == expected
    assert list(samples) == ["0", "1", "2", "3"]
    assert all(sorted(s) == indices for s in samples.values())
    assert samples["0"] != samples["1"]  # cumulative, not re-seeded per sample
    assert make_samples(indices, n_samples=1)["0"] == samples["0"]


def test_sample_file_validation(tmp_path: Path) -> None:
    def load(obj: object) -> dict[str, list[int]]:
        p = tmp_path / "s.json"
        p.write_text(json.dumps(obj), encoding="utf-8")
        return load_sample_file(p)

    assert load({"0": [3, 1, 2], "1": [2, 3, 1]}) == {"0": [3, 1, 2], "1": [2, 3, 1]}
    with pytest.raises(RecordError, match="expected a JSON object"):
        load([[1, 2]])
    with pytest.raises(RecordError, match="no samples"):
        load({})
    with pytest.raises(RecordError, match='sample "1".*expected a list'):
        load({"0": [1], "1": 5})
    with pytest.raises(RecordError, match='sample "0".*entry 1 is not a non-negative integer: -4'):
        load({"0": [1, -4]})
    with pytest.raises(RecordError, match="entry 0 is not a non-negative integer: True"):
        load({"0": [True]})
    with pytest.raises(RecordError, match="index 7 appears twice"):
        load({"0": [7, 2, 7]})
    (tmp_path / "bad.json").write_text('{"0": [1,', encoding="utf-8")
    with pytest.raises(RecordError, match="bad.json.*invalid JSON"):
        load_sample_file(tmp_path / "bad.json")
    with pytest.raises(RecordError, match="keys must be strings"):
        validate_samples({0: [1]})


def test_select_sample_by_position() -> None:
    records = [rec(i, s) for i, s in enumerate(["A", "B", "C", "D", "a"])]
    samples = {"0": [2, 0, 3], "1": [1, 4, 0]}
    assert [r.case_id for r in select_sample(records, samples)] == [2, 0, 3]
    assert [r.case_id for r in select_sample(records, samples, 0, n=2)] == [2, 0]
    assert select_sample(records, samples, "0", n=0) == []
    with pytest.raises(EditscaleError, match="asked for 4 edits but sample '0' holds only 3"):
        select_sample(records, samples, n=4)
    with pytest.raises(EditscaleError, match="no sample '7'"):
        select_sample(records, samples, 7)
    with pytest.raises(RecordError, match="subject 'A' is edited twice.*case_id=4"):
        select_sample(records, samples, "1")
    assert len(select_sample(records, samples, "1", allow_repeated_subjects=True)) == 3
    with pytest.raises(EditscaleError, match="index 9, outside the dataset's 5 records"):
        select_sample(records, {"0": [1, 9]})


def test_select_sample_refuses_positions_into_a_partial_dataset() -> None:
    partial = [rec(10, "A"), rec(11, "B")]
    with pytest.raises(RecordError, match="by='case_id'"):
        select_sample(partial, {"0": [1]})
    assert [r.case_id for r in select_sample(partial, {"0": [11, 10]}, by="case_id")] == [11, 10]
    with pytest.raises(EditscaleError, match="case_id 3, which the dataset lacks"):
        select_sample(partial, {"0": [11, 3, 10]}, by="case_id")
    kept = select_sample(partial, {"0": [11, 3, 10]}, by="case_id", missing="skip")
    assert [r.case_id for r in kept] == [11, 10]


# ---------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def easyedit_records(shared_data: Path) -> list[EditRecord]:
    return load_counterfact(shared_data / "counterfact" / "easyedit_format")


@pytest.fixture(scope="module")
def paper_samples(shared_data: Path) -> dict[str, list[int]]:
    return load_sample_file(shared_data / "counterfact" / "paper_samples_indices.json")


def test_rebuilds_the_papers_samples(easyedit_records: list[EditRecord],
                                     paper_samples: dict[str, list[int]]) -> None:
    unique = unique_subject_indices(easyedit_records)
    assert len(unique) == 20391
    rebuilt = make_samples(unique, n_samples=10, seed=37)
    assert rebuilt["0"][:10] == [14434, 2473, 4093, 16617, 12675, 19240, 16509, 17912, 17844, 13075]
    assert rebuilt["1"][:5] == [11534, 21285, 8632, 20606, 8517]
    assert rebuilt["0"] == paper_samples["0"]
    assert rebuilt == paper_samples


def test_paper_sample_selects_distinct_subjects(easyedit_records: list[EditRecord],
                                                paper_samples: dict[str, list[int]]) -> None:
    first = select_sample(easyedit_records, paper_samples, "0", n=1200)
    assert [r.case_id for r in first[:3]] == [14434, 2473, 4093]
    everything = select_sample(easyedit_records, paper_samples, "9")
    assert len(everything) == 20391


def test_partial_rome_subset_covers_few_of_the_first_1200(shared_data: Path,
                                                          paper_samples: dict[str, list[int]]) -> None:
    subset = load_counterfact(shared_data / "counterfact" / "counterfact_subset.json")
    kept0 = select_sample(subset, paper_samples, "0", 1200, by="case_id", missing="skip")
    kept1 = select_sample(subset, paper_samples, "1", 1200, by="case_id", missing="skip")
    assert (len(kept0), len(kept1)) == (20, 30)  # the counts MANIFEST.md reports


def test_disabling_edits_file_is_the_first_5000_of_one_shuffle(shared_data: Path) -> None:
    flagged = load_selection_flags(shared_data / "counterfact" / "disabling_edits_counterfact.json")
    assert len(flagged) == 5000
    assert flagged == sorted(make_samples(range(21919), n_samples=1, seed=37)["0"][:5000])


def test_selection_flag_validation(tmp_path: Path) -> None:
    p = tmp_path / "flags.json"
    p.write_text(json.dumps({"0": True, "1": False, "2": True}), encoding="utf-8")
    assert load_selection_flags(p) == [0, 2]
    p.write_text(json.dumps({"0": True, "x": False}), encoding="utf-8")
    with pytest.raises(RecordError, match="integer case_ids"):
        load_selection_flags(p)
    p.write_text(json.dumps({"0": 1}), encoding="utf-8")
    with pytest.raises(RecordError, match="expected true or false"):
        load_selection_flags(p)
