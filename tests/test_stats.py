"""Second-moment statistics: the value, the on-disk cache and its key, resume after an interruption."""

from __future__ import annotations

import pytest
import torch

from editscale.errors import EditscaleError, UnknownNameError
from editscale.methods.solver import stats as stats_mod
from editscale.methods.solver.stats import StatsKey, corpus_documents, model_fingerprint, second_moment
from editscale.models.adapter import ModelAdapter
from tiny_models import byte_bpe_tokenizer, tiny_model


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    tok = byte_bpe_tokenizer()
    return ModelAdapter(tiny_model("gpt2", len(tok)), tok)


def _direct(adapter: ModelAdapter, docs: list[str], layer: int) -> torch.Tensor:
    keys = []
    for d in docs:
        enc = adapter.encode([d], max_length=64)
        keys.append(adapter.capture_mlp_keys(enc, layer)[0].double())
    k = torch.cat(keys)
    return k.T @ k / k.shape[0]


def test_second_moment_value_and_cache(adapter: ModelAdapter, tmp_path) -> None:
    docs = corpus_documents("factworld", 40)
    assert len(docs) == 40 and docs == corpus_documents("factworld", 40)  # a fixed subset, fixed order
    c = second_moment(adapter, 1, model_name="tiny", n_samples=40, cache_dir=tmp_path, progress=False,
                      token_budget=256)
    torch.testing.assert_close(c, _direct(adapter, docs, 1), rtol=1e-9, atol=1e-12)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1 and "layer1_float64_n40" in files[0].name
    assert model_fingerprint(adapter.model) in str(files[0])

    def boom(*a, **k):
        raise AssertionError("the cached value must be used")

    orig = adapter.capture_mlp_keys
    adapter.capture_mlp_keys = boom  # type: ignore[method-assign]
    try:
        again = second_moment(adapter, 1, model_name="tiny", n_samples=40, cache_dir=tmp_path, progress=False)
    finally:
        adapter.capture_mlp_keys = orig  # type: ignore[method-assign]
    assert torch.equal(again, c)


def test_interrupted_accumulation_resumes(adapter: ModelAdapter, tmp_path) -> None:
    full = second_moment(adapter, 0, model_name="tiny", n_samples=30, cache_dir=tmp_path / "a", progress=False,
                         token_budget=128)
    calls = {"n": 0}
    orig = adapter.capture_mlp_keys

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return orig(*a, **k)

    adapter.capture_mlp_keys = dies  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            second_moment(adapter, 0, model_name="tiny", n_samples=30, cache_dir=tmp_path / "b", progress=False,
                          token_budget=128, save_every=1)
    finally:
        adapter.capture_mlp_keys = orig  # type: ignore[method-assign]
    assert list((tmp_path / "b").rglob("*.partial.safetensors"))
    calls["n"] = 0
    counted = {"n": 0}

    def counting(*a, **k):
        counted["n"] += 1
        return orig(*a, **k)

    adapter.capture_mlp_keys = counting  # type: ignore[method-assign]
    try:
        resumed = second_moment(adapter, 0, model_name="tiny", n_samples=30, cache_dir=tmp_path / "b",
                                progress=False, token_budget=128)
    finally:
        adapter.capture_mlp_keys = orig  # type: ignore[method-assign]
    torch.testing.assert_close(resumed, full, rtol=1e-12, atol=1e-14)
    fresh = second_moment(adapter, 0, model_name="tiny", n_samples=30, cache_dir=tmp_path / "c", progress=False,
                          token_budget=128)
    assert counted["n"] > 0
    assert not list((tmp_path / "b").rglob("*.partial.safetensors"))
    torch.testing.assert_close(fresh, full)


def test_cache_key_changes_with_the_model(tmp_path) -> None:
    tok = byte_bpe_tokenizer()
    a, b = tiny_model("gpt2", len(tok), seed=0), tiny_model("gpt2", len(tok), seed=1)
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(tiny_model("gpt2", len(tok), seed=0))
    key = StatsKey("abc", 5, "wikipedia", 100000, "float32", 2048)
    assert key.path(tmp_path).name == "layer5_float32_n100000_len2048.safetensors"
    assert key.path(tmp_path).parent == tmp_path / f"v{stats_mod.CACHE_FORMAT}" / "abc" / "wikipedia"


def test_bad_corpus_and_dtype(adapter: ModelAdapter, tmp_path) -> None:
    with pytest.raises(UnknownNameError, match="unknown statistics corpus 'wiki'"):
        corpus_documents("wiki", 10)
    with pytest.raises(EditscaleError, match="dtype"):
        second_moment(adapter, 0, model_name="tiny", dtype="float16", cache_dir=tmp_path)


def test_condition_number() -> None:
    c = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))
    assert stats_mod.condition_number(c) == pytest.approx(100.0)


def test_online_corpora_go_through_datasets(monkeypatch) -> None:
    """The wikitext/wikipedia path with a fake `datasets.load_dataset` (nothing downloads here)."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return {"text": ["", " = Title = ", "First paragraph of text .", "  ", "Second one ."]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = corpus_documents("wikitext", 10)
    assert calls == [("wikitext", "wikitext-103-raw-v1", "train")]
    assert docs == [" = Title = ", "First paragraph of text .", "Second one ."]  # empty lines dropped
    corpus_documents("wikipedia", 2)
    assert calls[-1] == ("wikimedia/wikipedia", "20231101.en", "train")


def test_a_computation_held_by_another_process_is_waited_for(adapter: ModelAdapter, tmp_path, monkeypatch) -> None:
    import os
    import subprocess
    import sys
    import threading

    kwargs = dict(model_name="tiny", n_samples=20, cache_dir=tmp_path, progress=False, token_budget=256)
    want = second_moment(adapter, 1, **{**kwargs, "cache_dir": tmp_path / "ref"})
    path = stats_mod.stats_path(adapter, 1, corpus="factworld", n_samples=20, dtype="float64", cache_dir=tmp_path)
    path.parent.mkdir(parents=True)
    lock = path.with_suffix(".lock")
    lock.write_text(str(os.getpid()))  # a live holder: wait, and read what it writes

    def boom(*a, **k):
        raise AssertionError("statistics held by another process must not be computed again")

    monkeypatch.setattr(adapter, "capture_mlp_keys", boom)
    monkeypatch.setattr(stats_mod, "LOCK_POLL_SECONDS", 0.05)
    writer = threading.Timer(0.3, lambda: stats_mod._save_atomic(path, {"mom2": want}))
    writer.start()
    got = second_moment(adapter, 1, **kwargs)
    writer.join()
    assert torch.equal(got, want) and lock.exists()  # the holder's lock is the holder's to remove
    monkeypatch.undo()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.unlink()
    lock.write_text(dead.stdout.strip())  # left by a process that is gone: taken over
    again = second_moment(adapter, 1, **kwargs)
    assert torch.equal(again, want) and not lock.exists()
