"""A stub editor and a tiny model world for the runner's unit tests: no trained checkpoint needed.

`StubEditor` ("stub") adds to each edited layer a rank-one delta drawn from the request's case_id,
so a run's updates are deterministic and independent of what came before; it keeps a counter of
applied edits as its own state (like AlphaEdit's preserved keys), and reports it as a diagnostic,
so a resume that lost the editor's state would write different rows. Import this module to
register it (a subprocess in the kill test does the same).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from editscale.methods.base import Editor, EditRequest, EditResult, register
from editscale.methods.config import MethodConfig
from tiny_models import byte_bpe_tokenizer, tiny_model

TASK = """name: tiny_sentiment
description: a short few-shot task that fits the tiny model's 64 positions
source: {kind: jsonl, path: PATH}
format: {like: sst2}
"""


class StubConfig(MethodConfig):
    layers: list[int]
    scale: float = 0.02
    nan_case_ids: list[int] = []  # these requests get a NaN in their delta
    bias: bool = False  # also return bias deltas, as FT-C does
    sleep: float = 0.0  # seconds per compute(), so a test can kill a run mid-way


@register
class StubEditor(Editor):
    name = "stub"
    config_class = StubConfig
    config: StubConfig
    summary = "test stub: a deterministic rank-one delta per case_id"

    def __init__(self, adapter: Any, config: MethodConfig, context: Any) -> None:
        super().__init__(adapter, config, context)
        self.applied = torch.zeros(1)

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        time.sleep(self.config.sleep)
        deltas, biases = {}, {}
        for layer in self.config.layers:
            total = torch.zeros(self.adapter.d_model, self.adapter.d_mlp)
            bias = torch.zeros(self.adapter.d_model)
            for r in requests:
                g = torch.Generator().manual_seed(1000 * r.case_id + layer)
                u, v = torch.randn(self.adapter.d_model, generator=g), torch.randn(self.adapter.d_mlp, generator=g)
                total += self.config.scale * torch.outer(u, v)
                bias += self.config.scale * u
                if r.case_id in self.config.nan_case_ids:
                    total[0, 0] = float("nan")
            deltas[layer] = total
            if self.config.bias:
                biases[layer] = bias
        return EditResult(deltas, {"applied_before": float(self.applied), "update_norm": 1.0},
                          {"stub": 0.0}, bias_deltas=biases)

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        self.applied += len(requests)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"applied": self.applied.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.applied.copy_(state["applied"])


def make_world(root: Path, n_records: int = 40) -> dict[str, str]:
    """A tiny GPT-2 directory, a CounterFact file of `n_records` records with distinct subjects and a
    short downstream task file; returns the paths by name."""
    tok = byte_bpe_tokenizer()
    model_dir = root / "tiny-gpt2"
    tiny_model("gpt2", len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    objects = ["France", "English", "Spain", "Apple", "Google", "London", "piano", "Dutch"]
    records = []
    for i in range(n_records):
        subject = f"Toko Yasu{chr(97 + i % 26)}{i}"
        true, new = objects[i % len(objects)], objects[(i + 3) % len(objects)]
        records.append({"case_id": i, "requested_rewrite": {
            "prompt": "{} is located in the country of", "subject": subject, "relation_id": "P17",
            "target_new": {"str": new, "id": "Q1"}, "target_true": {"str": true, "id": "Q2"}},
            "paraphrase_prompts": [f"Paris. {subject} is in", f"{subject}, which is located in"],
            "neighborhood_prompts": [f"Danielle {i} is located in the country of"]})
    data = root / "counterfact.json"
    data.write_text(json.dumps(records))
    tasks = root / "tasks"
    tasks.mkdir()
    examples = root / "tiny_sentiment.jsonl"
    examples.write_text("".join(json.dumps({"sentence": w, "label": y}) + "\n"
                                for w, y in [("great", 1), ("dull", 0), ("fine", 1), ("bad", 0)] * 2))
    (tasks / "tiny_sentiment.yaml").write_text(TASK.replace("PATH", str(examples)))
    return {"model": str(model_dir), "data": str(data), "tasks": str(tasks)}
