"""Atomic artifact writes and checked reads.

Every artifact is written to a temporary file in the same folder and renamed into
place, so a stage killed half-way never leaves a file that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from .errors import TTDSError


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it in for `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def hash_files(root: str | Path, pattern: str = "**/*", h=None) -> str:
    """sha256 over the relative names and bytes of the files under `root` matching `pattern`,
    in sorted order (a missing folder hashes as empty; hidden files and folders, such as the
    temp files of an interrupted atomic write, are skipped). Updates `h` when given."""
    import hashlib

    root = Path(root)
    h = h if h is not None else hashlib.sha256()
    files = (p for p in root.glob(pattern)
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for path in sorted(files):
        h.update(str(path.relative_to(root)).encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise TTDSError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TTDSError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def write_parquet(path: str | Path, df: pd.DataFrame) -> None:
    with atomic_path(path, ".parquet") as tmp:
        df.to_parquet(tmp, index=False)


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise TTDSError(f"{path}: file not found (run the stage that writes it first)")
    df = pd.read_parquet(path)
    if columns:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise TTDSError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path, ".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def read_npy(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise TTDSError(f"{path}: file not found (run the stage that writes it first)")
    return np.load(path, allow_pickle=False)


def save_tensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    # A copy of each: safetensors refuses tensors that share memory (e.g. tied input and
    # output SID rows), and a view of a bigger tensor would otherwise be saved with it.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=_deterministic_metadata(metadata))


def _deterministic_metadata(metadata: dict | None) -> dict:
    """safetensors writes its metadata map in a random order per process, so two keys make
    two runs' files differ byte for byte (and DVC hashes with them): several keys are
    written as one sorted JSON entry, `json`."""
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    if len(metadata) > 1:
        return {"json": json.dumps(metadata, sort_keys=True)}
    return metadata


def load_tensors(path: str | Path) -> dict:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise TTDSError(f"{path}: file not found (run the stage that writes it first)")
    return load_file(str(path))
