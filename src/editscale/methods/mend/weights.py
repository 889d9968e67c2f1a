"""Where MEND's trained network lives and how it is read: editscale's own layout (written by
`editscale train-mend`) and the reference's published checkpoints.

editscale's layout, a directory:

    mend.safetensors   the network's state dict (`MendNetwork`: "mend.(in, out).…", "edit_lrs")
    mend.json          model, weight fingerprint, sites, shapes, rank, n_hidden, steps done, training config
    checkpoint.pt      the trainer's resumable state (network, optimisers, step); not needed to edit

A published checkpoint (`mend-10tok-gpt2-xl.pt`, `mend-1tok-counterfact-gpt2-xl.pt`, ... from the
ROME/MEMIT projects' weight servers, trained by eric-mitchell/mend) is a `torch.save` pickle of
{"model": state dict, "opt": ..., ...}: the MEND module's state dict without the base model's
weights, with its config under "model_config" and, in the released files, the prefix "gtn." where
the code now says "mend.". Its sites are not stored: they come from the method config (layers,
in_layers, order), and every shape and mode count is checked against the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from editscale.config_files import cache_root
from editscale.errors import EditscaleError
from editscale.methods.mend.config import MendConfig
from editscale.methods.mend.network import MendNetwork, shape_key
from editscale.methods.solver.gradients import Site
from editscale.models.adapter import ModelAdapter

log = logging.getLogger(__name__)

WEIGHTS_FILE, META_FILE, TRAIN_FILE = "mend.safetensors", "mend.json", "checkpoint.pt"
FORMAT = "editscale-mend/1"


def default_weights_dir(model_slug: str, fingerprint: str) -> Path:
    """Where `editscale train-mend` puts a model's network unless told otherwise: keyed by the
    model's weight fingerprint, so another path to the same weights finds it."""
    return cache_root() / "mend" / f"{model_slug}-{fingerprint}"


def site_shapes(adapter: ModelAdapter, sites: list[Site]) -> list[tuple[int, int]]:
    """(in, out) of every edited map: the reference's shape-group key, whatever the storage."""
    shapes = []
    for role, layer in sites:
        out_dim, in_dim = adapter.get_weight(role, layer).shape
        shapes.append((in_dim, out_dim))
    return shapes


def build_network(adapter: ModelAdapter, cfg: MendConfig, *, edit_lr: float, seed: int = 0) -> MendNetwork:
    """A fresh network (the identity map: its blocks start with U = 0) for the config's sites."""
    sites = cfg.sites()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # V is drawn at random: the same seed gives the same network
        return MendNetwork(sites, site_shapes(adapter, sites), rank=cfg.rank, n_hidden=cfg.n_hidden, edit_lr=edit_lr)


def save_network(out: Path, network: MendNetwork, meta: dict[str, Any]) -> None:
    """Write the network and its description into `out` (each file swapped in whole)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{WEIGHTS_FILE}.{os.getpid()}.tmp"
    save_file({k: v.detach().contiguous() for k, v in network.state_dict().items()}, str(tmp))
    os.replace(tmp, out / WEIGHTS_FILE)
    body = {"format": FORMAT, "sites": [list(s) for s in network.sites], "shapes": [list(s) for s in network.shapes],
            **meta}
    tmp = out / f"{META_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, out / META_FILE)


def _published_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".pt":
        return path
    if path.is_dir():
        found = sorted(path.glob("mend-*.pt"))
        if len(found) > 1:
            raise EditscaleError(f"{path} holds several published MEND files ({', '.join(p.name for p in found)}); "
                                 "name one")
        return found[0] if found else None
    return None


def load_network(adapter: ModelAdapter, cfg: MendConfig, path: Path) -> tuple[MendNetwork, dict[str, Any]]:
    """The trained network at `path` (editscale's directory, a published .pt file or a directory holding
    one) for the config's sites on this model, and its description."""
    if not path.exists():
        raise EditscaleError(f"MEND weights {path} do not exist")
    if (path / META_FILE).exists():
        return _load_own(adapter, cfg, path)
    published = _published_file(path)
    if published is None:
        raise EditscaleError(f"{path} holds neither {META_FILE} (editscale train-mend) nor a published mend-*.pt")
    return _load_published(adapter, cfg, published)


def _read_meta(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EditscaleError(f"{file}: not readable JSON ({str(err).splitlines()[0]}); the file was damaged") from None
    if not isinstance(meta, dict):
        raise EditscaleError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise EditscaleError(f"{file}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    missing = [k for k in ("sites", "shapes", "rank", "n_hidden") if k not in meta]
    if missing:
        raise EditscaleError(f"{file}: missing {', '.join(missing)}; the file was damaged or edited")
    return meta


def _load_checkpoint_pickle(file: Path) -> Any:
    """A published checkpoint, read by torch's weights-only unpickler: tensors and plain data, plus
    the transformers configuration object the released files keep under "model_config". Any other
    global (a function a crafted file would call) is refused by name, before anything is unpickled."""
    import importlib

    from transformers import PretrainedConfig

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except Exception as err:  # noqa: BLE001 - a damaged archive fails in zipfile, pickle or torch
        raise EditscaleError(f"{file}: not a readable torch checkpoint ({type(err).__name__})") from None
    allowed = []
    for name in names:
        module, _, attr = name.rpartition(".")
        found = None
        if module.startswith("transformers."):
            with contextlib.suppress(ImportError, AttributeError):
                found = getattr(importlib.import_module(module), attr)
        if not (isinstance(found, type) and issubclass(found, PretrainedConfig)):
            raise EditscaleError(f"{file}: refused to unpickle {name}: a MEND checkpoint holds tensors, plain data "
                                 "and a transformers config, nothing that runs code")
        allowed.append(found)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise EditscaleError(f"{file}: cannot load it ({type(err).__name__}: {reason[:200]})") from None


def _load_own(adapter: ModelAdapter, cfg: MendConfig, path: Path) -> tuple[MendNetwork, dict[str, Any]]:
    meta = _read_meta(path / META_FILE)
    try:
        sites = [(str(r), int(layer)) for r, layer in meta["sites"]]
        [tuple(s) for s in meta["shapes"]]
        int(meta["rank"]), int(meta["n_hidden"])
    except (TypeError, ValueError):
        raise EditscaleError(f"{path / META_FILE}: sites, shapes, rank or n_hidden malformed; the file was damaged "
                             "or edited") from None
    if sites != cfg.sites():
        raise EditscaleError(f"the MEND network in {path} edits {_names(sites)}, but the method config asks for "
                             f"{_names(cfg.sites())}; set layers / in_layers / order to match")
    shapes = site_shapes(adapter, sites)
    if [tuple(s) for s in meta["shapes"]] != shapes:
        raise EditscaleError(f"the MEND network in {path} was trained for maps of shapes {meta['shapes']}, "
                             f"this model's are {[list(s) for s in shapes]}")
    network = MendNetwork(sites, shapes, rank=int(meta["rank"]), n_hidden=int(meta["n_hidden"]), edit_lr=0.0)
    _fill(network, load_file(str(path / WEIGHTS_FILE)), path / WEIGHTS_FILE)
    return network, meta


def _load_published(adapter: ModelAdapter, cfg: MendConfig, file: Path) -> tuple[MendNetwork, dict[str, Any]]:
    saved = _load_checkpoint_pickle(file)
    state = saved.get("model", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise EditscaleError(f"{file} is not a MEND checkpoint (no state dict under 'model')")
    tensors = {k.replace("gtn.", "mend.", 1): v for k, v in state.items()
               if isinstance(v, torch.Tensor) and not k.startswith("model.")}
    sites = cfg.sites()
    shapes = site_shapes(adapter, sites)
    groups = sorted({k.split(".")[1] for k in tensors if k.startswith("mend.")})
    expected = sorted({shape_key(*s) for s in shapes})
    if groups != expected:
        raise EditscaleError(f"{file} holds networks for map shapes {groups}, but layers {cfg.layers} / in_layers "
                             f"{cfg.in_layers} of this model have {expected}")
    if "edit_lrs" not in tensors or tensors["edit_lrs"].numel() != len(sites):
        n = tensors["edit_lrs"].numel() if "edit_lrs" in tensors else 0
        raise EditscaleError(f"{file} has {n} step sizes, but the method config edits {len(sites)} maps "
                             f"({_names(sites)})")
    first = f"mend.{groups[0]}.mlp.layers."
    n_blocks = len({k[len(first):].split(".")[0] for k in tensors if k.startswith(first)})
    rank = int(tensors[f"{first}0.u"].shape[1])
    network = MendNetwork(sites, shapes, rank=rank, n_hidden=n_blocks - 1, edit_lr=0.0)
    _fill(network, tensors, file)
    meta = {"published": str(file), "rank": rank, "n_hidden": n_blocks - 1, "step": saved.get("step")}
    log.info("loaded published MEND weights %s (rank %d, %d blocks) for %s", file, rank, n_blocks, _names(sites))
    return network, meta


def _fill(network: MendNetwork, tensors: dict[str, torch.Tensor], source: Path) -> None:
    missing = sorted(set(network.state_dict()) - set(tensors))
    unexpected = sorted(set(tensors) - set(network.state_dict()))
    if missing or unexpected:
        raise EditscaleError(f"{source} does not fit MEND's network: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
    try:
        network.load_state_dict(tensors)
    except RuntimeError as e:  # a shape mismatch (another model, another number of modes)
        raise EditscaleError(f"{source} does not fit MEND's network for this model: {str(e).splitlines()[-1].strip()}"
                             ) from None


def _names(sites: list[Site]) -> str:
    return ", ".join(f"{role} {layer}" for role, layer in sites)
