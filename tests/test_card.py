"""Installing a trained checkpoint into the package (editscale train-embedded --install)."""

from __future__ import annotations

import pytest

from editscale.embedded.card import CHECKPOINT_FILES, SWEEP_FILE, install_checkpoint


def _checkpoint(path, size=16):
    path.mkdir()
    for name in CHECKPOINT_FILES:
        (path / name).write_bytes(b"x" * size if name.endswith(".safetensors") else b"{}")
    return path


def test_install_copies_the_checkpoint_and_drops_what_was_measured_on_the_old_model(tmp_path):
    src, dest = _checkpoint(tmp_path / "new"), tmp_path / "pkg"
    dest.mkdir()
    for stale in (SWEEP_FILE, "card.json", "MODEL_CARD.md"):
        (dest / stale).write_text("old model")
    assert install_checkpoint(src, dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(CHECKPOINT_FILES)
    (src / SWEEP_FILE).write_text("{}")  # a sweep that travels with its checkpoint is kept
    install_checkpoint(src, dest)
    assert (dest / SWEEP_FILE).read_text() == "{}"


def test_install_refuses_an_incomplete_or_oversized_checkpoint(tmp_path):
    src = _checkpoint(tmp_path / "new")
    (src / "training.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks training.json"):
        install_checkpoint(src, tmp_path / "pkg")
    big = _checkpoint(tmp_path / "big", size=21 * 2**20)
    with pytest.raises(ValueError, match="over the 20 MB"):
        install_checkpoint(big, tmp_path / "pkg2")


def test_card_says_how_the_run_was_put_together():
    from editscale.embedded.card import _history_lines

    lines = _history_lines([{"step": 250, "rewrite": 0.5}, {"extended": "stages 0 -> 2", "step": 1300},
                            {"initialised_from": "ckpt", "step": 1900, "note": "optimizer moments restarted here"}])
    assert len(lines) == 2
    assert "extended at step 1300 (stages 0 -> 2)" in lines[0] and "weights are those of one command" in lines[0]
    assert lines[1] == "- optimizer moments restarted here at step 1900 (continued from a saved checkpoint)"
