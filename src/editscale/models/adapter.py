"""ModelAdapter: the one place that knows how a HF causal LM is laid out and tokenised.

Editors (ROME, MEMIT, ...) and evaluators talk to the model only through this class, so that no
method hard-codes module paths, weight orientation, padding or BOS handling. Nothing in here is
method-specific: it reads keys and values at a token, writes the MLP output matrix, and adds a
vector to a module's output at a token.

Conventions
- Batches are right-padded (docs/protocol.md §1.3), so position p of a row means the same token whether or
  not the row is padded. Negative positions are refused by the hooks because -1 would be padding.
- The MLP output matrix is always exchanged in the math orientation W [d_model, d_mlp] (v = W k + b),
  whatever the storage (Conv1D [in, out] or Linear [out, in]).
- Token positions come from tokenising the full string with character offsets, special tokens
  included (docs/protocol.md §10.8), so they index exactly the sequences that `encode` builds.
- A model placed by accelerate (a device map, CPU or disk offload) is edited where its weights
  live: an offloaded module's parameters sit on `meta` and their values in its hook's weights map,
  which is where edited layers are read from and written to (docs/protocol.md §1.5).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers import BatchEncoding

from editscale.errors import EditscaleError, UnknownNameError
from editscale.models.families import LAYER_ROLES, SPACING_OFFSETS, Family, family_for

SUBJECT_MODES = ("subject_last", "subject_first", "subject_first_after_last", "last")
# Module roles whose output has the hidden size and can be read or shifted at a token.
SITES = {"mlp": "mlp", "mlp_out": "mlp_out", "attn": "attn", "block": "block"}
EDIT_ROLES = ("mlp_out", "mlp_in")  # the linear maps editors may write (get_weight / add_to_weight)
_SHAPES = {"mlp_out": "[d_model, d_mlp]", "mlp_in": "[d_mlp, d_model]"}  # their canonical [out, in]
# A target scored without a prompt still needs a word before it, because SentencePiece and
# byte-level tokenizers only agree on how " Paris" splits once a space separates it from something.
_TARGET_ANCHOR = "A"

Positions = int | Sequence[int] | torch.Tensor
Inputs = str | Sequence[str] | Mapping[str, Any]


class _StopForward(Exception):
    """Raised inside a hook to abandon a forward pass once the module of interest has run."""


@dataclass
class ScoringBatch:
    """`prompt + " " + target` strings laid out for teacher-forced scoring (docs/protocol.md §8.1).

    Row i is scored by comparing logits[i, prefix_lens[i] + j - 1] with target_ids[i][j]. The
    prefix length counts a BOS token when the tokenizer adds one.
    """

    texts: list[str]
    input_ids: torch.Tensor  # [n, seq], right-padded
    attention_mask: torch.Tensor  # [n, seq]
    prefix_lens: list[int]
    target_ids: list[list[int]]

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


@dataclass
class Recording:
    """Outputs read by `ModelAdapter.record`, one [n_rows, d_model] fp32 tensor per forward pass."""

    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def last(self) -> torch.Tensor:
        if not self.outputs:
            raise EditscaleError("nothing was recorded: no forward pass ran inside the record() block")
        return self.outputs[-1]


@dataclass
class EditedParams:
    """Copies of edited parameters: MLP-output weights in the canonical [d_model, d_mlp] orientation,
    their biases [d_model], and MLP-input weights [d_mlp, d_model], all fp32. Taken by
    `ModelAdapter.snapshot`, written back by `restore` exactly (fp32 holds every half-precision value)."""

    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    biases: dict[int, torch.Tensor] = field(default_factory=dict)
    in_weights: dict[int, torch.Tensor] = field(default_factory=dict)  # MLP-input maps, [d_mlp, d_model]


class ModelAdapter:
    """Method-agnostic access to one loaded causal LM and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: Any, family: Family | None = None,
                 *, name: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.family = family if family is not None else family_for(model)
        config = getattr(model, "config", None)
        # Callers key caches (covariance stats) on this, so loaders pass the base model id rather
        # than the checkpoint path an edited model was reloaded from (docs/protocol.md §10.3).
        self.name = name or getattr(config, "_name_or_path", "") or type(model).__name__

    # ------------------------------------------------------------------ shapes and modules

    @property
    def n_layers(self) -> int:
        return len(self.module("layers"))

    @property
    def d_model(self) -> int:
        return self._canonical_shape("mlp_out", 0)[0]

    @property
    def d_mlp(self) -> int:
        return self._canonical_shape("mlp_out", 0)[1]

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's execution device (under a device map its weights may be offloaded)."""
        return execution_device(self.model, self.module_name("embed"))

    @property
    def dtype(self) -> torch.dtype:
        return self.module("embed").weight.dtype

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the model was built for (truncation length for statistics, docs/protocol.md §2.5)."""
        config = getattr(self.model, "config", None)
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def module_name(self, role: str, layer: int | None = None) -> str:
        """Full dotted name of the module playing `role` (at block `layer` for per-layer roles)."""
        candidates = self.family.candidate_paths(role)
        if not candidates:
            raise EditscaleError(f"model family '{self.family.name}' has no '{role}' module")
        if role in LAYER_ROLES:
            if layer is None:
                raise EditscaleError(f"module role '{role}' needs a layer index")
            n_layers = self.n_layers
            if not 0 <= layer < n_layers:
                raise EditscaleError(f"layer {layer} is out of range: the model has {n_layers} blocks")
            paths = [c.format(layer) for c in candidates]
        else:
            if layer is not None:
                raise EditscaleError(f"module role '{role}' exists once per model; do not pass a layer")
            paths = candidates
        for path in paths:
            try:
                self.model.get_submodule(path)
                return path
            except AttributeError:
                continue
        raise EditscaleError(
            f"module '{paths[0]}' ({role}) not found in {type(self.model).__name__}; "
            f"is this really a '{self.family.name}' model?"
        )

    def module(self, role: str, layer: int | None = None) -> nn.Module:
        """The module playing `role`: layers, block, mlp, mlp_in, mlp_gate, mlp_out, attn, final_norm,
        embed or unembed."""
        return self.model.get_submodule(self.module_name(role, layer))

    # ------------------------------------------------------------------ edited weights
    # Editors read and write the MLP's linear maps through these, in one canonical orientation,
    # [out_features, in_features] (mlp_out: [d_model, d_mlp]; mlp_in: [d_mlp, d_model]), whatever the
    # family stores (Conv1D keeps [in, out]) and wherever the layer lives (another device, offloaded).

    def weight_name(self, role: str, layer: int) -> str:
        if role not in EDIT_ROLES:
            raise EditscaleError(f"role '{role}' is not an editable weight; editable: {', '.join(EDIT_ROLES)}")
        return self.module_name(role, layer) + ".weight"

    def mlp_out_weight_name(self, layer: int) -> str:
        return self.weight_name("mlp_out", layer)

    def _canonical_shape(self, role: str, layer: int) -> tuple[int, int]:
        rows, cols = self.module(role, layer).weight.shape
        return (cols, rows) if self.family.conv1d_weights else (rows, cols)

    def _to_storage(self, role: str, layer: int, matrix: torch.Tensor, what: str) -> torch.Tensor:
        expected = self._canonical_shape(role, layer)
        if tuple(matrix.shape) != expected:
            raise EditscaleError(
                f"{what} for {role} of layer {layer} must have shape {_SHAPES[role]} = {list(expected)}, "
                f"got {list(matrix.shape)}"
            )
        # The family flag decides the transpose, never the shape: square matrices fit either way.
        return matrix.t() if self.family.conv1d_weights else matrix

    def get_weight(self, role: str, layer: int) -> torch.Tensor:
        """The weight of `role` ("mlp_out" or "mlp_in") as a detached fp32 copy, [out, in]."""
        weight = tensor_value(self.model, self.weight_name(role, layer)).detach()
        if self.family.conv1d_weights:
            weight = weight.t()
        return weight.to(torch.float32, copy=True).contiguous()

    def set_weight(self, role: str, layer: int, weight: torch.Tensor) -> None:
        """Overwrite the weight (given as [out, in]); cast to the parameter's dtype and device."""
        stored = self._to_storage(role, layer, weight, "weight")
        update_tensor(self.model, self.weight_name(role, layer), lambda current: stored)

    def add_to_weight(self, role: str, layer: int, delta: torch.Tensor) -> None:
        """W += delta (delta given as [out, in])."""
        stored = self._to_storage(role, layer, delta, "delta")
        # Sum in fp32 and round once; adding a pre-rounded half-precision delta would lose the tiny
        # per-element updates entirely (docs/protocol.md §10.15).
        update_tensor(self.model, self.weight_name(role, layer),
                      lambda current: current.float() + stored.to(device=current.device, dtype=torch.float32))

    def weight_offloaded(self, role: str, layer: int) -> bool:
        """Whether accelerate offloaded the weight (its parameter is then on `meta`, so only the
        get/set/add methods here reach its values, not the module's parameters)."""
        return _offload_slot(self.model, self.weight_name(role, layer)) is not None

    def get_mlp_out_weight(self, layer: int) -> torch.Tensor:
        """W of the MLP output projection as a detached fp32 copy, shape [d_model, d_mlp]."""
        return self.get_weight("mlp_out", layer)

    def set_mlp_out_weight(self, layer: int, weight: torch.Tensor) -> None:
        self.set_weight("mlp_out", layer, weight)

    def add_to_mlp_out_weight(self, layer: int, delta: torch.Tensor) -> None:
        self.add_to_weight("mlp_out", layer, delta)

    def mlp_out_offloaded(self, layer: int) -> bool:
        return self.weight_offloaded("mlp_out", layer)

    def _mlp_out_bias_name(self, layer: int) -> str | None:
        module = self.module("mlp_out", layer)
        return None if getattr(module, "bias", None) is None else self.module_name("mlp_out", layer) + ".bias"

    def get_mlp_out_bias(self, layer: int) -> torch.Tensor | None:
        """b of the MLP output projection as a detached fp32 copy [d_model], or None if it has none."""
        name = self._mlp_out_bias_name(layer)
        return None if name is None else tensor_value(self.model, name).detach().to(torch.float32, copy=True)

    def _require_mlp_out_bias(self, layer: int) -> str:
        name = self._mlp_out_bias_name(layer)
        if name is None:
            raise EditscaleError(f"layer {layer}'s MLP output projection has no bias")
        return name

    def set_mlp_out_bias(self, layer: int, bias: torch.Tensor) -> None:
        """Overwrite b; cast to the parameter's dtype and device."""
        update_tensor(self.model, self._require_mlp_out_bias(layer), lambda current: bias)

    def add_to_mlp_out_bias(self, layer: int, delta: torch.Tensor) -> None:
        """b += delta, summed in fp32 and rounded once (as `add_to_mlp_out_weight`)."""
        update_tensor(self.model, self._require_mlp_out_bias(layer),
                      lambda current: current.float() + delta.to(device=current.device, dtype=torch.float32))

    def snapshot(self, layers: Iterable[int], *, biases: bool = True, in_layers: Iterable[int] = ()) -> EditedParams:
        """Copies of the MLP-output weights (and biases, where they exist) of `layers`, and of the
        MLP-input weights of `in_layers` (methods that edit both maps, MEND)."""
        layers = list(layers)
        params = EditedParams({layer: self.get_mlp_out_weight(layer) for layer in layers},
                              in_weights={layer: self.get_weight("mlp_in", layer) for layer in in_layers})
        if biases:
            for layer in layers:
                bias = self.get_mlp_out_bias(layer)
                if bias is not None:
                    params.biases[layer] = bias
        return params

    def restore(self, params: EditedParams) -> None:
        """Write a snapshot back: the model then holds exactly the snapshot's values."""
        for layer, weight in params.weights.items():
            self.set_mlp_out_weight(layer, weight)
        for layer, bias in params.biases.items():
            self.set_mlp_out_bias(layer, bias)
        for layer, weight in params.in_weights.items():
            self.set_weight("mlp_in", layer, weight)

    # ------------------------------------------------------------------ tokenisation

    @property
    def pad_token_id(self) -> int:
        """Id used for right padding: the pad token, else EOS (as the reference sets it), else 0."""
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if isinstance(value, int):
                return value
        return 0

    @cached_property
    def adds_bos(self) -> bool:
        """Whether the live tokenizer prepends BOS when special tokens are on."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is None:
            return False
        with_special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        without = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        return len(with_special) > len(without) and with_special[0] == bos

    def _offsets_available(self) -> bool:
        return bool(getattr(self.tokenizer, "is_fast", False))

    def pad(self, rows: Sequence[Sequence[int]]) -> BatchEncoding:
        """Right-pad token id lists into input_ids and attention_mask on the model's device."""
        if not rows:
            raise EditscaleError("cannot build a batch from zero sequences")
        for i, row in enumerate(rows):
            if len(row) == 0:
                raise EditscaleError(f"text #{i} of the batch tokenises to no tokens")
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return BatchEncoding({"input_ids": input_ids.to(self.device),
                              "attention_mask": attention_mask.to(self.device)})

    def encode(self, texts: str | Sequence[str], *, add_special_tokens: bool = True,
               max_length: int | None = None) -> BatchEncoding:
        """Tokenise texts into one right-padded batch (input_ids, attention_mask) on the model's device.

        Padding is done here rather than by the tokenizer so a shared tokenizer without a pad
        token need not be changed, and so padding is on the right whatever its padding_side says.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens, padding=False,
                                 truncation=max_length is not None, max_length=max_length)
        return self.pad(encoded["input_ids"])

    def _batch(self, inputs: Inputs) -> Mapping[str, torch.Tensor]:
        if isinstance(inputs, str) or (isinstance(inputs, Sequence) and not isinstance(inputs, Mapping)):
            return self.encode(inputs)
        batch = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        if "input_ids" not in batch:
            raise EditscaleError("a pre-tokenised batch must hold 'input_ids'")
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    def target_ids(self, target: str) -> list[int]:
        """Token ids of a target as it is scored and edited after a prompt and one space
        (docs/protocol.md §1.3, §2.6).

        Byte-level BPE families use tok(" " + target.strip()) with no special tokens, exactly as
        the reference does. Other tokenizers read the target's tokens off a full-string
        tokenisation, because tokenising " Paris" alone gives SentencePiece an extra "▁".
        """
        if not target.strip():
            raise EditscaleError("target is empty")
        if self.family.target_spacing == SPACING_OFFSETS:
            return self.prompt_target_batch([_TARGET_ANCHOR], [target]).target_ids[0]
        return list(self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])

    def subject_token_index(self, template: str, subject: str, mode: str = "subject_last") -> int:
        """Position of the subject token in `template` with "{}" replaced by `subject` (docs/protocol.md §2.3).

        Modes: subject_last, subject_first, subject_first_after_last (first token after the
        subject, or its last token when nothing follows), last (last token of the sequence).
        The index counts a BOS token when the tokenizer adds one.
        """
        return self.subject_token_indices([template], [subject], mode)[0]

    def subject_token_indices(self, templates: Sequence[str], subjects: Sequence[str],
                              mode: str = "subject_last") -> list[int]:
        """Batched `subject_token_index` over (template, subject) pairs, one tokenizer call."""
        if mode not in SUBJECT_MODES:
            raise UnknownNameError(
                f"unknown fact-token mode '{mode}'; known modes: {', '.join(SUBJECT_MODES)}"
            )
        if len(templates) != len(subjects):
            raise EditscaleError(f"{len(templates)} templates but {len(subjects)} subjects")
        texts, spans = [], []
        for template, subject in zip(templates, subjects, strict=True):
            prefix, suffix = split_template(template)
            if not subject.strip():
                raise EditscaleError(f"empty subject for template {template!r}")
            text = prefix + subject + suffix
            lead = len(subject) - len(subject.lstrip())
            start = len(prefix) + lead
            texts.append(text)
            spans.append((start, start + len(subject.strip())))
        if not self._offsets_available():
            return self._reference_subject_indices(templates, subjects, mode)

        encoded = self.tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True,
                                 return_special_tokens_mask=True)
        indices = []
        for i, (text, (start, end)) in enumerate(zip(texts, spans, strict=True)):
            offsets = encoded["offset_mapping"][i]
            special = encoded["special_tokens_mask"][i]
            n_tokens = len(encoded["input_ids"][i])
            if mode == "last":
                indices.append(n_tokens - 1)
                continue
            first, last = _span_tokens(text, offsets, special, start, end)
            if mode == "subject_first":
                indices.append(first)
            elif mode == "subject_last":
                indices.append(last)
            else:  # subject_first_after_last
                has_next = last + 1 < n_tokens and not special[last + 1]
                indices.append(last + 1 if has_next else last)
        return indices

    def _reference_subject_indices(self, templates: Sequence[str], subjects: Sequence[str],
                                   mode: str) -> list[int]:
        # Without character offsets only the reference piecewise rule is left, and it is only
        # right for tokenizers that add no BOS and tokenise by concatenation (GPT-2 BPE).
        if self.adds_bos or self.family.target_spacing == SPACING_OFFSETS:
            raise EditscaleError(
                f"the tokenizer of {self.name} is not a fast tokenizer, so token offsets are not "
                "available; load it with use_fast=True"
            )
        pairs = zip(templates, subjects, strict=True)
        return [reference_subject_index(self.tokenizer, t, s, mode) for t, s in pairs]

    def prompt_target_batch(self, prompts: Sequence[str], targets: Sequence[str]) -> ScoringBatch:
        """Build `prompt + " " + target.strip()` rows with each row's prefix length and target ids.

        Target tokens are those covering the target's characters (and the one space before it) in
        the full tokenisation, so the layout is right for BOS and SentencePiece tokenizers too. For
        GPT-2 BPE it equals the reference: prefix_len = len(tok(prompt)), ids = tok(" " + target).
        """
        if len(prompts) != len(targets):
            raise EditscaleError(f"{len(prompts)} prompts but {len(targets)} targets")
        texts, spans = [], []
        for prompt, target in zip(prompts, targets, strict=True):
            if not target.strip():
                raise EditscaleError(f"empty target for prompt {prompt!r}")
            text = f"{prompt} {target.strip()}"
            texts.append(text)
            spans.append((len(prompt) + 1, len(text)))
        if not self._offsets_available():
            if self.adds_bos or self.family.target_spacing == SPACING_OFFSETS:
                raise EditscaleError(
                    f"the tokenizer of {self.name} is not a fast tokenizer; load it with use_fast=True"
                )
            prefix_lens = [len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
            target_ids = [self.target_ids(t) for t in targets]
            rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        else:
            encoded = self.tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True,
                                     return_special_tokens_mask=True)
            rows = encoded["input_ids"]
            prefix_lens, target_ids = [], []
            for i, (text, (start, end)) in enumerate(zip(texts, spans, strict=True)):
                first, last = _span_tokens(text, encoded["offset_mapping"][i],
                                           encoded["special_tokens_mask"][i], start, end)
                prefix_lens.append(first)
                target_ids.append(list(rows[i][first:last + 1]))
        batch = self.pad(rows)
        return ScoringBatch(texts=texts, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            prefix_lens=prefix_lens, target_ids=target_ids)

    # ------------------------------------------------------------------ forward passes

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """Logits [batch, seq, vocab] in the model's dtype; gradients flow (for v*/z optimisation)."""
        batch = self._batch(inputs)
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          use_cache=False).logits

    def final_hidden(self, inputs: Inputs) -> torch.Tensor:
        """Hidden states [batch, seq, d_model] after the final norm; gradients flow.

        With `unembed` this scores chosen positions only, which saves the vocabulary projection
        at every other position (most of the cost of a small model's forward pass).
        """
        batch = self._batch(inputs)
        out = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False)
        return out[0]

    def block_hidden(self, inputs: Inputs | None, layer: int, **forward_kwargs: Any) -> torch.Tensor:
        """Block `layer`'s output [batch, seq, d_model] through the final norm; gradients flow.

        With `unembed` this reads the model's prediction off an earlier block (MEMIT's v_loss_layer);
        for the last block it equals `final_hidden`. Later blocks are not run. Without `inputs`, the
        forward pass takes `forward_kwargs` alone (masks, positions, a cache), as `hidden_before_head`.
        """
        kwargs: dict[str, Any] = {}
        if inputs is not None:
            batch = self._batch(inputs)
            kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        kwargs.update(forward_kwargs)
        captured: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            captured["hidden"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        handle = self.module("block", layer).register_forward_hook(hook)
        try:
            self.model(**kwargs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return self.module("final_norm")(captured["hidden"])

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (any leading shape), as the model's output head computes them."""
        return self.model.get_output_embeddings()(hidden)

    def hidden_before_head(self, **forward_kwargs: Any) -> torch.Tensor:
        """One forward pass of the model (any keyword arguments: masks, positions, a cache) returning
        the hidden states [batch, seq, d_model] after the final norm, the input of `unembed`.

        The model's own forward runs (its hooks fire, a passed cache is filled) but its head is given
        no position, so `unembed` of the few gathered rows a caller reads is the only vocabulary
        projection. Without `logits_to_keep` (transformers < 4.50) the head still runs everywhere.
        """
        captured: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            captured["hidden"] = output[0] if isinstance(output, tuple) else output

        if self._head_keep_arg == "logits_to_keep":
            forward_kwargs["logits_to_keep"] = torch.zeros(0, dtype=torch.long)
        elif self._head_keep_arg == "num_logits_to_keep":
            forward_kwargs["num_logits_to_keep"] = 1
        handle = self.module("final_norm").register_forward_hook(hook)
        try:
            self.model(**forward_kwargs)
        finally:
            handle.remove()
        return captured["hidden"]

    @cached_property
    def _head_keep_arg(self) -> str | None:
        params = inspect.signature(self.model.forward).parameters
        return next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)

    def logits(self, inputs: Inputs) -> torch.Tensor:
        """Logits [batch, seq, vocab] as fp32, without gradients."""
        with torch.no_grad():
            return self.forward(inputs).float()

    def next_token_logprobs(self, inputs: Inputs) -> torch.Tensor:
        """Log-probabilities [batch, vocab] of the token after each row's last real token."""
        batch = self._batch(inputs)
        with torch.no_grad():
            logits = self.forward(batch)
        last = batch["attention_mask"].sum(dim=1) - 1
        rows = torch.arange(logits.shape[0], device=logits.device)
        return torch.log_softmax(logits[rows, last.to(logits.device)].float(), dim=-1)

    def capture_mlp_io(self, inputs: Inputs, positions: Positions, layer: int,
                       *, stop_early: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the MLP output projection at one token per row, in one forward pass.

        Returns (keys [n, d_mlp], values [n, d_model]) as detached fp32: the key is that module's
        input (post-activation) and the value its output, before any dropout or residual add.
        Negative positions count back from each row's last real token (-1 = last token).
        With stop_early the pass is abandoned once the module has run, since nothing later is read.
        """
        batch = self._batch(inputs)
        lengths = batch["attention_mask"].sum(dim=1)
        rows, pos = _resolve_positions(positions, lengths)
        captured: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            key_in = args[0]
            value_out = output[0] if isinstance(output, tuple) else output
            r, p = rows.to(key_in.device), pos.to(key_in.device)
            captured["keys"] = key_in[r, p].detach().float()
            captured["values"] = value_out[r, p].detach().float()
            if stop_early:
                raise _StopForward

        self._run_hooked(self.module("mlp_out", layer), hook, batch)
        return captured["keys"], captured["values"]

    def capture_mlp_keys(self, inputs: Inputs, layer: int, *, stop_early: bool = True) -> torch.Tensor:
        """Keys at every position, [batch, seq, d_mlp] fp32 (padding included; mask it with the
        batch's attention_mask). This is what second-moment statistics accumulate
        (docs/protocol.md §2.5)."""
        batch = self._batch(inputs)
        captured: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            captured["keys"] = args[0].detach().float()
            if stop_early:
                raise _StopForward

        self._run_hooked(self.module("mlp_out", layer), hook, batch)
        return captured["keys"]

    def _run_hooked(self, module: nn.Module, hook: Any, batch: Mapping[str, torch.Tensor]) -> None:
        handle = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()

    # ------------------------------------------------------------------ interventions

    def _site_module(self, site: str, layer: int) -> nn.Module:
        if site not in SITES:
            raise UnknownNameError(f"unknown intervention site '{site}'; known sites: {', '.join(SITES)}")
        return self.module(SITES[site], layer)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """While active, no model parameter requires a gradient (an editor's gradients go to its own
        tensors); the flags are restored on the way out."""
        was_trainable = [p for p in self.model.parameters() if p.requires_grad]
        for p in was_trainable:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in was_trainable:
                p.requires_grad_(True)

    @contextmanager
    def intervene(self, site: str, layer: int, positions: Positions, delta: torch.Tensor) -> Iterator[None]:
        """While active, add `delta` to the output of a module at one token per row.

        site="mlp": the MLP block's output before the residual add (ROME's v*, docs/protocol.md §2.6).
        site="block": the block's hidden-state output, i.e. the residual stream (MEMIT's z, §4.2 there).
        delta is [d_model] (same for every row) or [n_rows, d_model]; positions is one int for all
        rows or one non-negative int per row. The addition is out of place, so gradients reach
        delta. Hooks run in the order their contexts were entered.
        """

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            onehot = _position_mask(positions, hidden.shape[0], hidden.shape[1], hidden.device, hidden.dtype)
            shift = delta.to(device=hidden.device, dtype=hidden.dtype)
            if shift.dim() == 1:
                shift = shift.view(1, 1, -1)
            elif shift.dim() == 2 and shift.shape[0] == hidden.shape[0]:
                shift = shift.unsqueeze(1)
            else:
                raise EditscaleError(
                    f"delta must be [d_model] or [n_rows, d_model] with n_rows={hidden.shape[0]}, "
                    f"got {list(delta.shape)}"
                )
            hidden = hidden + onehot.unsqueeze(-1) * shift
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = self._site_module(site, layer).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def record(self, site: str, layer: int, positions: Positions,
               *, detach: bool = True) -> Iterator[Recording]:
        """While active, record a module's output at one token per row on every forward pass.

        Yields a Recording whose `outputs` gain one fp32 [n_rows, d_model] tensor per pass. A
        record() entered before intervene() on the same module sees the output without delta.
        """
        recording = Recording()

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            n_rows, seq_len = hidden.shape[0], hidden.shape[1]
            rows, pos = _rows_and_positions(positions, n_rows, seq_len, hidden.device)
            value = hidden[rows, pos].float()
            recording.outputs.append(value.detach() if detach else value)

        handle = self._site_module(site, layer).register_forward_hook(hook)
        try:
            yield recording
        finally:
            handle.remove()


# ---------------------------------------------------------------------- where tensors live (accelerate)


def _align_hooks(module: nn.Module) -> list[Any]:
    """accelerate's AlignDevicesHooks on a module (a SequentialHook holds several; accelerate hooks.py)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", None) or [hook])
    return [h for h in hooks if hasattr(h, "execution_device") and hasattr(h, "weights_map")]


def _covering_hooks(model: nn.Module, name: str, own_depth: int) -> Iterator[tuple[Any, str]]:
    """(hook, name relative to the hooked module) for the hooks that govern `name`, innermost first.

    A hook governs the tensors of the module it is attached to (the first `own_depth` parts of
    `name`) and, with place_submodules, those of its submodules too.
    """
    parts = name.split(".")
    for depth in range(own_depth, -1, -1):
        for hook in _align_hooks(model.get_submodule(".".join(parts[:depth]))):
            if depth == own_depth or hook.place_submodules:
                yield hook, ".".join(parts[depth:])


def execution_device(model: nn.Module, module_name: str) -> torch.device:
    """Where a module computes: its accelerate execution device when the model was dispatched
    (its weights may then be on `meta`), else the device of its weights."""
    for hook, _ in _covering_hooks(model, module_name, len(module_name.split(".")) if module_name else 0):
        if hook.execution_device is not None:
            return torch.device(hook.execution_device)
    module = model.get_submodule(module_name)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """The device input ids must be on: the input embedding's execution device (a module that is
    no transformers model: its first parameter's)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is embed), None) if embed is not None else None
    return execution_device(model, name) if name is not None else next(model.parameters()).device


def _offload_slot(model: nn.Module, name: str) -> tuple[Mapping[str, torch.Tensor], str] | None:
    """(weights_map, key) holding the real value of an offloaded parameter or buffer, or None when
    the value lives in the module. An offloading AlignDevicesHook keeps the module's tensors on
    `meta` and loads them from its weights_map for each forward pass (accelerate hooks.py)."""
    for hook, key in _covering_hooks(model, name, len(name.split(".")) - 1):
        if hook.offload and hook.weights_map is not None:
            return hook.weights_map, key
    return None


def _live_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    tensor = getattr(model.get_submodule(module_name), attr)
    if tensor.device.type == "meta":
        raise EditscaleError(f"{name} is on the meta device and no accelerate hook holds its value")
    return tensor


def tensor_value(model: nn.Module, name: str) -> torch.Tensor:
    """The real value of parameter or buffer `name` (a dotted state-dict name), also when accelerate
    offloaded it to CPU or disk. Not a copy when it lives in the module: do not write to it."""
    slot = _offload_slot(model, name)
    if slot is None:
        return _live_tensor(model, name)
    weights_map, key = slot
    return weights_map[key]


def update_tensor(model: nn.Module, name: str, new: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace tensor `name` by new(current value), cast to its dtype, wherever the value lives.

    An offloaded value is replaced in the weights map, so the next forward pass loads the new one.
    """
    with torch.no_grad():
        slot = _offload_slot(model, name)
        if slot is None:
            live = _live_tensor(model, name)
            live.copy_(new(live))
            return
        weights_map, key = slot
        current = weights_map[key]
        # A fresh contiguous tensor (`new` may return a view of the caller's own tensor), kept on the
        # CPU: a disk loader may read straight onto the GPU, and the hook moves values to the
        # execution device at each forward pass anyway.
        fresh = torch.empty(current.shape, dtype=current.dtype, device="cpu")
        fresh.copy_(new(current))
        _store_offloaded(weights_map, key, fresh)


def _store_offloaded(weights_map: Mapping[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    while isinstance(weights_map, PrefixedDataset):
        key = weights_map.prefix + key
        weights_map = weights_map.dataset
    if isinstance(weights_map, OffloadedWeightsLoader):
        # Its state_dict takes priority over its disk index (accelerate utils/offload.py), so the
        # edited value stays in memory and the files it reads (often the model's own checkpoint)
        # are never written.
        weights_map.state_dict[key] = value
    elif isinstance(weights_map, MutableMapping):
        weights_map[key] = value
    else:
        raise EditscaleError(f"cannot write offloaded tensor '{key}': its weights map is a read-only "
                             f"{type(weights_map).__name__}")


# ---------------------------------------------------------------------- helpers


def split_template(template: str) -> tuple[str, str]:
    """(prefix, suffix) around the single "{}" of a template (the reference asserts exactly one)."""
    parts = template.split("{}")
    if len(parts) != 2:
        raise EditscaleError(f"template must contain exactly one '{{}}', got {template!r}")
    return parts[0], parts[1]


def reference_subject_index(tokenizer: Any, template: str, subject: str, mode: str = "subject_last") -> int:
    """The reference rule (kmeng01/memit: rome/repr_tools.py; docs/protocol.md §2.3): prefix, subject and
    suffix tokenised separately.

    Only right for tokenizers that add no BOS and tokenise by concatenation (GPT-2 BPE); kept as a
    fallback for slow tokenizers and as the yardstick the offset-based rule is tested against.
    """
    prefix, suffix = split_template(template)
    word = subject
    if prefix:
        if not prefix.endswith(" "):
            raise EditscaleError(f"template prefix must end in a space for the reference rule: {template!r}")
        prefix = prefix[:-1]
        word = " " + subject.strip()

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    n_prefix, n_word, n_suffix = n_tokens(prefix), n_tokens(word), n_tokens(suffix)
    if mode == "subject_last":
        return n_prefix + n_word - 1
    if mode == "subject_first":
        return n_prefix
    if mode == "subject_first_after_last":
        return n_prefix + n_word - (1 if n_suffix == 0 else 0)
    if mode == "last":
        return n_prefix + n_word + n_suffix - 1
    raise UnknownNameError(f"unknown fact-token mode '{mode}'; known modes: {', '.join(SUBJECT_MODES)}")


def _span_tokens(text: str, offsets: Sequence[tuple[int, int]], special: Sequence[int],
                 start: int, end: int) -> tuple[int, int]:
    """First and last token covering text[start:end] (a span without outer whitespace).

    A token also counts when it covers only the single whitespace character just before the span:
    the reference moves that space into the subject (" Paris"), and SentencePiece may emit it as a
    lone "▁". Special tokens (BOS, which has an empty offset) never count.
    """
    gap_start = start - 1 if start > 0 and text[start - 1].isspace() else start
    hits = []
    for i, (tok_start, tok_end) in enumerate(offsets):
        if special[i] or tok_end <= tok_start:
            continue
        overlaps = tok_start < end and tok_end > start
        in_gap = tok_start >= gap_start and tok_end <= start
        if overlaps or in_gap:
            hits.append(i)
    if not hits:
        raise EditscaleError(f"no token covers {text[start:end]!r} in {text!r} (truncated?)")
    return hits[0], hits[-1]


def _resolve_positions(positions: Positions, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and position index tensors; negative positions count back from each row's real length."""
    lengths = lengths.cpu()
    pos = _positions_tensor(positions, lengths.shape[0])
    pos = torch.where(pos < 0, lengths + pos, pos)
    if bool(((pos < 0) | (pos >= lengths)).any()):
        raise EditscaleError(
            f"token positions {pos.tolist()} fall outside rows of lengths {lengths.tolist()}"
        )
    return torch.arange(lengths.shape[0]), pos


def _positions_tensor(positions: Positions, n_rows: int) -> torch.Tensor:
    """One position per row as a CPU long tensor; a single int applies to every row."""
    pos = torch.as_tensor(positions, dtype=torch.long).cpu()
    if pos.dim() == 0:
        return pos.expand(n_rows).clone()
    pos = pos.flatten()
    if pos.shape[0] != n_rows:
        raise EditscaleError(f"{pos.shape[0]} positions given for a batch of {n_rows} rows")
    return pos


def _rows_and_positions(positions: Positions, n_rows: int, seq_len: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pos = _positions_tensor(positions, n_rows)
    if bool(((pos < 0) | (pos >= seq_len)).any()):
        raise EditscaleError(
            f"token positions {pos.tolist()} must lie in [0, {seq_len}); negative positions are refused "
            "because padding is on the right"
        )
    return torch.arange(n_rows, device=device), pos.to(device)


def _position_mask(positions: Positions, n_rows: int, seq_len: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """[n_rows, seq_len] with a 1 at each row's position, so a shift can be added out of place."""
    rows, pos = _rows_and_positions(positions, n_rows, seq_len, device)
    mask = torch.zeros((n_rows, seq_len), device=device, dtype=dtype)
    mask[rows, pos] = 1
    return mask
