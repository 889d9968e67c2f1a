"""The downstream task registry: built-in tasks, user task files, the paper's GLUE subsets."""

from __future__ import annotations

import json

import pytest
import yaml

from editscale.data.fewshot import MRPC_FORMAT, RTE_FORMAT, SST2_FORMAT
from editscale.errors import EditscaleError, RecordError, UnknownNameError
from editscale.eval.downstream.registry import get_tasks, load_task_file, task_registry


def test_builtin_tasks_and_paper_prompts() -> None:
    tasks = task_registry()
    assert {"sst2", "mrpc", "cola", "rte", "sentiment", "paraphrase", "acceptability", "entailment"} <= set(tasks)
    sst2 = tasks["sst2"]
    prompt = sst2.fmt.render_prompt(sst2.demos, {"sentence": "a fine film"})
    assert prompt.startswith("Review : excruciatingly unfunny and pitifully unromantic\nSentiment : negative\n\n"
                             "Review : rich veins of funny stuff in this movie\nSentiment : positive\n\n")
    assert prompt.endswith("\n\nReview : a fine film\nSentiment :")
    mrpc = tasks["mrpc"]
    assert [y for _, y in mrpc.demos] == [0, 1, 0, 1, 1, 0]  # the code's order (docs/protocol.md §8.5)
    assert mrpc.demos[0][0]["sentence1"].startswith("Mr McDevitt")
    rte = tasks["rte"]
    assert [RTE_FORMAT.label_words[y] for _, y in rte.demos] == ["False", "True", "False"]
    assert rte.gold_to_label == {0: 1, 1: 0}
    # the embedded skills borrow the GLUE formats; the in-code constants are the task files' formats
    assert tasks["sentiment"].fmt == SST2_FORMAT and tasks["paraphrase"].fmt == MRPC_FORMAT
    demos, examples = tasks["sentiment"].examples(n=10)
    assert len(demos) == 4 and len(examples) == 10 and sorted(y for _, y in examples) == [0] * 5 + [1] * 5


def test_a_user_task_file_needs_no_code(tmp_path, monkeypatch) -> None:
    data = tmp_path / "yesno.jsonl"
    data.write_text("\n".join(json.dumps({"sentence": s, "label": y}) for s, y in [("sky is blue", 1),
                                                                                     ("fire is cold", 0)]))
    folder = tmp_path / "tasks"
    folder.mkdir()
    spec = {"name": "truth", "source": {"kind": "jsonl", "path": str(data)},
            "format": {"query": "Claim : {sentence}\nTrue :", "marker": "True :",
                       "label_words": {1: "yes", 0: "no"}, "parse_order": [["yes", 1], ["no", 0]]},
            "demos": [{"fields": {"sentence": "water is wet"}, "label": 1}]}
    (folder / "truth.yaml").write_text(yaml.safe_dump(spec))  # safe_dump quotes yes/no
    monkeypatch.setenv("EDITSCALE_TASKS", str(folder))
    (task,) = get_tasks(["truth"])
    demos, examples = task.examples()
    assert examples == [({"sentence": "sky is blue"}, 1), ({"sentence": "fire is cold"}, 0)]
    want = "Claim : water is wet\nTrue : yes\n\nClaim : sky is blue\nTrue :"
    assert task.fmt.render_prompt(demos, examples[0][0]) == want

    data.write_text(json.dumps({"sentence": "x", "label": 3}))
    with pytest.raises(RecordError, match="yesno.jsonl.*record #0.*label"):
        task.examples()


def test_bad_task_files_and_names(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsource: {kind: glue, task: sst2}\nformat: {query: 'x'}\n")
    with pytest.raises(EditscaleError, match="bad.yaml.*label_words"):
        load_task_file(bad)
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text("name: u\nsource: {kind: glue, task: sst2}\n"
                        "format: {query: 'x', marker: 'A:', label_words: {1: yes, 0: no}, parse_order: [[yes, 1]]}\n")
    with pytest.raises(EditscaleError, match="unquoted.yaml.*quote yes/no"):
        load_task_file(unquoted)
    with pytest.raises(UnknownNameError, match="unknown downstream task.*nosuch.*known: .*sst2"):
        get_tasks(["sst2", "nosuch"])


def test_paper_glue_subsets_load_in_order(shared_data, shared_spec) -> None:
    subsets = json.loads((shared_spec / "glue_subsets.json").read_text())
    for name in ("sst2", "mrpc", "cola", "rte"):
        (task,) = get_tasks([name])
        _, examples = task.examples(data_dir=shared_data / "glue")
        assert len(examples) == 200
        assert [y for _, y in examples] == [label for _, label in subsets[name]]
