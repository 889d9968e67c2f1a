"""The `editscale` command line. Thin: it parses options, calls the library, prints with rich.

Imports of the library sit inside the commands: `editscale --help` and the quick commands then
start without loading torch's model code, the datasets or every method.
"""

from __future__ import annotations

import functools
import inspect as pyinspect
import json
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from editscale.analysis.phases import PhaseRule
from editscale.errors import EditscaleError
from editscale.run.config import RetestRule, RunConfig
from editscale.run.zsre_check import ZsreCheckConfig

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Edit facts inside causal language models at scale and measure what that does.")
console = Console()
err_console = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Preset name, hub name or local directory.")]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda:0.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]
DeviceMapOpt = Annotated[str | None, typer.Option(help="Place the model with accelerate: auto, balanced, "
                                                       "sequential or a JSON/YAML file (see `run --help`).")]
MaxMemoryOpt = Annotated[str | None, typer.Option(help="Memory per device for --device-map, e.g. "
                                                       "0=20GiB,cpu=60GiB.")]
ProgressOpt = Annotated[bool, typer.Option(help="Show a progress bar.")]


def _emit_json(obj: Any) -> None:
    # plain print: rich would wrap long lines and break JSON for tools reading stdout
    print(json.dumps(obj, indent=2))


# ---------------------------------------------------------------------- config models -> options

# method_config is reached through --method-config FILE and --set KEY=VALUE
RUN_OPTION_FIELDS = [name for name in RunConfig.model_fields if name != "method_config"]
_SHORT = {"model": ["-m"]}


def _option_value(name: str, value: Any, annotation: Any = None) -> Any:
    """A config field's value from its command-line form: a list field is comma-separated ('none' =
    empty for downstream)."""
    if name == "downstream":
        return [] if value.strip().lower() == "none" else [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, str) and typing.get_origin(annotation) is list:
        return [t.strip() for t in value.split(",") if t.strip()]
    return value


def model_options(model: type[BaseModel], fields: list[str] | None = None, *, param: str = "options",
                  short: dict[str, list[str]] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per field of a pydantic model (help and default from the field);
    the command receives the options given on the command line as a dict in `param`."""
    names = list(model.model_fields) if fields is None else fields

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = pyinspect.signature(command, eval_str=True)
        generated = []
        for name in names:
            field = model.model_fields[name]
            kind = field.annotation if field.annotation in (int, float, bool) else str
            default = field.get_default(call_default_factory=True)
            flag = f"--{name.replace('_', '-')}"
            if kind is bool:
                flag = f"{flag}/--no-{name.replace('_', '-')}"
            # the option's own default is None ("not given"), so the field's default is shown instead
            opt = typer.Option(flag, *(short or {}).get(name, []), help=field.description,
                               show_default=False if default is None else str(default))
            generated.append(pyinspect.Parameter(name, pyinspect.Parameter.KEYWORD_ONLY, default=None,
                                                 annotation=Annotated[kind | None, opt]))
        params = [p for p in own.parameters.values() if p.name != param]
        params = [p.replace(kind=pyinspect.Parameter.KEYWORD_ONLY) for p in params] + generated

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in names}
            options = {n: _option_value(n, v, model.model_fields[n].annotation)
                       for n, v in given.items() if v is not None}
            return command(**{param: options}, **kwargs)

        wrapper.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must read the generated signature, not the command's own
        return wrapper

    return decorate


run_config_options = model_options(RunConfig, RUN_OPTION_FIELDS, short=_SHORT)


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EditscaleError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            reason = getattr(err, "problem", None) or " ".join(str(err).split())
            raise EditscaleError(f"--set {key.strip()}: the value {value!r} is not valid YAML ({reason})") from None
    return out


def _read_method_config(path: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """--method-config FILE: YAML or JSON hyper-parameters, or the reference's hparams JSON, whose
    module paths are checked against the model's family and dropped (methods/config.py)."""
    from editscale.config_files import read_yaml_mapping
    from editscale.methods.base import get_method
    from editscale.methods.config import from_reference_hparams

    data = read_yaml_mapping(path, "method config")
    run = RunConfig.parse({**fields, "method_config": {}}, source="command line")
    return from_reference_hparams(data, get_method(run.method).config_class, run.model, source=str(path))


def build_run_config(options: dict[str, Any], *, config: Path | None = None, method_config: Path | None = None,
                     sets: list[str] | None = None) -> RunConfig:
    """RunConfig defaults, then the --config file, then the options given; method hyper-parameters:
    the file's, then --method-config, then --set (the method's preset is filled in by the runner)."""
    from editscale.run.config import read_config_file

    fields = read_config_file(config) if config is not None else {}
    fields = {**fields, **options}
    method = dict(fields.get("method_config") or {})
    if method_config is not None:
        method.update(_read_method_config(method_config, fields))
    method.update(_parse_sets(sets))
    return RunConfig.parse({**fields, "method_config": method}, source="command line")


# ---------------------------------------------------------------------- commands


@app.command()
def models() -> None:
    """List the supported architecture families and the known model presets."""
    from editscale.models.families import FAMILIES
    from editscale.models.loading import list_presets

    t = Table(title="Architecture families (roles by module path)")
    for col in ("family", "model types", "MLP out (edited)", "transposed", "final norm", "unembedding"):
        t.add_column(col)
    for fam in FAMILIES.values():
        t.add_row(fam.name, ", ".join(fam.model_types), fam.mlp_out, "yes (Conv1D)" if fam.conv1d_weights else "no",
                  fam.final_norm, fam.unembed)
    console.print(t)
    p = Table(title="Model presets")
    for col in ("preset", "family", "blocks", "d_model", "ROME layer (0-idx)", "note"):
        p.add_column(col)
    for pre in list_presets():
        p.add_row(pre.name, pre.family, str(pre.n_layers), str(pre.d_model), str(pre.rome_layer), pre.note)
    console.print(p)


@app.command()
def facts(model: ModelOpt = "embedded", n: Annotated[int, typer.Option(help="Records to test.")] = 500,
          dataset: Annotated[str, typer.Option(help="factworld or counterfact.")] = "factworld",
          data_path: Annotated[Path | None, typer.Option(help="Local dataset file or directory.")] = None,
          device: DeviceOpt = "cpu", device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None,
          as_json: JsonOpt = False) -> None:
    """How many facts the model knows: true object preferred over the counterfactual one."""
    from editscale.data.registry import load_records
    from editscale.eval.knowledge import knowledge_scores
    from editscale.models.loading import load_model

    records = load_records(dataset, data_path=data_path, limit=n)  # cheap checks before the model loads
    loaded = load_model(model, device=device, device_map=device_map, max_memory=max_memory)
    scores = knowledge_scores(loaded.adapter, records)
    scores = {"model": model, "dataset": dataset, **scores}
    if as_json:
        _emit_json(scores)
        return
    t = Table(title=f"Facts known by {model} ({len(records)} records of {dataset})")
    t.add_column("prompts")
    t.add_column("true object preferred", justify="right")
    for k, v in scores.items():
        if k.startswith("known_"):
            t.add_row(k.removeprefix("known_"), f"{100 * v:.1f}%")
    console.print(t)


@app.command()
def skills(model: ModelOpt = "embedded",
           tasks: Annotated[str, typer.Option(help="Comma-separated tasks (default: the embedded model's four "
                                                   "skills, or sst2,mrpc,cola,rte for other models).")] = "",
           n: Annotated[int, typer.Option(help="Examples per task.")] = 200,
           mode: Annotated[str, typer.Option(help="paper (greedy 3 tokens, parsed) or logprob.")] = "paper",
           glue_dir: Annotated[Path | None, typer.Option(help="Folder of the GLUE subsets (<task>.jsonl or the "
                                                              "paper's <task>.pkl); else built with `datasets`.")]
           = None,
           naive: Annotated[bool, typer.Option(help="One full pass per example (no shared-prefix cache).")] = False,
           device: DeviceOpt = "cpu", device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None,
           as_json: JsonOpt = False) -> None:
    """Few-shot F1 of downstream tasks in the paper's templates; --model may be a run directory."""
    from editscale.eval.downstream.suite import DownstreamSuite, default_tasks
    from editscale.run.checkpoint import load_run_model

    if mode not in ("paper", "logprob"):
        raise EditscaleError(f"--mode must be paper or logprob, got '{mode}'")
    loaded, label = load_run_model(model, device=device, device_map=device_map, max_memory=max_memory)
    names = [t.strip() for t in tasks.split(",") if t.strip()] or list(default_tasks(loaded.name))
    suite = DownstreamSuite(names, mode=mode, n=n, data_dir=glue_dir, fast=not naive)  # type: ignore[arg-type]
    res = suite.evaluate(loaded.model, loaded.tokenizer)
    keep = ("f1", "accuracy", "mcc", "invalid", "total")
    if as_json:
        _emit_json({"model": label, "mode": mode, **{k: {m: v[m] for m in keep} for k, v in res.items()}})
        return
    t = Table(title=f"Few-shot skills of {label} ({mode} mode)")
    for col in ("task", "F1", "accuracy", "invalid", "seconds"):
        t.add_column(col)
    for k, v in res.items():
        t.add_row(k, f"{v['f1']:.3f}", f"{v['accuracy']:.3f}", str(v["invalid"]), f"{v['seconds']:.1f}")
    console.print(t)


@app.command()
def demo(
    edits: Annotated[int, typer.Option(help="Sequential ROME edits to make.")] = 200,
    out: Annotated[Path, typer.Option(help="Run directory (an unfinished demo there is resumed).")] = Path(
        "editscale-demo"),
    device: DeviceOpt = "cpu",
) -> None:
    """Edit the embedded model with ROME, fact after fact, and show how it declines."""
    from editscale.run.runner import Runner

    runner = Runner(RunConfig(edits=edits, eval_every=10, checkpoint_every=50, downstream_every=25, device=device),
                    out, progress=True, log=console.print)
    console.print(f"[bold]editscale demo[/bold]: {edits} sequential ROME edits of the embedded model "
                  f"(a 6-block GPT-2 trained on an invented fact world), block "
                  f"{runner.cfg.method_config['layers'][0]}; ES/PS/NS after every edit, forgetting and control "
                  "facts every 10 edits, its four few-shot skills every 25")
    summary = runner.run()
    _print_examples(out)
    _print_run(out, summary)
    from editscale.report.html import build_report

    files = build_report([out], out / "report")
    console.print(f"report: [bold]{files.html}[/bold] (open it in a browser; `editscale analyze {out}` lists the "
                  "phases and disabling candidates)")


def _print_examples(out: Path, n: int = 4) -> None:
    from editscale.run.store import RunStore

    t = Table(title="The first edits")
    for col in ("case", "subject", "true -> new", "ES", "PS", "NS"):
        t.add_column(col)
    for r in RunStore(out).rows("edits")[:n]:
        if r["status"] == "ok":
            t.add_row(str(r["case_id"]), r["subject"], f"{r['target_true']} -> {r['target_new']}", f"{r['es']:.0f}",
                      f"{r['ps']:.2f}", f"{r['ns']:.2f}")
    console.print(t)


@app.command()
def inspect(device: DeviceOpt = "cpu", n: Annotated[int, typer.Option(help="Facts to show.")] = 8) -> None:
    """Tour the embedded model: facts it knows, its skills, and where its knowledge lives."""
    from editscale.report.inspect import tour

    tour(console, device=device, n_show=n)


@app.command()
@run_config_options
def run(
    out: Annotated[Path, typer.Option(help="Run directory; an existing run there is resumed.")],
    options: dict[str, Any],
    config: Annotated[Path | None, typer.Option(
        help="YAML file of run options (any option below, or a run's config.yaml); options given on the "
             "command line override it.")] = None,
    method_config: Annotated[Path | None, typer.Option(
        help="YAML or JSON file of method hyper-parameters; the paper's hparams/<METHOD>/<model>.json too "
             "(its module paths are checked against the model and dropped).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a method hyper-parameter, KEY=VALUE.")]
    = None,
    progress: ProgressOpt = True,
) -> None:
    """Edit one model sequentially and measure ES/PS/NS, forgetting and drift as edits accumulate."""
    from editscale.models.loading import check_model_name
    from editscale.run.runner import Runner

    cfg = build_run_config(options, config=config, method_config=method_config, sets=set_)
    check_model_name(cfg.model)  # a mistyped path would otherwise surface as "no hyper-parameters for model"
    summary = Runner(cfg, out, progress=progress, log=console.print).run()
    _print_run(out, summary)


@app.command()
def resume(out: Annotated[Path, typer.Argument(help="The run directory to continue.")],
           progress: ProgressOpt = True) -> None:
    """Continue a killed run from its last checkpoint (same rows and weights as if never killed)."""
    from editscale.run.runner import Runner

    summary = Runner.resume(out, progress=progress, log=console.print).run()
    _print_run(out, summary)


def _print_run(out: Path, summary: dict[str, Any]) -> None:
    from editscale.report.tables import run_table

    console.print(run_table(out))
    gen = summary.get("mean_gen_es", float("nan"))
    gen_text = f"  generated {gen:.3f}" if gen == gen else ""
    console.print(f"mean ES {summary['mean_es']:.3f}{gen_text}  PS {summary['mean_ps']:.3f}  "
                  f"NS {summary['mean_ns']:.3f}  "
                  f"forgotten {summary['forgotten_pct_final']:.1f}% ({summary['forgetting_mode']})  "
                  f"max drift {summary['max_drift']:.3e}  {summary['seconds_per_edit']:.2f} s/edit")
    if summary.get("downstream_initial_f1"):
        f1 = "  ".join(f"{k} {v:.2f} -> {summary['downstream_final_f1'][k]:.2f}"
                       for k, v in summary["downstream_initial_f1"].items())
        console.print(f"few-shot F1, before -> after {summary['downstream_final_at']} edits: {f1}")
    console.print(f"files: {out}/edits.jsonl, forgetting.jsonl, downstream.jsonl, summary.json, config.yaml")


@app.command()
def compare(runs: Annotated[list[Path], typer.Argument(help="Run directories.")],
            as_json: JsonOpt = False,
            markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table.")] = False) -> None:
    """One table over runs: model, sample, ES/PS/NS, forgetting, final F1 per task, max drift, where a collapse
    is detected (a narrow terminal gets a compact form: one F1 column, short headers explained below it)."""
    from editscale.report.tables import comparison_markdown, comparison_rows, comparison_table

    for d in runs:
        if not (d / "config.yaml").exists():
            raise EditscaleError(f"{d} holds no run (no config.yaml)")
    if as_json:
        _emit_json(comparison_rows(list(runs)))
        return
    if markdown:
        print(comparison_markdown(list(runs)))
        return
    console.print(comparison_table(list(runs)))


@app.command()
def export(runs: Annotated[list[Path], typer.Argument(help="Run directories (finished or still running).")],
           fmt: Annotated[str, typer.Option("--format", help="parquet or csv.")] = "parquet",
           out: Annotated[Path, typer.Option(help="Folder for the tables (created; its tables are replaced).")]
           = Path("editscale-export")) -> None:
    """Write the runs' rows as flat tables, one per row kind (edits, forgetting, downstream, health, retest)
    and one of the runs (config and summary), for pandas, R, DuckDB or a spreadsheet."""
    from editscale.report.export import FORMATS, write_export

    if fmt not in FORMATS:
        raise EditscaleError(f"--format must be {' or '.join(FORMATS)}, got '{fmt}'")
    written = write_export(list(runs), out, fmt)
    console.print(f"{len(runs)} run(s) exported to {out}:", soft_wrap=True)
    for w in written.values():
        console.print(f"  {w.path}  {w.rows} rows, {w.columns} columns", soft_wrap=True, highlight=False)


def _existing_runs(dirs: list[Path]) -> None:
    for d in dirs:
        if not (d / "config.yaml").exists():
            raise EditscaleError(f"{d} holds no run (no config.yaml)")


@app.command()
@model_options(PhaseRule, param="rule_options")
def analyze(run_dir: Annotated[Path, typer.Argument(help="The run directory (finished, killed or running).")],
            rule_options: dict[str, Any], as_json: JsonOpt = False) -> None:
    """The gradual and the catastrophic phase, the collapse point and every disabling-edit candidate
    of a run, with what surrounds each; written to DIR/analysis.json."""
    from editscale.analysis.phases import analyze as analyze_run
    from editscale.analysis.rundata import load_run
    from editscale.report.html import candidate_rows, milestone_lines
    from editscale.run.store import RunStore

    _existing_runs([run_dir])
    result = analyze_run(load_run(run_dir), PhaseRule(**rule_options))
    RunStore(run_dir).write_json("analysis.json", result)
    if as_json:
        _emit_json(result)
        return
    unit = "batches" if result["unit"] == "batch" else "edits"
    state = "" if result["finished"] else " (run not finished)"
    if result["collapse_index"] is None:
        console.print(f"{run_dir}: {result['edits_done']} edits{state}; gradual phase only "
                      f"({result['reason']})")
    else:
        console.print(f"{run_dir}: {result['edits_done']} edits{state}; gradual phase edits "
                      f"0-{result['gradual'][1] - 1}, [bold red]catastrophic from edit {result['collapse_index']}"
                      f"[/bold red] ({result['reason']})")
    for line in milestone_lines(result):
        console.print(f"  {line}")
    rows = candidate_rows(result)
    if rows:
        t = Table(title=f"Disabling candidates ({len(rows)} {unit} at least {result['rule']['jump_factor']:g}x the "
                        "median update before them)")
        for col in rows[0]:
            t.add_column(col, justify="right")
        for row in rows:
            t.add_row(*row.values())
        console.print(t)
    console.print(f"written to {run_dir / 'analysis.json'}")


@app.command()
@model_options(RetestRule, param="rule_options")
def retest(run_dir: Annotated[Path, typer.Argument(help="The run directory.")],
           rule_options: dict[str, Any],
           edits: Annotated[str | None, typer.Option(help="Edit indices to re-test, comma-separated (default: "
                                                          "the run's disabling candidates).")] = None,
           largest: Annotated[int, typer.Option(help="Also re-test the run's N largest updates.")] = 0,
           baseline: Annotated[int | None, typer.Option(help="Normal updates drawn from the run as the baseline "
                                                             "(default: as many as re-tested).")] = None,
           seed: Annotated[int, typer.Option(help="Seed of the baseline draw.")] = 0,
           method: Annotated[str | None, typer.Option(help="Re-test with another method (its preset for "
                                                           "the model); default: the run's.")] = None,
           set_: Annotated[list[str] | None, typer.Option("--set", help="Override a method hyper-parameter, "
                                                                       "KEY=VALUE.")] = None,
           downstream: Annotated[bool, typer.Option(help="Measure downstream F1 after each edit.")] = True,
           device: Annotated[str | None, typer.Option(help="torch device (default: the run's).")] = None,
           progress: ProgressOpt = True, as_json: JsonOpt = False) -> None:
    """Re-apply disabling candidates (or chosen edits) as the FIRST edit of the unedited model, beside
    as many normal edits, and say whether each disables the model by itself (the paper's Table 2)."""
    from editscale.analysis.phases import analyze as analyze_run
    from editscale.analysis.phases import update_sizes
    from editscale.analysis.rundata import load_run
    from editscale.report.html import retest_rows
    from editscale.run.retest import retest as retest_run
    from editscale.run.store import RunStore
    from editscale.run.summary import updates

    _existing_runs([run_dir])
    run = load_run(run_dir)
    if edits is not None:
        try:
            chosen = [int(x) for x in edits.split(",") if x.strip()]
        except ValueError as err:
            raise EditscaleError(f"--edits expects edit indices such as 12,40; got '{edits}'") from err
    else:
        saved = RunStore(run_dir).read_json("analysis.json") or {}
        # the thresholds `editscale analyze` was last given for this run, if any
        chosen = [c["index"] for c in analyze_run(run, PhaseRule(**saved.get("rule", {})))["candidates"]]
    if largest:
        units = updates(run.edits)
        sizes = update_sizes(units)
        top = sorted(range(len(units)), key=lambda u: -sizes[u])[:largest]
        chosen += [units[u][0]["index"] for u in sorted(top)]
    if not chosen:
        raise EditscaleError(f"the phase rule finds no disabling candidate in {run_dir}; name edits with "
                             "--edits i,j,... or take the largest updates with --largest N")
    rows = retest_run(str(run_dir), chosen, baseline=baseline, seed=seed, method=method,
                      method_config=_parse_sets(set_), downstream=downstream, rule=RetestRule(**rule_options),
                      device=device, progress=progress, log=console.print)
    if as_json:
        _emit_json(rows)
        return
    method_name = next((r["method"] for r in rows if r["method"]), method)
    shown = [r for r in retest_rows(load_run(run_dir)) if r["method"] == method_name]  # with the new rows
    t = Table(title=f"Re-tested as the first edit of the unedited model ({method_name})")
    for col in ("kind", "edit", "subject", "distance (first edit)", "distance in the run", "ES", "control",
                "text loss", "verdict"):
        t.add_column(col, justify="right")
    for r in shown:
        t.add_row(*(r[c] for c in ("kind", "edit", "subject", "distance (first edit)", "distance in the run", "ES",
                                   "control", "text loss", "verdict")))
    console.print(t)
    console.print(f"rows in {run_dir / 'retest.jsonl'}")


@app.command()
@model_options(PhaseRule, param="rule_options")
def report(runs: Annotated[list[Path], typer.Argument(help="Run directories (finished or not).")],
           rule_options: dict[str, Any],
           out: Annotated[Path | None, typer.Option(help="Output folder (default: DIR/report for one run, "
                                                         "./editscale-report for several).")] = None,
           title: Annotated[str | None, typer.Option(help="Title of the report.")] = None) -> None:
    """One self-contained HTML report (figures embedded), a Markdown summary and the figures as
    PNG and SVG files, regenerated from the runs' files."""
    from editscale.report.html import build_report

    _existing_runs(runs)
    target = out or (runs[0] / "report" if len(runs) == 1 else Path("editscale-report"))
    files = build_report(runs, target, rule=PhaseRule(**rule_options), title=title)
    size = files.html.stat().st_size / 1e6
    console.print(f"report: {files.html} ({size:.1f} MB, self-contained); summary: {files.markdown}; "
                  f"figures: {target / 'figures'}/ ({len(files.figures)} files)")


@app.command()
def methods() -> None:
    """List the editing methods and the models they ship hyper-parameters for."""
    from editscale.methods.base import get_method, list_methods, preset_names
    from editscale.methods.config import TargetConfig

    t = Table(title="Editing methods")
    for col in ("method", "batch", "layers (embedded)", "mpes / norm_anchor", "presets", "what it does"):
        t.add_column(col)
    for name in list_methods():
        cls = get_method(name)
        presets = preset_names(cls)
        layers = "-"
        if "embedded" in presets:
            embedded = cls.default_config("embedded")
            layers = str(embedded.layers)
            if getattr(embedded, "in_layers", None):
                layers = f"out {layers}, in {embedded.in_layers}"
        # the options of the shared target optimisation (docs/protocol.md §2.6)
        targets = "yes" if issubclass(cls.config_class, TargetConfig) else "-"
        t.add_row(name, "yes" if cls.supports_batch else "no (one at a time)", layers, targets, ", ".join(presets),
                  cls.summary)
    console.print(t)


@app.command("zsre-check")
@model_options(ZsreCheckConfig, short=_SHORT)
def zsre_check(out: Annotated[Path, typer.Option(help="Folder of the results: one subfolder per method "
                                                      "(a method's facts already checked there are kept).")],
               options: dict[str, Any], progress: ProgressOpt = True, as_json: JsonOpt = False) -> None:
    """The paper's A.1 check: edit facts in zsRE's question form, then ask each successfully edited
    fact as a text completion; the table gives the share of those edits not retrieved."""
    from editscale.run.zsre_check import zsre_check as check

    cfg = ZsreCheckConfig.parse(options, source="command line")
    summaries = check(cfg, out, progress=progress and not as_json, log=err_console.print)
    if as_json:
        _emit_json(summaries)
        return
    table = Table(title=f"QA edits asked as completions ({cfg.model}, {cfg.dataset})")
    for col in ("method", "facts", "QA success (ES)", "QA answer generated", "not retrieved as completion",
                "not retrieved (probability)"):
        table.add_column(col, justify="left" if col == "method" else "right")

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    for s in summaries:
        table.add_row(s["method"], str(s["facts"]), f"{s['qa_success']} ({pct(s['qa_success_share'])})",
                      pct(s["qa_generated_share"]), pct(s["not_retrieved"]), pct(s["not_retrieved_by_probability"]))
    console.print(table)
    console.print(f"rows: {out}/<method>/zsre_check.jsonl; 'not retrieved': of the successful QA edits, the share "
                  "whose new answer greedy decoding does not produce after the completion prompt")


@app.command("validate-data")
def validate_data(dataset: Annotated[str, typer.Option(help="counterfact, zsre, factworld, factworld-insert or "
                                                             "factworld-qa.")],
                  data_path: Annotated[Path, typer.Option(help="File or directory to check.")],
                  strict: Annotated[bool, typer.Option(help="Refuse no-op records (target_new already the true "
                                                            "answer) instead of skipping them, as run --strict.")]
                  = False) -> None:
    """Load a dataset file and check every record; errors name the record and the field."""
    from rich.markup import escape

    from editscale.data.registry import load_dataset

    loaded = load_dataset(dataset, data_path=data_path, strict=strict)
    console.print(f"[green]ok[/green]: {len(loaded.records)} valid {dataset} records in {escape(str(data_path))}; "
                  f"{len(loaded.noops)} no-op records skipped")
    line = loaded.noop_line()
    if line is not None:
        console.print(escape(line))


@app.command("train-embedded")
def train_embedded(out: Annotated[Path, typer.Option(help="Work directory (resumable).")] = Path(
                       "work_dirs/embedded"),
                   steps: Annotated[int | None, typer.Option(help="Override the number of steps.")] = None,
                   config: Annotated[Path | None, typer.Option(
                       help="YAML of TrainConfig fields that override the shipped recipe (e.g. a probe of "
                            "one skill: fact_share, skill_mix, steps, threads).")] = None,
                   init_from: Annotated[Path | None, typer.Option(
                       help="A finished checkpoint to continue from (its weights and tokenizer; the "
                            "config must add steps or stages to its own).")] = None,
                   install: Annotated[bool, typer.Option(help="Copy the result into the package.")] = False
                   ) -> None:
    """Train the embedded default model from scratch (rerun the same command to resume)."""
    from editscale.embedded.card import install_checkpoint
    from editscale.embedded.train import EMBEDDED_CONFIG, load_train_config, train

    cfg = EMBEDDED_CONFIG if config is None else load_train_config(config, EMBEDDED_CONFIG)
    if steps is not None:
        cfg = cfg.model_copy(update={"steps": steps})
    final = train(cfg, out, init_from=init_from, log=console.print)
    console.print(f"checkpoint written to {final}")
    if install:
        dest = install_checkpoint(final)
        console.print(f"installed into {dest}; run `editscale model-card` to measure and write its card")


@app.command("train-mend")
def train_mend(model: ModelOpt = "embedded",
               dataset: Annotated[str, typer.Option(help="Where the training facts come from: the fact world's "
                                                         "own training facts (factworld, factworld-insert), or "
                                                         "a dataset's records outside --exclude-sample.")]
               = "factworld-insert",
               data_path: Annotated[str | None, typer.Option(help="Local dataset file.")] = None,
               exclude_sample: Annotated[str | None, typer.Option(
                   help="Sample file whose case ids are never trained on (the runs' evaluation edits).")] = None,
               out: Annotated[Path | None, typer.Option(
                   help="Output directory (rerun to resume); default: the cache entry --method mend reads.")]
               = None,
               steps: Annotated[int | None, typer.Option(help="Optimiser steps (over the preset's).")] = None,
               config: Annotated[Path | None, typer.Option(help="YAML of training settings (MendTrainConfig).")]
               = None,
               method_config: Annotated[Path | None, typer.Option(help="YAML of MEND hyper-parameters.")] = None,
               set_: Annotated[list[str] | None, typer.Option(
                   "--set", help="Override a training setting or MEND hyper-parameter, KEY=VALUE.")] = None,
               device: DeviceOpt = "cpu",
               threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
               progress: ProgressOpt = True) -> None:
    """Train MEND's editor network for a model, then edit with `run --method mend`."""
    from editscale.config_files import read_yaml_mapping
    from editscale.methods.mend.config import MendConfig, MendTrainConfig
    from editscale.run.train_mend import train_mend as train

    train_given = read_yaml_mapping(config, "MEND training config") if config is not None else {}
    method_given = read_yaml_mapping(method_config, "method config") if method_config is not None else {}
    for key, value in _parse_sets(set_).items():
        if key in MendTrainConfig.model_fields:
            train_given[key] = value
        elif key in MendConfig.model_fields:
            method_given[key] = value
        else:
            raise EditscaleError(f"--set {key}: neither a MEND training setting nor a MEND hyper-parameter")
    if steps is not None:
        train_given["steps"] = steps
    where, last = train(model, dataset=dataset, data_path=data_path, exclude_sample=exclude_sample, out=out,
                        method_given=method_given, train_given=train_given, device=device, threads=threads,
                        progress=progress, log=console.print)
    console.print(f"MEND network for {model} in {where}: held-out ES {last['es']:.2f}, PS {last['ps']:.2f}, "
                  f"neighbourhood KL {last['loc_kl']:.4f} after {int(last['step'])} steps")
    console.print(f"edit with: editscale run --model {model} --method mend"
                  + ("" if out is None else f" --mend-weights {where}"))


@app.command("model-card")
def model_card(model_dir: Annotated[Path | None, typer.Option(help="Checkpoint directory.")] = None,
               device: DeviceOpt = "cpu") -> None:
    """Measure the embedded model's figures and write its model card next to the checkpoint."""
    from editscale.embedded import checkpoint_dir
    from editscale.embedded.card import write_model_card

    path = write_model_card(model_dir or checkpoint_dir(), device=device)
    console.print(f"model card written to {path}")


@app.command()
def sweep(spec: Annotated[Path, typer.Argument(help="Sweep file (YAML): base, grid, per_method, resources.")],
          out: Annotated[Path | None, typer.Option(help="Sweep directory (default: ./<sweep file's name>); "
                                                       "an existing one is continued.")] = None,
          address: Annotated[str | None, typer.Option(help="Ray cluster to join (default: a local Ray "
                                                           "instance on this machine's CPUs).")] = None,
          max_concurrent: Annotated[int | None, typer.Option(help="At most this many runs at once (default: "
                                                                  "as many as Ray's resources fit).")] = None,
          dry_run: Annotated[bool, typer.Option(help="Show the runs and statistics tasks; run nothing.")] = False,
          report: Annotated[bool, typer.Option(help="Write the report over all runs at the end.")] = True) -> None:
    """Run a grid of runs on Ray, each an ordinary run directory under the sweep directory, with a
    live table; statistics are computed once and shared. Rerun the command to continue a sweep."""
    from rich.markup import escape

    from editscale.run.sweep import plan_table, run_sweep

    target = out or Path(spec.stem)
    result = run_sweep(spec, target, address=address, max_concurrent=max_concurrent, dry_run=dry_run,
                       console=console)
    if dry_run:
        console.print(plan_table(result))
        return
    for cell in result.failed:
        log = result.out / "logs" / f"{cell.name}.log"
        err_console.print(f"[bold red]failed:[/bold red] {cell.name}: {escape(cell.error or '')} (log: {log})")
    if report and result.run_dirs():
        from editscale.report.sweep import sweep_report

        files = sweep_report(result.out)
        console.print(f"report: {files.html}")
    done = sum(c.state in ("done", "skipped") for c in result.cells)
    console.print(f"{done} of {len(result.cells)} runs finished; runs in {result.out}/<run>, logs in "
                  f"{result.out / 'logs'}")
    if result.failed:
        sys.exit(1)  # not typer.Exit: `main` runs typer with standalone_mode=False, which returns its code

def main(argv: list[str] | None = None) -> None:
    """Entry point: a user-facing error becomes one red line and exit status 2, not a traceback."""
    import logging

    # the library reports what it chose or measured (layers by the depth rule, statistics used) at INFO
    logging.basicConfig(format="%(message)s")
    logging.getLogger("editscale").setLevel(logging.INFO)
    try:
        app(args=argv, standalone_mode=False)
    except EditscaleError as e:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}")  # a message may hold [brackets]
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code or 0)
    except Exception as e:  # usage errors and the like
        # by their shape: typer >= 0.2x raises its own copy of click's exceptions, older ones click's
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":  # Ctrl-C at a prompt
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
