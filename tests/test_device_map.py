"""Editing a model that accelerate placed over devices with CPU and disk offload (docs/protocol.md §1.5).

A tiny GPT-2 is saved as safetensors and loaded with a device map that offloads the edited block to
disk; its parameters are then on `meta` and their values come from the checkpoint file through the
hook's weights map. A ROME edit, its read-back, the next forward pass and snapshot/restore must
agree with the same model loaded whole, and the checkpoint file must never be written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import runner_stubs
from editscale.errors import EditscaleError
from editscale.methods.base import EditRequest, EditResult, apply_result, get_method
from editscale.methods.rome import RomeConfig
from editscale.methods.solver.context import EditContext
from editscale.methods.solver.stats import model_fingerprint, second_moment
from editscale.models.adapter import ModelAdapter, execution_device, input_device
from editscale.models.loading import load_model, parse_device_map, parse_max_memory
from editscale.run import runner as runner_module
from editscale.run.config import RunConfig
from editscale.run.runner import Runner
from editscale.run.store import RunStore
from tiny_models import byte_bpe_tokenizer, random_spd, tiny_model

LAYER = 1
TEMPLATES = ["{}", "Paris is nice. {}", "The piano. {}"]
PROMPTS = ["Danielle Darrieux plays the", "The mother tongue of Toko Yasuda is"]
# everything on the CPU except the edited block, which is read from disk at each forward pass
DISK_MAP = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
            "transformer.h.1": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = byte_bpe_tokenizer()
    tiny_model("gpt2", len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _c_proj(adapter: ModelAdapter) -> torch.nn.Module:
    return adapter.model.transformer.h[LAYER].mlp.c_proj  # written out by hand, not through the family table


def _assert_offloaded(adapter: ModelAdapter) -> None:
    module = _c_proj(adapter)
    assert module.weight.device.type == "meta" and module.bias.device.type == "meta"
    owners = [module, adapter.model.transformer.h[LAYER], adapter.model.transformer, adapter.model]
    assert any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in owners)


def _rome(adapter: ModelAdapter):
    cfg = RomeConfig(layers=[LAYER], mom2_dataset="factworld", v_num_grad_steps=8)
    ctx = EditContext("tiny", templates={"rome": list(TEMPLATES)}, mom2={LAYER: random_spd(adapter.d_mlp)},
                      progress=False)
    return get_method("rome")(adapter, cfg, ctx)


def _disk_map(tmp_path: Path) -> Path:
    """A device-map file that sends block LAYER to disk and keeps the rest on the CPU."""
    path = tmp_path / "map.json"
    path.write_text(json.dumps(DISK_MAP))
    return path


def _disk_placed(model_dir: Path, tmp_path: Path) -> ModelAdapter:
    return load_model(model_dir, device_map=str(_disk_map(tmp_path)), offload_folder=tmp_path / "offload").adapter


def _request() -> EditRequest:
    return EditRequest(case_id=0, prompt="{} plays the", subject="Danielle Darrieux", target_new="violin",
                       target_true="piano")


def test_a_rome_edit_of_a_disk_offloaded_layer_matches_the_whole_model(model_dir: Path, tmp_path: Path) -> None:
    placed = _disk_placed(model_dir, tmp_path)
    whole = load_model(model_dir).adapter
    _assert_offloaded(placed)
    assert placed.mlp_out_offloaded(LAYER) and not placed.mlp_out_offloaded(0) and not whole.mlp_out_offloaded(LAYER)
    assert placed.device == torch.device("cpu")
    checkpoint = model_dir / "model.safetensors"
    stored_w0 = load_file(checkpoint)[f"transformer.h.{LAYER}.mlp.c_proj.weight"]

    w0 = placed.get_mlp_out_weight(LAYER)
    assert w0.dtype == torch.float32 and torch.equal(w0, whole.get_mlp_out_weight(LAYER))
    assert torch.equal(w0, stored_w0.t())  # Conv1D storage, read back in the canonical orientation
    torch.testing.assert_close(placed.logits(PROMPTS), whole.logits(PROMPTS), rtol=0, atol=0)

    result = _rome(placed).compute([_request()])
    expected = _rome(whole).compute([_request()])
    torch.testing.assert_close(result.deltas[LAYER], expected.deltas[LAYER], rtol=1e-5, atol=1e-7)
    assert torch.equal(placed.get_mlp_out_weight(LAYER), w0), "compute() must leave the offloaded layer as it was"

    apply_result(placed, result)
    apply_result(whole, result)
    _assert_offloaded(placed)  # still offloaded: the edit went into the weights map, not onto a device
    assert torch.equal(placed.get_mlp_out_weight(LAYER), w0 + result.deltas[LAYER])
    torch.testing.assert_close(placed.logits(PROMPTS), whole.logits(PROMPTS), rtol=1e-5, atol=1e-6)
    assert not torch.equal(placed.logits(PROMPTS), load_model(model_dir).adapter.logits(PROMPTS))
    assert torch.equal(load_file(checkpoint)[f"transformer.h.{LAYER}.mlp.c_proj.weight"], stored_w0)

    edited = placed.snapshot([LAYER])
    g = torch.Generator().manual_seed(1)
    apply_result(placed, EditResult({LAYER: torch.randn(placed.d_model, placed.d_mlp, generator=g)},
                                    bias_deltas={LAYER: torch.randn(placed.d_model, generator=g)}))
    assert not torch.equal(placed.get_mlp_out_weight(LAYER), edited.weights[LAYER])
    placed.restore(edited)
    back = placed.snapshot([LAYER])
    assert torch.equal(back.weights[LAYER], edited.weights[LAYER])
    assert torch.equal(back.biases[LAYER], edited.biases[LAYER])
    torch.testing.assert_close(placed.logits(PROMPTS), whole.logits(PROMPTS), rtol=1e-5, atol=1e-6)


def _check_writes(placed: ModelAdapter, whole: ModelAdapter) -> None:
    """Weight and bias deltas, set and restore through the adapter land where the next forward reads."""
    g = torch.Generator().manual_seed(2)
    result = EditResult({LAYER: 0.1 * torch.randn(placed.d_model, placed.d_mlp, generator=g)},
                        bias_deltas={LAYER: 0.1 * torch.randn(placed.d_model, generator=g)})
    before = placed.snapshot([LAYER])
    for adapter in (placed, whole):
        apply_result(adapter, result)
    _assert_offloaded(placed)
    assert torch.equal(placed.get_mlp_out_weight(LAYER), before.weights[LAYER] + result.deltas[LAYER])
    assert torch.equal(placed.get_mlp_out_bias(LAYER), before.biases[LAYER] + result.bias_deltas[LAYER])
    torch.testing.assert_close(placed.logits(PROMPTS), whole.logits(PROMPTS), rtol=1e-5, atol=1e-6)
    placed.set_mlp_out_weight(LAYER, torch.zeros(placed.d_model, placed.d_mlp))
    assert not placed.get_mlp_out_weight(LAYER).any()
    placed.restore(before)
    whole.restore(before)
    assert torch.equal(placed.get_mlp_out_weight(LAYER), before.weights[LAYER])
    torch.testing.assert_close(placed.logits(PROMPTS), whole.logits(PROMPTS), rtol=1e-5, atol=1e-6)


def test_statistics_of_an_offloaded_model_are_those_of_the_whole_model(model_dir: Path, tmp_path: Path) -> None:
    placed = _disk_placed(model_dir, tmp_path)
    whole = load_model(model_dir).adapter
    _assert_offloaded(placed)
    # the same weights, so the same cache entry; the offloaded values are read from the hook
    assert model_fingerprint(placed.model) == model_fingerprint(whole.model)
    kwargs = dict(corpus="factworld", n_samples=6, max_length=48, progress=False)
    c_placed = second_moment(placed, LAYER, cache_dir=tmp_path / "a", **kwargs)
    c_whole = second_moment(whole, LAYER, cache_dir=tmp_path / "b", **kwargs)
    torch.testing.assert_close(c_placed, c_whole, rtol=1e-6, atol=1e-9)


def test_ft_c_refuses_an_offloaded_layer_in_one_line(model_dir: Path, tmp_path: Path) -> None:
    placed = _disk_placed(model_dir, tmp_path)
    cls = get_method("ft-c")
    editor = cls(placed, cls.config_class.parse({"layers": [LAYER]}), EditContext("tiny", progress=False))
    with pytest.raises(EditscaleError, match="offloaded") as err:
        editor.ensure_prepared()
    assert "\n" not in str(err.value)


def test_a_whole_model_offloaded_to_disk_by_max_memory(model_dir: Path, tmp_path: Path) -> None:
    # No room on the CPU: accelerate offloads the whole model under one hook that covers its submodules.
    lm = load_model(model_dir, device_map="auto", max_memory="cpu=1KB", offload_folder=tmp_path / "offload")
    assert lm.model.hf_device_map == {"": "disk"}
    assert lm.model.transformer.wte.weight.device.type == "meta"
    assert lm.adapter.device == torch.device("cpu") == input_device(lm.model)
    _check_writes(lm.adapter, load_model(model_dir).adapter)


def test_a_model_offloaded_to_the_cpu(model_dir: Path) -> None:
    # accelerate's cpu_offload keeps every tensor in a plain dict and streams it in at each forward pass.
    from accelerate import cpu_offload

    tok = byte_bpe_tokenizer()
    model = tiny_model("gpt2", len(tok))
    cpu_offload(model, execution_device=torch.device("cpu"))
    placed = ModelAdapter(model, tok)
    assert execution_device(model, "transformer.h.1.mlp") == torch.device("cpu")
    _check_writes(placed, ModelAdapter(tiny_model("gpt2", len(tok)), tok))


@pytest.mark.slow
def test_a_run_with_an_offloaded_edited_layer_writes_the_rows_of_a_whole_model_run(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    world = runner_stubs.make_world(tmp_path / "world", n_records=12)
    monkeypatch.setenv("EDITSCALE_TASKS", world["tasks"])
    map_file = tmp_path / "map.yaml"
    map_file.write_text("".join(f"{k}: {v}\n" for k, v in DISK_MAP.items()))
    base = dict(model=world["model"], method="stub", dataset="counterfact", data_path=world["data"], edits=3,
                eval_every=3, checkpoint_every=3, control=3, downstream=["tiny_sentiment"], downstream_n=4,
                downstream_every=3, health=False, method_config={"layers": [LAYER], "bias": True})
    placed_cfg = RunConfig(**base, device_map=str(map_file), offload_folder=str(tmp_path / "offload"))
    assert placed_cfg.identity() == RunConfig(**base).identity()  # where the weights live is not the run
    loaded = []

    def spy(*args, **kwargs):
        loaded.append(load_model(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(runner_module, "load_model", spy)
    rows = {}
    for name, cfg in (("placed", placed_cfg), ("whole", RunConfig(**base))):
        Runner(cfg, tmp_path / name, progress=False, log=lambda s: None).run()
        store = RunStore(tmp_path / name)
        rows[name] = [{k: r[k] for k in ("es", "ps", "ns", "drift")} for r in store.rows("edits")]
        rows[name].append({k: v for k, v in store.rows("forgetting")[-1].items() if k != "seconds"})
    _assert_offloaded(loaded[0].adapter)
    assert rows["placed"] == rows["whole"] and len(rows["whole"]) == 4


@pytest.mark.parametrize(("call", "named"), [
    (lambda: parse_device_map("fastest"), "'fastest'"),
    (lambda: parse_max_memory("0=lots"), "'lots'"),
    (lambda: parse_max_memory("gpu0=20GiB"), "'gpu0'"),
    (lambda: parse_max_memory("cpu"), "'cpu'"),
    (lambda: parse_max_memory('{"0": 20'), "not valid JSON"),
    (lambda: parse_max_memory("[1, 2]"), "DEVICE=SIZE"),
])
def test_bad_placements_are_one_line_errors(call, named: str) -> None:
    with pytest.raises(EditscaleError) as err:
        call()
    assert named in str(err.value) and "\n" not in str(err.value)


def test_placement_forms(model_dir: Path, tmp_path: Path) -> None:
    assert parse_device_map("balanced_low_0") == "balanced_low_0"
    assert parse_max_memory("0=20GiB, cpu=60GiB") == {0: "20GiB", "cpu": "60GiB"}
    assert parse_max_memory('{"0": "20GiB", "disk": 1000}') == {0: "20GiB", "disk": 1000}
    good = tmp_path / "good.yaml"
    good.write_text("transformer.h: 0\nlm_head: cuda:1\ntransformer.wte: disk\n")
    assert parse_device_map(str(good)) == {"transformer.h": 0, "lm_head": "cuda:1", "transformer.wte": "disk"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"transformer.h": "gpu", "lm_head": "cpu"}))
    with pytest.raises(EditscaleError, match="module 'transformer.h' has device 'gpu'"):
        parse_device_map(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("transformer.h: [0\n")
    with pytest.raises(EditscaleError, match="broken.yaml") as err:
        parse_device_map(str(broken))
    assert "\n" not in str(err.value)
    with pytest.raises(EditscaleError, match="--max-memory only applies with --device-map"):
        load_model(model_dir, max_memory="cpu=1GiB")


def test_the_run_command_offers_the_placement_options(run_cli) -> None:
    code, out, _ = run_cli("run", "--help")
    assert code == 0
    for flag in ("--device-map", "--max-memory", "--offload-folder"):
        assert flag in out


def test_facts_on_an_offloaded_model_equal_the_whole_models(run_cli, model_dir: Path, tmp_path: Path) -> None:
    map_file = _disk_map(tmp_path)
    code, whole, _ = run_cli("facts", "--model", str(model_dir), "--n", "6", "--json")
    assert code == 0
    code, placed, err = run_cli("facts", "--model", str(model_dir), "--n", "6", "--json", "--device-map",
                                str(map_file))
    assert code == 0, err
    assert json.loads(placed) == json.loads(whole)
    code, _, err = run_cli("skills", "--model", str(model_dir), "--device-map", "nowhere")
    assert code == 2 and "nowhere" in err
