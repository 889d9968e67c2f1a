"""Property-based fuzzing of every loader and config parser (hypothesis).

Each loader is given arbitrary JSON, wrong types, records with fields deleted, added or of the wrong
type, huge strings, deep nesting and raw non-UTF-8 bytes. The only allowed outcomes are a result or an
`EditscaleError` in one line that names the file (or source); a problem in one record is a
`RecordError` naming that record and its field. Anything else (a traceback) fails the test. (A string
of the input that a message quotes as it is may carry its own line breaks.)

The example budget is fixed and the examples derandomised, so a run is the same run everywhere and the
file takes about 15 s on two cores; `EDITSCALE_FUZZ_EXAMPLES=N` runs more of them locally and
`EDITSCALE_FUZZ_SHRINK=1` shrinks a failing example.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from editscale.cli import _parse_sets, _read_method_config, build_run_config
from editscale.config_files import read_yaml_mapping
from editscale.data.corpora import local_documents, resolve_corpus
from editscale.data.counterfact import parse_counterfact, read_counterfact_file, read_counterfact_files
from editscale.data.fewshot import FORMATS
from editscale.data.glue import example_from_row, load_glue_file, load_glue_jsonl, load_glue_pickle
from editscale.data.records import EditRecord, read_json
from editscale.data.registry import load_dataset
from editscale.data.sampling import edit_order, load_sample_file, load_selection_flags, validate_samples
from editscale.data.zsre import load_zsre, load_zsre_samples, parse_zsre
from editscale.errors import EditscaleError, RecordError
from editscale.eval.downstream.registry import DownstreamTask, get_tasks, load_task_file, task_registry
from editscale.methods.base import get_method, list_methods, preset_mapping, resolve_method_config
from editscale.methods.config import from_reference_hparams
from editscale.models.families import GPT2
from editscale.run.config import RunConfig, load_config, read_config_file
from editscale.run.sweep import SweepSpec
from test_counterfact import easyedit_record, rome_record
from test_zsre import mend_record

EXAMPLES = int(os.environ.get("EDITSCALE_FUZZ_EXAMPLES", "40"))
# No shrinking unless asked for (EDITSCALE_FUZZ_SHRINK=1): a failure then costs no more time than a pass.
PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("EDITSCALE_FUZZ_SHRINK") else [])
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                phases=PHASES, suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------------------------- strategies

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=30) | st.sampled_from(["", " ", "{}", "{0}", "{", "}", "\x00", "é", "nq question: q"]))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=5)
                           | st.dictionaries(st.text(max_size=10), kids, max_size=5), max_leaves=25)
# what a pickle can hold without a global, beyond JSON
pickle_values = st.recursive(scalars | st.binary(max_size=10),
                             lambda kids: st.lists(kids, max_size=5) | st.tuples(kids, kids)
                             | st.dictionaries(st.text(max_size=10) | st.integers(), kids, max_size=5),
                             max_leaves=25)
def huge(n: int) -> str:
    return "é{}x\n" * (n // 4)


huge_strings = st.integers(10_000, 60_000).map(huge)  # a field's value: round-trips through YAML in the tests
# bytes that are not UTF-8 anywhere a decoder would look: a bad lead byte first, more inside
non_utf8 = st.tuples(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x80"]), st.binary(max_size=60)).map(
    lambda t: t[0] + t[1] + b"\xfe")
# past Python's recursion limit, where the json and yaml parsers give up with a RecursionError
deep = st.integers(1_100, 20_000).map(lambda n: "[" * n + "]" * n)


def dump_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def dump_yaml(value: Any) -> bytes:
    return yaml.safe_dump(value, allow_unicode=True).encode()


# the content of a file: arbitrary JSON or YAML, text that is neither, or bytes that are not UTF-8
file_bytes = st.one_of(
    json_values.map(dump_json),
    json_values.map(dump_yaml),
    st.text(max_size=200).map(str.encode),
    non_utf8,
    st.binary(max_size=200),
)
# huge or deeply nested files, for the JSON readers (the YAML reader, slow on them, gets two: see below)
heavy_bytes = st.one_of(
    st.integers(200_000, 1_000_000).map(lambda n: dump_json([huge(n), {"text": huge(n)}])),
    st.integers(200_000, 1_000_000).map(lambda n: (huge(n).replace("\n", " ") + "\n").encode()),
    deep.map(str.encode),
)


def paths_in(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths_in(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths_in(v, (*prefix, i))


def get_at(obj: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        obj = obj[part]
    return obj


@st.composite
def mutated(draw: st.DrawFn, base: Any, values: st.SearchStrategy[Any] = json_values) -> tuple[Any, tuple[Any, ...]]:
    """``base`` with one change at one place: a field deleted, replaced (wrong type, null, huge string),
    or an extra field added. Returns the mutated object and the path changed (() for the whole)."""
    obj = copy.deepcopy(base)
    path = draw(st.sampled_from(list(paths_in(obj))))
    op = draw(st.sampled_from(["delete", "replace", "replace", "null", "huge", "extra"]))
    new = {"null": st.none(), "huge": huge_strings}.get(op, values)
    if not path:
        return (draw(values) if op != "extra" else obj), path
    parent, last = get_at(obj, path[:-1]), path[-1]
    if op == "delete":
        del parent[last]
    elif op == "extra" and isinstance(get_at(obj, path), dict):
        get_at(obj, path)[draw(st.text(max_size=12))] = draw(values)
    else:
        parent[last] = draw(new)
    return obj, path


# ---------------------------------------------------------------------------------------------- the property


def strings_in(obj: Any) -> list[str]:
    """Every string inside a value (keys too), longest first."""
    found: list[str] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend([*item.keys(), *item.values()])
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sorted(set(found), key=len, reverse=True)


def outcome(call: Callable[[], Any], *names: str, given: Any = None) -> Any:
    """``call()``'s result, or the EditscaleError it raised, checked: one line naming each of ``names``.
    A string of the input (``given``) that the message quotes may hold line breaks of its own. Any other
    exception propagates and fails the test."""
    try:
        return call()
    except EditscaleError as err:
        msg = str(err)
        own = msg
        for text in strings_in(given):
            if "\n" in text or "\r" in text:
                own = own.replace(text, "")
        assert "\n" not in own and "\r" not in own, f"not one line: {msg[:300]!r}"
        for name in names:
            assert name in msg, f"{name!r} not named in {msg[:300]!r}"
        return err


# A record replaced as a whole, or judged as a whole, has no one field to name.
WHOLE_RECORD = ("expected a JSON object", "cannot tell the schema", "not a MEND-format", "this looks like")
# A file is judged by its first record (which schema, or a companion file rather than records).
WHOLE_FILE = ("not a MEND-format", "cannot tell the schema")


def names_record(err: Any, *, path: tuple[Any, ...]) -> None:
    """An error about one record of a list names the record (index, case_id, or a line or record number in
    its source) and a field, unless the record as a whole is the problem. ``path``: where the list was
    changed; () is the whole list, which need not name a record."""
    if not isinstance(err, EditscaleError) or not path:
        return
    msg = str(err)[:300]
    if path[0] == 0 and any(w in msg for w in WHOLE_FILE):
        return
    assert isinstance(err, RecordError), f"not a RecordError: {msg}"
    assert (err.index is not None or err.case_id is not None or "record #" in msg or ", line " in msg), \
        f"no record named: {msg}"
    assert err.field or any(w in msg for w in WHOLE_RECORD) or len(path) == 1, f"no field named: {msg}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------------------------------------- valid bases


SUBJECTS = ("Danielle Darrieux", "BBC One", "Watts Humphrey")
ROME_FILE = [rome_record(i, s) for i, s in enumerate(SUBJECTS)]
EASYEDIT_FILE = [easyedit_record(i, s) for i, s in enumerate(SUBJECTS)]
MEND_FILE = [mend_record(s) for s in SUBJECTS]
GLUE_ROWS = [{"idx": i, "label": i % 2, "sentence1": f"first {i}", "sentence2": f"second {i}"} for i in range(3)]
SAMPLES = {"0": [2, 0, 1], "1": [1, 2, 0]}
FLAGS = {"0": True, "1": False, "2": True}
RUN = {"model": "embedded", "method": "rome", "dataset": "counterfact", "edits": 2, "sample": 0,
       "downstream": ["sst2"], "stats_samples": "auto", "method_config": {"v_lr": 0.1}}
TASK = {"name": "fuzztask", "description": "a task", "source": {"kind": "jsonl", "path": "/nonexistent.jsonl"},
        "format": {"query": "Review : {sentence}\nSentiment :", "marker": "Sentiment :",
                   "label_words": {1: "positive", 0: "negative"}, "parse_order": [["positive", 1], ["negative", 0]]},
        "demos": [{"fields": {"sentence": "great fun"}, "label": 1}], "gold_to_label": {0: 1, 1: 0}}
SWEEP = {"base": {"model": "embedded", "edits": 3}, "grid": {"method": ["rome", "memit"], "sample": [0, 1],
                                                             "method_config": [{}, {"v_lr": 0.1}]},
         "per_method": {"memit": {"mom2_n_samples": 2000}}, "resources": {"cpus": 2, "gpus": 0}}
ROME_HPARAMS = {"layers": [17], "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 0.5,
                "v_loss_layer": 47, "v_weight_decay": 0.5, "clamp_norm_factor": 4, "kl_factor": 0.0625,
                "mom2_adjustment": True, "context_template_length_params": [[5, 10], [10, 10]],
                "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
                "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
                "ln_f_module": "transformer.ln_f", "lm_head_module": "transformer.wte", "mom2_dataset": "wikipedia",
                "mom2_n_samples": 100000, "mom2_dtype": "float32", "bias_update": False}


def jsonl_task(path: Path, fmt: Any) -> DownstreamTask:
    return DownstreamTask(name="t", description="", source={"kind": "jsonl", "path": str(path)}, fmt=fmt)


def valid_records() -> list[EditRecord]:
    return parse_counterfact(ROME_FILE)


def test_the_bases_are_valid(folder: Path) -> None:
    assert len(parse_counterfact(ROME_FILE)) == len(parse_counterfact(EASYEDIT_FILE)) == len(parse_zsre(MEND_FILE)) == 3
    assert [example_from_row("mrpc", r).idx for r in GLUE_ROWS] == [0, 1, 2]
    assert validate_samples(SAMPLES) == SAMPLES
    assert RunConfig.parse(RUN, source="run").edits == 2
    assert load_task_file(write(folder, "task.yaml", dump_yaml(TASK))).name == "fuzztask"
    assert SweepSpec.load(write(folder, "sweep.yaml", dump_yaml(SWEEP))).grid.sample == [0, 1]
    assert from_reference_hparams(ROME_HPARAMS, get_method("rome").config_class, GPT2)["layers"] == [17]


# ---------------------------------------------------------------------------------------------- whole files

# name -> (file name, loader, whether it also gets huge and deeply nested files). Every loader gets
# arbitrary file content and must give a result or an error naming the file. The huge and deep files go
# to every JSON reader; the one function that reads every YAML file (read_yaml_mapping) gets one of each.
FILE_LOADERS: dict[str, tuple[str, Callable[[Path], Any], bool]] = {
    "read_json": ("data.json", read_json, True),
    "counterfact": ("cf.json", read_counterfact_file, True),
    "counterfact_dir": ("cf.json", lambda p: read_counterfact_files([p, p.parent / "other.json"]), False),
    "dataset_counterfact": ("cf.json", lambda p: load_dataset("counterfact", data_path=p), False),
    "zsre": ("zsre.json", load_zsre, True),
    "zsre_reference": ("zsre.json", lambda p: load_zsre(p, targets="reference", skip_noop=True), False),
    "dataset_zsre": ("zsre.json", lambda p: load_dataset("zsre", data_path=p), False),
    "zsre_samples": ("samples.json", load_zsre_samples, False),
    "sample_file": ("samples.json", load_sample_file, True),
    "selection_flags": ("flags.json", load_selection_flags, True),
    "edit_order": ("samples.json", lambda p: edit_order(valid_records(), sample=0, edits=1, sample_file=str(p)),
                   False),
    "glue_jsonl": ("mrpc.jsonl", lambda p: load_glue_jsonl("mrpc", p), True),
    "glue_pickle": ("mrpc.pkl", lambda p: load_glue_pickle("sst2", p), True),
    "glue_file": ("mrpc.pkl", lambda p: load_glue_file("mrpc", p), False),
    "corpus_txt": ("corpus.txt", local_documents, True),
    "corpus_jsonl": ("corpus.jsonl", local_documents, True),
    "corpus_parquet": ("corpus.parquet", local_documents, False),
    "yaml_mapping": ("any.yaml", lambda p: read_yaml_mapping(p, "config"), False),
    "json_mapping": ("any.json", lambda p: read_yaml_mapping(p, "config"), True),
    "run_config_file": ("run.yaml", read_config_file, False),
    "run_config_dir": ("config.yaml", load_config, False),
    "cli_config": ("run.yaml", lambda p: build_run_config({}, config=p), False),
    "cli_method_config": ("m.json", lambda p: build_run_config({"model": "gpt2-xl"}, method_config=p), True),
    "method_from_yaml": ("rome.yaml", lambda p: get_method("rome").config_class.from_yaml(p), False),
    "sweep": ("sweep.yaml", SweepSpec.load, False),
    "task_file": ("task.yaml", load_task_file, False),
    "task_dir": ("task.yaml", lambda p: task_registry([p.parent]), False),
    "task_jsonl": ("task.jsonl", lambda p: jsonl_task(p, FORMATS["sst2"]).examples(n=3), True),
    "glue_dir": ("sst2.pkl", lambda p: get_tasks(["sst2"])[0].examples(n=3, data_dir=p.parent), False),
}


def load_file(folder: Path, loader: str, content: bytes) -> None:
    name, load, _ = FILE_LOADERS[loader]
    sub = folder / loader
    sub.mkdir(exist_ok=True)
    path = write(sub, name, content)
    (sub / "other.json").write_bytes(dump_json(EASYEDIT_FILE))
    outcome(lambda: load(path), name)


@pytest.mark.parametrize("loader", sorted(FILE_LOADERS))
@FUZZ
@given(content=file_bytes)
def test_any_file_gives_a_result_or_an_error_naming_it(folder: Path, loader: str, content: bytes) -> None:
    load_file(folder, loader, content)


@pytest.mark.parametrize("loader", sorted(k for k, v in FILE_LOADERS.items() if v[2]))
@settings(FUZZ, max_examples=max(EXAMPLES // 8, 5))
@given(content=heavy_bytes)
def test_a_huge_or_deep_file_gives_a_result_or_an_error_naming_it(folder: Path, loader: str, content: bytes) -> None:
    load_file(folder, loader, content)


@pytest.mark.parametrize("content", [("[" * 1_200 + "]" * 1_200).encode(), dump_yaml({"model": huge(200_000)}),
                                     ("a: " * 20_000).encode()])
def test_a_huge_or_deep_yaml_file_gives_a_result_or_an_error_naming_it(folder: Path, content: bytes) -> None:
    load_file(folder, "yaml_mapping", content)


@pytest.mark.parametrize("task", ["sst2", "mrpc"])
@FUZZ
@given(value=pickle_values, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_any_pickled_data_gives_a_result_or_an_error_naming_the_file(folder: Path, task: str, value: Any,
                                                                     protocol: int) -> None:
    path = write(folder, f"{task}.pkl", pickle.dumps(value, protocol=protocol))
    outcome(lambda: load_glue_pickle(task, path), str(path))


# ---------------------------------------------------------------------------------------------- one bad record


@pytest.mark.parametrize("schema", ["rome", "easyedit"])
@FUZZ
@given(data=st.data())
def test_counterfact_one_bad_record(schema: str, data: st.DataObject) -> None:
    base = ROME_FILE if schema == "rome" else EASYEDIT_FILE
    raw, path = data.draw(mutated(base))
    names_record(outcome(lambda: parse_counterfact(raw, source="cf.json"), "cf.json", given=raw), path=path)


@pytest.mark.parametrize("targets", ["alt", "reference"])
@FUZZ
@given(data=st.data())
def test_zsre_one_bad_record(targets: str, data: st.DataObject) -> None:
    raw, path = data.draw(mutated(MEND_FILE))
    err = outcome(lambda: parse_zsre(raw, source="zsre.json", targets=targets), "zsre.json", given=raw)
    names_record(err, path=path)


@FUZZ
@given(data=st.data())
def test_edit_record_from_dict(data: st.DataObject) -> None:
    base = parse_counterfact(ROME_FILE)[0].to_dict()
    raw, path = data.draw(mutated(base))
    err = outcome(lambda: EditRecord.from_dict(raw, index=0, source="records.json"), "records.json", given=raw)
    names_record(err, path=(0, *path))


@FUZZ
@given(data=st.data(), protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_glue_one_bad_row(folder: Path, data: st.DataObject, protocol: int) -> None:
    rows, path = data.draw(mutated(GLUE_ROWS, pickle_values))
    if isinstance(rows, list):
        err = outcome(lambda: [example_from_row("mrpc", r, source=f"rows, record #{i}") for i, r in enumerate(rows)],
                      "rows", given=rows)
        names_record(err, path=path)
    file = write(folder, "mrpc.pkl", pickle.dumps(rows, protocol=protocol))
    names_record(outcome(lambda: load_glue_pickle("mrpc", file), str(file), given=rows), path=path)
    rows, path = data.draw(mutated(GLUE_ROWS))
    lines = [json.dumps(r) for r in rows] if isinstance(rows, list) else [json.dumps(rows)]
    file = write(folder, "mrpc.jsonl", "\n".join(lines).encode())
    names_record(outcome(lambda: load_glue_jsonl("mrpc", file), str(file), given=rows), path=path)


@FUZZ
@given(data=st.data())
def test_samples_and_flags_one_bad_entry(folder: Path, data: st.DataObject) -> None:
    samples, _ = data.draw(mutated(SAMPLES))
    outcome(lambda: validate_samples(samples, source="samples.json"), "samples.json", given=samples)
    file = write(folder, "samples.json", dump_json(samples))
    sample, edits = data.draw(st.integers(0, 2)), data.draw(st.integers(1, 4))
    outcome(lambda: edit_order(valid_records(), sample=sample, edits=edits, sample_file=str(file)), given=samples)
    flags, _ = data.draw(mutated(FLAGS))
    file = write(folder, "flags.json", dump_json(flags))
    outcome(lambda: load_selection_flags(file), "flags.json", given=flags)


# ---------------------------------------------------------------------------------------------- config parsers


@FUZZ
@given(data=st.data())
def test_run_config_one_bad_field(folder: Path, data: st.DataObject) -> None:
    fields, _ = data.draw(mutated(RUN))
    if isinstance(fields, dict):
        outcome(lambda: RunConfig.parse(fields, source="run.yaml"), "run.yaml", given=fields)
    file = write(folder, "run.yaml", dump_yaml(fields))
    outcome(lambda: read_config_file(file), "run.yaml", given=fields)
    outcome(lambda: build_run_config({}, config=file), "run.yaml", given=fields)
    file = write(folder, "config.yaml", dump_yaml({"run": fields, "versions": {"torch": "x"}}))
    outcome(lambda: load_config(file), given=fields)


# editscale's own methods (other test files register stubs in the same process)
BUILTIN_METHODS = [m for m in list_methods() if get_method(m).__module__.startswith("editscale.methods.")]


@settings(FUZZ, max_examples=2 * EXAMPLES)
@given(data=st.data(), method=st.sampled_from(BUILTIN_METHODS))
def test_method_config_one_bad_field(folder: Path, method: str, data: st.DataObject) -> None:
    cls = get_method(method)
    given_, _ = data.draw(mutated(preset_mapping(cls, "embedded")))
    if isinstance(given_, dict):
        outcome(lambda: cls.config_class.parse(given_, source="m.yaml"), "m.yaml", given=given_)
        outcome(lambda: resolve_method_config(method, "embedded", given_), f"{cls.name} method config", given=given_)
    file = write(folder, "m.yaml", dump_yaml(given_))
    outcome(lambda: build_run_config({"method": method}, method_config=file), given=given_)


@FUZZ
@given(data=st.data())
def test_reference_hparams_one_bad_key(folder: Path, data: st.DataObject) -> None:
    hparams, _ = data.draw(mutated(ROME_HPARAMS))
    file = write(folder, "gpt2-xl.json", dump_json(hparams))
    res = outcome(lambda: _read_method_config(file, {"model": "gpt2-xl", "method": "rome"}), "gpt2-xl.json",
                  given=hparams)
    if isinstance(res, dict):
        outcome(lambda: get_method("rome").config_class.parse(res, source="gpt2-xl.json"), "gpt2-xl.json",
                given=hparams)


@FUZZ
@given(data=st.data())
def test_sweep_one_bad_field(folder: Path, data: st.DataObject) -> None:
    spec, _ = data.draw(mutated(SWEEP))
    file = write(folder, "sweep.yaml", dump_yaml(spec))
    outcome(lambda: SweepSpec.load(file), "sweep.yaml", given=spec)


@FUZZ
@given(data=st.data())
def test_task_file_one_bad_field(folder: Path, data: st.DataObject) -> None:
    spec, _ = data.draw(mutated(TASK))
    file = write(folder, "task.yaml", dump_yaml(spec))
    task = outcome(lambda: load_task_file(file), "task.yaml", given=spec)
    if isinstance(task, DownstreamTask):
        rows, path = data.draw(mutated([{"sentence": "fine", "label": 1}, {"sentence": "bad", "label": 0}]))
        lines = [json.dumps(r) for r in rows] if isinstance(rows, list) else [json.dumps(rows)]
        jsonl = write(folder, "task.jsonl", "\n".join(lines).encode())
        names_record(outcome(lambda: jsonl_task(jsonl, task.fmt).examples(n=5), "task.jsonl", given=rows), path=path)


@FUZZ
@given(text=st.text(max_size=40) | st.sampled_from(["k=[", "k={a: b", "k=*x", "k=!!python/object:os.system x",
                                                    "=1", "k", "k=\t", "k=%x", "k=@x", "k=`", "k=&a [*a]"]))
def test_set_options(text: str) -> None:
    outcome(lambda: _parse_sets([text]), "--set", given=text)


@FUZZ
@given(text=st.text(max_size=40).map(lambda t: f"no-such-{t}")
       | st.sampled_from(["~nosuchuser/x", "~x\x00", "x\x00y", "a" * 5000, "wiki", "factworld"]))
def test_corpus_names(text: str) -> None:
    # a name that is no registry corpus is a path; one that cannot be a path is an unknown corpus too
    outcome(lambda: resolve_corpus(text), "statistics corpus", given=text)
