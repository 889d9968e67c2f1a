"""Keys (inputs of the MLP output projection) at the subject token, shared by ROME-family methods."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from editscale.models.adapter import ModelAdapter


def fill(template: str, prompt: str) -> str:
    """Put a request prompt into a context template: "X. {}" + "{} plays the" -> "X. {} plays the"."""
    return template.replace("{}", prompt, 1) if "{}" in template else template


def keys_at_subject(adapter: ModelAdapter, layer: int, prompts: Sequence[str], subject: str,
                    fact_token: str = "subject_last") -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [n, d_mlp], values [n, d_model]) at the fact token of each prompt ("{}" = subject)."""
    return keys_at_subjects(adapter, layer, prompts, [subject] * len(prompts), fact_token)


def keys_at_subjects(adapter: ModelAdapter, layer: int, prompts: Sequence[str], subjects: Sequence[str],
                     fact_token: str = "subject_last", *, batch_size: int = 128
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`keys_at_subject` with one subject per prompt, in forward passes of at most `batch_size` rows
    (the reference's representation batch), so a large edit batch does not become one huge pass."""
    keys, values = [], []
    for i in range(0, len(prompts), batch_size):
        chunk, subs = list(prompts[i:i + batch_size]), list(subjects[i:i + batch_size])
        positions = adapter.subject_token_indices(chunk, subs, fact_token)
        k, v = adapter.capture_mlp_io([p.format(s) for p, s in zip(chunk, subs, strict=True)], positions, layer)
        keys.append(k)
        values.append(v)
    return torch.cat(keys), torch.cat(values)


def mean_key(adapter: ModelAdapter, layer: int, templates: Sequence[str], prompt: str, subject: str,
             fact_token: str = "subject_last") -> tuple[torch.Tensor, torch.Tensor]:
    """k̄ and v̄: the key and value averaged over the context templates (docs/protocol.md §2.4, plain mean)."""
    keys, values = keys_at_subject(adapter, layer, [fill(t, prompt) for t in templates], subject, fact_token)
    return keys.mean(dim=0), values.mean(dim=0)
