"""dvclive where it is installed, a silent stand-in where it is not.

The stages log their curves with dvclive (`dvc plots show` draws them). A machine that runs
the stages without DVC, such as the GPU recipe's (`gpu_recipe.py`; the GPU image has no dvc
or dvclive, and dvclive needs dvc), gets the same metrics files and no curves, with one
line saying so, instead of an import error.
"""

from __future__ import annotations

import sys


class NoLive:
    """The part of `dvclive.Live` the stages use, doing nothing."""

    def log_metric(self, *args, **kwargs) -> None:
        pass

    def next_step(self) -> None:
        pass

    def end(self) -> None:
        pass

    def __enter__(self) -> "NoLive":
        return self

    def __exit__(self, *exc) -> None:
        pass


def open_live(path: str, **kwargs):
    """`dvclive.Live(path, dvcyaml=None, save_dvc_exp=False, report=None, **kwargs)`, or a
    `NoLive` when dvclive is not installed."""
    try:
        from dvclive import Live
    except ImportError:
        print(f"note: dvclive is not installed: no curves in {path} (metrics files are written as usual)",
              file=sys.stderr)
        return NoLive()
    return Live(str(path), dvcyaml=None, save_dvc_exp=False, report=None, **kwargs)
