"""The statistics-corpus registry: the text that second-moment statistics C are accumulated over.

`factworld` is generated from the embedded model's own world; `wikitext` and `wikipedia` (the
reference's corpus) go through `datasets`. Anything else is a local file or folder of text
(`local_documents`, docs/protocol.md §2.5). A corpus is a fixed random subset of its documents.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from editscale.data.factworld import default_world
from editscale.data.factworld.skills import SKILL_TASKS, skill_training_text
from editscale.data.factworld.world import fact_lines
from editscale.errors import EditscaleError, UnknownNameError

SUBSET_SEED = 1  # the reference's `random_sample = 1`


def _factworld_docs() -> list[str]:
    """Documents in the embedded model's own training distribution: fact lines and skill blocks.

    A fixed pool of about 7,500 documents (1,500 of fact lines, 1,500 per skill task); mixing both
    keeps C well conditioned, fact lines alone span few key directions.
    """
    world = default_world()
    rng = random.Random("stats-corpus")
    lines = fact_lines(world, 3, rng)
    docs = ["\n".join(lines[i:i + 4]) for i in range(0, len(lines), 4)][:1500]
    for task in SKILL_TASKS.values():
        text = skill_training_text(task, rng, world.reserved_names, 3000)
        blocks = [b for b in text.split("\n\n") if b.strip()]
        docs.extend("\n\n".join(blocks[i:i + 2]) + "\n\n" for i in range(0, len(blocks), 2))
    return docs


OFFLINE_HINT = ("pass --stats-corpus PATH (a local .txt, .jsonl or .parquet file, or a folder of them) "
                "or --stats-corpus factworld (the embedded model's own text)")


def _hf_docs(corpus: str, path: str, name: str | None) -> Callable[[], list[str]]:
    def load() -> list[str]:
        try:
            import datasets
        except ImportError as err:
            raise EditscaleError(f"statistics corpus '{corpus}' needs `datasets` (pip install 'editscale[online]'); "
                                 f"or {OFFLINE_HINT}") from err
        try:
            ds = datasets.load_dataset(path, name, split="train")
        # Offline mode and an unreachable hub both end here: datasets raises ConnectionError, and
        # huggingface_hub's HTTP errors and datasets' DatasetNotFoundError are OSErrors too.
        except OSError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise EditscaleError(f"statistics corpus '{corpus}' could not be loaded from the Hugging Face hub "
                                 f"({reason}); {OFFLINE_HINT}") from err
        return [t for t in ds["text"] if t.strip()]

    return load


# name -> all the documents of a corpus; `corpus_documents` takes the fixed subset a run uses
CORPORA: dict[str, Callable[[], list[str]]] = {
    "factworld": _factworld_docs,
    "wikitext": _hf_docs("wikitext", "wikitext", "wikitext-103-raw-v1"),
    # The reference's "wikipedia"/"20200501.en" snapshot is gone from the hub; this is its successor.
    "wikipedia": _hf_docs("wikipedia", "wikimedia/wikipedia", "20231101.en"),
}
# Generated corpora change when their generator does; the revision is part of the cache path, so
# statistics cached from an older revision are never read back. Bump it with the generator.
CORPUS_REVISIONS = {"factworld": 3}  # 2: skill examples keep recent objects out; 3: stated or denied facts

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _unknown(corpus: str, why: str = "") -> UnknownNameError:
    shown = f"'{corpus}'" if corpus.isprintable() else repr(corpus)
    return UnknownNameError(f"unknown statistics corpus {shown}{why}; known: {', '.join(CORPORA)}, or a local "
                            f"{', '.join(LOCAL_SUFFIXES)} file or a folder of them")


def resolve_corpus(corpus: str) -> str:
    """A registry name as it is; a local file or folder as its absolute path (so a run resumed from
    another directory reads the same text). Anything else is an error naming the corpus."""
    if corpus in CORPORA:
        return corpus
    try:
        path = Path(corpus).expanduser()
        found = path.exists()
    # no such user for "~name", a NUL byte, a name too long for the file system
    except (OSError, ValueError, RuntimeError) as err:
        raise _unknown(corpus, f" (not a usable path: {err})") from None
    if not found:
        raise _unknown(corpus)
    _local_files(path)  # a file of another kind, or a folder without text files, fails here
    return str(path.resolve())


def _local_files(path: Path) -> list[Path]:
    """The text files of a local corpus: the file itself, or every file with a known suffix under
    the folder, recursively, sorted by relative path."""
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise EditscaleError(f"statistics corpus {path}: expected a {', '.join(LOCAL_SUFFIXES)} file or a folder")
        return [path]
    files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise EditscaleError(f"statistics corpus {path}: the folder holds no {', '.join(LOCAL_SUFFIXES)} files")
    return files


_BLANK_LINE = re.compile(r"\n(?:[ \t]*\n)+")


def _txt_docs(path: Path) -> list[str]:
    # A file with blank lines holds paragraphs (documents between blank lines, as plain prose);
    # a file without any holds one document per line (as the lines of a JSONL dump of text).
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    parts = _BLANK_LINE.split(text) if _BLANK_LINE.search(text) else text.split("\n")
    return [p.strip("\n") for p in parts if p.strip()]


def _jsonl_docs(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EditscaleError(f"statistics corpus {path}, line {n}: not JSON ({err.msg})") from None
            except RecursionError:
                raise EditscaleError(f"statistics corpus {path}, line {n}: JSON nested too deeply") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise EditscaleError(f"statistics corpus {path}, line {n}: expected an object with a string 'text'")
            if text.strip():
                docs.append(text)
    return docs


def _parquet_docs(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        if "text" not in pq.read_schema(path).names:
            raise EditscaleError(f"statistics corpus {path}: the parquet file has no 'text' column")
        column = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid (not parquet) is a ValueError
        raise EditscaleError(f"statistics corpus {path}: cannot read it as parquet ({err})") from None
    return [t for t in column if isinstance(t, str) and t.strip()]


_READERS = {".txt": _txt_docs, ".jsonl": _jsonl_docs, ".parquet": _parquet_docs}


def local_documents(path: Path | str) -> list[str]:
    """Every document of a local corpus, files in sorted order (docs/protocol.md §2.5):

    * `.txt`: documents separated by blank lines; a file with no blank line has one per line;
    * `.jsonl`: one JSON object per line, its `text` field;
    * `.parquet`: the `text` column (read with pyarrow);
    * a folder: every such file below it, recursively, sorted by relative path.
    Empty documents are dropped.
    """
    docs: list[str] = []
    for f in _local_files(Path(path)):
        try:
            docs.extend(_READERS[f.suffix.lower()](f))
        except UnicodeDecodeError as err:
            raise EditscaleError(f"statistics corpus {f}: not UTF-8 text ({err.reason})") from None
    return docs


def corpus_cache_name(corpus: str) -> str:
    """The name statistics of a corpus are cached under: a registry name with its revision, or for a
    local corpus its name and a hash of its files' names and bytes, so an edited file is new text
    and a copied one is the same text."""
    if corpus in CORPORA:
        return corpus + (f"-r{CORPUS_REVISIONS[corpus]}" if corpus in CORPUS_REVISIONS else "")
    path = Path(resolve_corpus(corpus))
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _local_files(path))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name)[:40] or "corpus"
    return f"{slug}-{_content_hash(str(path), stamp)}"


@lru_cache(maxsize=16)
def _content_hash(root: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    # `stamp` (names, sizes, mtimes) only keys this in-process memo: a corpus is hashed once per
    # process for all the layers it serves, and again as soon as a file changes.
    h = hashlib.sha256()
    base = Path(root)
    for name, size, _mtime in stamp:
        f = Path(name)
        # a folder's file names set the order of its documents; a single file's name changes nothing
        h.update((f.relative_to(base).as_posix() if f != base else "").encode() + b"\0")
        h.update(str(size).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def all_documents(corpus: str) -> list[str]:
    """Every document of a corpus, in its own order."""
    if corpus in CORPORA:
        return CORPORA[corpus]()
    return local_documents(resolve_corpus(corpus))


def corpus_documents(corpus: str, n_samples: int | None) -> list[str]:
    """`n_samples` documents of a corpus: a fixed random subset (seed 1), in a fixed order.

    `n_samples=None` gives every document in a fixed random order (seed 1), for accumulations that
    stop early (`mom2_n_samples: auto`): any prefix of it is a random sample of the corpus.
    """
    docs = all_documents(corpus)
    if n_samples is None:
        return [docs[i] for i in random.Random(SUBSET_SEED).sample(range(len(docs)), len(docs))]
    if len(docs) > n_samples:
        idx = sorted(random.Random(SUBSET_SEED).sample(range(len(docs)), n_samples))
        docs = [docs[i] for i in idx]
    return docs
