"""`grpo`: run one stage or the whole pipeline from the command line.

    grpo run                       prepare → reference → train → evaluate
    grpo train --set grpo.beta=0   one stage, with a params override
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from stages.artifacts import Layout
from stages.config import Params, load_params
from stages.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="params file")
SetOption = typer.Option(None, "--set", "-S", help="override a params key: grpo.beta=0.0 (repeatable)")
RootOption = typer.Option(Path("."), "--root", help="project directory holding data/, models/, runs/, metrics/")


def _run(step: Callable[[Params, Layout], Any], params_file: Path, overrides: Optional[List[str]], root: Path) -> Any:
    """Run a step; a user-fixable problem becomes one line on stderr and exit code 1."""
    try:
        params = load_params(params_file, overrides or [])
        result = step(params, Layout(root.resolve()))
    except PipelineError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    if isinstance(result, dict):
        typer.echo(json.dumps(result, indent=2, sort_keys=True, default=str))
    return result


def _prepare(params: Params, layout: Layout) -> Any:
    from stages.prepare import prepare
    return prepare(params, layout)


def _reference(params: Params, layout: Layout) -> Any:
    from stages.reference import reference
    return reference(params, layout)


def _train(params: Params, layout: Layout) -> Any:
    from flows.train import train
    return train(params, layout, log=lambda line: typer.echo(line, err=True))


def _evaluate(params: Params, layout: Layout) -> Any:
    from stages.evaluate import evaluate
    return evaluate(params, layout)


def _pipeline(params: Params, layout: Layout) -> Any:
    for name, step in (("prepare", _prepare), ("reference", _reference), ("train", _train)):
        typer.echo(f"== {name}", err=True)
        step(params, layout)
    typer.echo("== evaluate", err=True)
    return _evaluate(params, layout)


def _command(name: str, step: Callable[[Params, Layout], Any], doc: str) -> None:
    def command(params: Path = ParamsOption, set_: Optional[List[str]] = SetOption, root: Path = RootOption) -> None:
        _run(step, params, set_, root)
    command.__doc__ = doc
    app.command(name)(command)


_command("prepare", _prepare, "Write data/prompts/{train,test}.parquet (built-in task or data.source).")
_command("reference", _reference, "Build + SFT the tiny model, or validate model.path → models/reference/.")
_command("train", _train, "Run the GRPO iterations (resumes from the last complete one) → models/policy/.")
_command("evaluate", _evaluate, "Greedy accuracy of reference and policy on held-out prompts → metrics/eval.json.")
_command("run", _pipeline, "The whole pipeline: prepare → reference → train → evaluate.")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
