"""Hub name or local directory -> (model, tokenizer, adapter), plus the paper's model presets."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from editscale.config_files import read_yaml_mapping
from editscale.errors import EditscaleError
from editscale.models.adapter import ModelAdapter
from editscale.models.families import Family, family_for

EMBEDDED = "embedded"
# Placement strategies accelerate computes from free memory (transformers' from_pretrained device_map).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# Keys accelerate's max_memory accepts besides GPU indices (accelerate utils/modeling.py get_max_memory).
_MEMORY_DEVICES = ("cpu", "disk", "mps")


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


def check_model_name(name_or_path: str | Path) -> None:
    """Fail in one line when a model is neither the embedded model, a preset, a model directory nor
    a name the hub could serve. Looks at nothing remote, so a path typo is named as one offline
    instead of surfacing later as "no hyper-parameters" or the hub client's repo-id complaint."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    name = str(name_or_path)
    if name == EMBEDDED or find_preset(name) is not None:
        return
    path = Path(name)
    if path.is_dir():
        return
    if path.exists():
        raise EditscaleError(f"model '{name}' is a file; pass a model directory (config.json and weights), "
                             "a preset (`editscale models`) or a hub name")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise EditscaleError(f"model directory '{name}' does not exist, and the name is no known preset "
                             "(`editscale models`) or hub name; check the path") from None
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise EditscaleError(f"model '{name}' is no directory, no known preset (`editscale models`) and not in "
                             "the local hub cache (HF_HUB_OFFLINE is set); check the path or download it first")


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


def parse_device_map(value: str | Mapping[str, Any] | None) -> str | dict[str, int | str] | None:
    """A device map as `load_model` takes it: a strategy (auto, balanced, balanced_low_0, sequential),
    a mapping of module names to devices, or the path of a JSON/YAML file holding that mapping.
    Devices are GPU indices, cpu, disk or torch device names (cuda:1)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value in DEVICE_MAP_STRATEGIES:
            return value
        if not Path(value).is_file():
            raise EditscaleError(f"--device-map '{value}' is neither one of {', '.join(DEVICE_MAP_STRATEGIES)} "
                                 "nor a JSON/YAML file")
        try:
            value = read_yaml_mapping(value, "device map")
        except EditscaleError as err:
            raise EditscaleError(_one_line(err)) from err
    if not value:
        raise EditscaleError("--device-map: the mapping of module names to devices is empty")
    return {str(name): _placement(device, name) for name, device in value.items()}


def _placement(device: Any, module: str) -> int | str:
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    if isinstance(device, str):
        text = device.strip()
        if text.isdecimal():
            return int(text)
        if text in ("cpu", "disk"):
            return text
        try:
            if torch.device(text).type != "meta":
                return text
        except RuntimeError:
            pass
    raise EditscaleError(f"--device-map: module '{module}' has device {device!r}; use a GPU index, cpu, disk "
                         "or a torch device such as cuda:1")


def parse_max_memory(value: str | Mapping[Any, Any] | None) -> dict[int | str, int | str] | None:
    """The memory each device may hold, as accelerate's max_memory: from `0=20GiB,cpu=60GiB`, a JSON
    mapping (`{"0": "20GiB", "cpu": "60GiB"}`) or a mapping. Sizes are bytes or strings with a unit."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise EditscaleError(f"--max-memory '{text}' is not valid JSON: {err}") from err
            if not isinstance(value, dict):
                raise EditscaleError(f"--max-memory '{text}' must be a JSON mapping of devices to sizes")
        else:
            pairs = {}
            for item in text.split(","):
                key, sep, size = (part.strip() for part in item.partition("="))
                if not sep or not key or not size:
                    raise EditscaleError(f"--max-memory expects DEVICE=SIZE,... (e.g. 0=20GiB,cpu=60GiB), "
                                         f"got '{item.strip()}'")
                pairs[key] = size
            value = pairs
    if not value:
        raise EditscaleError("--max-memory: no devices given")
    return {_memory_device(key): _memory_size(key, size) for key, size in value.items()}


def _memory_device(key: Any) -> int | str:
    text = str(key).strip()
    if text.isdecimal():
        return int(text)
    if text in _MEMORY_DEVICES:
        return text
    raise EditscaleError(f"--max-memory: unknown device '{key}'; use a GPU index or one of "
                         f"{', '.join(_MEMORY_DEVICES)}")


def _memory_size(key: Any, size: Any) -> int | str:
    from accelerate.utils import convert_file_size_to_int

    if isinstance(size, bool) or not isinstance(size, int | str):
        raise EditscaleError(f"--max-memory: size {size!r} of device '{key}' is not a size such as 20GiB")
    try:
        if convert_file_size_to_int(size) < 0:
            raise ValueError(size)
    except (ValueError, TypeError) as err:
        raise EditscaleError(f"--max-memory: size '{size}' of device '{key}' is not a size such as 20GiB or "
                             "500MB") from err
    return size


def load_model(name_or_path: str | Path, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
               device_map: str | Mapping[str, Any] | None = None, max_memory: str | Mapping[Any, Any] | None = None,
               offload_folder: str | Path | None = None, trust_remote_code: bool = False,
               revision: str | None = None, local_files_only: bool | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer by preset name, hub id or local directory.

    The reference loads fp32 (docs/protocol.md §1.4); half precision is allowed, but editors compute in
    fp32. `device` may be "auto" (CUDA when available). With device_map (needs accelerate; see
    `parse_device_map` for its forms) `device` is ignored and accelerate places the weights over
    GPUs, CPU and disk (docs/protocol.md §1.5), within `max_memory` per device (see
    `parse_max_memory`); `offload_folder` is where weights offloaded to disk are written when they
    cannot be read from the checkpoint's own safetensors files. Parameters are frozen and the
    model is in eval mode.
    """

    name = str(name_or_path)
    check_model_name(name)
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
    if device_map is None and (max_memory is not None or offload_folder is not None):
        given = "--max-memory" if max_memory is not None else "--offload-folder"
        raise EditscaleError(f"{given} only applies with --device-map (e.g. --device-map auto)")
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise EditscaleError("device_map needs the 'accelerate' package: pip install accelerate")
    device_map = parse_device_map(device_map)
    max_memory = parse_max_memory(max_memory)

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
        if max_memory is not None:
            model_kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            model_kwargs["offload_folder"] = str(offload_folder)
    local = Path(source)
    if local.is_dir():
        # Prefer safetensors (no pickle) when the directory has them; otherwise .bin is allowed.
        model_kwargs["use_safetensors"] = True if any(local.glob("*.safetensors")) else None
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except SafetensorError as err:
        raise EditscaleError(f"could not load model '{name}': {_damaged_weights(local, err)}") from err
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


def _damaged_weights(folder: Path, err: BaseException) -> str:
    """The weights file behind a safetensors error, named: safetensors' own message names none."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as bad:
            return f"{f} is damaged or truncated ({_one_line(bad)}); copy or download it again"
    where = f" in {folder}" if files else ""
    return f"a safetensors weights file{where} is damaged or truncated ({_one_line(err)}); copy or download it again"


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


def model_depth(model: str) -> dict[str, Any]:
    """`n_layers` and `family` of a model, from a preset's table or the model's config.json (no
    weights are read); empty when the config cannot be read, so the resolution says what to pass."""
    from transformers import AutoConfig

    from editscale.models.families import family_for

    preset = find_preset(model)
    if preset is not None and preset.n_layers and not Path(model).is_dir():
        return {"n_layers": preset.n_layers, "family": preset.family}
    if model == EMBEDDED:
        return {}
    try:
        config = AutoConfig.from_pretrained(model)
        return {"n_layers": int(config.num_hidden_layers), "family": family_for(config).name}
    except (OSError, ValueError, KeyError, AttributeError, EditscaleError):
        return {}
