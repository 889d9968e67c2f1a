"""Train the embedded default model from scratch: tokenizer, GPT-2 model, fact world and skills.

`editscale train-embedded --out DIR` runs this. It is resumable: the training state is saved to
DIR/train_state.pt every few hundred steps and picked up again when the same command is rerun.

Data: a token stream of fact lines (every fact in its two trained phrasings, and with
`shared_phrasings` in its relation's two shared ones too, shuffled, grouped 1-3 sentences a line),
and one stream per skill task (runs of answered few-shot blocks). A batch row is a window from one
stream, starting at a line or block boundary: a fact line with probability `fact_share`, else a
skill stream drawn by `skill_mix`. The first answer token of each skill block gets a larger loss
weight, because that single token carries the decision and the rest of a
block is mostly predictable format.

A YAML file of TrainConfig fields (`editscale train-embedded --config FILE`) overrides the shipped
recipe, e.g. to probe on its own whether a skill can be learnt: `fact_share: 0.0` and a
`skill_mix` that keeps only that skill.

Later stages (`TrainConfig.stages`) continue the same model with their own mix of streams and
learning-rate schedule; they may add the `phrasings` stream (every fact in its relation's shared
phrasings). A run directory may be extended by more steps or by more stages, never changed.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from editscale.config_files import read_yaml_mapping, validate
from editscale.data.factworld.skills import (
    SKILL_TASKS,
    SkillEvalSet,
    skill_eval_set,
    skill_training_text,
)
from editscale.data.factworld.world import FactWorld, fact_lines, generate_world
from editscale.eval.downstream.fewshot import evaluate_fewshot
from editscale.eval.knowledge import knowledge_scores
from editscale.models.adapter import ModelAdapter


class Stage(BaseModel):
    """A later training stage: the same model, continued on its own mix with its own schedule."""

    model_config = ConfigDict(extra="forbid")

    steps: int
    mix: dict[str, float]  # stream -> share of batch rows: facts, phrasings, or a skill task's name
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup: int = 30
    answer_weight: float = 4.0  # loss weight of a skill block's first answer token
    context_weight: float = 1.0  # loss weight of every other token of a skill block
    phrasing_repeats: int = 6  # copies of each shared-phrasing sentence in the phrasings stream
    # "varied": the phrasings stream also holds the trained sentences, and its shared copies are
    # worded from the shared and varied phrasings (world.fact_lines)
    phrasings: Literal["shared", "varied"] = "shared"
    filler: float = 0.0  # share of the phrasings stream's sentences carrying filler words
    noise: float = 0.0  # share of the phrasings stream's sentences with stand-in words (world.with_noise)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    world_seed: int = 0
    n_subjects: int = 1800
    train_seed: int = 0
    vocab_size: int = 4096
    n_layer: int = 6
    n_embd: int = 192
    n_head: int = 6
    n_positions: int = 512
    block_size: int = 384
    batch_size: int = 24
    steps: int = 6000
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 200
    weight_decay: float = 0.05
    fact_share: float = 0.5
    fact_repeats: int = 40  # copies of each trained sentence in the fact stream
    shared_phrasings: bool = False  # the fact stream also holds every fact in its relation's shared phrasings
    # each shared-phrasing copy is worded at random from the relation's shared and varied phrasings
    varied_phrasings: bool = False
    filler: float = 0.0  # share of fact sentences carrying filler words (world.with_filler)
    skill_blocks: int = 30000  # answered blocks per skill task in its stream
    skill_mix: dict[str, float] | None = None  # share of each skill among skill rows; None: equal
    answer_weight: float = 4.0
    eval_every: int = 500
    save_every: int = 250
    threads: int = 0  # 0: torch's default
    stages: list[Stage] = []

    @model_validator(mode="after")
    def _mix_names_every_stream_once(self) -> TrainConfig:
        names = list(SKILL_TASKS)
        mix = self.skill_mix
        if mix is not None and (set(mix) != set(names) or min(mix.values()) < 0 or not sum(mix.values())):
            raise ValueError(f"skill_mix needs a share >= 0 for each of {', '.join(names)} (got {mix})")
        if self.varied_phrasings and not self.shared_phrasings:
            raise ValueError("varied_phrasings words the shared-phrasing copies: it needs shared_phrasings: true")
        return self

    @property
    def total_steps(self) -> int:
        return self.steps + sum(st.steps for st in self.stages)

    def stage_at(self, step: int) -> tuple[int, Stage | None, int]:
        """(stage number, the stage or None for the first, the step's index within it); a step past
        the end belongs to the last stage."""
        if step < self.steps or not self.stages:
            return 0, None, step
        start = self.steps
        for i, st in enumerate(self.stages, start=1):
            if step < start + st.steps or i == len(self.stages):
                return i, st, step - start
            start += st.steps
        raise AssertionError("unreachable: the last stage takes every later step")

    def extends(self, before: TrainConfig) -> bool:
        """True when this config continues `before`: the same run with more first-stage steps (and no
        stages yet), or the same steps and stages followed by more stages."""
        if before.model_copy(update={"steps": self.steps, "stages": self.stages}) != self:
            return False
        more_steps = not before.stages and not self.stages and self.steps > before.steps
        n = len(before.stages)
        more_stages = self.steps == before.steps and len(self.stages) > n and self.stages[:n] == before.stages
        return more_steps or more_stages


@dataclass
class Stream:
    ids: np.ndarray  # int32 token ids
    weights: np.ndarray  # float32 loss weight of predicting each token
    starts: np.ndarray  # token indices where a window may start (line / block starts)


def corpus_texts(world: FactWorld, cfg: TrainConfig) -> tuple[str, dict[str, str], list[str]]:
    rng = random.Random(f"corpus-{cfg.train_seed}")
    phrasings = ("varied" if cfg.varied_phrasings else "both") if cfg.shared_phrasings else "trained"
    facts = "\n".join(fact_lines(world, cfg.fact_repeats, rng, phrasings=phrasings, filler=cfg.filler)) + "\n"
    skills = {name: skill_training_text(task, rng, world.reserved_names, cfg.skill_blocks)
              for name, task in SKILL_TASKS.items()}
    return facts, skills, [facts, *skills.values()]


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE like GPT-2's (no prefix space), so GPT-2's spacing rules apply unchanged."""

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    sample = [t[i:i + 4000] for t in texts for i in range(0, min(len(t), 2_000_000), 4000)]
    bpe.train_from_iterator(sample, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.model_max_length = 512
    return tok


def _stream(tokenizer: Any, text: str, boundary: str, answer_after: str | None, answer_weight: float
            ) -> Stream:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray([o[0] for o in enc["offset_mapping"]], dtype=np.int64)
    bounds = [0]
    pos = text.find(boundary)
    while pos != -1:
        bounds.append(pos + len(boundary))
        pos = text.find(boundary, pos + 1)
    starts = np.unique(np.searchsorted(offsets, np.asarray(bounds, dtype=np.int64)))
    weights = np.ones(len(ids), dtype=np.float32)
    if answer_after:
        ans, pos = [], text.find(answer_after)
        while pos != -1:
            ans.append(pos + len(answer_after))
            pos = text.find(answer_after, pos + 1)
        idx = np.searchsorted(offsets, np.asarray(ans, dtype=np.int64))
        weights[idx[idx < len(ids)]] = answer_weight
    return Stream(ids, weights, starts[starts < len(ids) - 2])


def build_streams(tokenizer: Any, world: FactWorld, cfg: TrainConfig) -> dict[str, Stream]:
    facts, skills, _ = corpus_texts(world, cfg)
    streams = {"facts": _stream(tokenizer, facts, "\n", None, 1.0)}
    for name, text in skills.items():
        streams[name] = _stream(tokenizer, text, "\n\n", SKILL_TASKS[name].fmt.marker, cfg.answer_weight)
    return streams


def _windows(pick: Callable[[int], Stream], cfg: TrainConfig, rng: np.random.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of windows: row b from stream `pick(b)`, starting at a random line or block start."""
    x = np.zeros((cfg.batch_size, cfg.block_size + 1), dtype=np.int64)
    w = np.zeros((cfg.batch_size, cfg.block_size + 1), dtype=np.float32)
    for b in range(cfg.batch_size):
        s = pick(b)
        start = int(s.starts[rng.integers(len(s.starts))])
        chunk = s.ids[start:start + cfg.block_size + 1]
        x[b, : len(chunk)] = chunk
        w[b, : len(chunk)] = s.weights[start:start + cfg.block_size + 1]
    return torch.from_numpy(x), torch.from_numpy(w)


def sample_batch(streams: dict[str, Stream], cfg: TrainConfig, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first stage's batch: a row is facts with probability fact_share, else a random skill."""
    skill_names = [n for n in streams if n != "facts"]
    p = None if cfg.skill_mix is None else np.asarray([cfg.skill_mix[n] for n in skill_names], dtype=np.float64)
    if p is not None:
        p /= p.sum()

    def pick(_: int) -> Stream:
        if rng.random() < cfg.fact_share:
            return streams["facts"]
        if p is None:  # the draws of runs made before skill_mix existed
            return streams[skill_names[rng.integers(len(skill_names))]]
        return streams[skill_names[rng.choice(len(skill_names), p=p)]]

    return _windows(pick, cfg, rng)


def _cosine(step: int, steps: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up then cosine decay, within the first stage and again within each later one."""
    _, stage, i = cfg.stage_at(step)
    if stage is None:
        return _cosine(step, cfg.steps, cfg.warmup, cfg.lr, cfg.min_lr)
    return _cosine(i, stage.steps, stage.warmup, stage.lr, stage.min_lr)


def stage_streams(tokenizer: Any, world: FactWorld, cfg: TrainConfig, stage: Stage, index: int,
                  base: dict[str, Stream]) -> dict[str, Stream]:
    """The streams a later stage samples from: the first stage's, re-weighted, and its phrasings."""
    unknown = set(stage.mix) - {"phrasings", *base}
    if unknown:
        raise ValueError(f"stage {index}: unknown streams in mix: {', '.join(sorted(unknown))}")
    out: dict[str, Stream] = {}
    for name in stage.mix:
        if name == "phrasings":
            rng = random.Random(f"phrasings-{cfg.train_seed}-{index}")
            lines = fact_lines(world, stage.phrasing_repeats, rng, phrasings=stage.phrasings, filler=stage.filler,
                               noise=stage.noise)
            text = "\n".join(lines) + "\n"
            out[name] = _stream(tokenizer, text, "\n", None, 1.0)
        elif name == "facts":
            out[name] = base[name]
        else:
            s = base[name]
            weights = np.where(s.weights > 1, stage.answer_weight, stage.context_weight).astype(np.float32)
            out[name] = Stream(s.ids, weights, s.starts)
    return out


def sample_mixed(streams: dict[str, Stream], mix: dict[str, float], cfg: TrainConfig, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A later stage's batch: rows come from the streams in the proportions of `mix`.

    (The first stage keeps `sample_batch`, whose random draws the shipped checkpoint was trained on.)
    """
    names = list(mix)
    p = np.asarray([mix[n] for n in names], dtype=np.float64)
    rows = rng.choice(len(names), size=cfg.batch_size, p=p / p.sum())
    return _windows(lambda b: streams[names[rows[b]]], cfg, rng)


def load_train_config(path: Path, base: TrainConfig) -> TrainConfig:
    """`base` with the fields a YAML file sets; an unknown or invalid field is an error naming the file."""

    return validate(TrainConfig, base.model_dump() | read_yaml_mapping(path, "training config"), source=str(path))


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int) -> torch.nn.Module:

    config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=eos_id, eos_token_id=eos_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(cfg.train_seed)
    return GPT2LMHeadModel(config)


def quick_eval(model: torch.nn.Module, tokenizer: Any, world: FactWorld, n_facts: int = 300,
               n_skill: int = 60) -> dict[str, float]:

    was_training = model.training
    model.eval()

    out = knowledge_scores(ModelAdapter(model, tokenizer), world.records[:n_facts])
    for name, task in SKILL_TASKS.items():
        es: SkillEvalSet = skill_eval_set(task, world.reserved_names, n=n_skill, seed=99)
        longest = max(len(tokenizer(es.prompt(f))["input_ids"]) for f, _ in es.examples)
        if longest + 3 > model.config.n_positions:  # a small probe tokenizer can make prompts too long
            out[f"f1_{name}"] = float("nan")
            continue
        out[f"f1_{name}"] = evaluate_fewshot(model, tokenizer, task.fmt, es.demos, es.examples)["f1"]
    model.train(was_training)
    return out


def init_state(cfg: TrainConfig, checkpoint: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The config a finished checkpoint was trained with, and a training state that starts from it.

    What a checkpoint keeps is its weights, tokenizer and training.json; the optimizer moments and
    the batch sampler's state are gone, so they start afresh at its last step (recorded in the
    history). `cfg` must continue that config (`TrainConfig.extends`), e.g. add a stage.
    """

    record_path = checkpoint / "training.json"
    if not record_path.exists():
        raise ValueError(f"{checkpoint} has no training.json: not a checkpoint written by this trainer")
    record = json.loads(record_path.read_text())
    before = TrainConfig(**record["config"])
    if not cfg.extends(before):
        raise ValueError(f"the config does not continue the one {checkpoint} was trained with "
                         "(only more first-stage steps or more stages may follow)")
    weights = GPT2LMHeadModel.from_pretrained(checkpoint).state_dict()
    step = int(record["steps"])
    note = {"initialised_from": str(checkpoint), "step": step,
            "note": "optimizer moments and batch sampler restarted here"}
    return before, {"model": weights, "step": step, "elapsed": 60.0 * record["train_minutes"],
                    "history": [*record["history"], note]}


def train(cfg: TrainConfig, out_dir: Path, *, init_from: Path | None = None, progress: bool = True,
          log: Any = print) -> Path:
    """Train (or resume) into ``out_dir``; return the directory holding the final checkpoint.

    ``init_from``: a finished checkpoint to continue from (`init_state`) when ``out_dir`` holds no
    training state yet; its tokenizer is reused."""

    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg_path = out_dir / "train_config.json"
    state_path = out_dir / "train_state.pt"
    extended_from, initial = None, None
    if init_from is not None and not state_path.exists():
        extended_from, initial = init_state(cfg, init_from)
        tok_dir = out_dir / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            PreTrainedTokenizerFast.from_pretrained(init_from).save_pretrained(tok_dir)
    elif cfg_path.exists():
        before = TrainConfig(**json.loads(cfg_path.read_text()))
        if before != cfg:
            # Only a longer run may reuse a directory: more steps continue the same model (the
            # cosine schedule is stretched from there on), or more stages follow the finished ones;
            # training.json records either.
            if not cfg.extends(before):
                raise ValueError(f"{out_dir} holds a training run with another config; use a new --out")
            extended_from = before
    cfg_path.write_text(json.dumps(cfg.model_dump(), indent=2))

    world = generate_world(cfg.world_seed, cfg.n_subjects)
    tok_dir = out_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        _, _, texts = corpus_texts(world, cfg)
        tokenizer = train_tokenizer(texts, cfg.vocab_size)
        tokenizer.save_pretrained(tok_dir)
    t0 = time.time()
    streams = build_streams(tokenizer, world, cfg)
    log(f"streams ready in {time.time() - t0:.0f}s: " +
        ", ".join(f"{k}={len(s.ids):,} tokens" for k, s in streams.items()))

    model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg.train_seed)
    step, elapsed, history = 0, 0.0, []
    if initial is not None:
        model.load_state_dict(initial["model"])
        step, elapsed, history = initial["step"], initial["elapsed"], initial["history"]
        rng = np.random.default_rng([cfg.train_seed, step])
        log(f"initialised from {init_from} at step {step}")
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        log(f"resumed at step {step} ({elapsed / 60:.1f} min trained)")
    if extended_from is not None:
        what = (f"steps {extended_from.steps} -> {cfg.steps}" if cfg.steps != extended_from.steps else
                f"stages {len(extended_from.stages)} -> {len(cfg.stages)}")
        history.append({"extended": what, "step": step})
        log(f"extending the run: {what}")

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                    "step": step, "elapsed": elapsed, "history": history}, tmp)
        tmp.replace(state_path)  # atomic: a kill mid-save never corrupts the last good state

    model.train()
    columns = (TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.total_steps, completed=step, loss=float("nan"))
        t_last = time.time()
        current: tuple[int, dict[str, Stream]] | None = None
        while step < cfg.total_steps:
            index, stage, _ = cfg.stage_at(step)
            if stage is None:
                x, w = sample_batch(streams, cfg, rng)
            else:
                if current is None or current[0] != index:
                    current = (index, stage_streams(tokenizer, world, cfg, stage, index, streams))
                    t_last = time.time()  # building a stage's streams is not training time
                x, w = sample_mixed(current[1], stage.mix, cfg, rng)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            logits = model(input_ids=x[:, :-1]).logits
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                                    reduction="none")
            wt = w[:, 1:].reshape(-1)
            loss = (nll * wt).sum() / wt.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            now = time.time()
            elapsed += now - t_last
            t_last = now
            bar.update(task, completed=step, loss=loss.item())
            if step % cfg.eval_every == 0 or step == cfg.total_steps:
                ev = quick_eval(model, tokenizer, world)
                ev.update(step=step, stage=cfg.stage_at(step - 1)[0], minutes=elapsed / 60, loss=loss.item())
                history.append(ev)
                log(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items()))
                t_last = time.time()  # evaluation time is not training time
            if step % cfg.save_every == 0 or step == cfg.total_steps:
                save_state()
    final = out_dir / "checkpoint"
    model.eval()
    model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    (final / "training.json").write_text(json.dumps(
        {"config": cfg.model_dump(), "train_minutes": round(elapsed / 60, 1), "threads": torch.get_num_threads(),
         "steps": step,
         "history": history}, indent=2))
    return final


# The configuration of the shipped checkpoint (`editscale train-embedded` uses it): one run from
# scratch. The first stage memorises the facts (every fact also in its relation's shared phrasings);
# the second rewords them (varied phrasings, filler words), which is what lets the model recall a
# fact in a phrasing it never saw. The short last stage swaps some words of those wordings for
# stand-in words, so that a fact is recalled from whatever is left of a wording. The recipes tried
# and their never-seen recall: docs/embedded-model.md.
_REWORD_MIX = {"facts": 0.25, "phrasings": 0.45, "paraphrase": 0.075, "entailment": 0.075, "sentiment": 0.075,
               "acceptability": 0.075}
EMBEDDED_CONFIG = TrainConfig(
    n_layer=6, n_embd=128, n_head=4, block_size=384, batch_size=24, steps=1300, fact_share=0.7, fact_repeats=60,
    shared_phrasings=True, skill_blocks=30000, warmup=100, eval_every=250, save_every=100,
    stages=[Stage(steps=480, lr=1e-3, min_lr=5e-5, warmup=30, phrasings="varied", filler=0.5, mix=_REWORD_MIX),
            Stage(steps=120, lr=1e-3, min_lr=5e-5, warmup=20, phrasings="varied", filler=0.5, noise=0.5,
                  mix=_REWORD_MIX)])
