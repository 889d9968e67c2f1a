from __future__ import annotations

import copy
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from editscale.data.counterfact import (
    COUNTERFACT_SIZE,
    COUNTERFACT_URL,
    assert_case_id_is_position,
    cache_path_for,
    dataset_by_case_id,
    default_cache_dir,
    download_file,
    load_counterfact,
    parse_counterfact,
    read_counterfact_files,
)
from editscale.errors import EditscaleError, RecordError


def rome_record(case_id: int = 0, subject: str = "Danielle Darrieux") -> dict[str, Any]:
    return {
        "case_id": case_id,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": subject,
        },
        "paraphrase_prompts": [f"Shayna does this. {subject} speaks the language", f"{subject} is a native"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Robert Schuman, a native"],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
        "generation_prompts": [f"{subject}'s mother tongue is"],
    }


def easyedit_record(case_id: int = 0, subject: str = "BBC One") -> dict[str, Any]:
    return {
        "case_id": case_id,
        "prompt": f"{subject}, by",
        "target_new": "Sega",
        "subject": subject,
        "ground_truth": "BBC",
        "rephrase_prompt": f"{subject} is my favorite product out of everything owned by",
        "locality_prompt": "BBC Radio, by",
        "locality_ground_truth": "BBC",
    }


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def drop(d: dict[str, Any], dotted: str) -> dict[str, Any]:
    d = copy.deepcopy(d)
    *parents, last = dotted.split(".")
    node = d
    for p in parents:
        node = node[p]
    del node[last]
    return d


def put(d: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    *parents, last = dotted.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[last] = value
    return d


def assert_names(err: RecordError, *, index: int, case_id: object, field: str) -> None:
    msg = str(err)
    assert f"record #{index}" in msg, msg
    assert f"case_id={case_id}" in msg, msg
    assert f"'{field}'" in msg, msg
    assert err.index == index and err.field == field


# ---------------------------------------------------------------------------------------------- schemas


def test_rome_record_is_normalised() -> None:
    (rec,) = parse_counterfact([rome_record(5)])
    assert rec.case_id == 5
    assert rec.prompt == "The mother tongue of {} is"
    assert rec.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert (rec.target_new, rec.target_true) == ("English", "French")
    assert (rec.target_new_id, rec.target_true_id, rec.relation_id) == ("Q1860", "Q150", "P103")
    assert len(rec.paraphrase_prompts) == 2 and len(rec.neighborhood_prompts) == 2
    assert rec.attribute_prompts and rec.generation_prompts
    assert rec.extra["schema"] == "rome" and rec.extra["pararel_idx"] == 2796


def test_rome_optional_fields_may_be_absent() -> None:
    raw = rome_record()
    for f in ("pararel_idx", "attribute_prompts", "generation_prompts", "requested_rewrite.relation_id",
              "requested_rewrite.target_new.id"):
        raw = drop(raw, f)
    (rec,) = parse_counterfact([raw])
    assert rec.attribute_prompts == () and rec.relation_id is None and rec.target_new_id is None


def test_easyedit_record_rebuilds_the_template_and_says_what_it_lacks() -> None:
    (rec,) = parse_counterfact([easyedit_record(10)])
    assert rec.prompt == "{}, by" and rec.subject == "BBC One"
    assert (rec.target_new, rec.target_true) == ("Sega", "BBC")
    assert rec.paraphrase_prompts == ("BBC One is my favorite product out of everything owned by",)
    assert rec.neighborhood_prompts == ("BBC Radio, by",)
    assert rec.extra["schema"] == "easyedit"
    assert "attribute_prompts" in rec.extra["lacks"] and "relation_id" in rec.extra["lacks"]
    assert "neighborhood_target" not in rec.extra


def test_easyedit_distinct_locality_answer_is_kept() -> None:
    raw = put(easyedit_record(), "locality_ground_truth", "BBC Studios")
    (rec,) = parse_counterfact([raw])
    assert rec.extra["neighborhood_target"] == "BBC Studios"


def test_unknown_schema_is_reported() -> None:
    with pytest.raises(RecordError, match="cannot tell the schema"):
        parse_counterfact([{"case_id": 0, "question": "?"}])


# ---------------------------------------------------------------------------------------------- malformed


ROME_REQUIRED = [
    "case_id",
    "requested_rewrite",
    "requested_rewrite.prompt",
    "requested_rewrite.subject",
    "requested_rewrite.target_new",
    "requested_rewrite.target_new.str",
    "requested_rewrite.target_true",
    "requested_rewrite.target_true.str",
    "paraphrase_prompts",
    "neighborhood_prompts",
]


@pytest.mark.parametrize("field", ROME_REQUIRED)
def test_rome_missing_field_names_index_case_id_and_field(field: str) -> None:
    records = [rome_record(0, "A"), drop(rome_record(7, "B"), field)]
    with pytest.raises(RecordError) as ei:
        parse_counterfact(records, source="cf.json")
    err = ei.value
    assert "cf.json" in str(err) and "missing required field" in str(err)
    if field == "case_id":
        assert "record #1" in str(err) and "'case_id'" in str(err)
    else:
        assert_names(err, index=1, case_id=7, field=field)


@pytest.mark.parametrize(
    ("field", "value", "reported"),
    [
        ("case_id", "7", "case_id"),
        ("case_id", True, "case_id"),
        ("requested_rewrite", "oops", "requested_rewrite"),
        ("requested_rewrite.target_new", "English", "requested_rewrite.target_new"),
        ("requested_rewrite.target_new.str", 3, "requested_rewrite.target_new.str"),
        ("requested_rewrite.target_true.str", "  ", "requested_rewrite.target_true.str"),
        ("requested_rewrite.target_new.id", 5, "requested_rewrite.target_new.id"),
        ("requested_rewrite.relation_id", ["P1"], "requested_rewrite.relation_id"),
        ("paraphrase_prompts", "one prompt", "paraphrase_prompts"),
        ("neighborhood_prompts", ["ok", 3], "neighborhood_prompts[1]"),
        ("attribute_prompts", [""], "attribute_prompts[0]"),
        ("pararel_idx", "x", "pararel_idx"),
        ("requested_rewrite.prompt", "The mother tongue of X is", "requested_rewrite.prompt"),
        ("requested_rewrite.prompt", "{} and {} speak", "requested_rewrite.prompt"),
        ("requested_rewrite.target_new.str", "French", "requested_rewrite.target_new.str"),
    ],
)
def test_rome_bad_value_names_the_field(field: str, value: Any, reported: str) -> None:
    records = [rome_record(0, "A"), put(rome_record(7, "B"), field, value)]
    with pytest.raises(RecordError) as ei:
        parse_counterfact(records)
    case_id = value if field == "case_id" else 7
    assert_names(ei.value, index=1, case_id=case_id, field=reported)


@pytest.mark.parametrize("field", sorted(easyedit_record()))
def test_easyedit_missing_field_is_named(field: str) -> None:
    records = [easyedit_record(0, "A"), drop(easyedit_record(3, "B"), field)]
    with pytest.raises(RecordError) as ei:
        parse_counterfact(records)
    msg = str(ei.value)
    assert "record #1" in msg and f"'{field}'" in msg
    if field != "case_id":
        assert "case_id=3" in msg


def test_easyedit_subject_not_in_prompt() -> None:
    records = [easyedit_record(0), put(easyedit_record(4, "Toyota Camry"), "prompt", "Camry is made by")]
    with pytest.raises(RecordError, match="does not occur") as ei:
        parse_counterfact(records)
    assert_names(ei.value, index=1, case_id=4, field="prompt")


def test_easyedit_subject_twice_or_brace_in_prompt() -> None:
    with pytest.raises(RecordError, match="occurs 2 times"):
        parse_counterfact([put(easyedit_record(0, "Ana"), "prompt", "Ana, like Ana, speaks")])
    with pytest.raises(RecordError, match="brace"):
        parse_counterfact([put(easyedit_record(0, "Ana"), "prompt", "Ana {x} speaks")])


def test_easyedit_equal_targets_rejected() -> None:
    with pytest.raises(RecordError, match="nothing to edit") as ei:
        parse_counterfact([put(easyedit_record(2), "target_new", "BBC")])
    assert_names(ei.value, index=0, case_id=2, field="target_new")


def test_non_object_record() -> None:
    with pytest.raises(RecordError, match="expected a JSON object") as ei:
        parse_counterfact([rome_record(0), ["not", "a", "record"]])
    assert "record #1" in str(ei.value)


def test_duplicate_case_id_names_both_records() -> None:
    with pytest.raises(RecordError, match="duplicate case_id") as ei:
        parse_counterfact([rome_record(3, "A"), rome_record(4, "B"), rome_record(3, "C")])
    assert_names(ei.value, index=2, case_id=3, field="case_id")
    assert "record #0" in str(ei.value)


def test_bad_json_names_the_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "broken.json"
    p.write_text('[\n{"case_id": 0,\n oops}\n]', encoding="utf-8")
    with pytest.raises(RecordError, match="invalid JSON at line 3") as ei:
        load_counterfact(p)
    assert "broken.json" in str(ei.value)


def test_non_list_and_empty_json_rejected(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="expected a JSON list") as ei:
        load_counterfact(write_json(tmp_path / "obj.json", {"0": rome_record()}))
    assert "obj.json" in str(ei.value)
    with pytest.raises(RecordError, match="no records"):
        load_counterfact(write_json(tmp_path / "empty.json", []))


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EditscaleError, match="no such file"):
        load_counterfact(tmp_path / "nope.json")
    with pytest.raises(EditscaleError, match="either source or path"):
        load_counterfact(tmp_path, path=tmp_path)


# ---------------------------------------------------------------------------------------------- files


def test_split_files_merge_sorted_by_case_id(tmp_path: Path) -> None:
    d = tmp_path / "easyedit"
    d.mkdir()
    write_json(d / "counterfact-train.json", [easyedit_record(2, "C"), easyedit_record(0, "A")])
    write_json(d / "counterfact-val.json", [easyedit_record(3, "D")])
    write_json(d / "counterfact-edit.json", [easyedit_record(1, "B")])
    from_dir = load_counterfact(d)
    assert [r.case_id for r in from_dir] == [0, 1, 2, 3]
    assert [r.subject for r in from_dir] == ["A", "B", "C", "D"]
    from_list = load_counterfact(path=sorted(d.glob("*.json")))
    assert from_list == from_dir
    assert [r.case_id for r in load_counterfact(d, limit=2)] == [0, 1]
    assert_case_id_is_position(from_dir)


def test_duplicate_case_id_across_files_names_both(tmp_path: Path) -> None:
    a = write_json(tmp_path / "a.json", [easyedit_record(0, "A"), easyedit_record(1, "B")])
    b = write_json(tmp_path / "b.json", [easyedit_record(1, "C")])
    with pytest.raises(RecordError, match="duplicate case_id") as ei:
        read_counterfact_files([a, b])
    msg = str(ei.value)
    assert "a.json" in msg and "b.json" in msg and "case_id=1" in msg


def test_case_id_position_helpers() -> None:
    recs = parse_counterfact([rome_record(0, "A"), rome_record(5, "B")])
    assert set(dataset_by_case_id(recs)) == {0, 5}
    with pytest.raises(RecordError, match="differs from list position 1") as ei:
        assert_case_id_is_position(recs)
    assert ei.value.case_id == 5


# ---------------------------------------------------------------------------------------------- download


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDITSCALE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert cache_path_for(COUNTERFACT_URL) == tmp_path / "c" / "counterfact.json"
    other = cache_path_for("https://example.org/x/counterfact.json")
    assert other.parent == tmp_path / "c" and other.name.endswith("-counterfact.json")
    monkeypatch.delenv("EDITSCALE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "editscale"


def test_download_from_file_url_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = write_json(tmp_path / "counterfact.json", [rome_record(0, "A"), rome_record(1, "B")])
    monkeypatch.setenv("EDITSCALE_CACHE", str(tmp_path / "cache"))
    url = src.as_uri()
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    recs = load_counterfact(url=url, sha256=sha)
    assert [r.case_id for r in recs] == [0, 1]
    cached = cache_path_for(url)
    assert cached.read_bytes() == src.read_bytes()

    def must_not_fetch(url: str, out: BinaryIO) -> None:
        raise AssertionError("the cached copy should have been used")

    assert load_counterfact(url, fetch=must_not_fetch) == recs
    with pytest.raises(EditscaleError, match="sha256 mismatch"):
        load_counterfact(url=url, sha256="0" * 64, fetch=must_not_fetch)


def test_download_failure_or_bad_hash_leaves_no_file(tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "counterfact.json"

    def dies_half_way(url: str, out: BinaryIO) -> None:
        out.write(b'[{"case_id": 0, ')
        raise ConnectionResetError("connection lost")

    with pytest.raises(ConnectionResetError):
        download_file("https://example.invalid/cf.json", dest, fetch=dies_half_way)
    assert not dest.exists() and list(dest.parent.iterdir()) == []

    def writes(url: str, out: BinaryIO) -> None:
        out.write(b"[]")

    with pytest.raises(EditscaleError, match="sha256 mismatch"):
        download_file("https://example.invalid/cf.json", dest, sha256="0" * 64, fetch=writes)
    assert list(dest.parent.iterdir()) == []
    download_file("https://example.invalid/cf.json", dest, sha256=hashlib.sha256(b"[]").hexdigest(),
                  fetch=writes)
    assert dest.read_bytes() == b"[]"


def test_unreachable_url_is_a_clear_error(tmp_path: Path) -> None:
    missing = (tmp_path / "absent.json").as_uri()
    with pytest.raises(EditscaleError, match="could not download"):
        load_counterfact(url=missing, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_over_local_http(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    write_json(served / "counterfact.json", [easyedit_record(0, "A")])
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/counterfact.json"
        recs = load_counterfact(url, cache_dir=tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert [r.subject for r in recs] == ["A"]
    assert cache_path_for(url, tmp_path / "cache").is_file()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass


# ---------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def easyedit_records(shared_data: Path) -> list:
    return load_counterfact(shared_data / "counterfact" / "easyedit_format")


def test_real_rome_subset(shared_data: Path) -> None:
    recs = load_counterfact(shared_data / "counterfact" / "counterfact_subset.json")
    assert len(recs) == 500
    ids = [r.case_id for r in recs]
    assert ids == sorted(ids) and ids[0] == 18 and ids[-1] == 21884
    assert all(len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 10 for r in recs)
    assert all(r.relation_id and r.target_new_id and r.target_true_id for r in recs)
    with pytest.raises(RecordError):
        assert_case_id_is_position(recs)


def test_real_easyedit_splits_cover_every_case(easyedit_records: list, shared_data: Path) -> None:
    assert len(easyedit_records) == COUNTERFACT_SIZE
    assert_case_id_is_position(easyedit_records)
    assert all(r.extra["schema"] == "easyedit" for r in easyedit_records)
    subset = load_counterfact(shared_data / "counterfact" / "counterfact_subset.json")
    for r in subset:  # both schemas agree on the edit itself (MANIFEST)
        e = easyedit_records[r.case_id]
        assert (e.prompt, e.subject, e.target_new, e.target_true) == (
            r.prompt, r.subject, r.target_new, r.target_true)
        assert e.neighborhood_prompts[0] in r.neighborhood_prompts
