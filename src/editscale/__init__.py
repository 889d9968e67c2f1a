"""editscale: edit facts inside causal language models at scale and measure what that does."""

from __future__ import annotations

__version__ = "0.1.0"

from editscale.api import evaluate_skills, layer_scan, load_records  # noqa: E402
from editscale.data.records import EditRecord  # noqa: E402
from editscale.models.loading import load_model  # noqa: E402

__all__ = ["EditRecord", "__version__", "evaluate_skills", "layer_scan", "load_model", "load_records"]
