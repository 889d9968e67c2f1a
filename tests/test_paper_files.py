"""The paper's own files load: its GLUE subsets as pickles (glue_eval/dataset/<task>.pkl), read with every
pickled global refused, and its ROME/MEMIT hparams JSON files as method configs, their module paths
checked against the model's family and dropped."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from editscale.cli import build_run_config
from editscale.data.glue import GLUE_TASK_FIELDS, find_glue_file, load_glue_file, load_glue_jsonl, load_glue_pickle
from editscale.errors import EditscaleError, RecordError
from editscale.eval.downstream.registry import get_tasks
from editscale.methods.config import from_reference_hparams
from editscale.methods.memit.config import MemitConfig
from editscale.methods.rome.config import RomeConfig
from editscale.models.families import GPT2, GPTJ
from editscale.run.config import RunConfig, resolve_config

# ---------------------------------------------------------------------------------------------- GLUE pickles


def rows(task: str, n: int = 4) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        row: dict[str, Any] = {"idx": 10 + i, "label": i % 2}
        for name in GLUE_TASK_FIELDS[task]:
            row[name] = f"{task} {name} {i}"
        out.append(row)
    return out


def write_pickle(path: Path, obj: Any, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_hand_made_pickle_loads_like_its_jsonl(tmp_path: Path, protocol: int) -> None:
    data = rows("rte")
    pkl = write_pickle(tmp_path / "rte.pkl", data, protocol)
    jsonl = tmp_path / "rte.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in data))
    got = load_glue_pickle("rte", pkl)
    assert got == load_glue_jsonl("rte", jsonl) == load_glue_file("rte", pkl)
    assert [(e.idx, e.label, e.sentence1) for e in got][:2] == [(10, 0, "rte sentence1 0"), (11, 1, "rte sentence1 1")]


@pytest.mark.parametrize("task", sorted(GLUE_TASK_FIELDS))
def test_the_shared_subsets_load_from_pickles_of_their_records(shared_data: Path, tmp_path: Path, task: str) -> None:
    # the paper's .pkl holds exactly the list of dicts the shared JSONL was converted from
    jsonl = shared_data / "glue" / f"{task}.jsonl"
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    pkl = write_pickle(tmp_path / f"{task}.pkl", records)
    assert load_glue_pickle(task, pkl) == load_glue_jsonl(task, jsonl)
    assert len(load_glue_pickle(task, pkl)) == 200


def test_a_glue_dir_of_pickles_serves_the_downstream_tasks(tmp_path: Path) -> None:
    for task in ("sst2", "mrpc"):
        write_pickle(tmp_path / f"{task}.pkl", rows(task, 6))
    assert find_glue_file("sst2", tmp_path) == tmp_path / "sst2.pkl"
    sst2, mrpc = get_tasks(["sst2", "mrpc"])
    _, examples = sst2.examples(n=3, data_dir=tmp_path)
    assert examples == [({"sentence": f"sst2 sentence {i}"}, i % 2) for i in range(3)]
    _, examples = mrpc.examples(n=2, data_dir=tmp_path)
    assert examples[1] == ({"sentence1": "mrpc sentence1 1", "sentence2": "mrpc sentence2 1"}, 1)
    # the JSONL form wins when both are there
    (tmp_path / "sst2.jsonl").write_text(json.dumps(rows("sst2", 1)[0]) + "\n")
    assert find_glue_file("sst2", tmp_path) == tmp_path / "sst2.jsonl"
    with pytest.raises(EditscaleError, match=r"expected cola\.jsonl or cola\.pkl in"):
        get_tasks(["cola"])[0].examples(n=2, data_dir=tmp_path)


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_with_a_global_is_refused_without_running_it(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "ran"
    data: list[Any] = rows("sst2", 3)
    data[1]["sentence"] = _RunsACommand(marker)
    pkl = write_pickle(tmp_path / "sst2.pkl", data, protocol)
    with pytest.raises(RecordError) as err:
        load_glue_pickle("sst2", pkl)
    msg = str(err.value)
    assert msg.startswith(f"{pkl}, record #1, field 'sentence': holds the pickled global ")
    assert "system" in msg and "nothing in the file was run" in msg and "\n" not in msg
    # the whole file a global, and a global in the registry's folder
    write_pickle(pkl, _RunsACommand(marker), protocol)
    with pytest.raises(RecordError, match=rf"^{pkl}: holds the pickled global .*system"):
        load_glue_pickle("sst2", pkl)
    with pytest.raises(RecordError, match="pickled global"):
        get_tasks(["sst2"])[0].examples(n=2, data_dir=tmp_path)
    assert not marker.exists()


def test_a_class_instance_is_refused_too(tmp_path: Path) -> None:
    # an instance pickles as its class (a global) plus its state: refused like a function
    data: list[Any] = rows("cola", 2)
    data[0]["label"] = Path("x")
    pkl = write_pickle(tmp_path / "cola.pkl", data)
    with pytest.raises(RecordError, match=r"record #0, field 'label': holds the pickled global pathlib"):
        load_glue_pickle("cola", pkl)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"not a pickle", r"not a readable pickle of plain data"),
        (pickle.dumps(rows("sst2"))[:-5], r"not a readable pickle of plain data"),
        (pickle.dumps({"0": rows("sst2")}), r"expected a pickled list of examples, got dict"),
        (pickle.dumps([]), r"holds no examples"),
        (pickle.dumps([*rows("sst2", 2), "text"]), r"record #2: expected a JSON object, got str"),
        (pickle.dumps([{**rows("sst2", 1)[0], "label": 2}]), r"record #0, field 'label': expected label 0 or 1"),
        (pickle.dumps([{**rows("sst2", 1)[0], "sentence": b"bytes"}]), r"record #0, field 'sentence': expected a "
                                                                          "non-empty string"),
        (pickle.dumps(rows("sst2", 2) + rows("sst2", 1)), r"record #2, field 'idx': duplicate idx 10"),
    ],
)
def test_a_bad_pickle_is_one_line_naming_file_and_record(tmp_path: Path, content: bytes, pattern: str) -> None:
    pkl = tmp_path / "sst2.pkl"
    pkl.write_bytes(content)
    with pytest.raises(EditscaleError, match=pattern) as err:
        load_glue_pickle("sst2", pkl)
    assert str(err.value).startswith(str(pkl)) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- hparams JSON

# The paper's files, as its code ships them (hparams/ROME/gpt2-xl.json and hparams/MEMIT/gpt2-xl.json;
# docs/protocol.md §1.1, §2.8 and §4.5 list the same values), keys in the files' order.
ROME_GPT2_XL = """{
    "layers": [
        17
    ],
    "fact_token": "subject_last",
    "v_num_grad_steps": 20,
    "v_lr": 5e-1,
    "v_loss_layer": 47,
    "v_weight_decay": 0.5,
    "clamp_norm_factor": 4,
    "kl_factor": 0.0625,
    "mom2_adjustment": true,
    "context_template_length_params": [[5, 10], [10, 10]],
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
    "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp",
    "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f",
    "lm_head_module": "transformer.wte",
    "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000,
    "mom2_dtype": "float32",
    "bias_update": false,
    "dynamic": false,
    "dynamic_multiplier": 10
}
"""

MEMIT_GPT2_XL = """{
    "layers": [13, 14, 15, 16, 17],
    "clamp_norm_factor": 0.75,
    "layer_selection": "all",
    "fact_token": "subject_last",
    "v_num_grad_steps": 20,
    "v_lr": 5e-1,
    "v_loss_layer": 47,
    "v_weight_decay": 0.5,
    "kl_factor": 0.0625,
    "mom2_adjustment": true,
    "mom2_update_weight": 20000,
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
    "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp",
    "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f",
    "lm_head_module": "transformer.wte",
    "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000,
    "mom2_dtype": "float32"
}
"""

MODULE_KEYS = "rewrite_module_tmp, layer_module_tmp, mlp_module_tmp, attn_module_tmp, ln_f_module, lm_head_module"


def hparams_file(tmp_path: Path, text: str, name: str = "gpt2-xl.json", **changes: Any) -> Path:
    data = json.loads(text)
    data.update(changes)
    path = tmp_path / name
    path.write_text(text if not changes else json.dumps(data, indent=4))
    return path


@pytest.mark.parametrize(("method", "text", "unused"), [
    ("rome", ROME_GPT2_XL, "bias_update, dynamic, dynamic_multiplier"),
    ("memit", MEMIT_GPT2_XL, "layer_selection, mom2_adjustment"),
])
def test_the_papers_hparams_json_loads_as_the_method_config(tmp_path: Path, caplog, method: str, text: str,
                                                            unused: str) -> None:
    path = hparams_file(tmp_path, text)
    with caplog.at_level(logging.INFO, logger="editscale"):
        cfg = build_run_config({"model": "gpt2-xl", "method": method}, method_config=path)
    note = [r.getMessage() for r in caplog.records if "hparams file" in r.getMessage()]
    assert note == [f"{path}: the reference's hparams file; dropped the module paths {MODULE_KEYS} (they match the "
                    f"gpt2 family's) and {unused} (no meaning in editscale)"]
    paper = json.loads(text)
    kept = {k: v for k, v in paper.items() if k not in MODULE_KEYS.split(", ") and k not in unused.split(", ")}
    assert cfg.method_config == kept
    # the paper's values are the shipped preset's: the resolved config is the preset's
    resolved = resolve_config(cfg).method_config
    assert resolved == resolve_config(RunConfig(model="gpt2-xl", method=method)).method_config
    assert resolved["v_lr"] == 0.5 and resolved["layers"] == paper["layers"]


def test_set_overrides_the_json_and_the_family_may_be_given(tmp_path: Path) -> None:
    path = hparams_file(tmp_path, ROME_GPT2_XL)
    cfg = build_run_config({"model": "gpt2-xl"}, method_config=path, sets=["v_lr=0.1"])
    assert cfg.method_config["v_lr"] == 0.1 and "rewrite_module_tmp" not in cfg.method_config
    # the same check with the family known (the library's form); the embedded model is a GPT-2 too
    data = json.loads(MEMIT_GPT2_XL)
    assert from_reference_hparams(data, MemitConfig, GPT2)["mom2_update_weight"] == 20000
    assert from_reference_hparams(data, MemitConfig, "embedded")["layers"] == [13, 14, 15, 16, 17]
    # a mapping without a reference-only key is passed through unchanged (pydantic judges it later)
    assert from_reference_hparams({"v_lr": 1, "typo": 2}, RomeConfig, GPT2) == {"v_lr": 1, "typo": 2}


@pytest.mark.parametrize(("changes", "model", "pattern"), [
    ({"rewrite_module_tmp": "transformer.h.{}.mlp.fc_out"}, "gpt2-xl",
     r"rewrite_module_tmp = 'transformer\.h\.\{\}\.mlp\.fc_out' is not where the gpt2 family keeps its mlp_out "
     r"module \(transformer\.h\.\{\}\.mlp\.c_proj\)"),
    ({"ln_f_module": "model.norm"}, "gpt2-xl", r"ln_f_module = 'model\.norm' is not where the gpt2 family keeps "
                                                r"its final_norm module \(transformer\.ln_f\)"),
    ({}, "EleutherAI/gpt-j-6b", r"rewrite_module_tmp = 'transformer\.h\.\{\}\.mlp\.c_proj' is not where the gptj "
                                r"family keeps its mlp_out module \(transformer\.h\.\{\}\.mlp\.fc_out\); is the file "
                                r"for another model\?"),
    ({"edit_bias": True}, "gpt2-xl", r"unknown key 'edit_bias': not a hyper-parameter of RomeConfig"),
    ({"bias_update": True}, "gpt2-xl", r"bias_update = True is not supported by RomeConfig"),
])
def test_a_wrong_module_path_or_unknown_key_is_one_line(tmp_path: Path, changes: dict[str, Any], model: str,
                                                        pattern: str) -> None:
    path = hparams_file(tmp_path, ROME_GPT2_XL, **changes)
    with pytest.raises(EditscaleError, match=pattern) as err:
        build_run_config({"model": model, "method": "rome"}, method_config=path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    assert GPTJ.mlp_out == "transformer.h.{}.mlp.fc_out"


def test_the_cli_refuses_a_wrong_module_path_before_loading_the_model(tmp_path: Path, run_cli) -> None:
    path = hparams_file(tmp_path, MEMIT_GPT2_XL, mlp_module_tmp="gpt_neox.layers.{}.mlp")
    code, _, err = run_cli("run", "--model", "gpt2-xl", "--method", "memit", "--method-config", str(path),
                           "--out", str(tmp_path / "run"))
    assert code == 2
    assert "mlp_module_tmp = 'gpt_neox.layers.{}.mlp' is not where the gpt2 family keeps its mlp module" in err
    assert not (tmp_path / "run").exists()
