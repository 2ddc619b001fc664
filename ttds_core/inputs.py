"""Stage `inputs`: a fingerprint of the raw files `preprocess` reads, wherever params point.

DVC tracks the paths written in dvc.yaml, but the input files are named by params
(`data.root`, `data.name`, `data.item_text_file`, `data.interactions_file`,
`data.items_file`): a file outside the repository, or a null `data.root`, cannot be a
`deps` entry, and an edited file would leave `preprocess` stale. DVC runs this stage on
every `dvc repro` (`always_changed`); it hashes every file the reader of `data.format` reads
or falls back to (`data_source.input_files`) into `data/inputs.json`, which `preprocess`
depends on. So `preprocess` re-runs exactly when one of those files changes, appears or
disappears, and never otherwise. Hashing the Games files takes well under a second.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .io import write_json
from .data_source import DataConfig, check_root, dvc_workspace, input_files


def file_md5(path: Path) -> str | None:
    """md5 of the file's bytes (None: no such file)."""
    if not path.is_file():
        return None
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _display(path: Path, root: Path) -> str:
    """A name for the file that is the same in the workspace and in DVC's temporary copies:
    inside `data.root`, relative to it; else relative to the repository (the copy, or the
    repository it was made from); else the absolute path."""
    bases = ([root] if root != Path(".") else []) + [Path.cwd()] + [b for b in [dvc_workspace()] if b]
    for base in bases:
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path.resolve())


def fingerprint(cfg: DataConfig) -> dict:
    """`{"format", "files": {name: md5 or null when absent}}` over `input_files(cfg)`."""
    check_root(cfg)
    return {"format": cfg.format,
            "files": {_display(path, cfg.root): file_md5(path) for path in input_files(cfg)}}


def run(params: dict, out_path: str | Path = "data/inputs.json") -> dict:
    result = fingerprint(DataConfig.from_params(params))
    write_json(out_path, result)
    return result
