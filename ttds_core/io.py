"""Atomic artifact writes and checked reads.

Every artifact is written to a temporary file in the same folder and renamed into
place, so a stage killed half-way never leaves a file that looks valid.
"""

from __future__ import annotations

import glob
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


def _read_umask() -> int:
    mask = os.umask(0)  # read once, at import: no other thread can create files meanwhile
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _publish_mode(path: Path) -> None:
    """Give a finished temp file or folder (and everything in it) the modes a plain write
    would have (mkstemp/mkdtemp create them 0600/0700, unlike checked-out files).
    Symbolic links are left alone (chmod would change their targets)."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~_UMASK)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _temp_prefix(path: Path) -> str:
    # the writer's pid in the name: a later writer removes only the leftovers of dead ones
    return f".{path.name}.tmp-{os.getpid()}-"


def _clear_leftovers(path: Path) -> None:
    """Remove what killed writers of `path` left behind (a kill skips the clean-up in the
    writers below). A concurrent live writer's files are kept. When a writer was killed
    between moving the old `path` aside and moving the new one in, the old one is put back
    first, so the last complete artifact is never lost."""
    for old in sorted(path.parent.glob(f".{glob.escape(path.name)}.tmp-*")):
        pid = old.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if old.name.endswith("-old") and not path.exists():
            os.replace(old, path)
        elif old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _publish_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it in for `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        yield tmp
        _publish_mode(tmp)
        if path.exists():
            old = path.with_name(f"{_temp_prefix(path)}old")
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
