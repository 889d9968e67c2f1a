from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from editscale.data.glue import (
    PAPER_TASK_ORDER,
    GlueExample,
    build_glue_subset,
    build_paper_subsets,
    example_from_row,
    load_glue_from_datasets,
    load_glue_jsonl,
)
from editscale.errors import EditscaleError, RecordError, UnknownNameError


def fake_rows(task: str, n: int, *, labels: tuple[int, ...] = (0, 1)) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"idx": i, "label": labels[(i + i // 2) % len(labels)]}
        if task in ("sst2", "cola"):
            row["sentence"] = f"{task} sentence {i}"
        else:
            row["sentence1"] = f"{task} first {i}"
            row["sentence2"] = f"{task} second {i}"
        rows.append(row)
    return rows


def fake_split(task: str, n: int = 500) -> list[GlueExample]:
    return [example_from_row(task, r) for r in fake_rows(task, n)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- JSONL


def test_jsonl_loads_typed_examples(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "mrpc.jsonl", fake_rows("mrpc", 3))
    ex = load_glue_jsonl("mrpc", p)
    assert ex[1] == GlueExample(idx=1, label=ex[1].label, sentence1="mrpc first 1", sentence2="mrpc second 1")
    assert ex[1].sentence is None


@pytest.mark.parametrize(
    ("change", "field", "pattern"),
    [
        ({"label": None}, "label", "missing required field"),
        ({"label": 2}, "label", "expected label 0 or 1"),
        ({"label": True}, "label", "expected an integer"),
        ({"label": "1"}, "label", "expected an integer"),
        ({"idx": -1}, "idx", "non-negative"),
        ({"sentence": ""}, "sentence", "non-empty string"),
        ({"sentence": 4}, "sentence", "non-empty string"),
    ],
)
def test_jsonl_errors_name_line_and_field(tmp_path: Path, change: dict[str, Any], field: str,
                                          pattern: str) -> None:
    rows = fake_rows("sst2", 3)
    rows[1].update(change)
    if change.get(field, 0) is None:
        del rows[1][field]
    p = write_jsonl(tmp_path / "sst2.jsonl", rows)
    with pytest.raises(RecordError, match=pattern) as ei:
        load_glue_jsonl("sst2", p)
    msg = str(ei.value)
    assert "sst2.jsonl, line 2" in msg and f"'{field}'" in msg


def test_jsonl_structural_errors(tmp_path: Path) -> None:
    p = tmp_path / "rte.jsonl"
    p.write_text(json.dumps(fake_rows("rte", 1)[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(RecordError, match="rte.jsonl, line 2: invalid JSON"):
        load_glue_jsonl("rte", p)
    write_jsonl(p, [fake_rows("rte", 1)[0], ["a", "list"]])
    with pytest.raises(RecordError, match="line 2: expected a JSON object"):
        load_glue_jsonl("rte", p)
    rows = fake_rows("rte", 3)
    rows[2]["idx"] = 0
    write_jsonl(p, rows)
    with pytest.raises(RecordError, match=r"line 3.*duplicate idx 0 \(first at .*line 1\)"):
        load_glue_jsonl("rte", p)
    p.write_text("\n", encoding="utf-8")
    with pytest.raises(RecordError, match="no examples"):
        load_glue_jsonl("rte", p)
    with pytest.raises(EditscaleError, match="cannot read"):
        load_glue_jsonl("rte", tmp_path / "absent.jsonl")
    with pytest.raises(UnknownNameError, match="unknown GLUE task 'qnli'"):
        load_glue_jsonl("qnli", p)


def test_pair_task_needs_both_sentences() -> None:
    row = fake_rows("mrpc", 1)[0]
    del row["sentence2"]
    with pytest.raises(RecordError, match="'sentence2'.*missing"):
        example_from_row("mrpc", row)


# ---------------------------------------------------------------------------------------------- recipe


def reference_recipe(examples: list[GlueExample], rng: random.Random) -> list[GlueExample]:
    """The paper's loop, written the way the reference script does it (shuffle, slice, per label)."""
    classwise: dict[int, list[GlueExample]] = {}
    for ex in examples:
        classwise.setdefault(ex.label, []).append(ex)
    subset: list[GlueExample] = []
    for label in classwise:
        rng.shuffle(classwise[label])
        subset += classwise[label][:100]
    rng.shuffle(subset)
    return subset


def test_subset_is_balanced_deterministic_and_follows_the_recipe() -> None:
    split = fake_split("cola", 400)
    a = build_glue_subset("cola", split, random.Random(37))
    b = build_glue_subset("cola", split, random.Random(37))
    assert a == b
    assert Counter(ex.label for ex in a) == {0: 100, 1: 100}
    assert len({ex.idx for ex in a}) == 200
    assert a == reference_recipe(split, random.Random(37))
    assert a != build_glue_subset("cola", split, random.Random(38))
    assert [ex.idx for ex in split] == list(range(400))  # the caller's list is not reordered


def test_subset_refuses_a_short_label() -> None:
    split = fake_split("sst2", 150)
    with pytest.raises(EditscaleError, match="fewer than 100 examples"):
        build_glue_subset("sst2", split, random.Random(37))
    assert len(build_glue_subset("sst2", split, random.Random(37), per_label=50)) == 100


def test_paper_subsets_share_one_generator_across_tasks() -> None:
    splits = {t: fake_split(t, 300 + 10 * k) for k, t in enumerate(PAPER_TASK_ORDER)}
    calls: list[str] = []

    def load(task: str) -> list[GlueExample]:
        calls.append(task)
        return list(splits[task])

    subsets = build_paper_subsets(load)
    assert calls == ["sst2", "mrpc", "cola", "rte"]
    rng = random.Random(37)
    for t in PAPER_TASK_ORDER:
        assert subsets[t] == reference_recipe(list(splits[t]), rng)
    # Re-seeding per task would give a different RTE subset: the carried state matters.
    assert subsets["rte"] != reference_recipe(list(splits["rte"]), random.Random(37))


# ---------------------------------------------------------------------------------------------- datasets


def test_datasets_path_with_an_injected_loader() -> None:
    seen: list[tuple[Any, ...]] = []

    def loader(path: str, name: str, split: str) -> list[dict[str, Any]]:
        seen.append((path, name, split))
        return fake_rows(name, 250)

    ex = load_glue_from_datasets("rte", loader=loader)
    assert seen == [("glue", "rte", "validation")]
    assert len(ex) == 250 and ex[0].sentence1 == "rte first 0"

    def bad_loader(path: str, name: str, split: str) -> list[dict[str, Any]]:
        rows = fake_rows(name, 3)
        rows[2]["label"] = -1  # the GLUE test split's hidden label
        return rows

    with pytest.raises(RecordError, match=r"glue/rte\[test\] row 2, field 'label'"):
        load_glue_from_datasets("rte", split="test", loader=bad_loader)


def test_datasets_path_with_a_local_dataset() -> None:
    datasets = pytest.importorskip("datasets")

    def loader(path: str, name: str, split: str) -> Any:
        return datasets.Dataset.from_list(fake_rows(name, 260))

    subsets = build_paper_subsets(lambda t: load_glue_from_datasets(t, loader=loader))
    assert list(subsets) == list(PAPER_TASK_ORDER)
    for t, sub in subsets.items():
        assert Counter(ex.label for ex in sub) == {0: 100, 1: 100}, t


def test_missing_datasets_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(EditscaleError, match="optional 'datasets' package"):
        load_glue_from_datasets("sst2")


# ---------------------------------------------------------------------------------------------- real data


def test_shared_subsets_match_the_spec(shared_data: Path, shared_spec: Path) -> None:
    spec = json.loads((shared_spec / "glue_subsets.json").read_text(encoding="utf-8"))
    for task in PAPER_TASK_ORDER:
        examples = load_glue_jsonl(task, shared_data / "glue" / f"{task}.jsonl")
        assert len(examples) == 200
        assert Counter(ex.label for ex in examples) == {0: 100, 1: 100}, task
        assert [[ex.idx, ex.label] for ex in examples] == spec[task], task


def test_ume_subsets_load_balanced(shared_data: Path) -> None:
    for task in PAPER_TASK_ORDER:
        examples = load_glue_jsonl(task, shared_data / "glue_extra" / f"ume_{task}.jsonl")
        counts = Counter(ex.label for ex in examples)
        assert counts[0] == counts[1], task
