"""Context (prefix) templates for k* and v*, generated from the unedited model (docs/protocol.md §2.2, §4.1).

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
def sample_texts(adapter: ModelAdapter, n: int, max_len: int, *, seed: int, top_k: int = 5,
                 start_text: str | None = None) -> list[str]:
    """`n` top-k samples of `max_len` tokens in total (start included), from the start-of-text token
    or, with `start_text`, from that text (kept at the head of each sample, as MEMIT's seeds are).

    A private torch.Generator makes the draw reproducible without touching the global RNG.
    """
    tok = adapter.tokenizer
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if start_text is None:
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
        prefix, drop = [start], 0
    else:
        # tokenised as the reference's generator does (special tokens on); a BOS it adds is not text
        prefix = list(tok(start_text, add_special_tokens=True)["input_ids"])
        drop = 1 if adapter.adds_bos else 0
    ids = torch.tensor([prefix] * n, dtype=torch.long, device=adapter.device)
    for _ in range(max_len - len(prefix)):
        logits = adapter.model(input_ids=ids, use_cache=False).logits[:, -1].float().cpu()
        top = torch.topk(logits, top_k, dim=-1)
        choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=gen)
        nxt = top.indices.gather(1, choice).to(adapter.device)
        ids = torch.cat([ids, nxt], dim=1)
    texts = tok.batch_decode(ids[:, drop:].tolist(), skip_special_tokens=False)
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


# MEMIT's seed prompts (docs/protocol.md §4.1): one sample of 10 tokens in total from each.
MEMIT_SEED_PROMPTS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
MEMIT_TEMPLATE_LENGTH = 10


def generate_memit_templates(adapter: ModelAdapter, *, seed: int = 0) -> list[str]:
    """MEMIT's 6 templates, flat: "{}" then one "<sample>. {}" per seed prompt (docs/protocol.md §4.1).

    The reference holds them as two groups, [["{}"], [the 5 prefixed]]; they are stored flat like
    ROME's (one list per kind in the run's templates.json) and split by `memit_template_groups`.
    """
    templates = ["{}"]
    for j, start in enumerate(MEMIT_SEED_PROMPTS):
        (text,) = sample_texts(adapter, 1, MEMIT_TEMPLATE_LENGTH, seed=seed * 1000 + 100 + j, start_text=start)
        templates.append(f"{text}. {{}}")
    return templates


def memit_template_groups(templates: Sequence[str]) -> list[list[str]]:
    """[["{}"], [prefixed...]]: the first (bare) template is a group of its own, the rest the other.

    Keys average within each group, then across groups (docs/protocol.md §4.3), so the bare prompt weighs 1/2.
    """
    if len(templates) < 2:
        return [list(templates)]
    return [[templates[0]], list(templates[1:])]


def load_templates_file(path: str) -> dict[str, list[str]]:
    """Context templates given to a run (`--templates FILE`): a JSON mapping of kind ("rome",
    "memit") to templates, as a run's templates.json, or one list used for every kind. Each
    template holds one "{}" where the prompt goes and no other brace."""
    import json
    from pathlib import Path

    from editscale.errors import EditscaleError

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise EditscaleError(f"--templates {path}: cannot read it ({err.strerror or err})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise EditscaleError(f"--templates {path}: not JSON ({err})") from None
    if isinstance(raw, list):
        raw = {kind: raw for kind in TEMPLATE_KINDS}
    if not isinstance(raw, dict) or not raw:
        raise EditscaleError(f"--templates {path}: expected a mapping of kind ({', '.join(TEMPLATE_KINDS)}) to "
                             f"a list of templates, or one list, got {type(raw).__name__}")
    for kind, templates in raw.items():
        if kind not in TEMPLATE_KINDS:
            raise EditscaleError(f"--templates {path}: unknown kind {kind!r}; kinds: {', '.join(TEMPLATE_KINDS)}")
        if not isinstance(templates, list) or not templates:
            raise EditscaleError(f"--templates {path}: {kind!r} must be a non-empty list of templates")
        for i, t in enumerate(templates):
            rest = t.replace("{}", "", 1) if isinstance(t, str) else "{"
            if not isinstance(t, str) or t.count("{}") != 1 or "{" in rest or "}" in rest:
                raise EditscaleError(f"--templates {path}: {kind}[{i}] = {t!r} must be a string with one '{{}}' "
                                     "where the prompt goes and no other brace")
    return {kind: list(ts) for kind, ts in raw.items()}


TEMPLATE_KINDS = ("rome", "memit")
