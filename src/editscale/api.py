"""What a notebook user imports: the library's main entry points in one place.

A facade only: it re-exports functions that live in their pipeline packages, and no module of the
library imports it (tests/test_layers.py checks this).
"""

from __future__ import annotations

from editscale.analysis.phases import PhaseRule, analyze
from editscale.analysis.rundata import load_run
from editscale.data.records import EditRecord
from editscale.data.registry import load_records
from editscale.eval.knowledge import knowledge_scores
from editscale.eval.locate import layer_scan
from editscale.eval.skills import evaluate_skills
from editscale.methods.base import get_method, list_methods, resolve_method_config
from editscale.models.loading import load_model
from editscale.report.export import export_runs
from editscale.report.html import build_report
from editscale.run.checkpoint import load_run_model
from editscale.run.config import RetestRule, RunConfig
from editscale.run.retest import retest
from editscale.run.runner import Runner

__all__ = ["EditRecord", "PhaseRule", "RetestRule", "RunConfig", "Runner", "analyze", "build_report", "evaluate_skills",
           "export_runs", "get_method", "knowledge_scores", "layer_scan", "list_methods", "load_model", "load_records",
           "load_run", "load_run_model", "resolve_method_config", "retest"]
