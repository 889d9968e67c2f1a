"""Shared fixtures. Tests that read the real data in the shared folder skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_shared() -> Path | None:
    """The shared folder (holding ``data/`` and ``spec/``): ``$EDITSCALE_SHARED`` or ``../shared``."""
    env = os.environ.get("EDITSCALE_SHARED")
    candidates = [Path(env).expanduser()] if env else [REPO_ROOT.parent / "shared"]
    for c in candidates:
        if (c / "data").is_dir():
            return c
        if c.name == "data" and c.is_dir():  # pointed at the data folder itself
            return c.parent
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = _find_shared()
    if root is None:
        pytest.skip("shared data folder not found (set EDITSCALE_SHARED or place it at ../shared)")
    return root


@pytest.fixture(scope="session")
def shared_data(shared_dir: Path) -> Path:
    return shared_dir / "data"


@pytest.fixture(scope="session")
def shared_spec(shared_dir: Path) -> Path:
    spec = shared_dir / "spec"
    if not spec.is_dir():
        pytest.skip(f"{spec} not found")
    return spec


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are tiny: one thread is fastest and avoids contention on a busy 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
