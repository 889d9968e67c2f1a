"""The one record type every dataset is normalised to, and its validation.

A record describes one requested fact rewrite in CounterFact terms: a prompt template with ``{}``
where the subject goes, the true object and the counterfactual new object, plus the prompts used
to measure generalisation (paraphrases) and specificity (neighbourhood). Targets are stored
without their leading space; the model family's spacing rule is applied when tokenising.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from editscale.errors import EditscaleError, RecordError

# extra["ns"] of a record whose neighbourhood prompt is an unrelated question answered by the model
# itself (zsRE's loc/loc_ans): its NS is the agreement of that answer's tokens before and after the edit
NS_AGREEMENT = "agreement"


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
        if not isinstance(d, Mapping):
            raise RecordError(f"expected a JSON object, got {type(d).__name__}", index=index, source=source)
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

        def opt_str(name: str) -> str | None:
            v = d.get(name)
            if v is not None and not isinstance(v, str):
                raise RecordError(f"expected a string, got {v!r}", index=index, case_id=case_id, field=name,
                                  source=source)
            return v

        if case_id is None:
            raise RecordError("missing required field", index=index, field="case_id", source=source)
        try:
            case_id = int(case_id)
        except (TypeError, ValueError, OverflowError):
            raise RecordError(f"expected an integer, got {d.get('case_id')!r}", index=index,
                              case_id=d.get("case_id"), field="case_id", source=source) from None
        extra = d.get("extra") or {}
        if not isinstance(extra, Mapping):
            raise RecordError(f"expected a JSON object, got {type(extra).__name__}", index=index, case_id=case_id,
                              field="extra", source=source)
        rec = cls(
            case_id=case_id,
            subject=need_str("subject"),
            prompt=need_str("prompt"),
            target_true=need_str("target_true"),
            target_new=need_str("target_new"),
            relation_id=opt_str("relation_id"),
            paraphrase_prompts=str_list("paraphrase_prompts"),
            neighborhood_prompts=str_list("neighborhood_prompts"),
            attribute_prompts=str_list("attribute_prompts"),
            generation_prompts=str_list("generation_prompts"),
            target_true_id=opt_str("target_true_id"),
            target_new_id=opt_str("target_new_id"),
            extra=dict(extra),
        )
        validate_record(rec, index=index, source=source)
        return rec


class NoopRecordError(RecordError):
    """A record that asks to edit a fact to the answer it already has: there is nothing to edit.

    Its own class so that a loader can skip such records (the default of a run, `load_records`)
    while every other malformed record still stops the load."""


# A loader given one drops each no-op record after handing it the record's error; given none, it raises.
NoopHandler = Callable[[NoopRecordError], None]


def is_noop(rec: EditRecord) -> bool:
    return rec.target_true.strip() == rec.target_new.strip()


def validate_record(rec: EditRecord, *, index: int | None = None, source: str | None = None) -> None:
    """Check the invariants editors rely on; raise RecordError naming the record and field."""

    def bad(msg: str, fld: str) -> RecordError:
        return RecordError(msg, index=index, case_id=rec.case_id, field=fld, source=source)

    if rec.prompt.count("{}") != 1:
        raise bad(f"prompt must contain exactly one '{{}}' for the subject, got {rec.prompt!r}", "prompt")
    try:
        rec.prompt.format(rec.subject)
    # "{.x}" or "{[k]}" beside the "{}" look up an attribute or item of the subject
    except (IndexError, KeyError, ValueError, AttributeError, TypeError) as e:
        raise bad(f"prompt is not a valid template ({e}): {rec.prompt!r}", "prompt") from None
    if is_noop(rec):
        raise NoopRecordError(f"target_new equals target_true ({rec.target_new!r}); nothing to edit",
                              index=index, case_id=rec.case_id, field="target_new", source=source)


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


class RawRecord:
    """Typed access to one raw JSON record; every error names source, index, case_id and dotted field.

    Loaders for the various dataset schemas share it so their messages read the same way, e.g.
    ``data.json, record #3, case_id=17, field 'requested_rewrite.target_new.str': missing required field``.
    """

    def __init__(self, raw: Any, *, index: int, source: str | None = None) -> None:
        self.index = index
        self.source = source
        self.case_id: object = raw.get("case_id") if isinstance(raw, Mapping) else None
        if not isinstance(raw, Mapping):
            raise self.error(f"expected a JSON object, got {type(raw).__name__}", None)
        self.raw: Mapping[str, Any] = raw

    def error(self, msg: str, field: str | None, *, kind: type[RecordError] = RecordError) -> RecordError:
        return kind(msg, index=self.index, case_id=self.case_id, field=field, source=self.source)

    def get(self, path: str, *, required: bool = True) -> Any:
        """The value at a dotted path; None when absent (or null) and not required."""
        node: Any = self.raw
        parts = path.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, Mapping):
                parent = ".".join(parts[:depth])
                raise self.error(f"expected a JSON object, got {type(node).__name__}", parent)
            if part not in node or node[part] is None:
                if required:
                    # Name the outermost missing part: a missing "target_new" object, not its "str".
                    raise self.error("missing required field", ".".join(parts[:depth + 1]))
                return None
            node = node[part]
        return node

    def int_(self, path: str) -> int:
        v = self.get(path)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"expected an integer, got {v!r}", path)
        return v

    def opt_int(self, path: str) -> int | None:
        return None if self.get(path, required=False) is None else self.int_(path)

    def str_(self, path: str) -> str:
        v = self.get(path)
        if not isinstance(v, str) or not v.strip():
            raise self.error(f"expected a non-empty string, got {v!r}", path)
        return v

    def opt_str(self, path: str) -> str | None:
        return None if self.get(path, required=False) is None else self.str_(path)

    def str_list(self, path: str, *, required: bool = True, nonempty: bool = False) -> tuple[str, ...]:
        v = self.get(path, required=required)
        if v is None:
            return ()
        if not isinstance(v, list):
            raise self.error(f"expected a list of strings, got {type(v).__name__}", path)
        if nonempty and not v:
            raise self.error("expected a non-empty list", path)
        for j, s in enumerate(v):
            if not isinstance(s, str) or not s.strip():
                raise self.error(f"expected a non-empty string, got {s!r}", f"{path}[{j}]")
        return tuple(v)

    def template(self, prompt: str, subject: str, field: str) -> str:
        """ROME's ``prompt.replace(subject, "{}")``, refusing prompts where that would not round-trip."""
        n = prompt.count(subject)
        if n == 0:
            raise self.error(f"subject {subject!r} does not occur in {prompt!r}", field)
        if n > 1:
            raise self.error(f"subject {subject!r} occurs {n} times in {prompt!r}; the template is ambiguous",
                             field)
        if "{" in prompt or "}" in prompt:
            raise self.error(f"contains a brace, which would break the '{{}}' template: {prompt!r}", field)
        return prompt.replace(subject, "{}")

    def validated(self, rec: EditRecord, renames: Mapping[str, str]) -> EditRecord:
        """Run :func:`validate_record`, reporting EditRecord field names as the source file's names."""
        try:
            validate_record(rec, index=self.index, source=self.source)
        except RecordError as e:
            raise self.error(e.detail, renames.get(e.field or "", e.field), kind=type(e)) from None
        return rec


def not_a_dataset(raw: Any) -> str:
    """A hint, for a loader's error, when a decoded file is one of the companions that travel with
    edit datasets (sample indices, selection flags, prompt lists, QnA rewrites) rather than records;
    empty otherwise."""
    if isinstance(raw, Mapping) and raw:
        values = list(raw.values())
        if all(isinstance(v, list) and all(isinstance(i, int) for i in v[:10]) for v in values):
            return "; this looks like a sample file ({\"0\": [case ids], ...}): pass it as --sample-file"
        if all(isinstance(v, bool) for v in values):
            return "; this looks like a selection file ({\"<case_id>\": true|false}), not edit records"
    if isinstance(raw, list) and raw:
        first = raw[0]
        if isinstance(first, str):
            return "; this is a list of strings (a prompts file?), not edit records"
        if isinstance(first, Mapping) and "text_completion_prompt" in first:
            return ("; this is a file of zsRE completion prompts (give it to `editscale zsre-check --prompts`), "
                    "not edit records: it has no true target to edit away from")
        if isinstance(first, Mapping) and "case_index" in first and "target_true" not in first:
            return ("; this looks like a companion file whose case_index points into another dataset "
                    "(QnA or completion prompts), not edit records: it has no true target to edit away from")
    return ""


def read_json(path: str | os.PathLike[str]) -> Any:
    """``json.load`` with errors that name the file (and the line and column of a syntax error)."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                          source=str(p)) from None
    except UnicodeDecodeError as e:
        raise RecordError(f"not UTF-8 text: {e}", source=str(p)) from None
    except RecursionError:
        raise RecordError("JSON nested too deeply", source=str(p)) from None
    except OSError as e:
        raise EditscaleError(f"cannot read {p}: {e.strerror or e}") from None
