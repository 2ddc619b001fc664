"""`ttds grid`: run the variants of `ttds_core.variants` as named DVC experiments.

Default: one after the other in the workspace (`dvc exp run --name … -S …`), with
`params.yaml` reset to the committed baseline before each, and the baseline's params,
lock, metrics and outputs restored at the end (`git checkout`, `dvc checkout`). `--queue`
queues them instead (`dvc exp run --queue`, then `--run-all`): queued runs live in a copy
of the repository under `.dvc/tmp/exps` (a relative `data.root` is resolved against the
repository the copy came from: `data_source.workspace_path`) and start from the last commit
plus changes to tracked files.
Compare with `dvc exp show` / `dvc metrics diff`, render with `ttds report`.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from .errors import TTDSError
from .variants import VARIANTS, dvc_exp_command, variant_name

# What a workspace run changes and the end of the grid puts back (tracked by git).
BASELINE_FILES = ("params.yaml", "dvc.lock", "metrics")


def grid_commands(names: list[str] | None = None, force: bool = False, queue: bool = False) -> list[str]:
    """The `dvc exp run` command of each variant (table order); with `queue`, the queue
    commands followed by the command that runs the queue."""
    names = list(VARIANTS) if not names else names
    unknown = [n for n in names if variant_name(n) is None]
    if unknown:
        raise TTDSError(f"--variant {unknown[0]!r}: unknown, expected one of {', '.join(VARIANTS)} (any case)")
    commands = []
    for name in names:
        cmd = dvc_exp_command(name, queue=queue)
        commands.append(cmd.replace("dvc exp run ", "dvc exp run --force ", 1) if force else cmd)
    return commands + (["dvc exp run --run-all"] if queue else [])


def compare_commands() -> list[str]:
    """What to look at once the grid has run."""
    return ["dvc exp show --md --only-changed", "dvc metrics diff --all --md", "ttds report"]


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def check_repository(queue: bool) -> None:
    """Experiments need a commit; a workspace grid also needs the baseline files committed
    (it resets them between variants); queued ones leave untracked files behind."""
    if _git("rev-parse", "--verify", "HEAD").returncode != 0:
        raise TTDSError("git: no commit yet; DVC experiments start from HEAD, commit the project first")
    if not queue:
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", *BASELINE_FILES).stdout.strip()
        if dirty:
            raise TTDSError(f"git: uncommitted changes in {dirty.splitlines()[0][3:]}; the grid resets "
                            f"{', '.join(BASELINE_FILES)} between variants, commit them first")
        return
    untracked = [p for p in _git("ls-files", "--others", "--exclude-standard").stdout.splitlines() if p]
    if untracked:
        print(f"warning: {len(untracked)} untracked file(s) will not reach the queued experiments "
              f"(e.g. {untracked[0]}); `git add` them first", file=sys.stderr)


def _run(cmd: str) -> None:
    print(f"$ {cmd}", flush=True)
    if subprocess.run(shlex.split(cmd)).returncode != 0:
        raise TTDSError(f"`{cmd}` failed (see the message above)")


def grid_cli(names: list[str] | None = None, dry_run: bool = False, force: bool = False,
             queue: bool = False) -> None:
    commands = grid_commands(names, force=force, queue=queue)
    if dry_run:
        print("\n".join(commands + ["# then compare:"] + [f"#   {c}" for c in compare_commands()]))
        return
    check_repository(queue)
    if queue:
        for cmd in commands:
            _run(cmd)
    else:
        try:
            for cmd in commands:
                # every variant starts from the committed baseline (HEAD: an interrupted
                # `dvc exp run` can leave a variant's params.yaml staged in the index)
                _run("git checkout HEAD -- params.yaml")
                _run(cmd)
        finally:
            _run("git checkout HEAD -- " + " ".join(BASELINE_FILES))
            _run("dvc checkout --force")  # the baseline's outputs, from the DVC cache
    print("grid done; compare with:\n  " + "\n  ".join(compare_commands()))
