"""zsRE question answering edits in MEND format, normalised to :class:`EditRecord`.

A MEND record is ``{subject, src, pred, rephrase, alt, answers[], loc, loc_ans, cond}``: ``src`` is the
question with the subject written out, ``alt`` the counterfactual answer, ``answers`` the true ones, and
``loc``/``loc_ans`` an unrelated Natural Questions pair used for specificity.

Targets. ``targets="alt"`` (default) edits ``alt`` over ``answers[0]``, the semantically meaningful pair.
ROME/MEMIT/EMMET's ``MENDQADataset`` instead sets ``target_new = answers[0]`` and ``target_true =
"<|endoftext|>"``; ``targets="reference"`` reproduces that for parity with their zsRE numbers.

The neighbourhood prompt is ``loc + "?"`` (ROME keeps the ``"nq question: "`` prefix); its answer is
``loc_ans``, not ``target_true``, so it is stored as ``extra["neighborhood_target"]`` and the record is
marked ``extra["ns"] = "agreement"``: NS is then the agreement of the model's answer tokens before and
after the edit (eval/proficiency.py), as MEND and EasyEdit score zsRE locality.
``case_id`` is the list position in the file, which is what the sample files of
scalable-model-editing/unified-model-editing index.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from editscale.data.records import (
    NS_AGREEMENT,
    EditRecord,
    NoopHandler,
    NoopRecordError,
    RawRecord,
    not_a_dataset,
    read_json,
)
from editscale.data.sampling import load_sample_file
from editscale.errors import EditscaleError, RecordError

Targets = Literal["alt", "reference"]
REFERENCE_TARGET_TRUE = "<|endoftext|>"
NQ_PREFIX = "nq question: "


def _is_noop(alt: object, answers: object) -> bool:
    """An ``alt`` that is empty or already a true answer gives no edit (2 and 21 of MEND's train 1k)."""
    if not isinstance(alt, str):
        return False
    return not alt.strip() or (isinstance(answers, (list, tuple)) and alt in answers)


def _from_mend(raw: Any, index: int, source: str, targets: Targets) -> EditRecord:
    f = RawRecord(raw, index=index, source=source)
    # zsRE has no ids of its own; the file position is the id everyone (ROME, EMMET's samples) uses.
    f.case_id = index
    subject = f.str_("subject")
    template = f.template(f.str_("src"), subject, "src")
    answers = f.str_list("answers", nonempty=True)
    loc = f.str_("loc")
    if NQ_PREFIX not in loc:
        # ROME asserts this too: without it the columns are probably shifted.
        raise f.error(f"expected a {NQ_PREFIX.strip()!r} question, got {loc!r}", "loc")
    loc_ans = f.str_("loc_ans")
    alt = f.get("alt", required=targets == "alt")
    if alt is not None and not isinstance(alt, str):
        raise f.error(f"expected a string, got {alt!r}", "alt")
    if targets == "alt":
        if _is_noop(alt, answers):
            why = "is empty" if not alt.strip() else f"is one of the true answers {list(answers)}"
            raise f.error(f"alt {alt!r} {why}; there is nothing to edit", "alt", kind=NoopRecordError)
        target_new, target_true = alt, answers[0]
    else:
        target_new, target_true = answers[0], REFERENCE_TARGET_TRUE
    rec = EditRecord(
        case_id=index,
        subject=subject,
        prompt=template,
        target_true=target_true,
        target_new=target_new,
        paraphrase_prompts=(f.str_("rephrase"),),
        neighborhood_prompts=(loc + "?",),
        extra={
            "schema": "zsre_mend",
            "targets": targets,
            "neighborhood_target": loc_ans,
            "ns": NS_AGREEMENT,
            "answers": list(answers),
            "alt": alt,
            "pred": f.opt_str("pred"),
            "cond": f.opt_str("cond"),
        },
    )
    return f.validated(rec, {"prompt": "src", "target_new": "alt" if targets == "alt" else "answers[0]"})


def parse_zsre(raw: Any, *, source: str = "<memory>", targets: Targets = "alt", skip_noop: bool = False,
               on_noop: NoopHandler | None = None) -> list[EditRecord]:
    """Normalise a decoded MEND-format zsRE list, in file order.

    With ``targets="alt"``, a record whose ``alt`` is empty or one of its true answers has nothing to edit
    (23 of the 1,000 MEND train records); that is an error unless ``on_noop`` is given (it is handed each
    such record's error) or ``skip_noop``, which drop them. The kept records keep their file positions as
    case_ids, so list position and case_id then differ."""
    if targets not in ("alt", "reference"):
        raise EditscaleError(f"targets must be 'alt' or 'reference', got {targets!r}")
    if not isinstance(raw, list):
        raise RecordError(f"expected a JSON list of records, got {type(raw).__name__}{not_a_dataset(raw)}",
                          source=source)
    if not raw:
        raise RecordError("the file holds no records", source=source)
    if on_noop is None and skip_noop:
        on_noop = _ignore
    if not (isinstance(raw[0], Mapping) and "src" in raw[0]) and not_a_dataset(raw):
        # a companion file would otherwise fail on its first record's missing 'subject', which hides what it is
        raise RecordError(f"not a MEND-format zsRE file{not_a_dataset(raw)}", source=source)
    out: list[EditRecord] = []
    for i, r in enumerate(raw):
        try:
            out.append(_from_mend(r, i, source, targets))
        except NoopRecordError as e:
            if on_noop is None:
                raise
            on_noop(e)
    return out


def _ignore(_: NoopRecordError) -> None:
    pass


def load_zsre(path: str | os.PathLike[str], *, targets: Targets = "alt", skip_noop: bool = False,
              limit: int | None = None, on_noop: NoopHandler | None = None) -> list[EditRecord]:
    """Load a MEND-format zsRE file (e.g. ``zsre_mend_eval.json``) as validated records."""
    records = parse_zsre(read_json(path), source=str(path), targets=targets, skip_noop=skip_noop,
                         on_noop=on_noop)
    if limit is not None:
        if limit < 0:
            raise EditscaleError(f"limit must be >= 0, got {limit}")
        records = records[:limit]
    return records


def load_zsre_samples(path: str | os.PathLike[str]) -> dict[str, list[int]]:
    """``zsre_sampled_unique_10_10000.json`` of scalable-model-editing/unified-model-editing: positions into
    ``zsre_mend_eval.json``."""
    return load_sample_file(path)


@dataclass(frozen=True)
class CompletionPrompt:
    """A zsRE question asked in text-completion form: `prompt` should be completed by the answer."""

    case_index: int  # the record's position in its MEND-format file, i.e. its case_id
    question: str
    prompt: str


def parse_completion_prompts(raw: Any, *, source: str = "<memory>") -> dict[int, CompletionPrompt]:
    """``[{case_index, question, text_completion_prompt}]`` (``zsre_text_completion_prompts.json`` of
    scalable-model-editing/unified-model-editing) by case_index."""
    if not isinstance(raw, list) or not raw:
        what = "an empty list" if isinstance(raw, list) else type(raw).__name__
        raise RecordError(f"expected a JSON list of completion prompts, got {what}", source=source)
    out: dict[int, CompletionPrompt] = {}
    for i, r in enumerate(raw):
        f = RawRecord(r, index=i, source=source)
        case = f.int_("case_index")
        if case < 0:
            raise f.error(f"expected a list position (>= 0), got {case}", "case_index")
        if case in out:
            raise f.error(f"case_index {case} appears twice", "case_index")
        out[case] = CompletionPrompt(case, f.str_("question"), f.str_("text_completion_prompt"))
    return out


def load_completion_prompts(path: str | os.PathLike[str]) -> dict[int, CompletionPrompt]:
    return parse_completion_prompts(read_json(path), source=str(path))


def pair_completion_prompts(records: Sequence[EditRecord], prompts: Mapping[int, CompletionPrompt], *,
                            source: str = "the completion prompts") -> list[tuple[EditRecord, CompletionPrompt]]:
    """The records that have a completion prompt, each with it. A prompt's question must be its
    record's question: a prompt file made for another zsRE file (the eval split's prompts with the
    train split's records) is refused, naming the first mismatch, instead of pairing wrong facts."""
    by_id = {r.case_id: r for r in records}
    pairs = []
    for case, p in sorted(prompts.items()):
        rec = by_id.get(case)
        if rec is None:
            continue
        if _question(p.question) != _question(rec.rewrite_prompt):
            raise RecordError(f"question {p.question!r} is not record {case}'s {rec.rewrite_prompt!r}: the prompts "
                              "were made for another file", index=case, field="question", source=source)
        pairs.append((rec, p))
    if not pairs:
        raise EditscaleError(f"no record of the dataset has a completion prompt in {source} (it covers case "
                             f"indices {min(prompts)}..{max(prompts)}); pass the zsRE file the prompts were made for")
    return pairs


def _question(q: str) -> str:
    return " ".join(q.split()).rstrip("?").strip().lower()
