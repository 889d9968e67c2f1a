"""Statistics anywhere: local text corpora, offline hub corpora, a cache keyed by the weights, `auto`
sample counts (docs/protocol.md §2.5.1) and layers for a model without a preset (§2.8.1)."""

from __future__ import annotations

import json
import logging
import random
import shutil
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import GPT2Config

from editscale.data import corpora
from editscale.data.corpora import corpus_cache_name, corpus_documents, local_documents, resolve_corpus
from editscale.errors import EditscaleError, UnknownNameError
from editscale.methods.base import get_method, preset_mapping, resolve_method_config
from editscale.methods.solver import stats as stats_mod
from editscale.methods.solver.stats import second_moment, stats_metadata, stats_path
from editscale.models.adapter import ModelAdapter
from editscale.models.loading import load_model
from editscale.run.config import RunConfig, resolve_config
from tiny_models import byte_bpe_tokenizer, sentences, tiny_model


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    tok = byte_bpe_tokenizer()
    return ModelAdapter(tiny_model("gpt2", len(tok)), tok)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = byte_bpe_tokenizer()
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    tiny_model("gpt2", len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _count_keys(monkeypatch, adapter: ModelAdapter) -> dict[str, int]:
    calls = {"n": 0}
    orig = adapter.capture_mlp_keys

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(adapter, "capture_mlp_keys", counting)
    return calls


# ---------------------------------------------------------------------- local corpora


def test_local_text_files_and_folders(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("First paragraph,\nstill the first.\n\n  \nSecond paragraph.\n")
    (root / "b" / "lines.txt").write_text("one line\ntwo\nthree\n")
    (root / "b" / "rows.jsonl").write_text(json.dumps({"text": "json doc", "id": 1}) + "\n\n"
                                           + json.dumps({"text": "   "}) + "\n")
    pq.write_table(pa.table({"text": ["parquet doc", None, ""], "n": [1, 2, 3]}), root / "c.parquet")
    (root / "README.md").write_text("not a corpus file")
    assert local_documents(root / "a.txt") == ["First paragraph,\nstill the first.", "Second paragraph."]
    assert local_documents(root / "b" / "lines.txt") == ["one line", "two", "three"]  # no blank line: one per line
    # a folder: every .txt/.jsonl/.parquet below it, sorted by relative path; other files ignored
    assert local_documents(root) == ["First paragraph,\nstill the first.", "Second paragraph.", "one line", "two",
                                     "three", "json doc", "parquet doc"]
    assert corpus_documents(str(root), 3) == corpus_documents(str(root), 3) and len(corpus_documents(str(root), 3)) == 3
    assert sorted(corpus_documents(str(root), None)) == sorted(local_documents(root))
    assert resolve_corpus(str(root)) == str(root.resolve()) and resolve_corpus("factworld") == "factworld"


def test_local_corpus_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(EditscaleError, match=r"bad.jsonl, line 2: expected an object with a string 'text'"):
        local_documents(bad)
    bad.write_text("{not json\n")
    with pytest.raises(EditscaleError, match=r"bad.jsonl, line 1: not JSON"):
        local_documents(bad)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(EditscaleError, match="has no 'text' column"):
        local_documents(tmp_path / "t.parquet")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(EditscaleError, match=r"notes.md: expected a .txt, .jsonl, .parquet file or a folder"):
        resolve_corpus(str(tmp_path / "notes.md"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EditscaleError, match="holds no .txt"):
        resolve_corpus(str(tmp_path / "empty"))
    with pytest.raises(UnknownNameError, match="unknown statistics corpus 'nowhere.txt'; known: factworld"):
        resolve_corpus("nowhere.txt")


def test_cache_name_follows_the_content(tmp_path: Path) -> None:
    a = tmp_path / "a" / "docs.txt"
    a.parent.mkdir()
    a.write_text("alpha\nbeta\n")
    b = tmp_path / "b" / "docs.txt"
    b.parent.mkdir()
    shutil.copy(a, b)
    assert corpus_cache_name(str(a)) == corpus_cache_name(str(b))  # the same text, wherever it lies
    assert corpus_cache_name(str(a)).startswith("docs.txt-")
    before = corpus_cache_name(str(a))
    a.write_text("alpha\ngamma\n")  # same size, other bytes
    assert corpus_cache_name(str(a)) != before
    assert corpus_cache_name("factworld") == f"factworld-r{corpora.CORPUS_REVISIONS['factworld']}"


def test_editing_the_corpus_recomputes(adapter: ModelAdapter, tmp_path: Path, monkeypatch) -> None:
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(sentences()[:20]))
    kwargs = dict(corpus=str(text), n_samples=20, cache_dir=tmp_path / "cache", progress=False)
    calls = _count_keys(monkeypatch, adapter)
    first = second_moment(adapter, 0, **kwargs)
    n_first = calls["n"]
    assert n_first > 0 and torch.equal(second_moment(adapter, 0, **kwargs), first) and calls["n"] == n_first
    text.write_text("\n".join(sentences()[20:40]))
    second = second_moment(adapter, 0, **kwargs)
    assert calls["n"] > n_first and not torch.equal(second, first)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2


# ---------------------------------------------------------------------- offline


@pytest.mark.parametrize("corpus", ["wikipedia", "wikitext"])
def test_hub_corpora_offline_fail_in_one_line(corpus: str, tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # both libraries read these at import time: set what they read, and an empty cache
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*a, **k):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(EditscaleError) as err:
        corpus_documents(corpus, 10)
    message = str(err.value)
    assert "\n" not in message and f"statistics corpus '{corpus}'" in message
    assert "--stats-corpus PATH" in message and "--stats-corpus factworld" in message


# ---------------------------------------------------------------------- cache keyed by the weights


def test_the_same_model_by_another_path_reuses_the_statistics(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    other = tmp_path / "copy-of-tiny"
    shutil.copytree(model_dir, other)
    kwargs = dict(corpus="factworld", n_samples=20, cache_dir=tmp_path / "cache", progress=False, token_budget=256)
    a, b = load_model(str(model_dir)), load_model(str(other))
    assert a.name != b.name
    first = second_moment(a.adapter, 1, model_name=a.name, **kwargs)
    calls = _count_keys(monkeypatch, b.adapter)
    again = second_moment(b.adapter, 1, model_name=b.name, **kwargs)
    assert calls["n"] == 0 and torch.equal(again, first)
    (path,) = (tmp_path / "cache").rglob("*.safetensors")
    assert "tiny" not in str(path.relative_to(tmp_path / "cache"))  # no model name in the key
    assert json.loads(stats_metadata(path)["key"])["model"] == a.name  # only in the metadata


# ---------------------------------------------------------------------- auto


def _direct(adapter: ModelAdapter, docs: list[str], layer: int) -> torch.Tensor:
    keys = [adapter.capture_mlp_keys(adapter.encode([d], max_length=64), layer)[0].double() for d in docs]
    k = torch.cat(keys)
    return k.T @ k / k.shape[0]


def _random_text(path: Path, n_docs: int = 1500) -> str:
    """Documents of 12 random words: keys close to independent, so C converges within the file."""
    rng = random.Random(0)
    words = sorted({w for line in sentences() for w in line.replace(".", "").split()})
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_docs)))
    return str(path)


@pytest.mark.slow
def test_auto_stops_when_c_has_converged(adapter: ModelAdapter, tmp_path: Path, caplog) -> None:
    corpus = _random_text(tmp_path / "random.txt")
    kwargs = dict(corpus=corpus, n_samples="auto", cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="editscale.methods.solver.stats"):
        c = second_moment(adapter, 1, model_name="tiny", progress=False, token_budget=1024, **kwargs)
    meta = stats_metadata(stats_path(adapter, 1, **kwargs))
    docs, tokens = int(meta["docs"]), int(meta["tokens"])
    everything = corpus_documents(corpus, None)
    assert meta["auto_stopped"] == "converged" and docs < len(everything)
    assert float(meta["auto_change"]) < stats_mod.AUTO_TOLERANCE
    assert tokens >= 2 * stats_mod.AUTO_MIN_KEYS_PER_DIM * adapter.d_mlp  # a check, then a check after doubling
    torch.testing.assert_close(c, _direct(adapter, everything[:docs], 1), rtol=1e-6, atol=1e-9)  # batched vs one by one
    (line,) = [r.getMessage() for r in caplog.records if "statistics C" in r.getMessage()]
    assert f"{tokens} tokens from {docs} documents (auto: converged)" in line
    assert "nauto" in next((tmp_path / "cache").rglob("*.safetensors")).name


def test_auto_rule() -> None:
    d = 4
    total = torch.eye(d, dtype=torch.float64) * 100
    assert stats_mod._converged(total, 100, torch.zeros(d, d), 0) is None  # the first check only sets a reference
    near = total * 1.001
    verdict = stats_mod._converged(near, 100, total, 100)
    assert verdict is not None and verdict["stopped"] == "converged" and float(verdict["cond"]) == pytest.approx(1)
    assert stats_mod._converged(total * 1.5, 100, total, 100) is None  # C still moves
    singular = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    assert stats_mod._converged(singular, 1, singular, 1) is None  # stable but not invertible


def test_auto_runs_through_a_small_corpus_and_resumes(adapter: ModelAdapter, tmp_path: Path, monkeypatch) -> None:
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(sentences()[:40]))
    kwargs = dict(corpus=str(text), n_samples="auto", progress=False, token_budget=64)
    full = second_moment(adapter, 0, cache_dir=tmp_path / "a", **kwargs)
    meta = stats_metadata(stats_path(adapter, 0, corpus=str(text), n_samples="auto", cache_dir=tmp_path / "a"))
    assert meta["auto_stopped"] == "all documents" and meta["docs"] == "40"
    orig = adapter.capture_mlp_keys
    calls = {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(adapter, "capture_mlp_keys", dies)
    with pytest.raises(KeyboardInterrupt):
        second_moment(adapter, 0, cache_dir=tmp_path / "b", save_every=1, **kwargs)
    partial = next((tmp_path / "b").rglob("*.partial.safetensors"))
    assert "prev_sum" in stats_mod.load_file(partial)  # the auto rule's reference survives the kill
    monkeypatch.setattr(adapter, "capture_mlp_keys", orig)
    resumed = second_moment(adapter, 0, cache_dir=tmp_path / "b", **kwargs)
    torch.testing.assert_close(resumed, full, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------- run options and layers


def test_stats_options_override_the_method_config(tmp_path: Path) -> None:
    text = tmp_path / "docs.txt"
    text.write_text("alpha\nbeta\n")
    cfg = RunConfig.parse({"stats_corpus": str(text), "stats_samples": "auto"}, source="test")
    resolved = resolve_config(cfg)
    assert resolved.method_config["mom2_dataset"] == str(text.resolve()) == resolved.stats_corpus
    assert resolved.method_config["mom2_n_samples"] == "auto"
    assert resolve_config(resolved) == resolved
    assert RunConfig.parse({"stats_samples": "500"}, source="command line").stats_samples == 500
    with pytest.raises(EditscaleError, match="stats_samples"):
        RunConfig.parse({"stats_samples": "many"}, source="command line")
    assert resolve_config(RunConfig(stats_samples=300)).method_config["mom2_n_samples"] == 300
    ftc = resolve_config(RunConfig(method="ft-c", stats_corpus="wikitext"))  # no statistics: ignored
    assert "mom2_dataset" not in ftc.method_config
    with pytest.raises(UnknownNameError, match="unknown statistics corpus 'wiki'"):
        resolve_config(RunConfig(stats_corpus="wiki"))


def _config_dir(root: Path, n_layer: int) -> str:
    path = root / f"gpt2-{n_layer}-layers"
    GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, n_positions=64, vocab_size=300).save_pretrained(path)
    return str(path)


def test_a_model_without_a_preset_gets_layers_by_the_depth_rule(model_dir: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="editscale.methods.base"):
        rome = resolve_config(RunConfig(model=str(model_dir), method="rome")).method_config
    assert rome["layers"] == [1] and rome["v_loss_layer"] is None  # 2 blocks: round(2 * 17/48) = 1
    xl = get_method("rome").config_class.parse(preset_mapping(get_method("rome"), "gpt2-xl")).model_dump(mode="json")
    assert {k: v for k, v in rome.items() if k not in ("layers", "v_loss_layer")} == \
        {k: v for k, v in xl.items() if k not in ("layers", "v_loss_layer")}
    (line,) = [r.getMessage() for r in caplog.records]
    assert "no rome preset" in line and "layers [1] of 2 by the depth rule" in line and "gpt2-xl" in line
    deep = _config_dir(tmp_path, 24)
    assert resolve_config(RunConfig(model=deep, method="rome")).method_config["layers"] == [9]
    assert resolve_config(RunConfig(model=deep, method="memit")).method_config["layers"] == [7, 8, 9]
    assert resolve_config(RunConfig(model=deep, method="ft-c")).method_config["layers"] == [9]
    given = resolve_config(RunConfig(model=deep, method="memit", method_config={"layers": [2, 3]}))
    assert given.method_config["layers"] == [2, 3] and resolve_config(given) == given
    # gpt2-xl itself: the rule gives its published layers back
    assert resolve_method_config("memit", "some-model", n_layers=48, family="gpt2").layers == [13, 14, 15, 16, 17]
    assert resolve_method_config("rome", "some-model", n_layers=28, family="gptj").layers == [5]
    with pytest.raises(EditscaleError, match=r"no rome hyper-parameters for model 'x'.*--set layers"):
        resolve_method_config("rome", "x")


@pytest.mark.slow
def test_run_on_a_local_model_with_set_and_a_local_corpus(run_cli, model_dir: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    """No YAML and no network: `--set layers=[1]`, `--stats-corpus FILE`, `--stats-samples auto`."""
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(sentences()))
    records = [{"case_id": i, "requested_rewrite": {
        "prompt": "{} is located in the country of", "subject": s, "relation_id": "P17",
        "target_new": {"str": "Spain", "id": "Q1"}, "target_true": {"str": "France", "id": "Q2"}},
        "paraphrase_prompts": [f"{s}, which is located in"], "neighborhood_prompts": ["Paris is located in"]}
        for i, s in enumerate(["Toko Yasuda", "Apple A5"])]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        "run", "--out", str(out), "--model", str(model_dir), "--method", "rome", "--dataset", "counterfact",
        "--data-path", str(data), "--edits", "2", "--control", "0", "--downstream", "none", "--no-health",
        "--stats-corpus", str(text), "--stats-samples", "auto", "--stats-cache", str(tmp_path / "cache"),
        "--set", "layers=[1]", "--set", "v_num_grad_steps=3", "--no-progress")
    assert code == 0, err
    saved = (out / "config.yaml").read_text()
    assert "mom2_n_samples: auto" in saved and str(text.resolve()) in saved
    (stats_file,) = (tmp_path / "cache").rglob("*.safetensors")
    assert stats_file.name.startswith("layer1_") and "nauto" in stats_file.name
