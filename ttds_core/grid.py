"""`ttds grid`: queue every variant of `ttds_core.variants` as a named DVC experiment and run them.

`dvc exp run --queue` runs each experiment from a copy of the last git commit plus the
workspace's changes to tracked files; untracked files are NOT carried over, so the
grid refuses to start without a commit and warns about untracked files. Results are
compared with `dvc exp show` / `dvc metrics diff` and rendered by `ttds report`.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from .errors import TTDSError
from .variants import VARIANTS, dvc_exp_command


def grid_commands(names: list[str] | None = None, force: bool = False) -> list[str]:
    """The queue commands (one per variant, in table order) then the command that runs them."""
    names = list(VARIANTS) if not names else names
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise TTDSError(f"--variant {unknown[0]!r}: unknown, expected one of {', '.join(VARIANTS)}")
    queue = []
    for name in names:
        cmd = dvc_exp_command(name, queue=True)
        queue.append(cmd.replace("dvc exp run ", "dvc exp run --force ", 1) if force else cmd)
    return queue + ["dvc exp run --run-all"]


def compare_commands() -> list[str]:
    """What to look at once the grid has run."""
    return ["dvc exp show --md --only-changed", "dvc metrics diff --all --md", "ttds report"]


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def check_repository() -> None:
    """Queued experiments start from HEAD: there must be one; untracked files are left behind."""
    if _git("rev-parse", "--verify", "HEAD").returncode != 0:
        raise TTDSError("git: no commit yet; `dvc exp run --queue` runs from HEAD, commit the project first")
    untracked = [p for p in _git("ls-files", "--others", "--exclude-standard").stdout.splitlines() if p]
    if untracked:
        print(f"warning: {len(untracked)} untracked file(s) will not reach the queued experiments "
              f"(e.g. {untracked[0]}); `git add` them first", file=sys.stderr)


def grid_cli(names: list[str] | None = None, dry_run: bool = False, force: bool = False) -> None:
    commands = grid_commands(names, force=force)
    if dry_run:
        print("\n".join(commands + ["# then compare:"] + [f"#   {c}" for c in compare_commands()]))
        return
    check_repository()
    for cmd in commands:
        print(f"$ {cmd}", flush=True)
        if subprocess.run(shlex.split(cmd)).returncode != 0:
            raise TTDSError(f"`{cmd}` failed (see DVC's message above)")
    print("grid done; compare with:\n  " + "\n  ".join(compare_commands()))
