"""UltraEdit (docs/protocol.md §6.1): each update against its equation, computed here independently on a
tiny model, and its lifelong normaliser carried exactly from batch to batch and through a resume."""

from __future__ import annotations

import pytest
import torch

from editscale.errors import EditscaleError
from editscale.methods.base import EditRequest, apply_deltas
from editscale.methods.solver.context import EditContext
from editscale.methods.ultraedit import UltraEditConfig, UltraEditEditor
from editscale.models.adapter import ModelAdapter
from tiny_models import byte_bpe_tokenizer, tiny_model

REQUESTS = [
    EditRequest(0, "{} plays the", "Danielle Darrieux", "violin", "piano"),
    EditRequest(1, "{} was born in", "Toko Yasuda", "London", "Paris"),
    EditRequest(2, "The mother tongue of {} is", "Thomas Joannes Stieltjes", "English", "Dutch"),
]
LAYERS = [0, 1]


def features(model, tok, requests) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """c_proj inputs and d(mean CE over the answer tokens)/d(c_proj output) at the answer positions."""
    keys: dict[int, list] = {layer: [] for layer in LAYERS}
    grads: dict[int, list] = {layer: [] for layer in LAYERS}
    for r in requests:  # one request per chunk (chunk=1 below), so no padding to think about
        prompt_ids = tok(r.prompt.format(r.subject))["input_ids"]
        target_ids = tok(" " + r.target_new)["input_ids"]
        ids = torch.tensor([prompt_ids + target_ids])
        outputs, inputs = {}, {}
        hooks = [model.transformer.h[layer].mlp.c_proj.register_forward_hook(
            lambda m, a, o, layer=layer, i=inputs, out=outputs: i.update({layer: a[0]}) or out.update({layer: o}))
            for layer in LAYERS]
        for p in model.parameters():
            p.requires_grad_(True)
        logits = model(input_ids=ids).logits[0]
        for h in hooks:
            h.remove()
        at = list(range(len(prompt_ids) - 1, len(prompt_ids) + len(target_ids) - 1))
        loss = torch.nn.functional.cross_entropy(logits[at], torch.tensor(target_ids))
        got = torch.autograd.grad(loss, [outputs[layer] for layer in LAYERS])
        for p in model.parameters():
            p.requires_grad_(False)
        for layer, g in zip(LAYERS, got, strict=True):
            keys[layer].append(inputs[layer][0, at].detach().double())
            grads[layer].append(g[0, at].double())
    return {k: torch.cat(v) for k, v in keys.items()}, {k: torch.cat(v) for k, v in grads.items()}


def expected_deltas(keys, grads, history: torch.Tensor, lr: float, d_mlp: int) -> dict[int, torch.Tensor]:
    rows = torch.cat([history] + [torch.cat([keys[layer], grads[layer]], dim=1) for layer in LAYERS])
    mean, std = rows.mean(dim=0), rows.std(dim=0)  # every row seen so far, this batch's included
    out = {}
    for layer in LAYERS:
        z = (torch.cat([keys[layer], grads[layer]], dim=1) - mean) / (std + torch.finfo(torch.float32).eps)
        k_hat, g_hat = z[:, :d_mlp], z[:, d_mlp:]
        v = -lr * (k_hat**2).sum(dim=1, keepdim=True) * g_hat
        k = keys[layer]
        # the ridge regression of v on the raw keys: argmin ‖K X − V‖² + ‖X‖², X = ΔWᵀ
        x = torch.linalg.lstsq(torch.cat([k, torch.eye(d_mlp, dtype=torch.float64)]),
                               torch.cat([v, torch.zeros(d_mlp, v.shape[1], dtype=torch.float64)])).solution
        out[layer] = x.T
    return out


def test_each_update_is_its_equation_and_the_normaliser_runs_on() -> None:
    tok = byte_bpe_tokenizer()
    model = tiny_model("gpt2", len(tok))
    adapter = ModelAdapter(model, tok)
    cfg = UltraEditConfig(layers=LAYERS, lr=0.3, chunk=1)
    editor = UltraEditEditor(adapter, cfg, EditContext("tiny"))
    d_mlp = adapter.d_mlp

    keys, grads = features(model, tok, REQUESTS[:2])
    first = editor.compute(REQUESTS[:2])
    want = expected_deltas(keys, grads, torch.zeros(0, d_mlp + adapter.d_model, dtype=torch.float64), 0.3, d_mlp)
    for layer in LAYERS:
        torch.testing.assert_close(first.deltas[layer].double(), want[layer], rtol=2e-4, atol=1e-9)
    assert float(editor.moments.n) == 0  # computed, not yet applied: nothing carried
    apply_deltas(adapter, first.deltas)
    editor.after_apply(REQUESTS[:2], first)
    history = torch.cat([torch.cat([keys[layer], grads[layer]], dim=1) for layer in LAYERS])
    assert float(editor.moments.n) == history.shape[0]

    # a resumed editor continues exactly: the next batch is standardised by both batches' rows
    resumed = UltraEditEditor(adapter, cfg, EditContext("tiny"))
    resumed.load_state_dict(editor.state_dict())
    keys2, grads2 = features(model, tok, REQUESTS[2:])
    second = resumed.compute(REQUESTS[2:])
    want = expected_deltas(keys2, grads2, history, 0.3, d_mlp)
    for layer in LAYERS:
        torch.testing.assert_close(second.deltas[layer].double(), want[layer], rtol=2e-4, atol=1e-9)
        assert torch.equal(second.deltas[layer], editor.compute(REQUESTS[2:]).deltas[layer])
    with pytest.raises(EditscaleError, match="ultraedit state must hold"):
        resumed.load_state_dict({})
    with pytest.raises(EditscaleError, match="warm_start needs records"):
        UltraEditEditor(adapter, UltraEditConfig(layers=LAYERS, warm_start=2), EditContext("tiny")).prepare()
