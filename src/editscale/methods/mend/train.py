"""Training MEND's editor network (docs/protocol.md §6.2; the reference's `trainer.py::edit_step`).

Each edit of a step: the fact's gradient factors on the unedited model go through the network
(whose input statistics take in the rows, as the reference's training mode does); the edited model,
W + ΔW with ΔW a differentiable function of the network, is then scored on

    L_edit = NLL of the new target after a paraphrase of the fact's prompt (the reference's edit_outer)
    L_loc  = KL(p_unedited ‖ p_edited) over every token of some of the fact's neighbourhood prompts

and cedit · L_edit + cloc · L_loc is back-propagated into the network and the step sizes α; every
`accumulate` edits make one Adam step of each. The edited model is never materialised: forward
hooks add x ΔWᵀ to the edited maps' outputs, so the base weights stay untouched throughout.

Which fact and prompts a step uses is drawn from (seed, step), and the network, both optimisers and
the input statistics go into `checkpoint.pt`, so a killed training resumes where it stopped with
the same result as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from editscale.data.records import EditRecord
from editscale.errors import EditscaleError
from editscale.methods.base import EditRequest
from editscale.methods.mend.config import MendConfig, MendTrainConfig
from editscale.methods.mend.network import MendNetwork
from editscale.methods.mend.weights import TRAIN_FILE, build_network, save_network
from editscale.methods.solver.gradients import Site, answer_loss, trace_edit_loss
from editscale.methods.solver.progress import progress_bar
from editscale.methods.solver.stats import model_fingerprint
from editscale.models.adapter import ModelAdapter

log = logging.getLogger(__name__)


@contextmanager
def edited_maps(adapter: ModelAdapter, deltas: dict[Site, torch.Tensor]) -> Iterator[None]:
    """While active the model computes with W + ΔW at every site (ΔW canonical [out, in]), as a
    differentiable function of ΔW, without writing any weight."""

    def hook(delta: torch.Tensor) -> Callable[..., torch.Tensor]:
        def add(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            return output + (x.float() @ delta.to(x.device).T).to(output.dtype)

        return add

    handles = [adapter.module(role, layer).register_forward_hook(hook(d)) for (role, layer), d in deltas.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _token_log_probs(adapter: ModelAdapter, prompts: Sequence[str]) -> torch.Tensor:
    """Next-token log-probabilities at every real token of the prompts, [tokens, vocab]."""
    batch = adapter.encode(prompts)
    mask = batch["attention_mask"].bool()
    hidden = adapter.hidden_before_head(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        use_cache=False)
    return torch.log_softmax(adapter.unembed(hidden[mask.to(hidden.device)]).float(), dim=-1)


def _kl(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(pre ‖ post), both log-probabilities (the reference's kl_loc_loss)."""
    return (pre.exp() * (pre - post)).sum(-1).mean()


def _paraphrase(record: EditRecord, rng: random.Random) -> str:
    return rng.choice(record.paraphrase_prompts) if record.paraphrase_prompts else record.prompt.format(record.subject)


def _loc_prompts(record: EditRecord, k: int, rng: random.Random, pool: Sequence[EditRecord]) -> list[str]:
    prompts = list(record.neighborhood_prompts)
    if not prompts:  # a record without neighbours: other facts' prompts are unrelated to it
        prompts = [r.prompt.format(r.subject) for r in rng.sample(list(pool), min(k, len(pool)))]
    return rng.sample(prompts, min(k, len(prompts)))


class MendTrainer:
    """Trains a `MendNetwork` for one model into an output directory (methods/mend/weights.py)."""

    def __init__(self, adapter: ModelAdapter, model_name: str, cfg: MendConfig, train: MendTrainConfig,
                 records: Sequence[EditRecord], out: Path) -> None:
        if len(records) < train.val_records + 1:
            raise EditscaleError(f"train-mend needs more than {train.val_records} training records, got {len(records)}")
        self.adapter, self.model_name, self.cfg, self.train, self.out = adapter, model_name, cfg, train, out
        pool = list(records)[: train.records]
        random.Random(f"mend-split-{train.seed}").shuffle(pool)
        self.val, self.pool = pool[: train.val_records], pool[train.val_records:]
        self.fingerprint = model_fingerprint(adapter.model)
        self.network: MendNetwork = build_network(adapter, cfg, edit_lr=train.edit_lr, seed=train.seed)
        self.opt = torch.optim.Adam([p for n, p in self.network.named_parameters() if n != "edit_lrs"], lr=train.lr)
        self.lr_opt = torch.optim.Adam([self.network.edit_lrs], lr=train.lr_lr)
        self.step = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ state

    def _settings(self) -> dict[str, Any]:
        return {"model": self.model_name, "fingerprint": self.fingerprint,
                "method_config": self.cfg.model_dump(mode="json", exclude={"weights", "lr_scale", "chunk"}),
                "train_config": self.train.model_dump(mode="json", exclude={"steps", "val_every", "checkpoint_every"})}

    def resume(self) -> bool:
        """Continue from `out/checkpoint.pt` if there is one; it must come from the same settings."""
        path = self.out / TRAIN_FILE
        if not path.exists():
            return False
        saved = torch.load(path, map_location="cpu", weights_only=True)
        settings = json.loads(saved["settings"])
        if settings != self._settings():
            differ = sorted(k for k in settings if settings[k] != self._settings()[k])
            raise EditscaleError(f"{self.out} holds a MEND training with other {', '.join(differ)}; "
                                 "use another --out or the same settings")
        self.network.load_state_dict(saved["network"])
        self.opt.load_state_dict(saved["opt"])
        self.lr_opt.load_state_dict(saved["lr_opt"])
        self.step = int(saved["step"])
        self.history = json.loads(saved["history"])
        return True

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f"{TRAIN_FILE}.{os.getpid()}.tmp"
        torch.save({"network": self.network.state_dict(), "opt": self.opt.state_dict(),
                    "lr_opt": self.lr_opt.state_dict(), "step": self.step, "settings": json.dumps(self._settings()),
                    "history": json.dumps(self.history)}, tmp)
        os.replace(tmp, self.out / TRAIN_FILE)
        save_network(self.out, self.network, {
            **self._settings(), "rank": self.cfg.rank, "n_hidden": self.cfg.n_hidden, "steps_done": self.step,
            "steps_planned": self.train.steps, "complete": self.step >= self.train.steps,
            "validation": self.history[-1] if self.history else None})

    # ------------------------------------------------------------------ one edit

    def _edit_loss(self, record: EditRecord, rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        adapter, t = self.adapter, self.train
        trace = trace_edit_loss(adapter, self.network.sites, [EditRequest.from_record(record)])
        self.network.observe(trace)
        loc = _loc_prompts(record, t.loc_prompts, rng, self.pool)
        with torch.no_grad():
            pre = _token_log_probs(adapter, loc)
        with edited_maps(adapter, self.network.deltas(trace)):
            l_edit = answer_loss(adapter, [_paraphrase(record, rng)], [record.target_new.strip()]).mean
            l_loc = _kl(pre, _token_log_probs(adapter, loc))
        loss = t.cedit * l_edit + t.cloc * l_loc
        return loss, {"edit": float(l_edit.detach()), "loc": float(l_loc.detach())}

    def train_step(self) -> dict[str, float]:
        """One optimiser step over `accumulate` edits drawn for this step."""
        t = self.train
        self.network.train()
        sums = {"edit": 0.0, "loc": 0.0}
        for a in range(t.accumulate):
            rng = random.Random(f"mend-{t.seed}-{self.step}-{a}")
            loss, parts = self._edit_loss(self.pool[rng.randrange(len(self.pool))], rng)
            (loss / t.accumulate).backward()
            for k, v in parts.items():
                sums[k] += v / t.accumulate
        params = list(self.network.parameters())
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        self.opt.step()
        self.lr_opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.lr_opt.zero_grad(set_to_none=True)
        self.step += 1
        return sums

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """On the held-out facts, each edited alone with the network as it is (statistics frozen):
        es / ps: the new target beats the alternative on the rewrite prompt / a paraphrase
        (mean per-token NLL, as editscale's ES), loc: the KL on the neighbourhood prompts."""
        adapter = self.adapter
        self.network.eval()
        es = ps = loc = 0.0
        for i, record in enumerate(self.val):
            rng = random.Random(f"mend-val-{self.train.seed}-{i}")
            with torch.enable_grad():
                trace = trace_edit_loss(adapter, self.network.sites, [EditRequest.from_record(record)])
            prompts = [record.prompt.format(record.subject), _paraphrase(record, rng)]
            loc_prompts = _loc_prompts(record, self.train.loc_prompts, rng, self.pool)
            pre = _token_log_probs(adapter, loc_prompts)
            new, true = record.target_new.strip(), record.target_true.strip()
            with edited_maps(adapter, self.network.deltas(trace)):
                nll = answer_loss(adapter, [p for p in prompts for _ in (0, 1)], [new, true] * 2).per_row(4)
                loc += float(_kl(pre, _token_log_probs(adapter, loc_prompts)))
            es += float(nll[0] < nll[1])
            ps += float(nll[2] < nll[3])
        n = len(self.val)
        return {"step": float(self.step), "es": es / n, "ps": ps / n, "loc_kl": loc / n,
                "alpha_mean": float(self.network.edit_lrs.mean())}

    # ------------------------------------------------------------------ loop

    def run(self, *, progress: bool = True, say: Callable[[str], None] = print) -> dict[str, float]:
        t = self.train
        if self.resume():
            say(f"resuming MEND training in {self.out} at step {self.step}/{t.steps}")
        bar = progress_bar(progress, "train-mend", t.steps, self.step, "steps")
        t0, first = time.perf_counter(), self.step
        try:
            with self.adapter.frozen():
                while self.step < t.steps:
                    parts = self.train_step()
                    bar(self.step)
                    if self.step % t.val_every == 0 or self.step == t.steps:
                        row = {**self.validate(), "train_edit": parts["edit"], "train_loc": parts["loc"],
                               "seconds": round(time.perf_counter() - t0, 1)}
                        self.history.append(row)
                        say(f"step {self.step}: ES {row['es']:.2f}  PS {row['ps']:.2f}  loc KL {row['loc_kl']:.4f}  "
                            f"train L_edit {parts['edit']:.3f} L_loc {parts['loc']:.4f}  α {row['alpha_mean']:.2e}")
                    if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                        self.save()
        finally:
            bar(None)
        if not self.history or self.history[-1]["step"] != self.step:
            with self.adapter.frozen():
                self.history.append(self.validate())
            self.save()
        spent = time.perf_counter() - t0
        return {**self.history[-1], "steps_this_process": float(self.step - first), "seconds_this_process": spent}
