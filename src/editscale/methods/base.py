"""The one interface every editing method implements, and the registry that finds them by name.

An editor *computes* weight deltas for a list of requests and leaves the model as it found it; the
runner applies them (`apply_deltas`). Splitting the two lets the runner check an update for
NaN/inf before it touches the model, keep the original weights for drift, and checkpoint only
the edited layers. Methods that are sequential by construction (ROME edits request after request)
apply their own intermediate updates inside `compute` and restore the weights before returning,
exactly as the reference's `execute_rome` does.

Deltas are in the adapter's canonical orientation: one [d_model, d_mlp] fp32 matrix per edited
MLP-output layer, whatever the storage (Conv1D or Linear) of the family.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from editscale.config_files import read_yaml_mapping
from editscale.data.records import EditRecord
from editscale.errors import EditscaleError, UnknownNameError
from editscale.methods.config import MethodConfig
from editscale.models.adapter import ModelAdapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditRequest:
    """One fact rewrite: `prompt` holds "{}" where `subject` goes; targets carry no leading space."""

    case_id: int
    prompt: str
    subject: str
    target_new: str
    target_true: str

    @classmethod
    def from_record(cls, record: EditRecord) -> EditRequest:
        return cls(record.case_id, record.prompt, record.subject, record.target_new.strip(),
                   record.target_true.strip())


@dataclass
class EditResult:
    deltas: dict[int, torch.Tensor]  # layer -> canonical [d_model, d_mlp] fp32 delta
    diagnostics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    # layer -> [d_model] fp32 delta of the MLP-output bias (FT-C trains it; closed-form methods never do)
    bias_deltas: dict[int, torch.Tensor] = field(default_factory=dict)
    # layer -> [d_mlp, d_model] fp32 delta of the MLP-input map (MEND edits both maps of a block)
    in_deltas: dict[int, torch.Tensor] = field(default_factory=dict)

    def all_finite(self) -> bool:
        return not self.nonfinite_parts()

    def nonfinite_parts(self) -> list[str]:
        """The edited parameters whose delta holds NaN or inf, by drift name ("3", "mlp_in.3")."""
        parts = [*((str(k), d) for k, d in self.deltas.items()), *((str(k), d) for k, d in self.bias_deltas.items()),
                 *((in_name(k), d) for k, d in self.in_deltas.items())]
        return sorted({name for name, d in parts if not bool(torch.isfinite(d).all())})


def in_name(layer: int) -> str:
    """How an MLP-input map is named in drift rows and diagnostics (an output map is named by its layer)."""
    return f"mlp_in.{layer}"


def preset_slug(model_name: str) -> str:
    """File-name form of a model name: "EleutherAI/gpt-j-6b" -> "gpt-j-6b"."""
    return re.sub(r"[^a-z0-9.-]+", "-", model_name.split("/")[-1].lower()).strip("-")


class Editor(ABC):
    """Computes weight deltas for edit requests. Subclasses set `name` and `config_class`.

    `context` carries the inputs that must be comparable across runs and implementations:
    context templates, second-moment statistics and the seed (see `solver.context`).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    presets_dir: ClassVar[Path | None] = None  # folder of <model-slug>.yaml published defaults
    summary: ClassVar[str] = ""  # one line for `editscale methods`
    supports_batch: ClassVar[bool] = True  # False: compute() refuses more than one request

    def __init__(self, adapter: ModelAdapter, config: MethodConfig, context: Any) -> None:
        for layer in config.layers:
            if not 0 <= layer < adapter.n_layers:
                raise EditscaleError(f"{self.name}: layer {layer} is outside the model's 0..{adapter.n_layers - 1}")
        self.adapter = adapter
        self.config = config
        self.context = context
        self._prepared = False

    def prepare(self) -> None:
        """Compute what must come from the unedited model (templates, statistics, projections).

        The runner calls this once before any edit and before a resumed run loads its checkpoint.
        """
        return None

    def ensure_prepared(self) -> None:
        """`prepare()` once. Every `compute()` starts with this: MEMIT-family updates write earlier
        layers while they go, and statistics first needed there would come from a half-edited model."""
        if not self._prepared:
            self.prepare()
            self._prepared = True

    @abstractmethod
    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """Deltas for the requests, as if applied in one go; the model is unchanged on return."""

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        """Called by the runner right after it has added `result.deltas` (from `compute(requests)`)
        to the model, for methods that remember something about the edited model between batches
        (AlphaEdit accumulates the applied keys). The model must be left as it is. Default: nothing.
        """
        return None

    @property
    def in_layers(self) -> list[int]:
        """Blocks whose MLP-input map this editor writes (`EditResult.in_deltas`); most edit only the
        output map of `config.layers`. The runner snapshots, checkpoints and measures drift of both."""
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State that must survive a resume besides the weights (saved with the run's checkpoint).

        Empty for stateless methods. Tensors only, so the runner can store them with safetensors.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_dict()` output; called after `prepare()` when a run resumes."""
        if state:
            raise EditscaleError(f"method {self.name} keeps no state, but was given {', '.join(sorted(state))}")

    def check_batch(self, requests: Sequence[EditRequest]) -> None:
        if len(requests) > 1 and not self.supports_batch:
            raise EditscaleError(f"method {self.name} edits one fact at a time; use --batch-size 1")

    @classmethod
    def default_config(cls, model_name: str) -> MethodConfig:
        """The published hyper-parameters for a model preset (`<presets_dir>/<slug>.yaml`)."""
        return resolve_method_config(cls.name, model_name)


def preset_names(cls: type[Editor]) -> list[str]:
    """The model slugs a method ships presets for."""
    return sorted(p.stem for p in cls.presets_dir.glob("*.yaml")) if cls.presets_dir else []


def preset_mapping(cls: type[Editor], model_name: str) -> dict[str, Any] | None:
    """A method's preset for a model as a mapping (None when it has none). A preset that starts with
    `extends: <method>` holds only what differs from that method's preset for the same model."""
    if cls.presets_dir is None:
        return None
    path = cls.presets_dir / f"{preset_slug(model_name)}.yaml"
    if not path.exists():
        return None
    data = read_yaml_mapping(path, "method preset")
    base = data.pop("extends", None)
    if base is None:
        return data
    parent = preset_mapping(get_method(str(base)), model_name)
    if parent is None:
        raise EditscaleError(f"{path} extends the {base} preset for '{model_name}', which does not exist")
    return {**parent, **data}


def resolve_method_config(method: str, model_name: str, given: Mapping[str, Any] | None = None, *,
                          n_layers: int | None = None, family: str | None = None) -> MethodConfig:
    """The hyper-parameters of a run: the method's preset for the model, then `given` over it.

    The one place a method config is resolved (`editscale run`, `demo`, `resume` and the Python
    API all come here, through the runner). A model without a preset gets the generic preset
    (`generic_preset`): its depth (`n_layers`, `family`) picks the layers unless `given` names them.
    """
    cls = get_method(method)
    given = dict(given or {})
    preset = preset_mapping(cls, model_name)
    if preset is None:
        preset = generic_preset(cls, model_name, given, n_layers=n_layers, family=family)
    return cls.config_class.parse({**preset, **given}, source=f"{cls.name} method config")


GENERIC_PRESET = "gpt2-xl"  # the paper's model, which every method ships a preset for


def generic_preset(cls: type[Editor], model_name: str, given: Mapping[str, Any], *, n_layers: int | None,
                   family: str | None) -> dict[str, Any]:
    """The hyper-parameters of a model without a preset (docs/protocol.md §2.8.1): the method's
    GPT-2 XL preset, its loss read from the model's own logits, and its layers from `given` or
    else by `depth_rule_layers`. Logs one line saying what was chosen."""
    generic = preset_mapping(cls, GENERIC_PRESET)
    if generic is None and given:
        return {}  # a method with no presets at all (a user's own): its config class checks what was given
    if generic is None or ("layers" not in given and n_layers is None):
        raise EditscaleError(
            f"no {cls.name} hyper-parameters for model '{model_name}'; presets: {', '.join(preset_names(cls))}. "
            "Pass --set layers=[...] or --method-config FILE.yaml")
    generic = dict(generic)
    if "v_loss_layer" in generic:
        generic["v_loss_layer"] = None  # GPT-2 XL's last block (47); None is any model's last block
    if "layers" in given:
        how = f"layers {list(given['layers'])} as given"
    else:
        generic["layers"] = depth_rule_layers(len(generic["layers"]), int(n_layers or 0), family)
        if generic.get("in_layers"):  # a method that also edits input maps (MEND) edits the same blocks'
            generic["in_layers"] = generic["layers"]
        how = f"layers {generic['layers']} of {n_layers} by the depth rule (docs/protocol.md §2.8.1)"
    log.warning("no %s preset for model '%s': %s, the other hyper-parameters from its %s preset",
                cls.name, model_name, how, GENERIC_PRESET)
    return generic


def depth_rule_layers(window: int, n_layers: int, family: str | None) -> list[int]:
    """Edit layers for a model without a preset (docs/protocol.md §2.8.1).

    The last edited layer sits at the relative depth ROME edits in the deepest model preset of the
    model's family (GPT-2 XL 17/48, GPT-J 5/28, GPT-NeoX-20B 15/44, Llama-2 5/32; 1/5 for a family
    without one), rounded half up. A method whose GPT-2 XL preset edits `window` layers (MEMIT's 5 of
    48) edits a range ending there, that window scaled to the depth (rounded half up, at least 1).
    """
    from editscale.models.loading import find_preset, list_presets

    known = [(p.rome_layer, p.n_layers) for p in list_presets()
             if p.family == family and p.rome_layer is not None and p.n_layers]
    rome_layer, depth = max(known, key=lambda rd: rd[1], default=(1, 5))
    last = min(n_layers - 1, math.floor(rome_layer / depth * n_layers + 0.5))
    generic_depth = find_preset(GENERIC_PRESET).n_layers or 48  # type: ignore[union-attr]
    width = max(1, math.floor(window * n_layers / generic_depth + 0.5))
    return list(range(max(0, last - width + 1), last + 1))


def apply_deltas(adapter: ModelAdapter, deltas: dict[int, torch.Tensor], *, sign: float = 1.0) -> None:
    """Add (sign=+1) or remove (sign=-1) canonical deltas to the live MLP-output weights."""
    for layer, delta in deltas.items():
        adapter.add_to_mlp_out_weight(layer, sign * delta)


def apply_bias_deltas(adapter: ModelAdapter, bias_deltas: dict[int, torch.Tensor], *, sign: float = 1.0) -> None:
    """Add (sign=+1) or remove (sign=-1) bias deltas of the MLP-output projections, summed in fp32."""
    for layer, delta in bias_deltas.items():
        adapter.add_to_mlp_out_bias(layer, sign * delta)


def apply_result(adapter: ModelAdapter, result: EditResult, *, sign: float = 1.0) -> None:
    """Write (sign=+1) or remove (sign=-1) everything an edit changes: weights, biases, input maps."""
    apply_deltas(adapter, result.deltas, sign=sign)
    apply_bias_deltas(adapter, result.bias_deltas, sign=sign)
    for layer, delta in result.in_deltas.items():
        adapter.add_to_weight("mlp_in", layer, sign * delta)


_METHODS: dict[str, type[Editor]] = {}
E = TypeVar("E", bound=type[Editor])


def register(cls: E) -> E:
    """Class decorator: make an editor available by its `name`."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_builtin_methods() -> None:
    # Importing a method's package registers it; done on first lookup so that importing the
    # registry does not load every method. Every folder of editscale/methods with an __init__.py
    # is a method, except the shared solver.
    for pkg in sorted(Path(__file__).parent.iterdir()):
        if pkg.name != "solver" and (pkg / "__init__.py").exists():
            importlib.import_module(f"editscale.methods.{pkg.name}")


def get_method(name: str) -> type[Editor]:
    _load_builtin_methods()
    try:
        return _METHODS[name.lower()]
    except KeyError:
        raise UnknownNameError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}") from None


def list_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)

