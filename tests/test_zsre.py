from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from editscale.data.zsre import REFERENCE_TARGET_TRUE, load_zsre, load_zsre_samples, parse_zsre
from editscale.errors import EditscaleError, RecordError


def mend_record(subject: str = "Watts Humphrey", alt: str = "University of Michigan") -> dict[str, Any]:
    return {
        "subject": subject,
        "src": f"What university did {subject} attend?",
        "pred": "Illinois Institute of Technology",
        "rephrase": f"What university did {subject} take part in?",
        "alt": alt,
        "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
        "cond": f"Illinois Institute of Technology >> {alt} || What university did {subject} attend?",
    }


def with_(d: dict[str, Any], **changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    for k, v in changes.items():
        if v is _DROP:
            del d[k]
        else:
            d[k] = v
    return d


_DROP = object()


def test_record_is_normalised_with_alt_as_the_new_target() -> None:
    (rec,) = parse_zsre([mend_record()])
    assert rec.case_id == 0
    assert rec.prompt == "What university did {} attend?"
    assert rec.rewrite_prompt == "What university did Watts Humphrey attend?"
    assert (rec.target_new, rec.target_true) == ("University of Michigan", "Illinois Institute of Technology")
    assert rec.paraphrase_prompts == ("What university did Watts Humphrey take part in?",)
    assert rec.neighborhood_prompts == ("nq question: who played desmond doss father in hacksaw ridge?",)
    assert rec.extra["neighborhood_target"] == "Hugo Weaving"
    assert rec.extra["answers"] == ["Illinois Institute of Technology"]
    assert rec.extra["schema"] == "zsre_mend" and rec.extra["targets"] == "alt"


def test_reference_targets_match_romes_loader() -> None:
    (rec,) = parse_zsre([mend_record(alt="")], targets="reference")
    assert (rec.target_new, rec.target_true) == ("Illinois Institute of Technology", REFERENCE_TARGET_TRUE)
    with pytest.raises(EditscaleError, match="targets must be"):
        parse_zsre([mend_record()], targets="other")  # type: ignore[arg-type]


def test_case_id_is_the_list_position() -> None:
    recs = parse_zsre([mend_record("A"), mend_record("B"), mend_record("C")])
    assert [r.case_id for r in recs] == [0, 1, 2]


@pytest.mark.parametrize("field", ["subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans"])
def test_missing_field_names_index_case_id_and_field(field: str) -> None:
    records = [mend_record("A"), with_(mend_record("B"), **{field: _DROP})]
    with pytest.raises(RecordError, match="missing required field") as ei:
        parse_zsre(records, source="zsre.json")
    msg = str(ei.value)
    assert "zsre.json" in msg and "record #1" in msg and "case_id=1" in msg and f"'{field}'" in msg


@pytest.mark.parametrize(
    ("change", "field", "pattern"),
    [
        ({"subject": 5}, "subject", "non-empty string"),
        ({"answers": "Illinois"}, "answers", "list of strings"),
        ({"answers": []}, "answers", "non-empty list"),
        ({"answers": ["ok", 3]}, "answers[1]", "non-empty string"),
        ({"alt": ["x"]}, "alt", "expected a string"),
        ({"rephrase": ""}, "rephrase", "non-empty string"),
        ({"loc": "who plays the cat in the hat"}, "loc", "nq question"),
        ({"pred": 3}, "pred", "non-empty string"),
    ],
)
def test_bad_values_name_the_field(change: dict[str, Any], field: str, pattern: str) -> None:
    records = [mend_record("A"), mend_record("B"), with_(mend_record("C"), **change)]
    with pytest.raises(RecordError, match=pattern) as ei:
        parse_zsre(records)
    msg = str(ei.value)
    assert "record #2" in msg and "case_id=2" in msg and f"'{field}'" in msg


def test_subject_not_in_question() -> None:
    bad = with_(mend_record("Watts Humphrey"), src="Where did he study?")
    with pytest.raises(RecordError, match="does not occur") as ei:
        parse_zsre([mend_record("A"), bad])
    assert "record #1" in str(ei.value) and "'src'" in str(ei.value)


def test_noop_edits_raise_unless_skipped() -> None:
    same = with_(mend_record("B"), alt="Illinois Institute of Technology")
    empty = with_(mend_record("C"), alt="")
    for bad in (same, empty):
        with pytest.raises(RecordError, match="nothing to edit") as ei:
            parse_zsre([mend_record("A"), bad])
        assert "record #1" in str(ei.value) and "'alt'" in str(ei.value)
    kept = parse_zsre([mend_record("A"), same, empty, mend_record("D")], skip_noop=True)
    assert [r.case_id for r in kept] == [0, 3]


def test_file_level_errors(tmp_path: Path) -> None:
    p = tmp_path / "z.json"
    p.write_text(json.dumps({"data": []}), encoding="utf-8")
    with pytest.raises(RecordError, match="z.json.*expected a JSON list"):
        load_zsre(p)
    p.write_text("[", encoding="utf-8")
    with pytest.raises(RecordError, match="z.json.*invalid JSON"):
        load_zsre(p)
    p.write_text("[]", encoding="utf-8")
    with pytest.raises(RecordError, match="no records"):
        load_zsre(p)
    p.write_text(json.dumps([mend_record("A"), mend_record("B")]), encoding="utf-8")
    assert len(load_zsre(p, limit=1)) == 1


# ---------------------------------------------------------------------------------------------- real data


def test_real_mend_train_sample(shared_data: Path) -> None:
    path = shared_data / "zsre" / "zsre_mend_train_1k.json"
    with pytest.raises(RecordError, match="record #88.*'alt'"):
        load_zsre(path)
    alt = load_zsre(path, skip_noop=True)
    assert len(alt) == 977  # 2 empty alts, 21 alts that are already a true answer
    assert all(r.target_new not in r.extra["answers"] for r in alt)
    ref = load_zsre(path, targets="reference")
    assert len(ref) == 1000 and [r.case_id for r in ref] == list(range(1000))
    assert ref[0].rewrite_prompt == "What is the product made by UniFirst?"
    assert all(r.neighborhood_prompts[0].startswith("nq question: ") for r in ref)


def test_real_ume_zsre_samples(shared_data: Path) -> None:
    samples = load_zsre_samples(shared_data / "zsre" / "ume_zsre_sampled_unique_10_10000.json")
    assert list(samples) == [str(i) for i in range(10)]
    assert all(len(s) == 10000 and max(s) <= 19085 for s in samples.values())
