"""The paper's model variants (Tables 2-3) as parameter overrides.

Each variant is the default params plus the overrides below; `dvc_exp_command(name)`
gives the exact `dvc exp run` line, so README, grid runner and report share one table.
"""

from __future__ import annotations

from .errors import TTDSError

VARIANTS: dict[str, dict] = {
    "TTDS": {},
    "STDS": {"tower.user": False},
    "TTSS": {"index.dynamic": False},
    "TTDS-DM": {"loss.dm_vae": False},
    "STDS-DM": {"tower.user": False, "loss.dm_vae": False},
    "TTDS-HO": {"tasks.high_order": False},
    "TTDS-3": {"index.length": 3},
    "TTDS-5": {"index.length": 5},
    "TT-DLSH": {"index.kind": "lsh"},
    "TT-SLSH": {"index.kind": "lsh", "index.dynamic": False},
    "TT-SR": {"index.kind": "random", "index.dynamic": False},
    # ours, not the paper's: refresh without hysteresis (plain nearest-code re-derivation)
    "TTDS-M0": {"index.refresh_margin": 0.0},
}


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def variant_name(name: str) -> str | None:
    """The variant's table name, whatever the case it is written in (`ttds-dm` -> `TTDS-DM`:
    experiments are named in lowercase); None for an unknown name."""
    return {v.lower(): v for v in VARIANTS}.get(str(name).lower())


def canonical(name: str) -> str:
    """`variant_name`, or one line naming the known variants."""
    known = variant_name(name)
    if known is None:
        raise TTDSError(f"unknown variant {name!r}, expected one of {', '.join(VARIANTS)} (any case)")
    return known


def overrides(name: str) -> dict:
    return dict(VARIANTS[canonical(name)])


def dvc_exp_command(name: str, queue: bool = False) -> str:
    sets = " ".join(f"-S {k}={_yaml_value(v)}" for k, v in overrides(name).items())
    flag = "--queue " if queue else ""
    return f"dvc exp run {flag}--name {name.lower()} {sets}".rstrip()


def apply(params: dict, name: str) -> dict:
    """A deep copy of `params` with the variant's overrides applied (for tests and tools)."""
    from .config import with_overrides

    return with_overrides(params, overrides(name))
