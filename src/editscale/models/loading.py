"""Hub name or local directory -> (model, tokenizer, adapter), plus the paper's model presets."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from editscale.errors import EditscaleError
from editscale.models.adapter import ModelAdapter
from editscale.models.families import Family, family_for

EMBEDDED = "embedded"


@dataclass(frozen=True)
class Preset:
    """A model the paper (or its follow-ups) edited, with the facts needed to check and edit it.

    Shape facts are None where they are only known after loading (the embedded checkpoint).
    `rome_layer` is the 0-based block ROME edits in the reference hparams (the paper counts layers
    from 1: its layer 18 of GPT-2 XL is block 17).
    """

    name: str
    source: str | None  # hub id; None when resolved to a local directory at load time
    family: str | None
    n_layers: int | None
    d_model: int | None
    d_mlp: int | None
    rome_layer: int | None
    note: str = ""


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("gpt2-medium", "openai-community/gpt2-medium", "gpt2", 24, 1024, 4096, 8),
    Preset("gpt2-large", "openai-community/gpt2-large", "gpt2", 36, 1280, 5120, 12),
    Preset("gpt2-xl", "openai-community/gpt2-xl", "gpt2", 48, 1600, 6400, 17, "paper: layer 18"),
    Preset("EleutherAI/gpt-j-6b", "EleutherAI/gpt-j-6b", "gptj", 28, 4096, 16384, 5, "paper: layer 6"),
    Preset("EleutherAI/gpt-neox-20b", "EleutherAI/gpt-neox-20b", "gpt_neox", 44, 6144, 24576, 15,
           "ROME only"),
    Preset("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", "llama", 32, 4096, 11008, 5,
           "layer as in UME (EMMET/MEMIT); gated on the hub"),
    Preset(EMBEDDED, None, None, None, None, None, None, "small model shipped with editscale (factworld)"),
)}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    adapter: ModelAdapter
    family: Family
    preset: Preset | None
    name: str  # the id caches and results are keyed on (preset name, hub id or directory)
    source: str  # what from_pretrained was given


def list_presets() -> list[Preset]:
    return list(PRESETS.values())


def find_preset(name: str) -> Preset | None:
    """The preset called `name` (case-insensitive, so "gpt-j-6B" and "gpt-j-6b" both match)."""
    lowered = name.lower()
    for preset in PRESETS.values():
        if lowered in (preset.name.lower(), (preset.source or "").lower()):
            return preset
    return None


def embedded_checkpoint_dir() -> Path:
    """Where the shipped embedded checkpoint lies: package data of `editscale.embedded`, found by
    path so that loading a model does not import the trainer that owns it."""
    return Path(str(resources.files("editscale"))) / "embedded" / "checkpoint"


def _embedded_dir() -> Path:
    path = embedded_checkpoint_dir()
    if not (path / "config.json").is_file():
        raise EditscaleError(f"the embedded model checkpoint is missing: {path} holds no config.json")
    return path


def model_key(name_or_path: str | Path) -> str:
    """The name presets, caches and results are keyed on: a preset's canonical name, else the
    name or directory as given."""
    name = str(name_or_path)
    preset = find_preset(name)
    if name != EMBEDDED and Path(name).is_dir():
        return name
    return preset.name if preset is not None else name


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise EditscaleError(f"unknown dtype '{dtype}'; use one of: auto, {', '.join(table)}")
    return table[dtype]


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_model(name_or_path: str | Path, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
               device_map: str | dict[str, Any] | None = None, trust_remote_code: bool = False,
               revision: str | None = None, local_files_only: bool | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer by preset name, hub id or local directory.

    The reference loads fp32 (docs/protocol.md §1.4); half precision is allowed, but editors compute in
    fp32. `device` may be "auto" (CUDA when available). With device_map (e.g. "auto", needs
    accelerate) `device` is ignored and accelerate places the weights. Parameters are frozen and
    the model is in eval mode.
    """

    name = str(name_or_path)
    model_name = model_key(name)
    preset = find_preset(name)
    if name == EMBEDDED:
        source = str(_embedded_dir())
    elif Path(name).is_dir():
        source = name
        preset = None
    elif preset is not None and preset.source is not None:
        source = preset.source
    else:
        source = name  # an unknown hub id: let transformers try
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise EditscaleError("device_map needs the 'accelerate' package: pip install accelerate")

    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        common["revision"] = revision
    if local_files_only is not None:
        common["local_files_only"] = local_files_only

    try:
        config = AutoConfig.from_pretrained(source, **common)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise EditscaleError(f"could not load model '{name}': {_one_line(err)}") from err
    # Check the family before reading gigabytes of weights.
    family = family_for(config)

    model_kwargs: dict[str, Any] = dict(common)
    model_kwargs[_dtype_keyword()] = _torch_dtype(dtype)
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    local = Path(source)
    if local.is_dir():
        # Prefer safetensors (no pickle) when the directory has them; otherwise .bin is allowed.
        model_kwargs["use_safetensors"] = True if any(local.glob("*.safetensors")) else None
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as err:
        raise EditscaleError(f"could not load model '{name}': {_one_line(err)}") from err

    if device_map is None:
        model = model.to(_pick_device(device))
    model.eval()
    model.requires_grad_(False)
    # This tokenizer is ours, so following the reference (pad = EOS, right padding) surprises no one.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"

    adapter = ModelAdapter(model, tokenizer, family, name=model_name)
    if preset is not None:
        _check_preset(preset, adapter)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, family=family, preset=preset,
                       name=model_name, source=source)


def _pick_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype_keyword() -> str:
    # transformers renamed torch_dtype to dtype in 4.56; older releases reject the new name.

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _check_preset(preset: Preset, adapter: ModelAdapter) -> None:
    # A preset's layer numbers are only meaningful for the architecture they were written for.
    expected = {"family": preset.family, "n_layers": preset.n_layers, "d_model": preset.d_model,
                "d_mlp": preset.d_mlp}
    actual = {"family": adapter.family.name, "n_layers": adapter.n_layers, "d_model": adapter.d_model,
              "d_mlp": adapter.d_mlp}
    wrong = [f"{k}={actual[k]} (expected {v})" for k, v in expected.items()
             if v is not None and actual[k] != v]
    if wrong:
        raise EditscaleError(f"model '{preset.name}' does not match its preset: {', '.join(wrong)}")
