"""Context templates and covariance statistics given to a run (`--templates FILE`, `--stats PATH`),
and config.yaml's record of where they came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

import runner_stubs
from editscale.methods.base import EditRequest, get_method
from editscale.methods.solver.context import EditContext
from editscale.methods.solver.stats import given_second_moments
from editscale.methods.solver.templates import load_templates_file
from editscale.models.loading import load_model
from editscale.run.checkpoint import load_checkpoint
from editscale.run.store import RunStore
from test_dataset_forms import one_line_error
from tiny_models import random_spd

TEMPLATES = {"rome": ["{}", "Yes. {}", "The end of it. {}"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    return runner_stubs.make_world(tmp_path_factory.mktemp("world"), n_records=6)


@pytest.fixture(scope="module")
def lm(world):
    return load_model(world["model"])


def reference_npz(path: Path, c: torch.Tensor, count: int = 1000) -> Path:
    """Statistics as the reference's layer_stats writes them (kmeng01/rome `rome/layer_stats.py`): summed."""
    np.savez(path, **{"mom2.mom2": (c * count).numpy(), "mom2.count": np.array(count)})
    return path


def test_a_run_edits_with_the_given_templates_and_statistics(run_cli, world, lm, tmp_path: Path) -> None:
    d = lm.adapter.get_mlp_out_weight(1).shape[1]
    c = random_spd(d, seed=3).float()
    stats = reference_npz(tmp_path / "transformer.h.1.mlp.c_proj_float32_mom2_1000.npz", c)
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(TEMPLATES))
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--out", str(out), "--model", world["model"], "--method", "rome",
                           "--set", "layers=[1]", "--set", "v_num_grad_steps=3", "--data-path", world["data"],
                           "--dataset", "counterfact", "--edits", "1", "--checkpoint-every", "1", "--control", "0",
                           "--downstream", "none", "--no-health", "--stats", str(stats), "--templates", str(templates),
                           "--stats-cache", str(cache), "--no-progress")
    assert code == 0, err
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # nothing was computed
    assert RunStore(out).read_json("templates.json") == TEMPLATES
    doc = yaml.safe_load((out / "config.yaml").read_text())
    assert doc["inputs"]["templates"]["source"] == "file" and doc["inputs"]["templates"]["path"] == str(templates)
    assert doc["inputs"]["stats"]["path"] == str(stats) and len(doc["inputs"]["stats"]["sha256"]) == 64

    # the same edit computed here, with C and the templates handed over explicitly
    cls = get_method("rome")
    cfg = cls.config_class.parse(doc["run"]["method_config"])
    ctx = EditContext(lm.name, templates=json.loads(json.dumps(TEMPLATES)), mom2={1: c.double()}, progress=False)
    from editscale.data.registry import load_records

    (first,) = [r for r in load_records("counterfact", data_path=world["data"])
                if r.case_id == RunStore(out).rows("edits")[0]["case_id"]]
    result = cls(lm.adapter, cfg, ctx).compute([EditRequest.from_record(first)])
    saved = load_checkpoint(RunStore(out)).params.weights[1]
    torch.testing.assert_close(saved, lm.adapter.get_mlp_out_weight(1) + result.deltas[1], rtol=1e-5, atol=1e-6)


def test_config_records_generated_templates_and_cached_statistics(run_cli, world, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(*runner_stubs_args(world, out))
    assert code == 0, err
    doc = yaml.safe_load((out / "config.yaml").read_text())
    assert doc["inputs"]["templates"] == {"source": "generated from the unedited model", "seed": 0}
    assert "stats" not in doc["inputs"]  # the stub method takes no statistics


def runner_stubs_args(world: dict[str, str], out: Path, *extra: str) -> list[str]:
    return ["run", "--out", str(out), "--model", world["model"], "--method", "stub", "--set", "layers=[0, 1]",
            "--data-path", world["data"], "--dataset", "counterfact", "--edits", "1", "--downstream", "none",
            "--no-progress", *extra]


def test_statistics_folders_by_either_naming(lm, tmp_path: Path) -> None:
    d = lm.adapter.get_mlp_out_weight(0).shape[1]
    c0, c1 = random_spd(d, seed=1).float(), random_spd(d, seed=2).float()
    reference_npz(tmp_path / "transformer.h.0.mlp.c_proj_float32_mom2_100000.npz", c0)
    save_file({"mom2": c1}, tmp_path / "layer1_float64_n20000_len64.safetensors")
    got = given_second_moments(tmp_path, lm.adapter, [0, 1])
    torch.testing.assert_close(got[0], c0)
    torch.testing.assert_close(got[1], c1)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p, d: reference_npz(p / "model.layers.0.mlp.down_proj_float32_mom2_1000.npz", random_spd(d).float()),
     "holds no statistics of layer 0"),
    (lambda p, d: reference_npz(p / "transformer.h.0.mlp.c_proj_float32_mom2_1000.npz", random_spd(d + 1).float()),
     "statistics of another model"),
    (lambda p, d: np.savez(p / "transformer.h.0.mlp.c_proj_float32_mom2_1000.npz", other=np.zeros(2)),
     "not the reference's layer statistics"),
    (lambda p, d: (p / "transformer.h.0.mlp.c_proj_float32_mom2_1000.npz").write_bytes(b"PK\x03\x04 damaged"),
     "cannot read it"),
])
def test_bad_statistics_are_one_line_errors(lm, tmp_path: Path, make, message: str) -> None:
    from editscale.errors import EditscaleError

    make(tmp_path, lm.adapter.get_mlp_out_weight(0).shape[1])
    with pytest.raises(EditscaleError, match=message):
        given_second_moments(tmp_path, lm.adapter, [0])


def test_one_file_for_several_layers_is_refused(lm, tmp_path: Path) -> None:
    from editscale.errors import EditscaleError

    path = reference_npz(tmp_path / "s.npz", random_spd(lm.adapter.get_mlp_out_weight(0).shape[1]).float())
    with pytest.raises(EditscaleError, match="pass a folder"):
        given_second_moments(path, lm.adapter, [0, 1])


@pytest.mark.parametrize(("content", "message"), [
    ({"rome": ["{} and {}"]}, "one '{}'"),
    ({"rome": ["no slot"]}, "one '{}'"),
    ({"rome": ["{x} {}"]}, "no other brace"),
    ({"mend": ["{}"]}, "unknown kind 'mend'"),
    ({"rome": []}, "non-empty list"),
    ("{}", "expected a mapping"),
])
def test_bad_templates_files(tmp_path: Path, content, message: str) -> None:
    from editscale.errors import EditscaleError

    path = tmp_path / "t.json"
    path.write_text(json.dumps(content))
    with pytest.raises(EditscaleError, match=message):
        load_templates_file(str(path))


def test_a_list_of_templates_serves_every_kind(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(["{}", "A. {}"]))
    assert load_templates_file(str(path)) == {"rome": ["{}", "A. {}"], "memit": ["{}", "A. {}"]}


def test_stats_for_a_method_without_statistics_and_changed_templates(run_cli, world, tmp_path: Path) -> None:
    code, _, err = run_cli(*runner_stubs_args(world, tmp_path / "a", "--stats", str(tmp_path)))
    assert "--stats is for methods that use covariance statistics, not stub" in one_line_error(code, err)

    templates = tmp_path / "t.json"
    templates.write_text(json.dumps({"rome": ["{}"]}))
    out = tmp_path / "b"
    code, _, err = run_cli(*runner_stubs_args(world, out, "--templates", str(templates)))
    assert code == 0, err
    templates.write_text(json.dumps({"rome": ["{}", "Other. {}"]}))
    code, _, err = run_cli("resume", str(out), "--no-progress")
    assert "no longer holds the templates" in one_line_error(code, err)
