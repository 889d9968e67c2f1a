"""Few-shot evaluation that runs the shared demonstrations once (exact, not an approximation).

Every prompt of a task starts with the same rendered demonstrations, usually most of its tokens.
The naive path (``fewshot.evaluate_fewshot``) recomputes them for every example and, in paper
mode, for every generated token. Here the longest common token prefix is run once (batch 1), its
key/value cache is shared by every chunk of examples, and only each example's suffix and the
generated tokens are computed. Each row sees the same tokens at the same positions with the same
attention as in the naive path, so predictions agree up to float rounding.

Layout of one chunk (b rows, prefix length P, longest suffix S, per-row suffix lengths L_i):
cache columns [0, P) hold the prefix, [P, P+S) the right-padded suffixes, and each later column
one generated (or teacher-forced) token for every row. Padding columns are masked out and every
token gets its true position explicitly (P + L_i + step), so absolute (GPT-2) and rotary
(GPT-J, Llama) position schemes both see the naive positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from editscale.data.fewshot import FewShotFormat
from editscale.eval.downstream.fewshot import (
    Example,
    check_mode,
    evaluate_fitted,
    label_targets,
    logprob_result,
    pad_token_id,
    paper_result,
    prompt_token_ids,
)
from editscale.eval.scoring import HeadRows, length_batches
from editscale.models.adapter import input_device
from editscale.models.cache import KV, cache_arg, cache_from, cache_kv


@dataclass(frozen=True)
class PrefixSplit:
    prompts: list[str]
    ids: list[list[int]]  # each prompt's full tokenisation, as the naive path feeds it
    prefix: list[int]  # the longest common token prefix, shortened so every suffix keeps >= 1 token

    @property
    def prefix_len(self) -> int:
        return len(self.prefix)

    @property
    def suffixes(self) -> list[list[int]]:
        return [row[self.prefix_len:] for row in self.ids]


def prefix_split(fmt: FewShotFormat, demos: Sequence[Example], fields_list: Sequence[Mapping[str, str]],
                 tokenizer: Any) -> PrefixSplit:
    """Tokenise every prompt as the naive path does and find their common prefix on token ids.

    Working on ids rather than text means a BPE merge across the demo/query boundary can never
    make the split differ from the naive tokenisation.
    """
    if not fields_list:
        raise ValueError("prefix_split needs at least one example")
    prompts = [fmt.render_prompt(demos, f) for f in fields_list]
    ids = prompt_token_ids(tokenizer, prompts)
    first = ids[0]
    n = min(len(row) for row in ids) - 1  # the last token of each prompt must stay in its suffix
    for row in ids[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
    return PrefixSplit(prompts=prompts, ids=ids, prefix=first[:max(n, 0)])


class _Runner:
    """Forward passes against a key/value cache, across the transformers API versions we support.

    Each pass names the (row, column) cells whose logits are read; only those go through the output
    head (`scoring.HeadRows`), so a 50k vocabulary costs one projection per row, not per column.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.head = HeadRows(model)
        self.device = input_device(model)
        self.cache_arg = cache_arg(model)
        self.calls = 0

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                read: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Logits [n, vocab] at the cells ``read = (rows, columns)`` of this pass's input (None: none)."""
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                  self.cache_arg: cache, "use_cache": True}
        self.calls += 1
        if read is None:
            self.head.run(**kwargs)
            return None
        return self.head(*read, **kwargs)


def _prefix_kv(runner: _Runner, prefix: Sequence[int]) -> KV:
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=runner.device)
    cache = DynamicCache()
    positions = torch.arange(len(prefix), device=runner.device)[None]
    runner.forward(ids, torch.ones_like(ids), positions, cache)  # its logits are never needed
    return cache_kv(cache)


@dataclass
class _Chunk:
    """One batch of suffixes run on top of the prefix cache, with each row's next-token logits."""
    cache: DynamicCache
    mask: torch.Tensor  # [b, P + S]: prefix and real suffix tokens 1, padding 0
    lengths: torch.Tensor  # [b] suffix lengths L_i
    next_logits: torch.Tensor  # [b, vocab] logits after each row's last real token


def _run_suffixes(runner: _Runner, prefix_kv: KV, prefix_len: int, suffixes: Sequence[Sequence[int]],
                  pad_id: int) -> _Chunk:
    b, width, device = len(suffixes), max(len(s) for s in suffixes), runner.device
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, prefix_len + width), dtype=torch.long)
    mask[:, :prefix_len] = 1
    for i, s in enumerate(suffixes):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, prefix_len: prefix_len + len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    lengths = torch.tensor([len(s) for s in suffixes], device=device)
    positions = (prefix_len + torch.arange(width, device=device)).expand(b, -1)
    cache = cache_from(prefix_kv, b)
    # only the logits after each row's last real token are read
    next_logits = runner.forward(ids, mask, positions, cache, read=(torch.arange(b, device=device), lengths - 1))
    assert next_logits is not None
    return _Chunk(cache=cache, mask=mask, lengths=lengths, next_logits=next_logits)


def _greedy(runner: _Runner, chunk: _Chunk, prefix_len: int, gen_len: int) -> list[list[int]]:
    """Greedy tokens per row; token t of row i sits at position P + L_i + t, padding masked out."""
    if gen_len <= 0:
        return [[] for _ in range(len(chunk.lengths))]
    mask, logits, new = chunk.mask, chunk.next_logits, []
    rows = torch.arange(len(chunk.lengths), device=runner.device)
    for step in range(gen_len):
        nxt = logits.argmax(dim=-1).to(runner.device)
        new.append(nxt)
        if step == gen_len - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = (prefix_len + chunk.lengths + step)[:, None]
        logits = runner.forward(nxt[:, None], mask, positions, chunk.cache, read=(rows, torch.zeros_like(rows)))
    return torch.stack(new, dim=1).tolist()


def _label_logprobs(runner: _Runner, chunk: _Chunk, prefix_len: int, targets: Sequence[Mapping[int, list[int]]],
                    pad_id: int) -> list[dict[int, float]]:
    """Mean per-token log-prob of each row's label targets, teacher-forced after its suffix."""
    device, b = runner.device, len(targets)
    first = torch.log_softmax(chunk.next_logits.float(), dim=-1)
    suffix_kv = cache_kv(chunk.cache)  # prefix + suffixes; each label continues from a fresh copy
    scores: list[dict[int, float]] = [{} for _ in range(b)]
    for label in sorted(targets[0]):
        rows = [list(t[label]) for t in targets]
        extra = max(len(r) for r in rows) - 1  # tokens to feed after the suffix: all but each row's last
        # token j > 0 of row i is predicted at column j - 1 of the fed tokens; only those cells are read
        cells = [(i, j - 1) for i, r in enumerate(rows) for j in range(1, len(r))]
        later_lp: list[float] = []
        if extra > 0:
            ids = torch.full((b, extra), pad_id, dtype=torch.long)
            fed = torch.zeros((b, extra), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r) - 1] = torch.as_tensor(r[:-1], dtype=torch.long)
                fed[i, : len(r) - 1] = 1
            mask = torch.cat([chunk.mask, fed.to(device)], dim=1)
            positions = prefix_len + chunk.lengths[:, None] + torch.arange(extra, device=device)[None]
            read = (torch.tensor([i for i, _ in cells], device=device),
                    torch.tensor([c for _, c in cells], device=device))
            logits = runner.forward(ids.to(device), mask, positions, cache_from(suffix_kv, b), read=read)
            assert logits is not None
            tokens = torch.tensor([tok for r in rows for tok in r[1:]], device=logits.device)
            later_lp = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0].tolist()
        k = 0
        for i, r in enumerate(rows):
            lp = [float(first[i, r[0]])] + later_lp[k:k + len(r) - 1]
            k += len(r) - 1
            scores[i][label] = sum(lp) / len(lp)
    return scores


@torch.no_grad()
def evaluate_fewshot_fast(model: torch.nn.Module, tokenizer: Any, fmt: FewShotFormat,
                          demos: Sequence[Example], examples: Sequence[Example], *, mode: str = "paper",
                          batch_size: int = 32, gen_len: int = 3, task: str | None = None) -> dict[str, Any]:
    """``evaluate_fewshot`` with the shared prefix computed once; same result dict, plus cost stats.

    Extra keys: ``prefix_len`` (tokens run once), ``mean_suffix_len`` and ``forward_calls``. Prompts
    are fitted to the model's positions as in ``evaluate_fewshot`` (``fewshot.evaluate_fitted``).
    """
    return evaluate_fitted(_evaluate_fast, model, tokenizer, fmt, tuple(demos), examples, mode=mode,
                           gen_len=gen_len, batch_size=batch_size, task=task)


def _evaluate_fast(model: torch.nn.Module, tokenizer: Any, fmt: FewShotFormat, demos: Sequence[Example],
                   examples: Sequence[Example], *, mode: str, batch_size: int, gen_len: int) -> dict[str, Any]:
    check_mode(mode)
    split = prefix_split(fmt, demos, [f for f, _ in examples], tokenizer)
    labels = [y for _, y in examples]
    pad = pad_token_id(tokenizer)
    runner = _Runner(model)
    prefix_kv = _prefix_kv(runner, split.prefix) if split.prefix_len else []
    suffixes = split.suffixes
    targets = label_targets(tokenizer, fmt, split.prompts, split.ids) if mode == "logprob" else []
    gens: list[list[int]] = [[] for _ in examples]
    scores: list[dict[int, float]] = [{} for _ in examples]
    # longest suffixes first, in batches of similar length: a padded column costs a full one
    order = sorted(range(len(examples)), key=lambda i: -len(suffixes[i]))
    for start, stop in length_batches([len(suffixes[i]) for i in order], batch_size):
        rows = order[start:stop]
        chunk = _run_suffixes(runner, prefix_kv, split.prefix_len, [suffixes[i] for i in rows], pad)
        if mode == "paper":
            for i, g in zip(rows, _greedy(runner, chunk, split.prefix_len, gen_len), strict=True):
                gens[i] = g
        else:
            got = _label_logprobs(runner, chunk, split.prefix_len, [targets[i] for i in rows], pad)
            for i, sc in zip(rows, got, strict=True):
                scores[i] = sc
    result = (paper_result(tokenizer, fmt, split.prompts, gens, labels) if mode == "paper"
              else logprob_result(fmt, scores, labels))
    stats = {"prefix_len": split.prefix_len, "mean_suffix_len": sum(map(len, suffixes)) / max(len(suffixes), 1),
             "forward_calls": runner.calls}
    return {**result, **stats}
