"""CounterFact: load the dataset in either schema users hold, download it once, validate every record.

Two schemas exist in the wild and are detected per file:

* the original ROME/MEMIT ``counterfact.json`` (``requested_rewrite{prompt, subject, target_new{str,id},
  target_true{str,id}, relation_id}``, ``paraphrase_prompts``, ``neighborhood_prompts``, ...), and
* the reduced EasyEdit/MEND split (``counterfact-{train,val,edit}.json``: ``prompt`` with the subject
  filled in, ``target_new`` and ``ground_truth`` as plain strings, one rephrase and one locality prompt).

The paper's samples (docs/protocol.md §9.1) index records by list position, which equals ``case_id`` only in the
full file or in the three EasyEdit splits merged by ``case_id``; :func:`assert_case_id_is_position` checks
that before positions are trusted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from editscale.config_files import cache_root
from editscale.data.records import EditRecord, NoopHandler, NoopRecordError, RawRecord, not_a_dataset, read_json
from editscale.errors import EditscaleError, RecordError

COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
# sha256 of the 45,108,470-byte counterfact.json that rebuilding-rome tracks in Git LFS (MANIFEST.md);
# pass it as ``sha256=`` to verify a download or a local copy.
COUNTERFACT_SHA256 = "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f"
COUNTERFACT_SIZE = 21919

# A fetcher copies the resource at a URL into an open binary file; tests inject their own.
Fetcher = Callable[[str, BinaryIO], None]
PathLike = str | os.PathLike[str]

EASYEDIT_LACKS = (
    "relation_id",
    "target_true_id",
    "target_new_id",
    "pararel_idx",
    "attribute_prompts",
    "generation_prompts",
    "all but one paraphrase prompt",
    "all but one neighborhood prompt",
)
EASYEDIT_NOTE = (
    "paraphrase_prompts holds EasyEdit's rephrase_prompt, which is often one of ROME's generation "
    "prompts rather than a paraphrase prompt, so PS/NS here are not the paper's"
)


# --------------------------------------------------------------------------------------------------
# Download and cache


def default_cache_dir() -> Path:
    """``$EDITSCALE_CACHE`` if set, else ``~/.cache/editscale``."""
    return cache_root()


def cache_path_for(url: str, cache_dir: PathLike | None = None) -> Path:
    """Where ``url`` is cached. The official file keeps its plain name so a manual copy can be dropped in."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    if url == COUNTERFACT_URL:
        return root / name
    # Other URLs may share a base name; keep them apart.
    return root / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def urllib_fetch(url: str, out: BinaryIO, *, timeout: float = 60.0) -> None:
    """Stream ``url`` into ``out`` with urllib (http, https and file URLs)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            expected = resp.headers.get("Content-Length") if resp.headers else None
            start = out.tell()
            shutil.copyfileobj(resp, out, length=1 << 20)
            got = out.tell() - start
    except (urllib.error.URLError, OSError) as e:
        raise EditscaleError(
            f"could not download {url}: {e}. Download it by hand and pass path=..., or set EDITSCALE_CACHE"
        ) from e
    if expected is not None and expected.isdigit() and int(expected) != got:
        raise EditscaleError(f"download of {url} was cut short: got {got} of {expected} bytes")


def sha256_of(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(path: Path, expected: str, what: str) -> None:
    got = sha256_of(path)
    if got != expected.lower():
        raise EditscaleError(f"sha256 mismatch for {what}: expected {expected}, got {got}")


def download_file(url: str, dest: PathLike, *, sha256: str | None = None, fetch: Fetcher | None = None
                  ) -> Path:
    """Download ``url`` to ``dest`` atomically: the bytes go to a temporary file in the same folder that is
    renamed over ``dest`` only once complete (and, if ``sha256`` is given, verified), so an interrupted
    download never leaves a partial ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fetch = fetch or urllib_fetch
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            fetch(url, out)
            out.flush()
            os.fsync(out.fileno())
        if sha256 is not None:
            _check_sha256(tmp, sha256, f"download of {url}")
        os.replace(tmp, dest)
    except BaseException:
        # BaseException: a Ctrl-C mid-download must not leave the temporary file behind either.
        tmp.unlink(missing_ok=True)
        raise
    return dest


def fetch_cached(url: str = COUNTERFACT_URL, *, cache_dir: PathLike | None = None, sha256: str | None = None,
                 fetch: Fetcher | None = None) -> Path:
    """Return the cached copy of ``url``, downloading it on first use."""
    dest = cache_path_for(url, cache_dir)
    if dest.is_file():
        if sha256 is not None:
            _check_sha256(dest, sha256, f"cached file {dest} (delete it to download again)")
        return dest
    return download_file(url, dest, sha256=sha256, fetch=fetch)


# --------------------------------------------------------------------------------------------------
# The two schemas


def _from_rome(raw: Any, index: int, source: str) -> EditRecord:
    f = RawRecord(raw, index=index, source=source)
    case_id = f.int_("case_id")
    rr = "requested_rewrite"
    rec = EditRecord(
        case_id=case_id,
        subject=f.str_(f"{rr}.subject"),
        prompt=f.str_(f"{rr}.prompt"),
        target_true=f.str_(f"{rr}.target_true.str"),
        target_new=f.str_(f"{rr}.target_new.str"),
        relation_id=f.opt_str(f"{rr}.relation_id"),
        paraphrase_prompts=f.str_list("paraphrase_prompts"),
        neighborhood_prompts=f.str_list("neighborhood_prompts"),
        attribute_prompts=f.str_list("attribute_prompts", required=False),
        generation_prompts=f.str_list("generation_prompts", required=False),
        target_true_id=f.opt_str(f"{rr}.target_true.id"),
        target_new_id=f.opt_str(f"{rr}.target_new.id"),
        extra={"schema": "rome", "pararel_idx": f.opt_int("pararel_idx")},
    )
    return f.validated(rec, {"prompt": f"{rr}.prompt", "target_new": f"{rr}.target_new.str"})


def _from_easyedit(raw: Any, index: int, source: str) -> EditRecord:
    f = RawRecord(raw, index=index, source=source)
    case_id = f.int_("case_id")
    subject = f.str_("subject")
    ground_truth = f.str_("ground_truth")
    locality_gt = f.str_("locality_ground_truth")
    extra: dict[str, Any] = {"schema": "easyedit", "lacks": EASYEDIT_LACKS, "note": EASYEDIT_NOTE}
    if locality_gt != ground_truth:
        # Evaluators score neighbourhood prompts against this instead of target_true when present.
        extra["neighborhood_target"] = locality_gt
    rec = EditRecord(
        case_id=case_id,
        subject=subject,
        prompt=f.template(f.str_("prompt"), subject, "prompt"),
        target_true=ground_truth,
        target_new=f.str_("target_new"),
        paraphrase_prompts=(f.str_("rephrase_prompt"),),
        neighborhood_prompts=(f.str_("locality_prompt"),),
        extra=extra,
    )
    return f.validated(rec, {})


_SCHEMAS: dict[str, Callable[[Any, int, str], EditRecord]] = {"rome": _from_rome, "easyedit": _from_easyedit}


def detect_schema(raw: Sequence[Any], *, source: str = "<memory>") -> str:
    """``"rome"`` or ``"easyedit"``, judged from the first record."""
    if not raw:
        raise RecordError("the file holds no records", source=source)
    first = raw[0]
    if not isinstance(first, Mapping):
        raise RecordError(f"expected a JSON object, got {type(first).__name__}{not_a_dataset(raw)}", index=0,
                          source=source)
    if "requested_rewrite" in first:
        return "rome"
    if "prompt" in first and ("ground_truth" in first or isinstance(first.get("target_new"), str)):
        return "easyedit"
    raise RecordError(
        "cannot tell the schema: expected 'requested_rewrite' (ROME counterfact.json) or 'prompt' and "
        f"'ground_truth' (EasyEdit split); keys are {sorted(first)}{not_a_dataset(raw)}",
        index=0, case_id=first.get("case_id"), source=source,
    )


def parse_counterfact(raw: Any, *, source: str = "<memory>", schema: str | None = None,
                      on_noop: NoopHandler | None = None) -> list[EditRecord]:
    """Normalise a decoded CounterFact JSON list (either schema) to validated records, in file order.

    A record whose target_new equals its target_true is an error, or, given ``on_noop``, handed to it
    and dropped."""
    return [rec for _, rec in _parse_positions(raw, source=source, schema=schema, on_noop=on_noop)]


def _parse_positions(raw: Any, *, source: str, schema: str | None = None, on_noop: NoopHandler | None = None
                     ) -> list[tuple[int, EditRecord]]:
    """The kept records with their positions in the file (errors name records by file position)."""
    if not isinstance(raw, list):
        raise RecordError(f"expected a JSON list of records, got {type(raw).__name__}{not_a_dataset(raw)}",
                          source=source)
    schema = schema or detect_schema(raw, source=source)
    if schema not in _SCHEMAS:
        raise EditscaleError(f"unknown CounterFact schema {schema!r}; expected one of {sorted(_SCHEMAS)}")
    convert = _SCHEMAS[schema]
    kept: list[tuple[int, EditRecord]] = []
    for i, r in enumerate(raw):
        try:
            kept.append((i, convert(r, i, source)))
        except NoopRecordError as e:
            if on_noop is None:
                raise
            on_noop(e)
    _check_unique_case_ids([rec for _, rec in kept], [(source, i) for i, _ in kept])
    return kept


def _check_unique_case_ids(records: Sequence[EditRecord], where: Sequence[tuple[str, int]]) -> None:
    seen: dict[int, tuple[str, int]] = {}
    for rec, (src, i) in zip(records, where, strict=True):
        if rec.case_id in seen:
            first_src, first_i = seen[rec.case_id]
            also = f"{first_src} " if first_src != src else ""
            raise RecordError(f"duplicate case_id (first seen at {also}record #{first_i})", index=i,
                              case_id=rec.case_id, field="case_id", source=src)
        seen[rec.case_id] = (src, i)


def read_counterfact_file(path: PathLike, *, on_noop: NoopHandler | None = None) -> list[EditRecord]:
    """One CounterFact JSON file, either schema, in file order."""
    return parse_counterfact(read_json(path), source=str(path), on_noop=on_noop)


def _expand(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise EditscaleError(f"no *.json files in {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise EditscaleError(f"no such file or directory: {p}")
    if not out:
        raise EditscaleError("no CounterFact files given")
    return out


def read_counterfact_files(paths: PathLike | Iterable[PathLike], *, on_noop: NoopHandler | None = None
                           ) -> list[EditRecord]:
    """Load one file, a directory of ``*.json`` files, or a list of files/directories.

    More than one file (the EasyEdit train/val/edit split) is merged and sorted by ``case_id``; a
    case_id present in two files is an error naming both."""
    files = _expand(paths)
    if len(files) == 1:
        return read_counterfact_file(files[0], on_noop=on_noop)
    records: list[EditRecord] = []
    where: list[tuple[str, int]] = []
    for p in files:
        for i, rec in _parse_positions(read_json(p), source=str(p), on_noop=on_noop):
            records.append(rec)
            where.append((str(p), i))
    _check_unique_case_ids(records, where)
    return sorted(records, key=lambda r: r.case_id)


def _is_url(s: object) -> bool:
    return isinstance(s, str) and "://" in s


def load_counterfact(
    source: PathLike | Sequence[PathLike] | None = None,
    *,
    path: PathLike | Sequence[PathLike] | None = None,
    url: str = COUNTERFACT_URL,
    cache_dir: PathLike | None = None,
    limit: int | None = None,
    sha256: str | None = None,
    fetch: Fetcher | None = None,
    on_noop: NoopHandler | None = None,
) -> list[EditRecord]:
    """Load CounterFact as validated :class:`EditRecord` s.

    ``source`` (or ``path=``) is a file, a directory, a list of files, or a URL. With neither, ``url`` (the
    published ``counterfact.json``) is downloaded once into ``cache_dir`` (default ``$EDITSCALE_CACHE`` or
    ``~/.cache/editscale``). ``sha256`` verifies the file (see :data:`COUNTERFACT_SHA256`); ``fetch``
    replaces the urllib download. ``limit`` keeps the first records after sorting by file/case_id order.
    A record whose target_new equals its target_true is an error, or, given ``on_noop``, handed to it and
    dropped.
    """
    if source is not None and path is not None:
        raise EditscaleError("give either source or path=, not both")
    target = source if source is not None else path
    if target is None or _is_url(target):
        link = target if isinstance(target, str) else url
        files: PathLike | Sequence[PathLike] = fetch_cached(link, cache_dir=cache_dir, sha256=sha256,
                                                            fetch=fetch)
    else:
        files = target
        if sha256 is not None:
            single = _expand(files)
            if len(single) != 1:
                raise EditscaleError("sha256= checks a single file; got several")
            _check_sha256(single[0], sha256, str(single[0]))
    records = read_counterfact_files(files, on_noop=on_noop)
    if limit is not None:
        if limit < 0:
            raise EditscaleError(f"limit must be >= 0, got {limit}")
        records = records[:limit]
    return records


# --------------------------------------------------------------------------------------------------
# Position semantics (docs/protocol.md §9.1)


def dataset_by_case_id(records: Iterable[EditRecord]) -> dict[int, EditRecord]:
    """Map case_id to record, refusing duplicates."""
    out: dict[int, EditRecord] = {}
    for i, rec in enumerate(records):
        if rec.case_id in out:
            raise RecordError("duplicate case_id", index=i, case_id=rec.case_id, field="case_id")
        out[rec.case_id] = rec
    return out


def assert_case_id_is_position(records: Sequence[EditRecord], *, source: str | None = None) -> None:
    """Raise unless ``records[i].case_id == i`` for every i.

    The paper's sample files and plotting scripts index CounterFact by list position and name results by
    case_id; the two agree only for the full file (or the merged EasyEdit splits)."""
    for i, rec in enumerate(records):
        if rec.case_id != i:
            raise RecordError(
                f"case_id differs from list position {i}; position-based sample indices would pick the "
                "wrong records (load the full dataset, or select by case_id)",
                index=i, case_id=rec.case_id, field="case_id", source=source,
            )
