"""The shipped embedded model must keep knowing its facts and keep its skills.

These are the targets the model card reports as met (`FACT_TARGETS`, `SKILL_F1_TARGET` in the card module),
checked on a sample so they stay fast: a retrained or damaged checkpoint that stops knowing its facts fails here.
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from editscale.data.factworld import default_world
from editscale.embedded import checkpoint_dir
from editscale.eval.knowledge import knowledge_scores
from editscale.eval.skills import evaluate_skills
from editscale.report.inspect import tour

pytestmark = pytest.mark.skipif(
    not (checkpoint_dir() / "model.safetensors").exists(),
    reason="the embedded checkpoint is not installed (train it: editscale train-embedded --install)")


@pytest.fixture(scope="module")
def embedded(embedded_lm):
    return embedded_lm


def test_checkpoint_is_small_safetensors() -> None:
    path = checkpoint_dir() / "model.safetensors"
    assert path.exists()
    assert path.stat().st_size <= 20 * 2**20
    assert (checkpoint_dir() / "MODEL_CARD.md").exists()


def test_was_trained_by_the_default_recipe() -> None:
    # The card names plain `editscale train-embedded` as the training command: that is only true
    # while EMBEDDED_CONFIG is the config the shipped checkpoint recorded. A run extended in its own
    # directory keeps its optimizer and sampler state and so trains the same weights (see
    # test_a_run_extended_by_a_stage_resumes_mid_stage); a continued finished checkpoint does not.
    import json

    from editscale.embedded.train import EMBEDDED_CONFIG

    training = json.loads((checkpoint_dir() / "training.json").read_text())
    assert training["config"] == EMBEDDED_CONFIG.model_dump()
    assert not any("initialised_from" in h for h in training.get("history", []))


@pytest.fixture(scope="module")
def fact_scores(embedded):
    # 150 records spread over the world (measured: rewrite 0.993, paraphrase 0.987, neighborhood 0.989,
    # never-seen 0.870; the card's figures are over all 1,800)
    return knowledge_scores(embedded.adapter, default_world().records[::12])


def test_knows_its_facts(fact_scores) -> None:
    assert fact_scores["known_rewrite"] >= 0.97
    assert fact_scores["known_paraphrase"] >= 0.95
    assert fact_scores["known_neighborhood"] >= 0.95


def test_knows_its_facts_in_never_seen_phrasings(fact_scores) -> None:
    assert fact_scores["known_unseen"] >= 0.85


@pytest.fixture(scope="module")
def skill_results(embedded):
    return evaluate_skills(embedded.model, embedded.tokenizer, n=100)


@pytest.mark.parametrize("task", ["sentiment", "paraphrase", "acceptability", "entailment"])
def test_keeps_its_skills(skill_results, task: str) -> None:
    assert skill_results[task]["f1"] >= 0.85, skill_results[task]["f1"]


def test_inspect_tour_runs(embedded) -> None:
    buf = io.StringIO()
    out = tour(Console(file=buf, width=160), n_show=3, n_facts=20, n_skill=10, n_scan=40)
    text = buf.getvalue()
    assert "Facts it knows" in text and "Where facts live" in text
    assert len(out["layer_scan"]) == embedded.adapter.n_layers
    # zeroing a storing MLP must hurt, far more than zeroing a late block's (measured on 40 facts:
    # block 0 +0.50 nats, block 1 +0.12, blocks 2-5 within 0.01)
    rises = [r["nll_increase"] for r in out["layer_scan"]]
    late = rises[len(rises) // 2:]
    assert max(rises) > 0.3 and max(rises) > 10 * max(abs(x) for x in late)
