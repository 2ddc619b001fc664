"""Where the raw data is: the `data:` section of params.yaml, checked once (`DataConfig`),
its paths resolved (inside `data.root`, relative to the repository, or from a DVC temporary
copy back to the repository it was made from), and the files a reader of `data.format`
reads (`input_files`). Shared by the `inputs` stage (which fingerprints those files) and
`preprocess` (which reads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import get
from .errors import TTDSError
from .readers import candidate_files
from .user_text import UserTextRule

FORMATS = ("lcrec", "amazon2018", "generic")
SAMPLERS = ("snowball", "users")


def dvc_workspace() -> Path | None:
    """The repository a DVC temporary copy (`<repo>/.dvc/tmp/exps/…`) was made from; None
    when not running inside one."""
    cwd = Path.cwd()
    return Path(*cwd.parts[:cwd.parts.index(".dvc")]) if ".dvc" in cwd.parts else None


def workspace_path(value: str) -> Path:
    """`value` as written when absolute or found from here; else, inside a DVC temporary
    copy of the repository (`dvc exp run --temp`/`--queue` run in `<repo>/.dvc/tmp/exps/…`),
    relative to the repository the copy was made from, which is what the user wrote it
    against. Anything else stays as written (and fails with a clear line when read)."""
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path
    repo = dvc_workspace()
    if repo is not None and (repo / path).exists():
        return repo / path
    return path


@dataclass(frozen=True)
class DataConfig:
    """The `data:` section of params.yaml, checked once."""

    format: str
    root: Path
    name: str
    item_text_file: Path | None
    interactions_file: Path | None
    items_file: Path | None
    require_text: bool
    kcore: int
    max_users: int | None
    sampler: str
    seed: int
    item_text_chars: int
    user_text: UserTextRule

    @classmethod
    def from_params(cls, params: dict) -> "DataConfig":
        fmt = get(params, "data.format", str, choices=FORMATS)
        # generic reads data.interactions_file / data.items_file; root may be null
        root_value = get(params, "data.root", str, allow_none=fmt == "generic")
        root = workspace_path(root_value) if root_value else None

        def path(key):
            value = get(params, key, str, default=None)
            if not value:
                return None
            # a relative file name is inside data.root where it exists there, else relative
            # to the repository (as it was before data.root was consulted)
            if root is not None and not Path(value).is_absolute() and (root / value).exists():
                return root / value
            return workspace_path(value)

        return cls(
            format=fmt,
            root=root if root is not None else Path("."),
            name=get(params, "data.name", str),
            item_text_file=path("data.item_text_file"),
            interactions_file=path("data.interactions_file"),
            items_file=path("data.items_file"),
            require_text=get(params, "data.require_text", bool),
            kcore=get(params, "data.kcore", int, min_value=1),
            max_users=get(params, "data.max_users", int, default=1500, allow_none=True, min_value=1),
            sampler=get(params, "data.sampler", str, default="snowball", choices=SAMPLERS),
            seed=get(params, "seed", int),
            item_text_chars=get(params, "data.item_text_chars", int, default=512, min_value=16),
            user_text=UserTextRule.from_params(params),
        )


def check_root(cfg: DataConfig) -> None:
    if cfg.format != "generic" and not cfg.root.is_dir():
        raise TTDSError(f"params: 'data.root' = '{cfg.root}' is not a folder "
                        f"(expected the folder holding the {cfg.format} files)")


def input_files(cfg: DataConfig) -> list[Path]:
    """Every file the reader of `cfg.format` reads or falls back to (existing or not)."""
    return candidate_files(cfg.format, cfg.root, cfg.name, cfg.item_text_file,
                           cfg.interactions_file, cfg.items_file)
