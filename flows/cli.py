"""`grpo`: run one stage or the whole pipeline from the command line.

    grpo run                       prepare → reference → train → evaluate
    grpo train --set grpo.beta=0   one stage, with a params override
    grpo replay 37                 iteration 37's update again, from its files
    grpo rescore 37 --set reward.weights.format=0.5
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from flows.signals import Interrupted, stop_at_once
from stages.records.artifacts import Layout
from stages.config import Params
from stages.params import load_params
from stages.errors import ConfigError, PipelineError, ServiceError, StoppedError
from stages.records.runlock import exclusive_run

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="params file")
SetOption = typer.Option(None, "--set", "-S", help="override a params key: grpo.beta=0.0 (repeatable)")
RootOption = typer.Option(Path("."), "--root", help="project directory holding data/, models/, runs/, metrics/")


def _run(step: Callable[[Params, Layout], Any], params_file: Path, overrides: Optional[List[str]], root: Path,
         command: str, show: Optional[Callable[[Any], None]] = None) -> Any:
    """Run a step, holding the project's run lock; a user-fixable problem becomes one line on
    stderr and exit code 1, a SIGINT/SIGTERM one line and 128 + its number."""
    try:
        with stop_at_once():  # the GRPO loop stops at its next stage boundary instead (flows/signals.py)
            params = load_params(params_file, overrides or [])
            layout = Layout(root.resolve())
            with exclusive_run(layout, f"grpo {command}") if command != "check" else nullcontext():
                result = step(params, layout)
    except StoppedError as stopped:
        typer.echo(f"error: {stopped}", err=True)
        raise typer.Exit(128 + stopped.signal_number) from None
    except Interrupted as interrupted:
        typer.echo(f"error: stopped by {interrupted} during {command}; what it had written before is unchanged; "
                   f"run the same command to start it again", err=True)
        raise typer.Exit(128 + interrupted.signal_number) from None
    except PipelineError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    if show is not None:
        show(result)
    elif isinstance(result, dict):
        typer.echo(json.dumps(result, indent=2, sort_keys=True, default=str))
    return result


def prepare_step(params: Params, layout: Layout) -> Any:
    from stages.prepare import prepare
    return prepare(params, layout)


def reference_step(params: Params, layout: Layout) -> Any:
    from stages.reference import reference
    return reference(params, layout)


def train_step(params: Params, layout: Layout) -> Any:
    from flows.server import prefect_api

    with prefect_api() as server_ready:  # a temporary server boots while the flow's imports run
        from prefect import tags
        from prefect.exceptions import TerminationSignal

        from flows.train import readable_logs, train

        server_ready()
        check_api_answers()
        # A run triggered from the Prefect deployment passes its flow run id down through DVC.
        parent = os.environ.get("GRPO_PARENT_FLOW_RUN_ID")
        try:
            with tags(*([f"triggered-by:{parent}"] if parent else [])), readable_logs():
                return train(params, layout)
        except TerminationSignal as signal:  # a SIGTERM while Prefect starts or ends the flow run
            raise Interrupted(signal.signal) from None


def check_step(params: Params, layout: Layout) -> Any:
    """Nothing to do: `_run` has validated every key of params.yaml (and imported the reward paths)."""
    return {"params": "valid"}


def check_api_answers() -> None:
    from flows.outages import api_answers, api_url

    url = api_url()
    if url and not api_answers(url):
        raise ServiceError(f"the Prefect API at {url} (PREFECT_API_URL) does not answer: start the server "
                           f"(prefect server start --host 127.0.0.1) or unset PREFECT_API_URL to use a temporary one")


def sync_step(params: Params, layout: Layout) -> Any:
    """What the bookkeeping services missed while they were away, written from what is on disk."""
    from flows.outages import PENDING_FILE, report_earlier_end
    from flows.server import prefect_api
    from flows.tracking import complete_record

    synced = complete_record(layout, params.eval.samples_logged)
    if (layout.runs / PENDING_FILE).is_file():
        with prefect_api() as server_ready:
            server_ready()
            check_api_answers()
            pending = report_earlier_end(layout)
        synced |= {"prefect_flow_run_id": pending["flow_run_id"], "prefect_state": pending["state"]}
    return synced or {"synced": "nothing on record in runs/"}


def evaluate_step(params: Params, layout: Layout) -> Any:
    from flows.tracking import log_evaluation
    from stages.evaluate import evaluate

    metrics = evaluate(params, layout)
    log_evaluation(layout, metrics)
    return metrics


def pipeline(params: Params, layout: Layout) -> Any:
    for name, step in (("prepare", prepare_step), ("reference", reference_step), ("train", train_step)):
        typer.echo(f"== {name}", err=True)
        step(params, layout)
    typer.echo("== evaluate", err=True)
    return evaluate_step(params, layout)


def _command(name: str, step: Callable[[Params, Layout], Any], doc: str) -> None:
    def command(params: Path = ParamsOption, set_: Optional[List[str]] = SetOption, root: Path = RootOption) -> None:
        _run(step, params, set_, root, name)
    command.__doc__ = doc
    app.command(name)(command)


_command("check", check_step, "Validate every key of params.yaml (and the reward functions it names); write nothing.")
_command("prepare", prepare_step, "Write data/prompts/{train,test}.parquet (built-in task or data.source).")
_command("reference", reference_step, "Build + SFT the tiny model, or validate model.path → models/reference/.")
_command("train", train_step, "Run the GRPO iterations (resumes from the last complete one) → models/policy/.")
_command("evaluate", evaluate_step, "Greedy accuracy of reference and policy on held-out prompts → metrics/eval.json.")
_command("run", pipeline, "The whole pipeline: prepare → reference → train → evaluate.")
_command("sync", sync_step, "Complete the MLflow run and the Prefect flow run that an unreachable store or API missed.")


def changed_params(params_file: Path, overrides: Optional[List[str]], section: str, command: str) -> Optional[Params]:
    """The run's params with `--set` overrides, each of which must be a `section.*` key."""
    for override in overrides or []:
        key = override.partition("=")[0].strip()
        if not key.startswith(f"{section}."):
            raise ConfigError(f"grpo {command} --set {key}: only {section}.* keys can change here ({command} "
                              f"{'recomputes the update' if section == 'grpo' else 're-scores the rollouts'} "
                              f"of the iteration's files)")
    return load_params(params_file, overrides) if overrides else None


def _table(title: str, rows: dict[str, list], columns: list[str]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ["", *columns]:
        table.add_column(column, justify="right" if column else "left")
    for name, values in rows.items():
        table.add_row(name, *("" if v is None else f"{v:.10g}" if isinstance(v, float) else str(v) for v in values))
    return table


def show_replay(outcome: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console(width=160)
    columns = [name for name in ("recorded", "replayed", "changed") if name in outcome]
    for part, title in (("first_step", "first optimizer step"), ("mean", "mean over the steps (update.json)")):
        sources = [outcome[name].get(part, {}) for name in columns]
        keys = list(dict.fromkeys(key for source in sources for key in source))
        console.print(_table(f"iteration {outcome['iteration']}: {title}",
                             {key: [source.get(key) for source in sources] for key in keys}, columns))
    verdict = {True: "every recorded step reproduced bit for bit", False: "the replayed steps differ from update.json",
               None: "update.json records no steps (written before they were kept): compare the means"}
    console.print(f"exact: {outcome['exact']} ({verdict[outcome['exact']]})")


def show_rescore(summary: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console(width=160)
    rows = {f"mean {name}": values for name, values in summary["mean"].items()}
    rows["zero-std groups"] = summary["zero_std_groups"]
    console.print(_table(f"iteration {summary['iteration']} re-scored", rows, ["recorded", "re-scored"]))
    console.print(f"groups that gained a signal: {summary['gained_signal'] or 'none'}; lost it: "
                  f"{summary['lost_signal'] or 'none'}")
    console.print(f"advantages: largest change {summary['advantage_max_abs_change']:.6g}, "
                  f"{summary['advantage_sign_flips']} changed sign; unchanged: {summary['unchanged']}")
    console.print(f"written to {summary['written_to']}")


@app.command("replay")
def replay_command(iteration: int = typer.Argument(..., help="the iteration to replay"),
                   params: Path = ParamsOption, set_: Optional[List[str]] = SetOption, root: Path = RootOption) -> None:
    """Recompute ITERATION's update from its files (no generation) beside update.json; --set grpo.* to compare."""
    def step(base: Params, layout: Layout) -> Any:
        from stages.replay import replay

        return replay(base, layout, iteration, changed_params(params, set_, "grpo", "replay"))
    _run(step, params, [], root, "replay", show=show_replay)


@app.command("rescore")
def rescore_command(iteration: int = typer.Argument(..., help="the iteration to re-score"),
                    params: Path = ParamsOption, set_: Optional[List[str]] = SetOption, root: Path = RootOption,
                    name: Optional[str] = typer.Option(None, help="folder under rescored/ (default: the overrides)")
                    ) -> None:
    """Score ITERATION's rollouts again under --set reward.* into rescored/ (never over the run's files)."""
    def step(base: Params, layout: Layout) -> Any:
        from stages.rescore import rescore, rescore_name

        changed = changed_params(params, set_, "reward", "rescore") or base
        return rescore(base, layout, iteration, changed, rescore_name(set_ or []) if name is None else name)
    _run(step, params, [], root, "rescore", show=show_rescore)


@app.command("vllm-server")
def vllm_server_command(params: Path = ParamsOption, set_: Optional[List[str]] = SetOption, root: Path = RootOption,
                        port: int = typer.Option(8000, help="the port to serve on"),
                        host: str = typer.Option("127.0.0.1", help="the address to bind (0.0.0.0: every interface)"),
                        ) -> None:
    """Run a vLLM server for rollout.vllm.urls in the foreground, serving models/reference (Ctrl-C stops it)."""
    def step(base: Params, layout: Layout) -> Any:
        from stages.model.vllm_server import server_command, server_environment, vllm_python

        command = server_command(vllm_python(base, layout), layout.reference, port, base, parent=0, host=host)
        typer.echo(f"serving {layout.reference} at http://{host}:{port}: set rollout.vllm.urls: "
                   f"['http://<this machine>:{port}'] (runs/ must be at the same path here: weights come as files)",
                   err=True)
        os.chdir(layout.root)
        os.execve(command[0], command, server_environment(base))
    _run(step, params, set_, root, "check")  # holds no run lock: a server outlives runs


@app.command("compare")
def compare(
    runs: Optional[List[str]] = typer.Argument(None, help="MLflow run ids or names (default: the last two)"),
    sweep: Optional[str] = typer.Option(None, help="every run tagged with this sweep (params.yaml tracking.sweep)"),
    root: Path = RootOption,
    plot: Path = typer.Option(Path("metrics/compare.png"), help="where to write the reward/accuracy curves"),
) -> None:
    """Differing params, final and best metrics side by side, and a PNG of the curves (any number of runs)."""
    from rich.console import Console
    from rich.table import Table

    from flows.compare import differing_params, metric_summary, plot_curves, resolve_runs

    try:
        chosen = resolve_runs(root.resolve(), runs or [], sweep)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    console = Console(width=160)
    for title, frame in (("params that differ", differing_params(chosen)),
                         ("metrics (final / best)" if len(chosen) <= 2 else "metrics (final)",
                          metric_summary(root.resolve(), chosen))):
        table = Table(title=title)
        table.add_column("")
        for column in frame.columns:
            table.add_column(str(column), justify="right")
        for index, row in frame.iterrows():
            table.add_row(str(index), *(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
        console.print(table)
    target = plot if plot.is_absolute() else root.resolve() / plot
    console.print(f"curves: {plot_curves(root.resolve(), chosen, target)}")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
