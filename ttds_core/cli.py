"""The `ttds` command: one sub-command per pipeline stage, plus serving and reporting.

Each stage is a `run(params)` function in a `ttds_core` module; `stages/<name>.py`
and `ttds <name>` both go through `run_stage`, which turns a `TTDSError` into one
line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from typing import Optional

import typer

from .config import load_params
from .errors import TTDSError

# stage name -> "module:function" taking the params dict
STAGES = {
    "backbone": "ttds_core.backbone_export:run",
    "inputs": "ttds_core.inputs:run",
    "preprocess": "ttds_core.preprocess:run",
    "embed": "ttds_core.embed:run",
    "warmup": "ttds_core.warmup:run",
    "build_sids": "ttds_core.build_sids:run",
    "finetune": "ttds_core.finetune:run",
    "evaluate": "ttds_core.evaluate:run",
    "precompute": "ttds_core.serve:run_precompute",
    "baseline": "ttds_core.baselines:run",
}


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


@contextmanager
def user_errors():
    """Turn a `TTDSError` into one line on stderr and exit code 2 (no traceback)."""
    try:
        yield
    except TTDSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_stage(name: str, params_path: str = "params.yaml", /, **kwargs) -> None:
    """Load params and run stage `name`; user errors become one line + exit 2."""
    with user_errors():
        _resolve(STAGES[name])(load_params(params_path), **kwargs)


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="TTDS generative recommender: pipeline stages, serving and reports.")


def _register(name: str) -> None:
    def command(params: str = typer.Option("params.yaml", help="params file")) -> None:
        run_stage(name, params)

    command.__doc__ = f"Run the `{name}` stage with the given params file."
    app.command(name=name.replace("_", "-"))(command)


for _name in STAGES:
    if _name != "baseline":  # takes the model name, registered below
        _register(_name)


@app.command()
def baseline(name: str = typer.Argument(..., help="mostpop | sasrec | gru4rec | bert4rec | fmlprec"),
             params: str = typer.Option("params.yaml", help="params file")) -> None:
    """Train and evaluate one classic baseline on the evaluation split."""
    run_stage("baseline", params, name=name)


@app.command()
def recommend(user: str = typer.Option(..., help="original user id or user index"),
              k: int = typer.Option(10, help="number of items"),
              params: str = typer.Option("params.yaml", help="params file")) -> None:
    """Print the top-K items for one user (from the top-K cache when it is current)."""
    with user_errors():
        _resolve("ttds_core.serve:recommend_cli")(load_params(params), user=user, k=k)


@app.command()
def report(out: str = typer.Option("docs/results.md", help="markdown file to write"),
           experiments: Optional[str] = typer.Option(None, help="JSON of experiment metrics "
                                                      "(default: read `dvc exp show --json`)"),
           rev: Optional[list[str]] = typer.Option(None, help="take the experiments of this baseline commit "
                                                   "(repeatable; commits must have the same TTDS metrics)"),
           params: str = typer.Option("params.yaml", help="params file")) -> None:
    """Render the paper-style tables and bar chart from experiments and baselines."""
    with user_errors():
        _resolve("ttds_core.report:report_cli")(load_params(params), out=out, experiments=experiments, revs=rev)


@app.command()
def grid(variant: Optional[list[str]] = typer.Option(None, help="variant to run (repeatable; default: all)"),
         dry_run: bool = typer.Option(False, "--dry-run", help="print the dvc commands, run nothing"),
         force: bool = typer.Option(False, "--force", help="re-run every stage and overwrite experiments of the same name (dvc exp run --force)"),
         queue: bool = typer.Option(False, "--queue", help="queue them (they run in copies of the repo, "
                                    "then `dvc exp run --run-all`) instead of one by one in the workspace")
         ) -> None:
    """Run the paper's variants as named DVC experiments (one by one in the workspace)."""
    with user_errors():
        _resolve("ttds_core.grid:grid_cli")(variant, dry_run=dry_run, force=force, queue=queue)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
