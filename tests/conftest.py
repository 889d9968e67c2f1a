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


# The longest files, each about a minute on 2 cores: they start first, on different workers.
LONGEST_FIRST = ("test_rome_embedded.py", "test_memit_embedded.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first, then the other files with slow tests, then the rest: xdist hands
    files out in this order, so the long ones start early and the workers finish together."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        if item.path.name in LONGEST_FIRST:
            return LONGEST_FIRST.index(item.path.name)
        return len(LONGEST_FIRST) + (item.path not in slow_files)

    items.sort(key=rank)  # stable: the order within a file is kept


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


@pytest.fixture(scope="session")
def embedded_lm():
    """The trained embedded model, loaded once per session. Tests that edit it restore it."""
    from editscale.embedded import checkpoint_dir
    from editscale.models.loading import load_model

    if not (checkpoint_dir() / "model.safetensors").exists():
        pytest.skip("the embedded checkpoint is not installed (train it: editscale train-embedded --install)")
    return load_model("embedded")


@pytest.fixture(scope="session")
def embedded_stats(tmp_path_factory) -> Path:
    """One statistics cache for every test that edits the embedded model, shared by the xdist
    workers of this session (their base folders sit side by side): each covariance is computed
    once, and a worker that finds it written by the other reads it."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "embedded-stats"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are tiny: one thread is fastest and avoids contention on a busy 2-core machine."""
    import torch

    from editscale.run import runner

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    # a run's default is every usable CPU; here each xdist worker keeps to its one core
    patch = pytest.MonkeyPatch()
    patch.setattr(runner, "usable_cpus", lambda: 1)
    yield
    patch.undo()
    torch.set_num_threads(n)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `editscale ARGS` in this process: (exit status, stdout, stderr)."""
    from rich.console import Console

    from editscale import cli

    # wide consoles: rich wraps tables to 80 columns when stdout is not a terminal
    monkeypatch.setattr(cli, "console", Console(width=250))
    monkeypatch.setattr(cli, "err_console", Console(stderr=True, width=250))

    def invoke(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            cli.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """The stub runs' world (`runner_stubs.make_world`): a tiny GPT-2 directory, a CounterFact file and
    a downstream task folder, one per test module. A module with other needs defines its own `world`."""
    import runner_stubs

    return runner_stubs.make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture
def tiny_tasks(world, monkeypatch) -> None:
    """The world's task folder as the downstream tasks (`pytestmark = pytest.mark.usefixtures("tiny_tasks")`)."""
    monkeypatch.setenv("EDITSCALE_TASKS", world["tasks"])
