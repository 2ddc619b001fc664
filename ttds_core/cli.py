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
    if _name not in ("baseline", "finetune"):  # they take more options, registered below
        _register(_name)


@app.command()
def finetune(params: str = typer.Option("params.yaml", help="params file"),
             warm_start: Optional[str] = typer.Option(
                 None, "--warm-start", help="a trained model folder to go on training from (fresh optimizer and "
                 "schedule; outside the DVC pipeline: the GPU recipe's second slot)")) -> None:
    """Run the `finetune` stage with the given params file."""
    if warm_start is None:
        run_stage("finetune", params)
    else:
        run_stage("finetune", params, warm_start=warm_start)


@app.command()
def baseline(name: str = typer.Argument(..., help="mostpop | markov | sasrec | gru4rec | bert4rec | fmlprec"),
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


gpu = typer.Typer(no_args_is_help=True, help="The budgeted GPU recipe (docs/gpu-runs.md): pack here, run there, "
                                             "unpack the result here.")
app.add_typer(gpu, name="gpu")


@gpu.command("pack")
def gpu_pack(params: str = typer.Option("params.yaml", help="params file"),
             preset: str = typer.Option("presets/gpu.yaml", help="params preset laid over it ('' for none)"),
             set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE over params and preset (repeatable)"),
             out: str = typer.Option(".gpu/bundle", help="folder of the parts (part-1/, part-2/, ...)"),
             part_mib: float = typer.Option(60.0, help="largest part in MiB"),
             wheel: Optional[list[str]] = typer.Option(None, help="another wheel to carry (repeatable)"),
             resume: Optional[str] = typer.Option(None, help="an unpacked result whose model a --rank-only or --warm-start run uses")
             ) -> None:
    """Bundle backbone, raw data, wheels and run params into parts of at most --part-mib MiB."""
    with user_errors():
        manifest = _resolve("ttds_core.gpu_recipe:pack")(params, preset or None, set_, out, part_mib, wheel, resume)
        print(f"{out}: {len(manifest['parts'])} parts, {manifest['bytes'] / (1 << 20):.1f} MiB "
              f"(carry part-1, part-2, ... one per command)")


@gpu.command("run")
def gpu_run(bundle: str = typer.Option(".gpu/bundle", help="folder holding part-1/, part-2/, ..."),
            out: str = typer.Option("gpu-result", help="result folder (what comes back)"),
            minutes: float = typer.Option(9.0, help="wall-clock budget of the whole run"),
            reserve_minutes: float = typer.Option(1.5, help="kept from training for validation, saving, ranking"),
            set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE over the bundle's params"),
            rank_only: bool = typer.Option(False, "--rank-only", help="rank with the bundle's --resume model, no training"),
            warm_start: bool = typer.Option(False, "--warm-start", help="train on from the bundle's --resume model "
                                            "(fresh optimizer and schedule), then rank")
            ) -> None:
    """On the GPU machine: check the parts, unpack, run the stages within --minutes, write the result."""
    with user_errors():
        body = _resolve("ttds_core.gpu_recipe:run")(bundle, out, minutes, reserve_minutes, set_, rank_only,
                                                            warm_start)
        print(f"{out}: {body['status']}; stages {body['stages']}")


@gpu.command("unpack")
def gpu_unpack(result: str = typer.Argument(..., help="the returned result folder"),
               into: Optional[str] = typer.Option(None, help="where to unpack (default: RESULT/unpacked)")) -> None:
    """Check a returned result and unpack its model, SID tables, ranks, metrics and params."""
    with user_errors():
        print(_resolve("ttds_core.gpu_recipe:unpack")(result, into))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
