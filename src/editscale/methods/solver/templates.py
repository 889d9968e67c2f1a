"""Context (prefix) templates for k* and v*, generated from the unedited model (spec §2.2, §4.1).

The reference samples them once per process, unseeded, from whatever model is loaded when the
first edit runs; a restart therefore edits with other templates. Here they are generated with an
explicit seed from the base model, stored with the run and passed back in on resume, so that two
implementations (or a run and its resumed half) edit with the very same prefixes.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import torch

from editscale.models.adapter import ModelAdapter

# (total tokens including the start token, number of samples), as in every ROME/MEMIT JSON
DEFAULT_LENGTH_PARAMS: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))


@torch.no_grad()
def sample_texts(adapter: ModelAdapter, n: int, max_len: int, *, seed: int, top_k: int = 5) -> list[str]:
    """`n` top-k samples of `max_len` tokens in total, starting from the start-of-text token.

    A private torch.Generator makes the draw reproducible without touching the global RNG.
    """
    tok = adapter.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.full((n, 1), start, dtype=torch.long, device=adapter.device)
    for _ in range(max_len - 1):
        logits = adapter.model(input_ids=ids, use_cache=False).logits[:, -1].float().cpu()
        top = torch.topk(logits, top_k, dim=-1)
        choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=gen)
        nxt = top.indices.gather(1, choice).to(adapter.device)
        ids = torch.cat([ids, nxt], dim=1)
    texts = tok.batch_decode(ids.tolist(), skip_special_tokens=False)
    eos = tok.eos_token or ""
    return [_clean(t, eos) for t in texts]


def _clean(text: str, eos: str) -> str:
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    if eos:
        text = text.replace(eos, "")
    # Braces would break str.format on the template (a reference ROME bug MEMIT already fixed).
    return text.replace("{", " ").replace("}", " ")


def generate_context_templates(adapter: ModelAdapter, length_params: Sequence[Sequence[int]] = DEFAULT_LENGTH_PARAMS,
                               *, seed: int = 0) -> list[str]:
    """["{}"] followed by one "<sample>. {}" per sample: 21 templates for the default parameters."""
    templates = ["{}"]
    for i, (length, n_gen) in enumerate(length_params):
        texts = sample_texts(adapter, int(n_gen), int(length), seed=seed * 1000 + i)
        templates.extend(f"{t}. {{}}" for t in texts)
    return templates
