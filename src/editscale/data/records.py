"""The one record type every dataset is normalised to, and its validation.

A record describes one requested fact rewrite in CounterFact terms: a prompt template with ``{}``
where the subject goes, the true object and the counterfactual new object, plus the prompts used
to measure generalisation (paraphrases) and specificity (neighbourhood). Targets are stored
without their leading space; the model family's spacing rule is applied when tokenising.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from editscale.errors import RecordError


@dataclass(frozen=True)
class EditRecord:
    case_id: int
    subject: str
    prompt: str  # template with exactly one "{}" for the subject, e.g. "The mother tongue of {} is"
    target_true: str
    target_new: str
    relation_id: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()  # subject already filled in
    neighborhood_prompts: tuple[str, ...] = ()  # other subjects, same relation and true object
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    target_true_id: str | None = None
    target_new_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rewrite_prompt(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, index: int | None = None, source: str | None = None
                  ) -> EditRecord:
        """Build from the record's own ``to_dict`` form, validating every field."""
        case_id = d.get("case_id")

        def need_str(name: str) -> str:
            if name not in d or d[name] is None:
                raise RecordError("missing required field", index=index, case_id=case_id, field=name,
                                  source=source)
            v = d[name]
            if not isinstance(v, str) or not v.strip():
                raise RecordError(f"expected a non-empty string, got {v!r}", index=index,
                                  case_id=case_id, field=name, source=source)
            return v

        def str_list(name: str) -> tuple[str, ...]:
            v = d.get(name) or []
            if isinstance(v, str) or not isinstance(v, Iterable):
                raise RecordError(f"expected a list of strings, got {type(v).__name__}", index=index,
                                  case_id=case_id, field=name, source=source)
            out = tuple(v)
            for j, s in enumerate(out):
                if not isinstance(s, str) or not s.strip():
                    raise RecordError(f"item {j} is not a non-empty string: {s!r}", index=index,
                                      case_id=case_id, field=name, source=source)
            return out

        if case_id is None:
            raise RecordError("missing required field", index=index, field="case_id", source=source)
        try:
            case_id = int(case_id)
        except (TypeError, ValueError):
            raise RecordError(f"expected an integer, got {d.get('case_id')!r}", index=index,
                              case_id=d.get("case_id"), field="case_id", source=source) from None
        rec = cls(
            case_id=case_id,
            subject=need_str("subject"),
            prompt=need_str("prompt"),
            target_true=need_str("target_true"),
            target_new=need_str("target_new"),
            relation_id=d.get("relation_id"),
            paraphrase_prompts=str_list("paraphrase_prompts"),
            neighborhood_prompts=str_list("neighborhood_prompts"),
            attribute_prompts=str_list("attribute_prompts"),
            generation_prompts=str_list("generation_prompts"),
            target_true_id=d.get("target_true_id"),
            target_new_id=d.get("target_new_id"),
            extra=dict(d.get("extra") or {}),
        )
        validate_record(rec, index=index, source=source)
        return rec


def validate_record(rec: EditRecord, *, index: int | None = None, source: str | None = None) -> None:
    """Check the invariants editors rely on; raise RecordError naming the record and field."""

    def bad(msg: str, fld: str) -> RecordError:
        return RecordError(msg, index=index, case_id=rec.case_id, field=fld, source=source)

    if rec.prompt.count("{}") != 1:
        raise bad(f"prompt must contain exactly one '{{}}' for the subject, got {rec.prompt!r}", "prompt")
    try:
        rec.prompt.format(rec.subject)
    except (IndexError, KeyError, ValueError) as e:
        raise bad(f"prompt is not a valid template ({e}): {rec.prompt!r}", "prompt") from None
    if rec.target_true.strip() == rec.target_new.strip():
        raise bad(f"target_new equals target_true ({rec.target_new!r}); nothing to edit", "target_new")


def validate_records(records: Iterable[EditRecord], *, source: str | None = None) -> list[EditRecord]:
    out = list(records)
    seen: dict[int, int] = {}
    for i, r in enumerate(out):
        validate_record(r, index=i, source=source)
        if r.case_id in seen:
            raise RecordError(f"duplicate case_id (first seen at record #{seen[r.case_id]})", index=i,
                              case_id=r.case_id, field="case_id", source=source)
        seen[r.case_id] = i
    return out
