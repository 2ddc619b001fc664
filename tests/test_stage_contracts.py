"""Stage contracts: every module a stage runs and every params key it reads is declared for it
in dvc.yaml, so that changing one makes `dvc repro` re-run the stage (never a stale result).

For each stage, the stage's entry point (`ttds_core.cli.STAGES`) is followed through every
import inside `ttds_core` (module-level and function-level, absolute and relative) plus
`ttds_core.config`, which parses params for every stage. Each module in that closure must be
a `deps` entry or lie under one. The params keys are every `get(params, "<key>", ...)` in
the closure (f-string keys by their constant prefix) and every other string literal that
names an existing params key with a dot (e.g. the keys listed for a fingerprint); each must
be declared in the stage's `params`, itself or through a section above it.

The check over-approximates on purpose: a module that is imported but unused by the stage,
or a key read only by a sibling function, is still required. An extra declaration costs a
re-run; a missing one costs a stale result.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from ttds_core.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ttds_core"


def module_path(name: str) -> Path | None:
    """File of a dotted module name inside the package (None outside it)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imports_of(path: Path) -> set[Path]:
    """Package modules `path` imports anywhere in its body (lazy imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(parse(path)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from . import x`
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
                found.add(module_path(".".join(parts[:i])))
    found.discard(None)
    return found


def closure(module: str) -> set[Path]:
    todo, seen = [module_path(module), module_path(f"{PACKAGE}.config")], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(imports_of(path) - seen)
    # The package's own __init__ only holds the version string.
    seen.discard(ROOT / PACKAGE / "__init__.py")
    return seen - VALIDATION_ONLY


# Modules that can refuse params but never change an output (schema.py: the checks of
# `load_params`; it supplies no values): neither a dependency of every stage nor a reader of
# every key it lists. Editing one re-runs nothing, which is right: outputs cannot differ.
VALIDATION_ONLY = {ROOT / PACKAGE / "schema.py"}


def params_paths(params: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in params.items():
        full = f"{prefix}{key}"
        out.add(full)
        if isinstance(value, dict):
            out |= params_paths(value, full + ".")
    return out


# `get(params, <expression>)` calls whose key the check cannot read, each with where its
# possible keys are spelled out as strings (which the check does see). A new one fails the
# test until it is listed here with that reason.
DYNAMIC_KEYS = {
    ("ttds_core/data_source.py", "key"): "DataConfig.from_params: path(key) is called with literal data.* keys",
    ("ttds_core/build_sids.py", "key"): "_check_config loops over a tuple of literal index.* keys",
}


def unresolved_keys(path: Path) -> list[tuple[str, str]]:
    """(module, source of the key) of every `get(params, key)` whose key is not a literal."""
    out = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "get" \
                and len(node.args) >= 2 and getattr(node.args[0], "id", None) == "params":
            key = node.args[1]
            literal = isinstance(key, ast.Constant) or (
                isinstance(key, ast.JoinedStr) and key.values and isinstance(key.values[0], ast.Constant))
            if not literal:
                out.append((path.relative_to(ROOT).as_posix(), ast.unparse(key)))
    return out


def keys_read(path: Path, known: set[str]) -> set[str]:
    """Params keys module `path` reads (see the module docstring for the rules)."""
    keys = set()
    tree = parse(path)
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "get" \
                and len(node.args) >= 2 and getattr(node.args[0], "id", None) == "params":
            key = node.args[1]
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                keys.add(key.value)
            elif isinstance(key, ast.JoinedStr) and key.values and isinstance(key.values[0], ast.Constant):
                keys.add(key.values[0].value.rstrip("."))  # f"baselines.{name}.x": the section
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_]+)+", node.value) and node.value in known:
            keys.add(node.value)
    return keys


def stages() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage["do"] if "foreach" in stage else stage for name, stage in spec.items()}


def declared_params(stage: dict) -> set[str]:
    out = set()
    for entry in stage.get("params", []):
        out |= set(entry) if isinstance(entry, dict) else {entry}
    return out


def missing(stage_name: str, stage: dict, known: set[str]) -> tuple[list[str], list[str]]:
    """(modules not covered by deps, params keys not declared) for one stage."""
    deps = [ROOT / d for d in stage.get("deps", []) if "${" not in d]
    modules = closure(STAGES[stage_name].split(":")[0])
    lost_modules = sorted(p.relative_to(ROOT).as_posix() for p in modules
                          if not any(p == d or d in p.parents for d in deps))
    declared = declared_params(stage)
    keys = set().union(*(keys_read(p, known) for p in modules))
    lost_keys = sorted(k for k in keys
                       if not any(k == d or k.startswith(d + ".") for d in declared))
    return lost_modules, lost_keys


@pytest.mark.parametrize("stage_name", sorted(STAGES))
def test_stage_declares_no_module_it_does_not_import(stage_name):
    """The other direction: a module in `deps` that the stage never imports makes every edit
    of it re-run the stage for nothing (and invites a `dvc commit` to paper over it)."""
    modules = closure(STAGES[stage_name].split(":")[0])
    extra = sorted(d for d in stages()[stage_name].get("deps", [])
                   if d.startswith("ttds_core/") and d.endswith(".py") and ROOT / d not in modules)
    assert not extra, f"dvc.yaml stage '{stage_name}': remove from deps {extra} (not imported)"


@pytest.mark.parametrize("stage_name", sorted(STAGES))
def test_stage_declares_its_code_and_params(stage_name):
    known = params_paths(yaml.safe_load((ROOT / "params.yaml").read_text()))
    stage = stages()[stage_name]
    lost_modules, lost_keys = missing(stage_name, stage, known)
    assert not lost_modules and not lost_keys, (
        f"dvc.yaml stage '{stage_name}': add to deps {lost_modules} and to params {lost_keys}")


def test_every_params_key_the_code_reads_is_visible_to_the_check():
    modules = set().union(*(closure(target.split(":")[0]) for target in STAGES.values()))
    found = {k for p in sorted(modules) for k in unresolved_keys(p)}
    assert found <= set(DYNAMIC_KEYS), f"get(params, <expression>) the contract check cannot read: {sorted(found - set(DYNAMIC_KEYS))}"


def test_no_module_imports_a_stage_module():
    """A stage's module holds its flow; code another stage needs lives in a library module
    (`embedding`, `sids`, `data_source`, `backbone`, `ranker`...). Otherwise editing one
    stage's flow re-runs the stages that import it, and the flows tangle. Only the `ttds`
    command (`cli`) dispatches to them."""
    stage_files = {module_path(target.split(":")[0]) for target in STAGES.values()}
    offenders = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        if path.name == "cli.py":
            continue
        for imported in imports_of(path) & stage_files:
            own_package = imported.name == "__init__.py" and imported.parent in path.parents
            if imported != path and not own_package:  # baselines/loop.py may import baselines/
                offenders.append(f"{path.relative_to(ROOT)} imports {imported.relative_to(ROOT)}")
    assert not offenders, offenders


def test_every_stage_has_an_entry_point():
    assert set(stages()) == set(STAGES), "dvc.yaml stages and ttds_core.cli.STAGES disagree"


def test_the_check_sees_lazy_imports_and_fstring_keys(tmp_path, monkeypatch):
    """The analysis itself: a function-level relative import and an f-string key are found."""
    assert ROOT / "ttds_core" / "ranker.py" in closure("ttds_core.finetune")  # imported inside a function
    assert "baselines" in keys_read(ROOT / "ttds_core" / "baselines" / "__init__.py", set())
    known = params_paths(yaml.safe_load((ROOT / "params.yaml").read_text()))
    stage = dict(stages()["evaluate"], deps=["data/processed"], params=["seed"])
    lost_modules, lost_keys = missing("evaluate", stage, known)
    assert "ttds_core/ranker.py" in lost_modules and "eval.beams" in lost_keys
