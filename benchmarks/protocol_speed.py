"""The paper's protocol run two ways on one model and one data set: editscale's way and the way of the
paper's code (scalable-model-editing/gradual-catastrophic-forgetting). Prints each phase's seconds both
ways, their ratio, and whether every metric came out the same.

The protocol: sequential ROME edits; after each, that edit's CounterFact scores (ES/PS/NS and the
greedy rewrite match); GLUE-style few-shot downstream (greedy, 3 tokens) on the unedited model and
every ``--every`` edits; forgetting of all earlier edits every ``--every`` edits (the paper's
criterion: greedy exact match of the rewrite, sticky).

The paper's way, reproduced in structure from its code (own code here, not copied):
- editing: the same ROME, but v* is optimised on the full logits of every position, log-softmaxed
  everywhere, as the reference's `rome/compute_v.py` does; editscale's own delta is the one applied,
  so both ways evaluate the same model (the two deltas' difference is printed);
- per-edit scores: `experiments/py/eval_utils_counterfact.py: test_batch_prediction`: one padded
  forward pass of the record's prompt x {new, true} rows with every position's logits, then a
  log-softmax over the vocabulary per target token and a Python loop of `.item()` calls;
- GLUE: `glue_eval/*_eval.py`: one `model.generate` per example (no attention mask), answer parsed
  from the decoded prompt + generation;
- forgetting: `experiments/evaluate_glue.py` saves the whole model every interval and
  `experiments/evaluate_history.py` reloads it and re-runs the per-record evaluation above for every
  earlier edit not yet forgotten.

Model: GPT-2-shaped, 4 blocks, d=768, random weights, the GPT-2 tokenizer from
$EDITSCALE_SHARED/data/tokenizers/gpt2 (else the tests' byte BPE; the script says which); records from
$EDITSCALE_SHARED/data/counterfact/counterfact_subset.json (else the fact world); GLUE subsets from
$EDITSCALE_SHARED/data/glue (else the fact world's four skills in the same formats).

    python benchmarks/protocol_speed.py [--edits 20] [--every 10] [--glue-n 200] [--v-steps 20]
                                        [--mom2-samples 200] [--threads 1] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from downstream_speed import GPT2_TOKENIZER_DIR, SHARED_DIR
from sklearn.metrics import f1_score
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
from transformers.utils import logging as hf_logging

from editscale.data.records import EditRecord
from editscale.data.registry import load_records
from editscale.eval.downstream.suite import EMBEDDED_DEFAULT, GLUE_DEFAULT, DownstreamSuite
from editscale.eval.forgetting import ForgettingTracker
from editscale.eval.proficiency import EditScores, edit_scores
from editscale.methods.base import Editor, EditRequest, apply_result, get_method, resolve_method_config
from editscale.methods.rome import editor as rome_editor
from editscale.methods.solver.context import EditContext
from editscale.methods.solver.targets import optimize_target
from editscale.models.adapter import ModelAdapter

COUNTERFACT_FILE = SHARED_DIR / "data/counterfact/counterfact_subset.json"
GLUE_DIR = SHARED_DIR / "data/glue"
PHASES = ("editing", "per-edit scores", "GLUE", "forgetting")


# ---------------------------------------------------------------------- setup


def build_model() -> tuple[ModelAdapter, str]:
    if (GPT2_TOKENIZER_DIR / "vocab.json").is_file():
        tok, source = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER_DIR)), "GPT-2 tokenizer"
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import byte_bpe_tokenizer

        tok, source = byte_bpe_tokenizer(), f"tests' byte BPE (GPT-2 files absent from {GPT2_TOKENIZER_DIR})"
    tok.pad_token = tok.eos_token  # as the paper's drivers set it
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=768, n_layer=4, n_head=12))
    model.eval().requires_grad_(False)
    return ModelAdapter(model, tok, name="gpt2-shaped-4-blocks"), source


def edit_records(n: int) -> tuple[list[EditRecord], str]:
    if COUNTERFACT_FILE.is_file():
        records, source = load_records("counterfact", data_path=COUNTERFACT_FILE), f"CounterFact ({COUNTERFACT_FILE})"
    else:
        records, source = load_records("factworld"), "the fact world (CounterFact subset absent)"
    seen, out = set(), []
    for r in records:  # one edit per subject, as the paper's samples
        if r.subject.lower() not in seen:
            seen.add(r.subject.lower())
            out.append(r)
    return out[:n], source


def downstream(n: int) -> tuple[DownstreamSuite, str]:
    if all((GLUE_DIR / f"{t}.jsonl").is_file() for t in GLUE_DEFAULT):
        return DownstreamSuite(GLUE_DEFAULT, n=n, data_dir=GLUE_DIR), f"GLUE subsets ({GLUE_DIR})"
    return DownstreamSuite(EMBEDDED_DEFAULT, n=n), "fact-world skills (GLUE subsets absent)"


# ---------------------------------------------------------------------- the paper's way


@torch.no_grad()
def paper_record_scores(model: torch.nn.Module, tok: Any, r: EditRecord) -> EditScores:
    """`test_batch_prediction` over the record's rewrite, paraphrase and neighborhood prompts."""
    prefixes = [r.rewrite_prompt, *r.paraphrase_prompts, *r.neighborhood_prompts]
    which = [0] * (1 + len(r.paraphrase_prompts)) + [1] * len(r.neighborhood_prompts)
    prefix_lens = [len(n) for n in tok(prefixes)["input_ids"]]
    enc = tok([f"{p} {s}" for p in prefixes for s in (r.target_new, r.target_true)], padding=True,
              return_tensors="pt")
    a_tok, b_tok = (tok(f" {n}")["input_ids"] for n in (r.target_new, r.target_true))
    logits = model(**enc).logits
    probs = np.zeros((logits.size(0),), dtype=np.float32)
    correct = []
    for i in range(logits.size(0)):
        cur = a_tok if i % 2 == 0 else b_tok
        for j, t in enumerate(cur):
            probs[i] += -torch.nn.functional.log_softmax(logits[i, prefix_lens[i // 2] + j - 1, :], dim=0)[t].item()
        probs[i] /= len(cur)
        if (which[i // 2] == 0 and i % 2 == 0) or (which[i // 2] == 1 and i % 2 == 1):
            ok = True
            for j, t in enumerate(cur):
                if logits[i, prefix_lens[i // 2] + j - 1, :].argmax().item() != t:
                    ok = False
                    break
            correct.append(ok)
    new, true = probs[0::2], probs[1::2]
    n_para = len(r.paraphrase_prompts)
    para, neigh = range(1, 1 + n_para), range(1 + n_para, len(prefixes))
    return EditScores(es=float(new[0] < true[0]),
                      ps=float(np.mean([new[k] < true[k] for k in para])) if n_para else float("nan"),
                      ns=float(np.mean([true[k] < new[k] for k in neigh])) if len(neigh) else float("nan"),
                      rewrite_correct=correct[0], nll_new=float(new[0]), nll_true=float(true[0]))


@torch.no_grad()
def paper_glue(model: torch.nn.Module, tok: Any, suite: DownstreamSuite) -> dict[str, dict[str, Any]]:
    out = {}
    for t in suite.tasks:
        preds, labels, gens = [], [], []
        for fields, label in t.examples:
            ids = tok.encode(t.task.fmt.render_prompt(t.demos, fields), return_tensors="pt")
            output = model.generate(ids, max_length=ids.shape[1] + 3, do_sample=False)
            preds.append(t.task.fmt.parse(tok.decode(output[0], skip_special_tokens=True)))
            gens.append(tok.decode(output[0, ids.shape[1]:], skip_special_tokens=True))
            labels.append(label)
        out[t.task.name] = {"f1": float(f1_score(labels, preds, average="weighted")), "predictions": preds,
                            "generations": gens}
    return out


def paper_history(model: torch.nn.Module, tok: Any, folder: Path, history: list[EditRecord],
                  remembered: dict[int, bool]) -> None:
    """Save the whole model, reload it, and re-evaluate every earlier edit not yet forgotten (sticky)."""
    model.save_pretrained(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    for r in history:
        if remembered.get(r.case_id, True):
            remembered[r.case_id] = paper_record_scores(loaded, tok, r).rewrite_correct
    shutil.rmtree(folder)


# ---------------------------------------------------------------------- the run


class Clock:
    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)

    @contextmanager
    def __call__(self, way: str, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[way, phase] += time.perf_counter() - t0


def run(adapter: ModelAdapter, editor: Editor, records: list[EditRecord], suite: DownstreamSuite, every: int,
        tmp: Path) -> tuple[Clock, list[str], float]:
    model, tok, clock = adapter.model, adapter.tokenizer, Clock()
    differ: list[str] = []
    tracker = ForgettingTracker()
    remembered: dict[int, bool] = {}  # the paper's history flags
    at_edit: dict[int, bool] = {}
    max_delta_diff = 0.0

    def glue(edits_done: int) -> None:
        with clock("editscale", "GLUE"):
            ours = suite.evaluate(model, tok)
        with clock("paper", "GLUE"):
            theirs = paper_glue(model, tok, suite)
        for name, res in theirs.items():
            for key in ("predictions", "generations"):
                if ours[name][key] != res[key]:
                    differ.append(f"GLUE {name} {key} after {edits_done} edits")
            if abs(ours[name]["f1"] - res["f1"]) > 1e-9:
                differ.append(f"GLUE {name} F1 after {edits_done} edits: {ours[name]['f1']} vs {res['f1']}")

    glue(0)
    for i, r in enumerate(records):
        request = EditRequest.from_record(r)
        with clock("paper", "editing"), mock.patch.object(rome_editor, "optimize_target",
                                                                        functools.partial(optimize_target,
                                                                                          full_logits=True)):
            theirs_delta = editor.compute([request]).deltas
        with clock("editscale", "editing"):
            result = editor.compute([request])
            apply_result(adapter, result)
        for layer, d in result.deltas.items():
            max_delta_diff = max(max_delta_diff, float((d - theirs_delta[layer]).norm() / d.norm()))
        with clock("editscale", "per-edit scores"):
            ours = edit_scores(adapter, [r])[0]
            tracker.add(r, greedy_success=ours.rewrite_correct, es_success=ours.es == 1.0)
        with clock("paper", "per-edit scores"):
            theirs = paper_record_scores(model, tok, r)
            at_edit[r.case_id] = theirs.rewrite_correct
        for key in ("es", "ps", "ns", "rewrite_correct"):
            a, b = getattr(ours, key), getattr(theirs, key)
            if not (a == b or (a != a and b != b)):
                differ.append(f"edit {i} {key}: {a} vs {b}")
        for key in ("nll_new", "nll_true"):
            if abs(getattr(ours, key) - getattr(theirs, key)) > 1e-4:
                differ.append(f"edit {i} {key}: {getattr(ours, key):.6f} vs {getattr(theirs, key):.6f}")
        done = i + 1
        if done % every == 0 or done == len(records):
            with clock("editscale", "forgetting"):
                tracker.check(adapter, done)
            with clock("paper", "forgetting"):
                paper_history(model, tok, tmp / f"edits_{done}", records[:done], remembered)
            forgotten = {c for c, ok in remembered.items() if at_edit[c] and not ok}
            if forgotten != set(tracker.paper_forgotten):
                differ.append(f"forgotten after {done} edits: {sorted(tracker.paper_forgotten)} vs {sorted(forgotten)}")
            glue(done)
    return clock, differ, max_delta_diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--every", type=int, default=10, help="GLUE and forgetting every this many edits")
    ap.add_argument("--glue-n", type=int, default=200, help="examples per downstream task (even; the paper's 200)")
    ap.add_argument("--v-steps", type=int, default=20, help="ROME's v* steps (the published 20)")
    ap.add_argument("--mom2-samples", type=int, default=200, help="corpus documents for ROME's C (setup only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print the 25 costliest calls (cProfile, cumulative)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # generate() without an attention mask warns on every call
    hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    adapter, tok_source = build_model()
    records, rec_source = edit_records(args.edits)
    suite, glue_source = downstream(args.glue_n)
    cfg = resolve_method_config("rome", "gpt2-xl", {"layers": [1], "v_loss_layer": None, "mom2_dataset": "factworld",
                                                    "mom2_n_samples": args.mom2_samples, "mom2_dtype": "float64",
                                                    "v_num_grad_steps": args.v_steps})
    editor = get_method("rome")(adapter, cfg, EditContext(adapter.name, progress=False))
    editor.ensure_prepared()
    n_params = sum(p.numel() for p in adapter.model.parameters()) / 1e6
    print(f"model: GPT-2-shaped, 4 blocks, d=768, vocabulary {len(adapter.tokenizer)} ({tok_source}), "
          f"{n_params:.0f}M parameters, random weights; {torch.get_num_threads()} thread(s)")
    print(f"edits: {len(records)} sequential ROME edits (layer 1, {args.v_steps} v* steps) from {rec_source}")
    print(f"downstream: {', '.join(suite.names)}, {args.glue_n} examples each, from {glue_source}; "
          f"GLUE and forgetting on the unedited model and every {args.every} edits")
    print(f"setup (C from {args.mom2_samples} documents, templates, data; shared): {time.perf_counter() - t0:.1f} s")

    profiler = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory() as tmp:
        if profiler:
            profiler.enable()
        clock, differ, delta_diff = run(adapter, editor, records, suite, args.every, Path(tmp))
        if profiler:
            profiler.disable()

    print(f"\n    {'phase':18s} {'paper s':>9s} {'editscale s':>12s} {'ratio':>7s}")
    for phase in (*PHASES, "total"):
        if phase == "total":
            p, e = (sum(v for (w, _), v in clock.seconds.items() if w == way) for way in ("paper", "editscale"))
        else:
            p, e = clock.seconds["paper", phase], clock.seconds["editscale", phase]
        print(f"    {phase:18s} {p:9.2f} {e:12.2f} {p / e if e else float('nan'):7.1f}x")
    print(f"\nROME deltas, paper's way vs editscale's: max relative difference {delta_diff:.1e} "
          "(editscale's is the one applied)")
    if differ:
        print(f"metrics differ in {len(differ)} place(s):")
        for line in differ:
            print(f"    {line}")
    else:
        print("metrics identical both ways: ES/PS/NS, greedy rewrite match and NLLs (to 1e-4) of every edit, "
              "forgotten facts at every checkpoint, F1, predictions and generations of every task at every checkpoint")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
