"""params.yaml loading and typed access with one-line errors.

`params.yaml` is the single source of truth; every stage reads its section through
`get(params, "index.length", int)` so that a wrong type or a missing key names the
parameter instead of failing deep inside torch or pandas.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

from .errors import TTDSError
from .schema import is_kind, type_name, validate

_MISSING = object()


def load_params(path: str | Path = "params.yaml") -> dict:
    """The params file, checked whole against `schema` (one line naming the first bad key)."""
    path = Path(path)
    if not path.exists():
        raise TTDSError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TTDSError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(params, dict):
        raise TTDSError(f"{path}: expected a mapping at the top level")
    validate(params)
    return params


def get(params: dict, key: str, kind=None, default: Any = _MISSING, *, choices=None,
        min_value=None, allow_none: bool = False):
    """Return the dotted `key` of `params`, checked against `kind`/`choices`/`min_value`.

    The type rule is the schema's (`schema.is_kind`): true/false is not a number, and a
    string that parses as a float (YAML reads `5e-4` as one) is a number.
    """
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is not _MISSING:
                return default
            raise TTDSError(f"params: missing parameter '{key}'")
        node = node[part]
    value = node
    if value is None:
        if allow_none or default is None:
            return None
        raise TTDSError(f"params: '{key}' is null, expected {type_name(kind) if kind else 'a value'}")
    if kind is not None:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, str) and is_kind(value, float):
            value = float(value)  # '5e-4': YAML reads it as a string
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not is_kind(value, kind):
            raise TTDSError(f"params: '{key}' = {value!r}, expected {type_name(kind)}")
    if choices is not None and value not in choices:
        raise TTDSError(f"params: '{key}' = {value!r}, expected one of {', '.join(map(str, choices))}")
    if min_value is not None and value < min_value:
        raise TTDSError(f"params: '{key}' = {value!r}, expected at least {min_value}")
    return value


def with_overrides(params: dict, overrides: dict, strict: bool = False) -> dict:
    """A deep copy of `params` with dotted-key overrides (`{"train.epochs": 2}`) set; with
    `strict`, a key that params.yaml does not have is one line (a typo must not be ignored)."""
    import copy

    out = copy.deepcopy(params)
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            if strict and not isinstance(node.get(part), dict):
                raise TTDSError(f"--set {key}: '{part}' is not a section of params.yaml")
            node = node.setdefault(part, {})
        if strict and leaf not in node:
            raise TTDSError(f"--set {key}: no such parameter in params.yaml")
        node[leaf] = value
    return out


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> tuple[dict, dict]:
    """The global RNG states `seed_everything` seeds, for a checkpoint: (tensors for
    safetensors: torch, cuda when present; JSON-able lists: numpy, python)."""
    import numpy as np
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    return tensors, {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                     "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(tensors: dict, js: dict) -> None:
    """Restore what `rng_state` returned."""
    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    n = js["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = js["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
