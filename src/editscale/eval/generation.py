"""Generation-based efficacy: does the edited model *say* the new object, with no teacher forcing
(docs/protocol.md §8.8)?

ES/PS compare target likelihoods with the target fed in, which tells the model both the answer's
tokens and its length. Here the model continues the prompt greedily on its own, the continuation is
cut at a stop that does not depend on the target, and the answer is judged against `target_new`.
Yang et al., "The Mirage of Model Editing" (arXiv 2502.11177, the WILD evaluation), show that
teacher forcing overstates single-edit success (38.5% vs 96.8%) and hides that sequential editing
fails within 1,000 edits once the answer must be generated.

The stop and the judging follow WILD's exact-match fallback (`easyeditor/evaluate/evaluate_utils.py:
test_prediction_acc_real` in WanliYoung/Revisit-Editing-Evaluation): greedy decoding ends at the
first ".", newline or EOS, and the answer matches when SQuAD's `normalize_answer` of both sides is
equal. WILD allows 50 new tokens; editscale allows `MAX_NEW_TOKENS` = 16, which is longer than any
object of CounterFact, zsRE or the fact world, and a continuation that has not stopped by then is
judged as it stands (it cannot equal a short object).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editscale.data.records import EditRecord
from editscale.eval.scoring import greedy_generate_until
from editscale.models.adapter import ModelAdapter

MAX_NEW_TOKENS = 16
STOP_CHARS = (".", "\n")
ANSWER_CHARS = 80  # the rewrite prompt's answer kept in an edit row

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def cut_answer(text: str) -> str:
    """The answer in a decoded continuation: everything before its first stop character, stripped."""
    cut = min((i for i in (text.find(c) for c in STOP_CHARS) if i >= 0), default=len(text))
    return text[:cut].strip()


def judge(answer: str, target: str) -> tuple[bool, bool]:
    """(exact, normalised): the answer equals the target verbatim (both stripped), and after
    `normalize_answer`."""
    return answer.strip() == target.strip(), normalize_answer(answer) == normalize_answer(target)


_STOP_MASKS: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}


def stop_mask(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int | None] = ()) -> torch.Tensor:
    """[vocab_size] bool: the tokens that end a continuation, those whose text holds a stop character
    and the EOS tokens. A token holds "." or a newline exactly when the text it decodes to does (both
    are ASCII, so no byte-level token splits them), so a row can be stopped on its last token's id."""
    key = (id(tokenizer), vocab_size)
    hit = _STOP_MASKS.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    n = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i, text in enumerate(texts):
        if any(c in text for c in STOP_CHARS):
            mask[i] = True
    for eos in (getattr(tokenizer, "eos_token_id", None), *eos_ids):
        if isinstance(eos, int) and 0 <= eos < vocab_size:
            mask[eos] = True
    _STOP_MASKS[key] = (tokenizer, mask)
    return mask


def prompt_ids(adapter: ModelAdapter, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt tokenised alone, special tokens as the tokenizer adds them (a BOS for Llama)."""
    if not prompts:
        return []
    return [list(ids) for ids in adapter.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]


def generate_answers(adapter: ModelAdapter, prompts: Sequence[Sequence[int]], *, max_new: int = MAX_NEW_TOKENS,
                     batch_size: int = 64) -> list[str]:
    """The greedy answer to each tokenised prompt (`cut_answer` of its continuation), batched."""
    if not prompts:
        return []
    model = adapter.model
    vocab = model.get_output_embeddings().weight.shape[0]
    eos = getattr(model.config, "eos_token_id", None)
    mask = stop_mask(adapter.tokenizer, vocab, eos if isinstance(eos, list) else [eos])
    outs = greedy_generate_until(model, prompts, max_new, pad_id=adapter.pad_token_id, stop=mask,
                                 batch_size=batch_size)
    texts = adapter.tokenizer.batch_decode(outs, skip_special_tokens=True)
    return [cut_answer(t) for t in texts]


@dataclass(frozen=True)
class GenerationScores:
    es: float  # 1.0 when the rewrite prompt's answer matches target_new after normalisation
    es_exact: float  # ... verbatim
    ps: float  # share of the paraphrase prompts whose answer matches after normalisation (NaN: none)
    ps_exact: float
    answer: str  # the rewrite prompt's answer

    def as_row(self) -> dict[str, Any]:
        return {"gen_es": self.es, "gen_es_exact": self.es_exact, "gen_ps": self.ps, "gen_ps_exact": self.ps_exact,
                "gen_text": self.answer[:ANSWER_CHARS]}


def _share(xs: Sequence[bool]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def generation_scores(adapter: ModelAdapter, records: Sequence[EditRecord], *, batch_size: int = 64
                      ) -> list[GenerationScores]:
    """Generation-based ES and PS of each record: its rewrite and paraphrase prompts, in one batched pass."""
    prompts, owner = [], []
    for i, r in enumerate(records):
        for p in (r.rewrite_prompt, *r.paraphrase_prompts):
            prompts.append(p)
            owner.append(i)
    answers = generate_answers(adapter, prompt_ids(adapter, prompts), batch_size=batch_size)
    per: list[list[tuple[str, bool, bool]]] = [[] for _ in records]
    for i, answer in zip(owner, answers, strict=True):
        per[i].append((answer, *judge(answer, records[i].target_new)))
    out = []
    for rows in per:
        (answer, exact, norm), para = rows[0], rows[1:]
        out.append(GenerationScores(es=float(norm), es_exact=float(exact), ps=_share([n for _, _, n in para]),
                                    ps_exact=_share([e for _, e, _ in para]), answer=answer))
    return out
