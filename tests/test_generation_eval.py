"""Generated answers without teacher forcing (docs/protocol.md §8.8) and the forgetting rows' status
strings (§8.4): the stop rule, the judging rule, batched against one-at-a-time decoding, the runner's
rows, an independent re-scoring of the statuses, and the analysis of the reference code's measure."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import runner_stubs  # noqa: F401 - registers the stub method the runs use
from editscale.analysis.retention import forgetting_measures, last_measures
from editscale.data.records import EditRecord
from editscale.eval import forgetting as forgetting_mod
from editscale.eval.forgetting import ForgettingTracker, _status
from editscale.eval.generation import (
    MAX_NEW_TOKENS,
    cut_answer,
    generate_answers,
    generation_scores,
    judge,
    normalize_answer,
    prompt_ids,
    stop_mask,
)
from editscale.eval.knowledge import score_prompt_targets
from editscale.eval.scoring import greedy_generate_until
from editscale.models.adapter import ModelAdapter
from editscale.run.checkpoint import load_run_model
from editscale.run.config import RunConfig, load_config
from editscale.run.runner import Runner
from editscale.run.store import RunStore
from test_forgetting_drift_store import Script, _rec
from tiny_models import byte_bpe_tokenizer, tiny_model, tokenizer_for

# --- judging ---------------------------------------------------------------------------------------------


def test_the_answer_is_cut_at_the_first_stop_and_judged_exactly_and_normalised() -> None:
    assert cut_answer(" Paris. It is a city") == "Paris"
    assert cut_answer(" Paris\nThe capital of") == "Paris"
    assert cut_answer(" Paris and London") == "Paris and London"  # no stop: the whole continuation
    assert cut_answer("\nParis.") == ""
    assert normalize_answer("  The  Beatles!") == "beatles"
    assert judge("Paris", "Paris") == (True, True)
    assert judge("paris", "Paris") == (False, True)
    assert judge("the Paris", " Paris ") == (False, True)
    assert judge("Paris, France", "Paris") == (False, False)  # the answer must be the object
    assert judge("Pari", "Paris") == (False, False)
    assert judge(cut_answer(" St. Louis"), "St. Louis") == (False, False)  # the price of a target-blind stop


# --- decoding --------------------------------------------------------------------------------------------


class Scripted(torch.nn.Module):
    """A causal LM that continues every prompt of `prompt_len` tokens with `script`, whatever the
    prompt: position p predicts script[p - prompt_len + 1]. No family, so scoring reads its full logits."""

    def __init__(self, vocab: int, prompt_len: int, script: list[int], eos: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 1)
        self.head = torch.nn.Linear(1, vocab, bias=False)
        self.config = SimpleNamespace(eos_token_id=eos)
        self.vocab, self.prompt_len, self.script = vocab, prompt_len, script
        self.calls = 0

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, past_key_values=None,
                **kwargs):
        self.calls += 1
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t).expand(b, t)
        logits = torch.zeros(b, t, self.vocab)
        for i in range(b):
            for j in range(t):
                k = int(position_ids[i, j]) - self.prompt_len + 1
                logits[i, j, self.script[min(max(k, 0), len(self.script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tok():
    return byte_bpe_tokenizer()


def scripted_adapter(tok, continuation: str, prompt_len: int = 4, extra: list[int] | None = None):
    script = tok(continuation, add_special_tokens=False)["input_ids"] + (extra or [])
    script += tok(" piano", add_special_tokens=False)["input_ids"] * 14  # never a stop
    model = Scripted(len(tok), prompt_len, script, eos=tok.eos_token_id)
    return SimpleNamespace(model=model, tokenizer=tok, pad_token_id=tok.eos_token_id)


def test_decoding_stops_at_a_full_stop_newline_or_eos_without_the_target(tok) -> None:
    prompt = [5, 6, 7, 8]
    mask = stop_mask(tok, len(tok), [tok.eos_token_id])
    dot = tok(".", add_special_tokens=False)["input_ids"][0]
    assert mask[dot] and mask[tok.eos_token_id] and mask.sum() < len(tok) // 4
    for continuation, answer in ((" violin. It is", "violin"), (" violin\nThe", "violin"),
                                 (" English", None)):
        adapter = scripted_adapter(tok, continuation)
        out = greedy_generate_until(adapter.model, [prompt], MAX_NEW_TOKENS, pad_id=0, stop=mask)[0]
        if answer is None:  # no stop: the whole budget, then judged as it stands
            assert len(out) == MAX_NEW_TOKENS
            assert generate_answers(adapter, [prompt])[0].startswith("English piano")
        else:
            script = adapter.model.script
            first = next(i for i, t in enumerate(script) if mask[t])
            assert out == script[:first + 1] and len(out) < MAX_NEW_TOKENS
            assert adapter.model.calls == len(out)  # one forward per new token, none after the stop
            assert generate_answers(adapter, [prompt]) == [answer]
    eos = scripted_adapter(tok, " violin", extra=[tok.eos_token_id])
    assert generate_answers(eos, [prompt]) == ["violin"]
    out = greedy_generate_until(eos.model, [prompt], MAX_NEW_TOKENS, pad_id=0, stop=mask)[0]
    assert out[-1] == tok.eos_token_id


@torch.no_grad()
def naive_until(model, prompt: list[int], max_new: int, stop: torch.Tensor) -> list[int]:
    """One unpadded row, no cache, the whole sequence run again for every token."""
    ids = list(prompt)
    for _ in range(max_new):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        if stop[ids[-1]]:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_decoding_equals_one_prompt_at_a_time(family: str) -> None:
    vocab = 97
    model = tiny_model(family, vocab, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # argmaxes far apart, so padding's rounding cannot flip one
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 9, 1, 14, 6, 9, 2)]
    free = [naive_until(model, p, 10, torch.zeros(vocab, dtype=torch.bool)) for p in prompts]
    stop = torch.zeros(vocab, dtype=torch.bool)
    stop[[free[0][2], free[3][0], free[4][5]]] = True  # rows stop at different steps, some never
    expected = [naive_until(model, p, 10, stop) for p in prompts]
    assert len({len(e) for e in expected}) > 2
    assert greedy_generate_until(model, prompts, 10, pad_id=0, stop=stop, batch_size=4) == expected
    assert [greedy_generate_until(model, [p], 10, pad_id=0, stop=stop)[0] for p in prompts] == expected


def test_generation_scores_of_records_batched_equal_one_at_a_time() -> None:
    tok = tokenizer_for("llama")  # a BOS to keep in front of each prompt
    model = tiny_model("llama", len(tok), seed=1)
    adapter = ModelAdapter(model, tok)
    assert prompt_ids(adapter, ["Paris is in"])[0][0] == tok.bos_token_id
    records = [EditRecord(case_id=i, subject=s, prompt="{} is located in the country of", target_true="France",
                          target_new="Spain", paraphrase_prompts=(f"{s} is in", f"In {s}, the official language is"))
               for i, s in enumerate(["Paris", "New York", "BBC One"])]
    together = generation_scores(adapter, records)
    alone = [generation_scores(adapter, [r])[0] for r in records]
    assert together == alone
    assert all(s.ps == s.ps and len(s.as_row()["gen_text"]) <= 80 for s in together)


# --- the runner's rows -----------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("tiny_tasks")


@pytest.fixture(scope="module")
def run_dir(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "r"
    cfg = RunConfig(model=world["model"], method="stub", dataset="counterfact", data_path=world["data"], edits=6,
                    eval_every=3, checkpoint_every=3, control=0, downstream=[], health=False,
                    method_config={"layers": [0, 1], "scale": 0.2})
    Runner(cfg, out, progress=False, log=lambda s: None).run()
    return out


def test_a_run_writes_generated_answers_and_every_edits_status(run_dir: Path) -> None:
    store = RunStore(run_dir)
    edits, checks = store.rows("edits"), store.rows("forgetting")
    for r in edits:
        assert r["gen_es"] in (0.0, 1.0) and r["gen_es_exact"] <= r["gen_es"] and 0 <= r["gen_ps"] <= 1
        assert isinstance(r["gen_text"], str) and r["timings"]["generation"] >= 0
    assert [c["edits_done"] for c in checks] == [3, 6]
    for c in checks:
        for key in ("status_greedy", "status_prob", "status_gen"):
            assert len(c[key]) == c["edits_done"] and set(c[key]) <= {"y", "n"}
        assert c["tested"] == c["edits_done"] and 0 <= c["gen_correct_pct"] <= 100
        # the headline fields are read off the same statuses
        ok = [e for e in edits[:c["edits_done"]] if e["es"] == 1.0]
        assert c["prob_eligible"] == len(ok)
        assert c["prob_forgotten"] == sum(c["status_prob"][e["index"]] == "n" for e in ok)
        gen_ok = [e for e in edits[:c["edits_done"]] if e["gen_es"] == 1.0]
        assert c["gen_eligible"] == len(gen_ok)
        assert c["gen_forgotten"] == sum(c["status_gen"][e["index"]] == "n" for e in gen_ok)
    # right after its edit, the edit's own row and the check agree on the last edit
    last = edits[-1]
    assert checks[-1]["status_greedy"][-1] == "ny"[last["rewrite_correct"]]
    assert checks[-1]["status_gen"][-1] == "ny"[int(last["gen_es"])]


def test_the_status_strings_agree_with_an_independent_rescoring(run_dir: Path) -> None:
    lm, _ = load_run_model(run_dir)  # the model at the last checkpoint: after the last check
    check = RunStore(run_dir).rows("forgetting")[-1]
    edits = RunStore(run_dir).rows("edits")
    for e in edits:
        record = EditRecord(case_id=e["case_id"], subject=e["subject"], prompt="{} is located in the country of",
                            target_true=e["target_true"], target_new=e["target_new"])
        new, true = score_prompt_targets(lm.adapter, [record.rewrite_prompt] * 2, [record.target_new,
                                                                                  record.target_true])
        (answer,) = generate_answers(lm.adapter, prompt_ids(lm.adapter, [record.rewrite_prompt]))
        i = e["index"]
        assert check["status_greedy"][i] == "ny"[new.greedy_match], i
        assert check["status_prob"][i] == "ny"[new.mean_nll < true.mean_nll], i
        assert check["status_gen"][i] == "ny"[judge(answer, record.target_new)[1]], i


def test_a_stored_config_from_before_generation_resumes_without_it(run_dir: Path, tmp_path: Path) -> None:
    doc = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert doc["run"]["generation"] == "all"
    del doc["run"]["generation"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    old = load_config(tmp_path / "config.yaml")
    assert old.generation == "off"
    # measuring more changes no edit: the same run, which `editscale run --out` may continue
    assert old.identity() == load_config(run_dir / "config.yaml").identity()


# --- status strings and the analysis ---------------------------------------------------------------------


def test_status_strings_mark_untested_and_skipped_edits() -> None:
    assert _status([10, 11, 12], {10: True, 12: False}, []) == "y.n"
    assert _status([10, 11, 12], {10: True, 11: True, 12: False}, [0, 3]) == "_yy_n"


def test_sampled_trackers_mark_what_they_did_not_retest(monkeypatch) -> None:
    script = Script()
    monkeypatch.setattr(forgetting_mod, "prompt_target_rows", script.rows)
    monkeypatch.setattr(forgetting_mod, "score_rows", script.score)
    tr = ForgettingTracker(sample=2, planned=8, seed=1)
    for i in range(6):
        tr.add(_rec(i), greedy_success=True, es_success=True)
    tr.check(None, 6)
    for i in range(6, 8):
        tr.add(_rec(i), greedy_success=True, es_success=True)
    script.greedy = {"S6": False}
    row = tr.check(None, 8)
    subset = tr._subset()
    expected = "".join("n" if i == 6 else "y" if i in subset or i >= 6 else "." for i in range(8))
    assert row["status_greedy"] == expected and "status_gen" not in row


def test_the_code_measure_beside_the_texts_on_hand_made_rows() -> None:
    edits = [{"index": i, "status": "ok", "rewrite_correct": ok, "es": 1.0, "gen_es": float(ok)}
             for i, ok in enumerate([True, True, False, True, True])]
    edits.insert(2, {"index": 2, "status": "nonfinite"})
    for k, e in enumerate(edits):
        e["index"] = k
    # edits: 0 ok, 1 ok, 2 skipped, 3 failed (greedy), 4 ok, 5 ok
    forgetting = [
        {"edits_done": 3, "paper_forgotten_pct": 0.0},  # an older row: no status strings, left out
        {"edits_done": 6, "paper_forgotten_pct": 25.0, "status_greedy": "yn_nyn", "status_prob": "yy_y.y",
         "status_gen": "yn_yyy"},
    ]
    (m,) = forgetting_measures(forgetting, edits)
    assert m["edits_done"] == 6 and m["text_pct"] == 25.0
    assert m["greedy_tested"] == 5 and m["greedy_failing_pct"] == pytest.approx(60.0)  # 3 of 5 fail now
    assert m["greedy_forgotten_pct"] == pytest.approx(50.0)  # of the 4 that succeeded, 2 fail now
    assert m["prob_tested"] == 4 and m["prob_failing_pct"] == 0.0 and m["prob_forgotten_pct"] == 0.0
    # failed edit 3 generates now: failing counts all edits, forgotten only those generated at edit time
    assert m["gen_failing_pct"] == pytest.approx(20.0) and m["gen_forgotten_pct"] == pytest.approx(25.0)
    assert last_measures(forgetting, edits) == m and last_measures(forgetting[:1], edits) == {}
    assert math.isclose(m["greedy_failing_pct"], 60.0)


def test_the_figures_and_the_report_show_generation_beside_es(run_dir: Path) -> None:
    from editscale.analysis.phases import analyze
    from editscale.analysis.rundata import load_run
    from editscale.report.figures import forgetting_figure, proficiency_figure
    from editscale.report.html import summary_rows

    run = load_run(run_dir)
    a = analyze(run)
    gids = {ln.get_gid() for ax in proficiency_figure([run], [a]).axes for ln in ax.lines}
    assert {"gen_es.w50.g0", "gen_ps.w50.g0"} <= gids
    retained = {ln.get_gid(): ln for ax in forgetting_figure([run], [a]).axes for ln in ax.lines}
    gen = [100.0 - c["gen_forgotten_pct"] for c in run.forgetting]
    assert list(retained["retained.gen.g0"].get_ydata()) == pytest.approx(gen)
    assert "retained.greedy_retested.g0" in retained
    (row,) = summary_rows([run], [a])
    mean = sum(r["gen_es"] for r in run.ok_edits) / len(run.ok_edits)
    assert row["ES gen."] == f"{mean:.2f}" and row["failing now (all / successful)"] != "–"
