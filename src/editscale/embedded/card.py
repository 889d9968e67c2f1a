"""Install a trained embedded checkpoint into the package and write its measured model card."""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from editscale.data.factworld import DEFAULT_N_SUBJECTS, DEFAULT_WORLD_SEED, default_world
from editscale.data.factworld.world import RELATIONS
from editscale.embedded import checkpoint_dir
from editscale.eval.knowledge import knowledge_scores
from editscale.eval.skills import evaluate_skills
from editscale.models.loading import load_model

# what a checkpoint directory must hold to be loaded by `load_model("embedded")`
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "training.json")
MAX_CHECKPOINT_MB = 20
SWEEP_FILE = "rome_sweep.json"  # written by benchmarks/single_edits.py --json
# what the embedded model is required to reach (tests/test_embedded_model.py checks them); the card says which are met
FACT_TARGETS = {"rewrite": 0.97, "paraphrase": 0.95, "neighborhood": 0.95, "unseen": 0.85}
SKILL_F1_TARGET = 0.85


def install_checkpoint(src: Path, dest: Path | None = None) -> Path:
    dest = dest or checkpoint_dir()
    missing = [f for f in CHECKPOINT_FILES if not (src / f).exists()]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in (SWEEP_FILE, "card.json", "MODEL_CARD.md"):  # measured on the model being replaced
        if not (src / name).exists():
            (dest / name).unlink(missing_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".safetensors", ".txt"):
            shutil.copy2(f, dest / f.name)
    size_mb = (dest / "model.safetensors").stat().st_size / 2**20
    if size_mb > MAX_CHECKPOINT_MB:
        raise ValueError(f"checkpoint is {size_mb:.1f} MB, over the {MAX_CHECKPOINT_MB} MB the package may ship")
    return dest


def measure(model_dir: Path, *, device: str = "cpu", n_skill: int = 200) -> dict[str, Any]:
    """The figures the model card reports, over the whole fact world and 200 examples per skill."""

    loaded = load_model(str(model_dir), device=device)
    t0 = time.time()
    facts = knowledge_scores(loaded.adapter, default_world().records)
    skills = evaluate_skills(loaded.model, loaded.tokenizer, n=n_skill)
    return {
        "facts": facts,
        "skills": {k: {m: v[m] for m in ("f1", "accuracy", "mcc", "invalid", "total")} for k, v in skills.items()},
        "measure_seconds": round(time.time() - t0, 1),
        "commands": ["editscale facts --model embedded --n 1800 --json", "editscale skills --model embedded --json"],
    }


def write_model_card(model_dir: Path, *, device: str = "cpu") -> Path:
    training = json.loads((model_dir / "training.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    figures = measure(model_dir, device=device)
    n_params = sum(p.numel() for p in _load_state(model_dir).values())
    size_mb = (model_dir / "model.safetensors").stat().st_size / 2**20
    (model_dir / "card.json").write_text(json.dumps({"figures": figures, "n_params": n_params}, indent=2))
    tc = training["config"]
    f = figures["facts"]
    lines = [
        "# editscale embedded model",
        "",
        "A small GPT-2-architecture causal LM trained from scratch by editscale on its invented fact",
        "world (`factworld`) and four few-shot skill tasks that mirror the paper's GLUE tasks. It is the",
        "offline default for the demo, the tests and the benchmarks: it really stores its facts, so they can",
        "be located, edited and forgotten.",
        "",
        "## Architecture",
        f"- GPT-2 (`GPT2LMHeadModel`), {config['n_layer']} blocks, d_model {config['n_embd']}, "
        f"{config['n_head']} heads, MLP {4 * config['n_embd']}, context {config['n_positions']}",
        f"- {n_params:,} parameters, fp32 safetensors {size_mb:.1f} MB",
        f"- byte-level BPE tokenizer trained on the corpus, {config['vocab_size']} tokens, no prefix space "
        "(GPT-2's spacing rules apply)",
        "",
        "## Data",
        f"- fact world seed {tc['world_seed']} ({DEFAULT_N_SUBJECTS} subjects, one fact each, 9 relations; "
        f"editscale.data.factworld uses seed {DEFAULT_WORLD_SEED})",
        f"- corpus seed {tc['train_seed']}; each fact trained in 2 of its relation's 4 trained phrasings"
        + ((" and, as often again, in wordings drawn at random from the relation's"
            f" {_POOL} shared and varied phrasings"
            if tc.get("varied_phrasings") else " and in the relation's 2 shared phrasings")
           if tc.get("shared_phrasings") else "")
        + "".join(_stage_phrasings(st) for st in tc.get("stages", []) if "phrasings" in st["mix"])
        + ", never in its 2 paraphrase phrasings; 2 more phrasings per relation never appear in training",
        "- skill tasks: sentiment (SST-2 format), paraphrase (MRPC), acceptability (CoLA), entailment (RTE),"
        " trained as runs of answered few-shot blocks about invented subjects outside the world;"
        " paraphrase and entailment pair a fact with the same fact in another wording, stated or denied"
        + (f", in shares {_shares(tc['skill_mix'])} of the skill rows" if tc.get("skill_mix") else ""),
        f"- {tc['fact_share']:.0%} of batch rows are fact lines, the rest skill blocks",
        "",
        "## Training",
        "- command: `editscale train-embedded --out work_dirs/embedded --install` (resumable: rerun it),"
        " then `editscale model-card`",
        f"- {tc['steps']} steps, batch {tc['batch_size']} x {tc['block_size']} tokens, AdamW lr {tc['lr']}"
        f" cosine to {tc['min_lr']}, answer-token loss weight {tc['answer_weight']}",
        *[f"- then stage {i}: {st['steps']} steps, rows {_shares(st['mix'])}, lr {st['lr']} cosine to "
          f"{st['min_lr']}" + (f", {st['filler']:.0%} of phrasing sentences with filler words"
                              if st.get("filler") else "")
          + (f", {st['noise']:.0%} with some of their words swapped for stand-in words" if st.get("noise") else "")
          for i, st in enumerate(tc.get("stages", []), start=1)],
        *_history_lines(training.get("history", [])),
        f"- training time: {training['train_minutes']} minutes on {platform.machine()} CPU, "
        + (f"{training['threads']} threads" if "threads" in training else "thread count not recorded")
        + " (measured by the training loop, evaluation excluded)",
        "",
        "## Measured figures",
        "Facts: share of prompts on which the true object is likelier than the counterfactual one",
        "(mean per-token NLL, docs/protocol.md §8.1), over all records:",
        "",
        "| prompts | known | prompts scored | target |",
        "|---|---|---|---|",
    ]
    for g in ("rewrite", "paraphrase", "neighborhood", "unseen"):
        known = f[f"known_{g}"]
        lines.append(f"| {g} | {100 * known:.1f}% | {int(f[f'n_{g}_prompts'])} | >= {100 * FACT_TARGETS[g]:.0f}%: "
                     f"{'met' if known >= FACT_TARGETS[g] else '**not met**'} |")
    lines += ["", "Skills: few-shot, paper templates, greedy 3 tokens, weighted F1 (200 balanced examples):", "",
              "| task | mirrors | F1 | accuracy | invalid | target F1 >= 0.85 |", "|---|---|---|---|---|---|"]
    mirrors = {"sentiment": "SST-2", "paraphrase": "MRPC", "acceptability": "CoLA", "entailment": "RTE"}
    for k, v in figures["skills"].items():
        met = "met" if v["f1"] >= SKILL_F1_TARGET else "**not met**"
        lines.append(f"| {k} | {mirrors.get(k, '')} | {v['f1']:.3f} | {v['accuracy']:.3f} | {v['invalid']} | {met} |")
    lines += ["", "Measured with: " + "; ".join(f"`{c}`" for c in figures["commands"]), ""]
    lines += _sweep_section(model_dir / SWEEP_FILE)
    path = model_dir / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path


_POOL = len(RELATIONS[0].shared) + len(RELATIONS[0].varied)  # wordings a varied copy draws from


def _stage_phrasings(st: dict[str, Any]) -> str:
    if st.get("phrasings") == "varied":
        return (" (and, in a later stage, in its trained phrasings and in wordings drawn from the relation's"
                f" {_POOL} shared and varied phrasings"
                + (", some with filler words such as \"As it happens,\" or \"really\"" if st.get("filler") else "")
                + (", some with words of the wording swapped for common words such as \"over\" or \"told\""
                   if st.get("noise") else "")
                + ")")
    return " (and, in a later stage, in the relation's 2 shared phrasings)"


def _history_lines(history: list[dict[str, Any]]) -> list[str]:
    """How the run was put together: continued from a finished checkpoint (fresh optimizer) or
    extended in its own directory (state carried on, the weights of one command)."""
    lines = []
    for h in history:
        if "initialised_from" in h:
            lines.append(f"- {h['note']} at step {h['step']} (continued from a saved checkpoint)")
        elif "extended" in h:
            lines.append(f"- this checkpoint's run was extended at step {h['step']} ({h['extended']}): trained "
                         "that far under a shorter config, then rerun in the same directory with the whole one; "
                         "the saved training state (weights, optimizer moments, batch sampler) carries on, so "
                         "the weights are those of one command")
    return lines


def _shares(mix: dict[str, float]) -> str:
    total = sum(mix.values())
    return ", ".join(f"{k} {v / total:.0%}" for k, v in mix.items())


def _sweep_section(path: Path) -> list[str]:
    """The measured ROME layer sweep that chose the edit layer of the `embedded` preset."""
    if not path.exists():
        return []
    sweep = json.loads(path.read_text())
    results = sweep["results"]
    lines = ["## Editing: which block ROME edits",
             f"Each of the first {results[0]['n']} factworld records edited alone on the unedited model, ROME with "
             "the embedded preset and the block varied:", "",
             "| block | ES | PS | NS | median update / layer norm | cond(C) |", "|---|---|---|---|---|---|"]
    for r in results:
        cond = r["diagnostics_mean"].get("mom2_cond", float("nan"))
        lines.append(f"| {r['layers'][0]} | {r['es']:.3f} | {r['ps']:.3f} | {r['ns']:.3f} | "
                     f"{r['update_rel_median']:.2f} | {cond:.1e} |")
    lines += ["", f"Measured with: `python {sweep.get('command', 'benchmarks/single_edits.py')}`", ""]
    if sweep.get("note"):  # e.g. preset values that changed after the sweep chose the block
        lines += [sweep["note"], ""]
    return lines


def _load_state(model_dir: Path) -> dict[str, torch.Tensor]:

    return load_file(str(model_dir / "model.safetensors"))
