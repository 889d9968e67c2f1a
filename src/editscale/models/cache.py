"""Key/value caches across the transformers versions editscale supports.

Evaluators and editors both run a fixed prefix once and many continuations on top of it; these
helpers take a filled cache apart and build fresh caches from its tensors, so a continuation never
writes into the shared prefix.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape [batch, heads, seq, head_dim]


def cache_arg(model: torch.nn.Module) -> str:
    """The forward argument a cache is passed by: transformers 5 renamed `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_kv(cache: DynamicCache) -> KV:
    """The per-layer key and value tensors a cache holds."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def cache_from(kv: KV, batch: int) -> DynamicCache:
    """A fresh cache holding ``kv`` broadcast to ``batch`` rows.

    The expanded tensors are views; the cache concatenates new keys onto them (a new tensor),
    so a forward pass on this cache never writes into the shared prefix tensors.
    """
    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
    if hasattr(DynamicCache, "from_legacy_cache"):
        return DynamicCache.from_legacy_cache(tuple(data))
    return DynamicCache(data)
