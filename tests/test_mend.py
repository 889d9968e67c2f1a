"""MEND (docs/protocol.md §6.2): its edit against the equations computed here independently on tiny
models, its rank limit, the published checkpoint layout, training that resumes exactly, and a run
whose checkpoint and drift cover the MLP input maps it edits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editscale.data.records import EditRecord
from editscale.errors import EditscaleError
from editscale.methods.base import EditRequest, apply_result
from editscale.methods.mend import MendConfig, MendEditor, MendTrainConfig
from editscale.methods.mend.network import MendNetwork
from editscale.methods.mend.train import MendTrainer
from editscale.methods.mend.weights import build_network, load_network, save_network
from editscale.methods.solver.context import EditContext
from editscale.models.adapter import ModelAdapter
from tiny_models import tiny_model, tokenizer_for

REQUESTS = [
    EditRequest(0, "{} plays the", "Danielle Darrieux", "violin", "piano"),
    EditRequest(1, "{} was born in", "Toko Yasuda", "London", "Paris"),
]


def _adapter(model_type: str) -> ModelAdapter:
    tok = tokenizer_for(model_type)
    return ModelAdapter(tiny_model(model_type, len(tok)), tok)


def _config(**kw) -> MendConfig:
    return MendConfig.parse({"layers": [1], "in_layers": [0, 1], "rank": 8, **kw})


def _weight_gradient(adapter: ModelAdapter, role: str, layer: int, request: EditRequest) -> torch.Tensor:
    """d(mean NLL of the target tokens)/dW in [out, in], by autograd on the weight itself."""
    batch = adapter.prompt_target_batch([request.prompt.format(request.subject)], [request.target_new])
    ids = batch.input_ids
    n_prompt, target = batch.prefix_lens[0], batch.target_ids[0]
    weight = adapter.module(role, layer).weight
    weight.requires_grad_(True)
    try:
        logits = adapter.model(input_ids=ids).logits[0]
        at = list(range(n_prompt - 1, n_prompt - 1 + len(target)))
        loss = torch.nn.functional.cross_entropy(logits[at], torch.tensor(target))
        (grad,) = torch.autograd.grad(loss, [weight])
    finally:
        weight.requires_grad_(False)
    return grad.T if adapter.family.conv1d_weights else grad


def _editor(adapter: ModelAdapter, cfg: MendConfig, network: MendNetwork, tmp_path: Path) -> MendEditor:
    save_network(tmp_path, network, {"rank": cfg.rank, "n_hidden": cfg.n_hidden})
    return MendEditor(adapter, cfg.model_copy(update={"weights": str(tmp_path)}), EditContext("tiny"))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_untrained_network_edits_by_step_size_times_gradient(model_type: str, tmp_path: Path) -> None:
    # a fresh network is the identity and its statistics standardise nothing, so ΔW = α ∇W exactly
    adapter = _adapter(model_type)
    cfg = _config()
    network = build_network(adapter, cfg, edit_lr=1e-3)
    with torch.no_grad():
        network.edit_lrs.copy_(torch.tensor([0.5, -2.0, 3.0]))  # sites: in 0, out 1, in 1
    editor = _editor(adapter, cfg, network, tmp_path)
    result = editor.compute(REQUESTS[:1])
    assert editor.in_layers == [0, 1] and set(result.deltas) == {1} and set(result.in_deltas) == {0, 1}
    for (role, layer), alpha in zip(cfg.sites(), [0.5, -2.0, 3.0], strict=True):
        got = (result.deltas if role == "mlp_out" else result.in_deltas)[layer]
        expected = alpha * _weight_gradient(adapter, role, layer, REQUESTS[0])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_edit_rank_is_at_most_the_positions_with_a_gradient(tmp_path: Path) -> None:
    adapter = _adapter("gpt2")
    cfg = _config(rank=4)
    network = build_network(adapter, cfg, edit_lr=1e-2)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith(".u") or name.endswith(".bias"):
                p.normal_(0, 0.5)  # a trained-looking network, not the identity
    editor = _editor(adapter, cfg, network, tmp_path)
    request = REQUESTS[0]
    batch = adapter.prompt_target_batch([request.prompt.format(request.subject)], [request.target_new])
    # positions up to the one predicting the last target token carry a gradient; the last does not
    positions = batch.prefix_lens[0] + len(batch.target_ids[0]) - 1
    result = editor.compute([request])
    assert result.diagnostics["rows"] <= positions
    for delta in [*result.deltas.values(), *result.in_deltas.values()]:
        # float32 sums: singular values below 1e-5 of the largest are rounding, not rank
        assert int(torch.linalg.matrix_rank(delta, rtol=1e-5)) <= positions < min(delta.shape)
        assert float(delta.norm()) > 0


def _reference_transform(sd: dict[str, torch.Tensor], group: str, mode: int, x: torch.Tensor,
                         delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's GradientTransform.forward in eval mode, written from its equations."""
    p = f"gtn.{group}."
    u = (x - sd[p + "u_mean"]) / (sd[p + "u_std"] + 1e-7)
    v = (delta - sd[p + "v_mean"]) / (sd[p + "v_std"] + 1e-7)
    z = torch.cat([u, v], -1)
    for i in range(2):
        q = f"{p}mlp.layers.{i}."
        pre = (sd[q + "u"] @ (sd[q + "v"] @ z.T)).T + sd[q + "bias"]
        pre = pre * sd[q + "mode_scale.weight"][mode] + sd[q + "mode_shift.weight"][mode]
        z = pre.clamp(min=0) + z
    return z[:, : x.shape[1]], z[:, x.shape[1]:]


def test_published_checkpoint_layout_loads_and_edits_as_the_reference(tmp_path: Path) -> None:
    adapter = _adapter("gpt2")
    d_model, d_mlp = adapter.d_model, adapter.d_mlp
    cfg = _config(layers=[0, 1], in_layers=[0, 1], rank=5)  # sites: out 0, in 0, out 1, in 1
    gen = torch.Generator().manual_seed(3)
    sd: dict = {}
    for (x_dim, d_dim) in [(d_mlp, d_model), (d_model, d_mlp)]:  # c_proj's group, c_fc's group
        group, dim = str((x_dim, d_dim)), x_dim + d_dim
        for side, n in (("u", x_dim), ("v", d_dim)):
            sd[f"gtn.{group}.{side}_mean"] = torch.randn(n, generator=gen) * 0.1
            sd[f"gtn.{group}.{side}_std"] = torch.rand(n, generator=gen) + 0.5
            sd[f"gtn.{group}.{side}_s"] = torch.rand(n, generator=gen)
        sd[f"gtn.{group}.k"] = torch.tensor([1000.0])
        for i in range(2):
            q = f"gtn.{group}.mlp.layers.{i}."
            sd[q + "u"] = torch.randn(dim, 5, generator=gen) * 0.1
            sd[q + "v"] = torch.randn(5, dim, generator=gen)
            sd[q + "bias"] = torch.randn(dim, generator=gen) * 0.1
            sd[q + "mode_scale.weight"] = torch.rand(2, dim, generator=gen) + 0.5
            sd[q + "mode_shift.weight"] = torch.randn(2, dim, generator=gen) * 0.1
    sd["edit_lrs"] = torch.tensor([1e-3, 2e-3, -1e-3, 5e-4])
    sd["model_config"] = {"n_embd": d_model}  # the released files keep the model's config object here
    file = tmp_path / "mend-10tok-tiny.pt"
    from transformers import GPT2Config

    torch.save({"model": sd, "opt": {}, "step": 7, "model_config": GPT2Config(n_embd=d_model)}, file)

    network, meta = load_network(adapter, cfg, tmp_path)  # a directory holding one mend-*.pt
    assert meta["step"] == 7 and meta["rank"] == 5 and meta["n_hidden"] == 1
    editor = MendEditor(adapter, cfg.model_copy(update={"weights": str(file)}), EditContext("tiny"))
    result = editor.compute(REQUESTS[:1])

    from editscale.methods.solver.gradients import trace_edit_loss

    trace = trace_edit_loss(adapter, cfg.sites(), REQUESTS[:1])
    modes = {("mlp_out", 0): 0, ("mlp_in", 0): 0, ("mlp_out", 1): 1, ("mlp_in", 1): 1}
    for i, site in enumerate(cfg.sites()):
        x, delta = trace.nonzero(site)
        group = str((x.shape[1], delta.shape[1]))
        xt, dt = _reference_transform(sd, group, modes[site], x, delta)
        expected = sd["edit_lrs"][i] * (dt.T @ xt)  # the reference's "bi,bj->ij" for Conv1D, transposed
        got = (result.deltas if site[0] == "mlp_out" else result.in_deltas)[site[1]]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)

    with pytest.raises(EditscaleError, match="step sizes"):
        load_network(adapter, _config(layers=[0], in_layers=[0, 1]), file)


def _records(n: int) -> list[EditRecord]:
    names = ["Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal"]
    objects = ["Paris", "London", "Rome", "Berlin"]
    return [EditRecord(case_id=i, subject=f"{names[i % 8]} {i}", prompt="{} was born in",
                       target_new=objects[i % 4], target_true=objects[(i + 1) % 4],
                       paraphrase_prompts=(f"{names[i % 8]} {i} is from",),
                       neighborhood_prompts=(f"{names[(i + 3) % 8]} lives in", f"The city of {names[i % 8]} is"))
            for i in range(n)]


def test_training_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    adapter = _adapter("gpt2")
    cfg = _config(rank=4)
    records = _records(12)
    settings = dict(lr=1e-3, accumulate=2, records=12, val_records=2, val_every=2, checkpoint_every=1)

    whole = MendTrainer(adapter, "tiny", cfg, MendTrainConfig(steps=4, **settings), records, tmp_path / "a")
    whole.run(progress=False, say=lambda s: None)

    MendTrainer(adapter, "tiny", cfg, MendTrainConfig(steps=2, **settings), records, tmp_path / "b").run(
        progress=False, say=lambda s: None)
    resumed = MendTrainer(adapter, "tiny", cfg, MendTrainConfig(steps=4, **settings), records, tmp_path / "b")
    said: list[str] = []
    resumed.run(progress=False, say=said.append)
    assert said[0].startswith("resuming") and resumed.step == 4
    a, b = whole.network.state_dict(), resumed.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "b" / "mend.json").read_text())
    assert meta["steps_done"] == 4 and meta["complete"] and meta["validation"]["step"] == 4
    assert not torch.equal(a["edit_lrs"], torch.full_like(a["edit_lrs"], 1e-4))  # it trained

    with pytest.raises(EditscaleError, match="other train_config"):
        MendTrainer(adapter, "tiny", cfg, MendTrainConfig(steps=4, **{**settings, "lr": 1e-2}), records,
                    tmp_path / "b").run(progress=False, say=lambda s: None)


def test_edit_applies_and_removes_exactly_with_input_maps(tmp_path: Path) -> None:
    adapter = _adapter("gpt2")
    cfg = _config()
    editor = _editor(adapter, cfg, build_network(adapter, cfg, edit_lr=1e-2), tmp_path)
    before = adapter.snapshot([1], in_layers=[0, 1])
    result = editor.compute(REQUESTS)  # a batch: one pass, the factors of both requests
    apply_result(adapter, result)
    assert not torch.equal(adapter.get_weight("mlp_in", 0), before.in_weights[0])
    adapter.restore(before)
    assert torch.equal(adapter.get_weight("mlp_in", 0), before.in_weights[0])
    assert torch.equal(adapter.get_mlp_out_weight(1), before.weights[1])


def test_missing_network_says_how_to_train_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDITSCALE_CACHE", str(tmp_path))
    adapter = _adapter("gpt2")
    editor = MendEditor(adapter, _config(), EditContext("tiny"))
    with pytest.raises(EditscaleError, match="editscale train-mend --model tiny"):
        editor.compute(REQUESTS[:1])


@pytest.mark.slow
def test_cli_trains_then_runs_mend_with_its_network(run_cli, tmp_path: Path) -> None:
    # two steps of training on the fact world's training facts, then a run that edits with them: its
    # checkpoint keeps the input maps and its drift rows name them
    net = tmp_path / "net"
    code, out, err = run_cli("train-mend", "--out", str(net), "--steps", "2", "--set", "accumulate=2",
                             "--set", "records=20", "--set", "val_records=4", "--no-progress", "--threads", "1")
    assert code == 0, err
    assert "held-out ES" in out and (net / "mend.safetensors").exists()
    run = tmp_path / "run"
    code, out, err = run_cli("run", "--out", str(run), "--method", "mend", "--mend-weights", str(net),
                             "--dataset", "factworld-insert", "--edits", "4", "--batch-size", "2",
                             "--checkpoint-every", "2", "--eval-every", "2", "--downstream", "none",
                             "--control", "10", "--no-progress", "--threads", "1")
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "edits.jsonl").read_text().splitlines()]
    assert {"3", "4", "5", "mlp_in.3", "mlp_in.4", "mlp_in.5"} == set(rows[-1]["drift"])
    from editscale.run.checkpoint import load_checkpoint
    from editscale.run.store import RunStore

    ckpt = load_checkpoint(RunStore(run))
    assert ckpt is not None and sorted(ckpt.params.in_weights) == [3, 4, 5]
    code, _, err = run_cli("run", "--out", str(tmp_path / "bad"), "--method", "rome", "--mend-weights", str(net),
                           "--edits", "1", "--no-progress")
    assert code != 0 and "--mend-weights is for --method mend" in err


def test_a_network_still_in_training_is_used_only_when_chosen(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDITSCALE_CACHE", str(tmp_path))
    from editscale.methods.base import preset_slug
    from editscale.methods.mend.weights import default_weights_dir
    from editscale.methods.solver.stats import model_fingerprint

    adapter = _adapter("gpt2")
    cfg = _config()
    where = default_weights_dir(preset_slug("tiny"), model_fingerprint(adapter.model))
    save_network(where, build_network(adapter, cfg, edit_lr=1e-3),
                 {"rank": cfg.rank, "n_hidden": cfg.n_hidden, "complete": False, "steps_done": 3, "steps_planned": 9})
    with pytest.raises(EditscaleError, match=r"still training \(3 of 9 steps\)"):
        MendEditor(adapter, cfg, EditContext("tiny")).compute(REQUESTS[:1])
    chosen = MendEditor(adapter, cfg.model_copy(update={"weights": str(where)}), EditContext("tiny"))
    assert set(chosen.compute(REQUESTS[:1]).in_deltas) == {0, 1}


class _Bomb:
    def __reduce__(self):
        import os

        return (os.system, ("touch BOMB_RAN",))


def test_a_published_file_that_would_run_code_is_refused(tmp_path: Path, monkeypatch) -> None:
    from editscale.errors import EditscaleError
    from editscale.methods.mend.weights import _load_checkpoint_pickle

    monkeypatch.chdir(tmp_path)
    file = tmp_path / "mend-evil.pt"
    torch.save({"model": {"gtn.x": torch.ones(1)}, "payload": _Bomb()}, file)
    with pytest.raises(EditscaleError, match="refused to unpickle posix.system|refused to unpickle os.system"):
        _load_checkpoint_pickle(file)
    assert not (tmp_path / "BOMB_RAN").exists()
    (tmp_path / "mend-bad.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(EditscaleError, match="not a readable torch checkpoint"):
        _load_checkpoint_pickle(tmp_path / "mend-bad.pt")


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": 1}', "missing sites"),
])
def test_a_damaged_mend_json_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    from editscale.errors import EditscaleError
    from editscale.methods.mend.weights import FORMAT, META_FILE, _read_meta

    (tmp_path / META_FILE).write_text(text.replace('"format": 1', f'"format": {json.dumps(FORMAT)}'))
    with pytest.raises(EditscaleError, match=message):
        _read_meta(tmp_path / META_FILE)
