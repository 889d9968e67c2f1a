"""The paper's appendix A.1 check: are facts edited in zsRE's question form retrieved when the same
fact is asked as a text completion?

zsRE asks facts as questions ("Where was Brakos born?"); base language models complete text. The
paper edits GPT-2 XL with ROME in the question form and finds that about 70% of the successful
edits are not produced when the fact is asked as a completion ("Brakos was born in"): an edit
that only teaches the model to answer one question has not changed what it knows.

For each method, each fact is edited alone on the unedited model (its edited parameters are
restored exactly before the next), then:
- in the question form: ES (the new answer is likelier than the true one after the question) and
  whether greedy decoding of the question answers with the new object (eval/generation.py: the
  text before the first stop, judged by normalised match, docs/protocol.md §8.8);
- in the completion form: the same two tests after the completion prompt.
A QA edit is *successful* when its ES is 1; the headline is the share of successful QA edits
whose new object greedy decoding does not answer after the completion prompt. The completion
prompts come from a file in the layout of `zsre_text_completion_prompts.json`
(scalable-model-editing/unified-model-editing `data/`), or, for `factworld-qa`, from the fact world.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from editscale.config_files import validate
from editscale.data.records import EditRecord
from editscale.data.zsre import CompletionPrompt
from editscale.errors import EditscaleError
from editscale.run.config import RunConfig

ROWS = "zsre_check"  # rows file of each method's directory
_RUN = RunConfig.model_fields


class ZsreCheckConfig(BaseModel):
    """Options of `editscale zsre-check` (the CLI's options are generated from these fields)."""

    model_config = ConfigDict(extra="forbid")

    # the options a run has too are RunConfig's own fields: one definition each
    model: str = _RUN["model"]
    methods: list[str] = Field(["rome"], description="Editing methods, comma-separated (see `editscale methods`).")
    dataset: str = Field("factworld-qa", description="QA-format facts: factworld-qa (the fact world asked as "
                                                     "questions) or zsre (a MEND-format file, --data-path).")
    data_path: str | None = Field(None, description="The MEND-format zsRE file the completion prompts were made for "
                                                    "(zsre_mend_eval.json for the published prompts).")
    prompts: str | None = Field(None, description="Completion prompts [{case_index, question, "
                                                  "text_completion_prompt}] (zsre: required; factworld-qa: "
                                                  "generated with the facts).")
    n: int = Field(100, ge=1, description="Facts edited per method, one at a time, in the prompts' order.")
    max_new_tokens: int = Field(16, ge=1, description="Most tokens generated after each prompt; the answer is "
                                                     "the text before the first '.', newline or EOS "
                                                     "(docs/protocol.md §8.8).")
    seed: int = _RUN["seed"]
    device: str = _RUN["device"]
    dtype: str = _RUN["dtype"]
    templates: str | None = _RUN["templates"]
    stats: str | None = _RUN["stats"]
    stats_cache: str | None = _RUN["stats_cache"]
    stats_corpus: str | None = _RUN["stats_corpus"]
    stats_samples: Annotated[int, Field(ge=1)] | Literal["auto"] | None = _RUN["stats_samples"]
    threads: int | None = _RUN["threads"]

    @classmethod
    def parse(cls, data: dict[str, Any], *, source: str) -> ZsreCheckConfig:
        return validate(cls, data, source=source)


def completion_pairs(cfg: ZsreCheckConfig) -> list[tuple[EditRecord, CompletionPrompt]]:
    """The dataset's records that have a completion prompt, each with it, in case order."""
    from editscale.data.registry import load_records
    from editscale.data.zsre import load_completion_prompts, pair_completion_prompts, parse_completion_prompts

    records = load_records(cfg.dataset, data_path=cfg.data_path)
    if cfg.prompts is not None:
        prompts, source = load_completion_prompts(cfg.prompts), cfg.prompts
    elif cfg.dataset == "factworld-qa":
        from editscale.data.factworld import default_world
        from editscale.data.factworld.qa import completion_prompts

        prompts, source = parse_completion_prompts(completion_prompts(default_world())), "factworld-qa"
    else:
        raise EditscaleError(f"--dataset {cfg.dataset} needs --prompts: a file of completion prompts such as "
                             "zsre_text_completion_prompts.json")
    return pair_completion_prompts(records, prompts, source=source)


def zsre_check(cfg: ZsreCheckConfig, out: Path | str, *, progress: bool = True,
               log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the check for every method of `cfg` into `out`/<method>/ (rows, resolved config,
    templates); a method's rows already there are kept and its remaining facts edited. Returns one
    summary per method (`summarize`)."""
    from editscale.models.loading import check_model_name, load_model
    from editscale.run.runner import set_threads

    check_model_name(cfg.model)
    out = Path(out)
    pairs = completion_pairs(cfg)[: cfg.n]
    set_threads(cfg.threads)
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    summaries = []
    for method in cfg.methods:
        rows = _check_method(cfg, method, lm, pairs, out / method, progress=progress, log=log)
        summaries.append(summarize(method, rows))
    return summaries


def _check_method(cfg: ZsreCheckConfig, method: str, lm: Any, pairs: Sequence[tuple[EditRecord, CompletionPrompt]],
                  out: Path, *, progress: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from editscale.methods.base import EditRequest, apply_result
    from editscale.run.config import dump_config, resolve_config
    from editscale.run.progress import ProgressBar
    from editscale.run.runner import build_editor, run_inputs
    from editscale.run.store import RunStore

    shared = cfg.model_dump(include=set(RunConfig.model_fields) & set(ZsreCheckConfig.model_fields))
    run_cfg = resolve_config(RunConfig(**shared, method=method, edits=len(pairs), downstream=[], control=0,
                                       health=False))
    store = RunStore(out)
    store.create()
    with store.lock(log):
        store.write_text("config.yaml", dump_config(run_cfg))
        store.write_json("zsre_check.json", cfg.model_dump())
        done = {r["case_id"] for r in store.iter_rows(ROWS)}
        editor = build_editor(run_cfg, store, lm.adapter, lm.name, progress=progress)
        store.write_text("config.yaml", dump_config(run_cfg, inputs=run_inputs(run_cfg)))
        original = lm.adapter.snapshot(editor.config.layers, in_layers=editor.in_layers)
        todo = [(r, p) for r, p in pairs if r.case_id not in done]
        if done:
            log(f"{method}: {len(done)} facts already checked in {out}; {len(todo)} to go")
        with ProgressBar(progress, len(pairs), len(pairs) - len(todo)) as bar:
            for k, (record, prompt) in enumerate(todo):
                t0 = time.perf_counter()
                result = editor.compute([EditRequest.from_record(record)])
                row: dict[str, Any] = {"case_id": record.case_id, "subject": record.subject,
                                       "question": record.rewrite_prompt, "completion": prompt.prompt,
                                       "target_new": record.target_new, "target_true": record.target_true}
                if result.all_finite():
                    apply_result(lm.adapter, result)
                    row.update(status="ok", **check_edit(lm.adapter, record, prompt, cfg.max_new_tokens))
                    lm.adapter.restore(original)
                else:
                    row.update(status="nonfinite")
                row["seconds"] = round(time.perf_counter() - t0, 4)
                store.append(ROWS, row)
                bar(len(pairs) - len(todo) + k + 1, row)
    rows = [r for r in store.iter_rows(ROWS) if r["case_id"] in {rec.case_id for rec, _ in pairs}]
    store.write_json("summary.json", summarize(method, rows))
    return rows


def check_edit(adapter: Any, record: EditRecord, prompt: CompletionPrompt, max_new_tokens: int) -> dict[str, Any]:
    """The edited model's answers to the fact in both forms: ES and greedy retrieval of the new answer."""
    from editscale.eval.generation import generate_answers, judge, prompt_ids
    from editscale.eval.knowledge import score_prompt_pairs

    forms = [record.rewrite_prompt, prompt.prompt]
    (qa_new, qa_true), (co_new, co_true) = score_prompt_pairs(adapter, forms, [record.target_new] * 2,
                                                              [record.target_true] * 2)
    qa, completion = generate_answers(adapter, prompt_ids(adapter, forms), max_new=max_new_tokens)
    return {"qa_es": qa_new < qa_true, "qa_answer": qa, "qa_retrieved": judge(qa, record.target_new)[1],
            "completion_es": co_new < co_true, "completion_answer": completion,
            "completion_retrieved": judge(completion, record.target_new)[1]}


def summarize(method: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts and shares of one method's rows; `not_retrieved` is the paper's A.1 figure."""
    ok = [r for r in rows if r["status"] == "ok"]
    qa = [r for r in ok if r["qa_es"]]

    def share(xs: Sequence[bool]) -> float | None:
        return statistics.mean(map(float, xs)) if xs else None

    return {"method": method, "facts": len(rows), "nonfinite": len(rows) - len(ok),
            "qa_success": len(qa), "qa_success_share": share([r["qa_es"] for r in ok]),
            "qa_generated_share": share([r["qa_retrieved"] for r in ok]),
            "not_retrieved": share([not r["completion_retrieved"] for r in qa]),
            "not_retrieved_by_probability": share([not r["completion_es"] for r in qa])}

