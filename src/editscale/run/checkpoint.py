"""A run's checkpoint: what `resume` needs to continue a killed run exactly where it stopped.

`DIR/checkpoint/` is written by `RunStore.save_checkpoint` (a new folder swapped in atomically) and
holds two files:

    weights.safetensors   fp32 tensors
        layer<L>          the MLP-output weight of edited layer L, [d_model, d_mlp]: the adapter's
                          canonical orientation, whatever the family stores (Conv1D or Linear)
        bias<L>           that projection's bias, [d_model], when it has one (FT-C trains it)
        mlp_in<L>         the MLP-input weight of layer L, [d_mlp, d_model], for methods that edit it (MEND)
        editor.<name>     the editor's own state, `Editor.state_dict()` (AlphaEdit: cache_c.layer<L>)
    state.json
        edits_done        edits made when the checkpoint was taken
        history           {"es": [...], "ps": [...], "ns": [...]}: every edit's scores, for the windowed means
        skipped           indices of edits whose update was non-finite and not applied
        tracker           `ForgettingTracker.state_dict()`: the earlier edits and their sticky flags
        checksums         sha256 of every tensor, of the state above and of the rows the checkpoint
                          covers, added and verified by `RunStore` (`load_checkpoint` raises on a
                          mismatch; `RunCheckpoint.state` leaves them out)

Only edited layers are kept, never the whole model: a resumed run (or `editscale skills --model DIR`)
loads the base model and writes these parameters over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from editscale.errors import EditscaleError
from editscale.models.adapter import EditedParams
from editscale.models.loading import LoadedModel, load_model
from editscale.run.config import load_config
from editscale.run.store import RunStore

WEIGHT, BIAS, IN_WEIGHT, EDITOR = "layer", "bias", "mlp_in", "editor."


@dataclass
class RunCheckpoint:
    params: EditedParams  # the edited layers' weights and biases
    editor_state: dict[str, torch.Tensor]
    state: dict[str, Any]  # edits_done, history, skipped, tracker (see the module docstring)

    @property
    def edits_done(self) -> int:
        return int(self.state["edits_done"])


def save_checkpoint(store: RunStore, params: EditedParams, editor_state: dict[str, torch.Tensor],
                    state: dict[str, Any]) -> None:
    tensors = {f"{WEIGHT}{layer}": w.float() for layer, w in params.weights.items()}
    tensors.update({f"{BIAS}{layer}": b.float() for layer, b in params.biases.items()})
    tensors.update({f"{IN_WEIGHT}{layer}": w.float() for layer, w in params.in_weights.items()})
    tensors.update({f"{EDITOR}{name}": t for name, t in editor_state.items()})
    store.save_checkpoint(tensors, state)


def load_checkpoint(store: RunStore) -> RunCheckpoint | None:
    """The run's last checkpoint, or None when it has none yet."""
    found = store.load_checkpoint()
    if found is None:
        return None
    tensors, state = found
    params, editor_state = EditedParams(), {}
    for key, t in tensors.items():
        if key.startswith(EDITOR):
            editor_state[key.removeprefix(EDITOR)] = t
        elif key.startswith(WEIGHT):
            params.weights[int(key.removeprefix(WEIGHT))] = t
        elif key.startswith(BIAS):
            params.biases[int(key.removeprefix(BIAS))] = t
        elif key.startswith(IN_WEIGHT):
            params.in_weights[int(key.removeprefix(IN_WEIGHT))] = t
        else:
            raise EditscaleError(f"{store.root}/checkpoint holds an unknown tensor '{key}'")
    return RunCheckpoint(params, editor_state, state)


def load_run_model(name_or_dir: str | Path, *, device: str = "cpu", device_map: str | None = None,
                   max_memory: str | None = None, offload_folder: str | None = None) -> tuple[LoadedModel, str]:
    """A model by preset, hub name or directory; or a run directory's model at its last checkpoint.

    A run directory's model is placed as its run placed it (device_map, max_memory, offload_folder
    of its config) unless `device_map` is given. Returns the model and a label that says which
    (e.g. "runs/a after 200 edits").
    """
    path = Path(name_or_dir)
    if not (path / "config.yaml").exists():
        return load_model(str(name_or_dir), device=device, device_map=device_map, max_memory=max_memory,
                          offload_folder=offload_folder), str(name_or_dir)
    cfg = load_config(path / "config.yaml")
    if device_map is None:
        device_map, max_memory, offload_folder = cfg.device_map, cfg.max_memory, cfg.offload_folder
    lm = load_model(cfg.model, device=device, dtype=cfg.dtype, device_map=device_map, max_memory=max_memory,
                    offload_folder=offload_folder)
    ckpt = load_checkpoint(RunStore(path))
    if ckpt is None:
        return lm, f"{path} (no checkpoint yet: the unedited {cfg.model})"
    lm.adapter.restore(ckpt.params)
    return lm, f"{path} after {ckpt.edits_done} edits"
