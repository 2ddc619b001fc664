"""Training checkpoints, one format for TTDS and the baselines.

A checkpoint is a folder written atomically (a killed writer leaves the previous one
whole): named tensor files (`<name>.safetensors`), torch-serialised optimizer/scheduler
states (`<name>.pt`, read back with `weights_only=True`), every RNG state
(`rng.safetensors`, seeded generators included) and `state.json` (progress, and the
fingerprint of what the run was made from). A checkpoint whose fingerprint differs from
the current run's is never resumed: `set_aside` moves it to `<name>.stale` with one line.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import rng_state, set_rng_state
from .errors import TTDSError
from .io import atomic_dir, load_tensors, read_json, save_tensors, write_json


def write(path: Path, state: dict, tensors: dict[str, dict[str, torch.Tensor]],
          objects: dict[str, object] | None = None, generators: dict[str, torch.Generator] | None = None,
          extra: Callable[[Path], None] | None = None) -> None:
    """One atomic checkpoint folder: `tensors` (name -> state dict), `objects` (name ->
    optimizer/scheduler state), the global RNG states and `generators`, `extra(folder)`
    for anything else (tables), and `state` last, in `state.json`."""
    with atomic_dir(path) as tmp:
        for name, values in tensors.items():
            save_tensors(tmp / f"{name}.safetensors", values)
        for name, obj in (objects or {}).items():
            torch.save(obj, tmp / f"{name}.pt")
        rng_t, rng_j = rng_state()
        rng_t.update({f"generator.{name}": g.get_state() for name, g in (generators or {}).items()})
        save_tensors(tmp / "rng.safetensors", rng_t)
        if extra is not None:
            extra(tmp)
        write_json(tmp / "state.json", {**state, "rng": rng_j})


@dataclass
class Stored:
    """A checkpoint folder on disk, read lazily (`read`)."""
    path: Path
    state: dict

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.safetensors").exists()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.path / f"{name}.safetensors")

    def object(self, name: str):
        return torch.load(self.path / f"{name}.pt", weights_only=True)

    def restore_rng(self, generators: dict[str, torch.Generator] | None = None) -> None:
        rng = load_tensors(self.path / "rng.safetensors")
        for name, g in (generators or {}).items():
            g.set_state(rng.pop(f"generator.{name}"))
        set_rng_state(rng, self.state["rng"])


def read(path: Path) -> Stored | None:
    """The checkpoint at `path`, or None when there is none."""
    if not (path / "state.json").exists():
        return None
    return Stored(path, read_json(path / "state.json"))


def mismatch(stored: Stored, fingerprint: dict[str, str]) -> str | None:
    """Why `stored` cannot be resumed by a run whose inputs have `fingerprint`, or None."""
    made = stored.state.get("fingerprint")
    if not isinstance(made, dict):
        return "was written by an older version (no input fingerprint)"
    changed = [k for k in fingerprint if made.get(k) != fingerprint[k]]
    return "was made from other " + ", ".join(changed) if changed else None


def set_aside(path: Path, why: str, who: str, main: bool = True, log=None) -> None:
    """Move an unusable checkpoint out of the way (kept for inspection as `<name>.stale`),
    saying why in one line (the main process does; the others only leave it alone)."""
    if not main:
        return
    aside = path.with_name(path.name + ".stale")
    replaced = " (replacing an older one)" if aside.exists() else ""
    try:
        if aside.is_dir():
            shutil.rmtree(aside)
        elif aside.exists():
            aside.unlink()
        os.replace(path, aside)
    except OSError as exc:
        raise TTDSError(f"{path} {why}, and it could not be set aside as {aside} ({exc.strerror}): "
                        "move or delete it") from None
    print(f"{who}: {path} {why}; set aside as {aside}{replaced}, starting fresh", file=log or sys.stderr, flush=True)
