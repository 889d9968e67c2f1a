"""editscale: edit facts inside causal language models at scale and measure what that does.

`import editscale` is light; the names of `editscale.api` (load_model, load_records, Runner, ...)
are imported on first use, so importing any submodule does not pull in the whole library.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    api = importlib.import_module("editscale.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'editscale' has no attribute {name!r}")


__all__ = ["__version__", "EditRecord", "PhaseRule", "RetestRule", "RunConfig", "Runner", "analyze", "build_report",
           "evaluate_skills", "export_runs", "get_method", "knowledge_scores", "layer_scan", "list_methods",
           "load_model", "load_records", "load_run", "load_run_model", "resolve_method_config", "retest"]
