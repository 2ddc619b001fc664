"""The budgeted GPU recipe: the whole pipeline on one borrowed GPU within a wall-clock budget
(`ttds gpu pack | run | unpack`, docs/gpu-runs.md).

The GPU machines this project can borrow are bare: no registry, no `../shared`, no dvc or
dvclive, at most 64 MiB carried per command and at most 8 files of 16 MiB brought back.
So the recipe moves everything a run needs in parts and brings back a small result:

- `pack` (here): the backbone source (the GGUF or HF folder `model.path` names), the raw data
  files the `data.format` reader reads (`data_source.input_files`), the wheels the GPU image
  lacks (gguf, for a GGUF backbone) and the run's params (`params.yaml` + a preset + `--set`
  overrides, checked whole) go into one tar cut into parts of at most `part_mib` MiB, each
  part in a folder of its own (`part-K/`) with the manifest (size and sha256 of every part
  and of the whole), so each command carries one folder.
- `run` (there): checks every part (one line naming a missing or damaged one), unpacks,
  installs the wheels into a folder of its own, checks the packages the stages import (one
  line naming what is missing or too old), and runs each stage in its own process, timed,
  in a work folder: the training budget (`train.max_minutes`) is what is left of
  `minutes` after the stages before it, less `reserve_minutes` for validation, saving and
  ranking. After training and again after ranking it writes the result: `result.json`
  (status, stage times, metrics, checksums), `log.txt` (the end of the log) and the model,
  SID tables, ranks, metrics and params as `result.tar.NNN` parts of at most 15 MiB.
- `unpack` (here): checks the result's parts and unpacks them into a folder.
- A second slot starts from the first one's model: `pack --resume <result folder>` adds the
  returned model to the bundle (refused, in one line, when its training params differ), then
  `run --rank-only` ranks with it (the stages before `evaluate` that build the processed data
  and the backbone folder run again: they are deterministic), or `run --warm-start` runs the
  whole pipeline with `finetune --warm-start` from it: training goes on from its weights and
  SID tables, with a fresh optimizer and schedule (`finetune`'s docstring).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

from .config import load_params, with_overrides
from .errors import TTDSError
from .io import write_json

MIB = 1 << 20
RESULT_PART_MIB = 15          # each returned file <= 16 MiB
MAX_RESULT_PARTS = 6          # + result.json + log.txt = the 8 files that can come back
MAX_BUNDLE_PART_MIB = 61      # the repository travels with each part (64 MiB per command)
LOG_TAIL = MIB
TRAIN_STAGES = ("backbone", "preprocess", "embed", "warmup", "build_sids", "finetune", "evaluate")
RANK_STAGES = ("backbone", "preprocess", "evaluate")
RESULT_PATHS = ("params.yaml", "metrics", "data/model", "data/sids", "data/eval")
RESUMED_MODEL = "resume/data/model"  # where `pack --resume` puts the returned model in the bundle
# what the stages import, with the floors of pyproject.toml (dvc/dvclive are optional there)
NEEDED = {"torch": "2.4", "transformers": "5.0", "peft": "0.15", "accelerate": "1.0", "safetensors": None,
          "pandas": "2.2", "pyarrow": "15", "numpy": "1.26", "scikit-learn": None, "typer": "0.12", "tqdm": None,
          "pyyaml": None}
GGUF_WHEEL = "gguf"
# carried at the versions installed here, the ones the tests ran with (pure-Python wheels; the
# GPU image has other versions, and the ranker and trainer use transformers internals)
PINNED_WHEELS = ("transformers", "peft")


# ---------------------------------------------------------------- params

def parse_sets(sets) -> dict:
    """`["a.b=1", "c.d=null"]` -> `{"a.b": 1, "c.d": None}` (values read as YAML)."""
    out = {}
    for item in sets or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise TTDSError(f"--set {item!r}: expected KEY=VALUE (e.g. train.epochs=2)")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_params(params_path: str | Path, preset: str | Path | None, sets) -> dict:
    """params.yaml, then the preset's keys, then `--set`; checked whole (`schema`)."""
    from .schema import validate

    params = load_params(params_path)
    layers = []
    if preset:
        preset = Path(preset)
        if not preset.is_file():
            raise TTDSError(f"--preset {preset}: no such file")
        loaded = yaml.safe_load(preset.read_text()) or {}
        if not isinstance(loaded, dict):
            raise TTDSError(f"{preset}: expected a mapping of params.yaml sections")
        layers.append(flatten(loaded))
    layers.append(parse_sets(sets))
    for layer in layers:
        params = with_overrides(params, layer, strict=True)
    validate(params)
    return params


# ---------------------------------------------------------------- parts

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def split_file(path: Path, part_bytes: int, name_of) -> list[dict]:
    """Cut `path` into parts of at most `part_bytes`, part k written to `name_of(k)` (k from 1)."""
    parts = []
    with open(path, "rb") as fh:
        k = 1
        while True:
            chunk = fh.read(part_bytes)
            if not chunk and k > 1:
                break
            target = Path(name_of(k))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(chunk)
            parts.append({"name": target.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
            k += 1
            if len(chunk) < part_bytes:
                break
    return parts


def join_parts(files: list[Path], manifest: dict, what: str, target: Path) -> None:
    """Check each part against the manifest (one line naming a missing or damaged one), then
    concatenate them into `target` and check the whole."""
    total = len(manifest["parts"])
    for k, (path, meta) in enumerate(zip(files, manifest["parts"]), 1):
        if not path.is_file():
            raise TTDSError(f"{what}: missing part {k} of {total} ({path})")
        if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            raise TTDSError(f"{what}: part {k} of {total} ({path}) is damaged (size or sha256 differs from the manifest)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        for path in files:
            with open(path, "rb") as fh:
                shutil.copyfileobj(fh, out, MIB)
    if sha256_file(target) != manifest["sha256"]:
        raise TTDSError(f"{what}: the joined parts do not match the manifest's sha256")


def extract(tar_path: Path, into: Path, what: str) -> None:
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise TTDSError(f"{what}: cannot unpack ({exc.__class__.__name__}: {exc})") from None


def read_manifest(path: Path, what: str) -> dict:
    try:
        manifest = json.loads(path.read_text())
        assert isinstance(manifest.get("parts"), list) and manifest["parts"] and "sha256" in manifest
        for meta in manifest["parts"]:
            assert {"name", "bytes", "sha256"} <= set(meta)
    except FileNotFoundError:
        raise TTDSError(f"{what}: no {path.name} in {path.parent}") from None
    except (ValueError, AssertionError, TypeError):
        raise TTDSError(f"{what}: {path} is not a manifest written by ttds gpu") from None
    return manifest


# ---------------------------------------------------------------- pack (here)

def _backbone_entry(params: dict) -> tuple[Path, str]:
    """(source, name in the bundle) of the backbone `model.path` names."""
    from .backbone import resolve_backbone_source

    source = resolve_backbone_source(params)
    return source, f"backbone/{source.name}"


def _data_entries(params: dict) -> tuple[list[tuple[Path, str]], dict]:
    """The raw files the reader reads, their names in the bundle, and the params that point there."""
    from .data_source import DataConfig, check_root, input_files

    cfg = DataConfig.from_params(params)
    check_root(cfg)
    entries, names, moved = [], {}, {"data.root": "raw"}
    for path in input_files(cfg):
        if not path.is_file():
            continue  # a fallback the reader tries only when present
        real = path.resolve()
        name = path.name
        if name in names and names[name] != real:
            raise TTDSError(f"two data files are both named {name} ({names[name]} and {real}); rename one")
        if name not in names:
            names[name] = real
            entries.append((real, f"raw/{name}"))
    for key, value in (("data.item_text_file", cfg.item_text_file), ("data.interactions_file", cfg.interactions_file),
                       ("data.items_file", cfg.items_file)):
        if value is not None:
            moved[key] = Path(value).name    # relative names are found inside data.root first
    if not entries:
        raise TTDSError(f"no data files found for data.format {cfg.format} in {cfg.root}")
    return entries, moved


# keys a ranking-only run may set otherwise than the run that trained the model
RANK_FREE = ("data.root", "data.item_text_file", "data.interactions_file", "data.items_file", "model.path",
             "train.max_minutes", "eval.", "serve.")


def check_same_run(params: dict, trained: dict, where: Path) -> None:
    """The model to rank was trained with these params (but for paths, budget and ranking
    settings): else one line naming the first key that differs, never a silently wrong ranking."""
    mine, theirs = flatten(params), flatten(trained)
    for key in sorted(set(mine) | set(theirs)):
        if key.startswith(RANK_FREE):  # a prefix of itself: exact keys and whole sections
            continue
        if mine.get(key) != theirs.get(key):
            raise TTDSError(f"--resume {where}: its model was trained with {key} = {theirs.get(key)!r}, these params "
                            f"have {mine.get(key)!r} (pack with the params, preset and --set of that run)")


def download_wheel(requirement: str, into: Path) -> Path:
    """A pure-Python wheel from the registry (at pack time, here)."""
    into.mkdir(parents=True, exist_ok=True)
    before = set(into.glob("*.whl"))
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                           "-d", str(into), requirement], capture_output=True, text=True)
    new = set(into.glob("*.whl")) - before
    found = sorted(into.glob(f"{requirement.split('==')[0].replace('-', '_')}-*.whl"))
    if proc.returncode != 0 or not (new or found):
        raise TTDSError(f"cannot download the {requirement} wheel for the GPU machine (pip download failed); "
                        "pass it with --wheel FILE")
    return sorted(new or found)[-1]


def pack(params_path: str | Path = "params.yaml", preset: str | Path | None = "presets/gpu.yaml", sets=(),
         out_dir: str | Path = ".gpu/bundle", part_mib: float = 60, wheels=(), resume: str | Path | None = None,
         pinned=PINNED_WHEELS) -> dict:
    """Write the bundle's parts into `out_dir/part-K/` (module docstring); returns the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    if not 0 < part_mib <= MAX_BUNDLE_PART_MIB:
        raise TTDSError(f"--part-mib {part_mib}: expected more than 0 and at most {MAX_BUNDLE_PART_MIB} "
                        "(the repository travels beside each part, 64 MiB in all)")
    params = run_params(params_path, preset, sets)
    out_dir = Path(out_dir)
    backbone, backbone_name = _backbone_entry(params)
    data, moved = _data_entries(params)
    entries = [(backbone, backbone_name)] + data
    staging = out_dir.parent / (out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    wheel_dir = staging / "wheels"
    wheel_names = []
    # a GGUF backbone: transformers reads it through the gguf package
    for name in tuple(pinned) + ((GGUF_WHEEL,) if backbone.is_file() else ()):
        try:
            requirement = f"{name}=={version(name)}"
        except PackageNotFoundError:
            requirement = name
        wheel_names.append(download_wheel(requirement, wheel_dir).name)
    for wheel in wheels or ():
        wheel = Path(wheel)
        if not wheel.is_file() or wheel.suffix != ".whl":
            raise TTDSError(f"--wheel {wheel}: not a .whl file")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, wheel_dir / wheel.name)
        wheel_names.append(wheel.name)
    if resume is not None:
        resumed = Path(resume)
        if not (resumed / "data" / "model" / "recommender.json").is_file() or not (resumed / "params.yaml").is_file():
            raise TTDSError(f"--resume {resumed}: no data/model/recommender.json and params.yaml there (unpack a "
                            "result with `ttds gpu unpack` first)")
        check_same_run(params, yaml.safe_load((resumed / "params.yaml").read_text()), resumed)
        entries.append((resumed / "data" / "model", RESUMED_MODEL))
    params = with_overrides(params, {**moved, "model.path": backbone_name})
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tar_path = staging / "bundle.tar"
    with tarfile.open(tar_path, "w", dereference=True) as tar:  # a linked file travels as its bytes
        tar.add(staging / "params.yaml", arcname="params.yaml")
        for source, name in entries:
            tar.add(source, arcname=name)
        for name in wheel_names:
            tar.add(wheel_dir / name, arcname=f"wheels/{name}")
    parts_dir = staging / "parts"
    parts = split_file(tar_path, int(part_mib * MIB), lambda k: parts_dir / f"part-{k}" / f"bundle.tar.{k:03d}")
    manifest = {"kind": "ttds-gpu-bundle", "sha256": sha256_file(tar_path), "bytes": tar_path.stat().st_size,
                "parts": parts, "has_model": resume is not None, "wheels": wheel_names,
                "files": sorted(name for _, name in entries)}
    tar_path.unlink()
    for k in range(1, len(parts) + 1):
        write_json(parts_dir / f"part-{k}" / "manifest.json", manifest)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    parts_dir.rename(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


# ---------------------------------------------------------------- run (there)

def _version_tuple(text: str) -> tuple:
    out = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check_packages(env: dict, gguf: bool) -> dict:
    """Versions of what the stages import, seen by the stages' interpreter with `env`; one
    line naming every missing or too old package."""
    needed = dict(NEEDED, **({GGUF_WHEEL: None} if gguf else {}))
    code = ("import json, importlib.metadata as m\nout = {}\n"
            f"for name in {sorted(needed)!r}:\n"
            "    try: out[name] = m.version(name)\n"
            "    except m.PackageNotFoundError: out[name] = None\n"
            "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise TTDSError(f"cannot check the installed packages: {proc.stderr.strip().splitlines()[-1:]}")
    found = json.loads(proc.stdout)
    bad = []
    for name, floor in sorted(needed.items()):
        have = found.get(name)
        if have is None:
            bad.append(f"{name} (missing)")
        elif floor and _version_tuple(have) < _version_tuple(floor):
            bad.append(f"{name} {have} (need >= {floor})")
    if bad:
        raise TTDSError("the GPU machine lacks " + ", ".join(bad) + ": carry the wheels with `ttds gpu pack --wheel`")
    return found


_BAR = re.compile(r"^(?P<desc>[^:]*):\s*\d+%\|.*?\|\s*(?P<n>\d+)/(?P<total>\d+) \[[^\]]*\]\s*$")


def _superseded(line: str, after: str) -> bool:
    """`line` is a progress-bar state that `after` redraws: the same bar (description and
    total), not behind it, and nothing else on the line (tqdm: "desc:  40%|####  | 2/5 [...]")."""
    a, b = _BAR.match(line), _BAR.match(after)
    return bool(a and b and a["desc"] == b["desc"] and a["total"] == b["total"] and int(b["n"]) >= int(a["n"]))


def _collapse_bars(text: str) -> str:
    """Progress bars redraw their line (with carriage returns, or line by line in a file):
    keep each bar's last state only, and no blank lines."""
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    lines = [line for line in lines if line.strip()]
    return "\n".join(line for line, after in zip(lines, lines[1:] + [""]) if not _superseded(line, after))


class Result:
    """The returned folder: result.json, log.txt and result.tar.NNN (module docstring)."""

    def __init__(self, out_dir: Path, work: Path, log: Path, bundle_sha: str):
        self.out_dir, self.work, self.log, self.bundle_sha = out_dir, work, log, bundle_sha
        self.status: dict = {"status": "running", "stages": {}, "bundle_sha256": bundle_sha}

    def write(self, status: str) -> dict:
        """Pack what exists of RESULT_PATHS into parts; swap them in only once all are written."""
        self.status["status"] = status
        staging = self.work.parent / "result.staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        tar_path = staging / "result.tar"
        with tarfile.open(tar_path, "w") as tar:
            for rel in RESULT_PATHS:
                if (self.work / rel).exists():
                    tar.add(self.work / rel, arcname=rel)
        parts = split_file(tar_path, RESULT_PART_MIB * MIB, lambda k: staging / f"result.tar.{k:03d}")
        if len(parts) > MAX_RESULT_PARTS:
            raise TTDSError(f"the result is {tar_path.stat().st_size / MIB:.1f} MiB: more than "
                            f"{MAX_RESULT_PARTS} parts of {RESULT_PART_MIB} MiB cannot come back")
        metrics = {}
        for path in sorted((self.work / "metrics").glob("**/*.json")):
            try:
                metrics[str(path.relative_to(self.work / "metrics"))] = json.loads(path.read_text())
            except ValueError:
                pass
        body = dict(self.status, sha256=sha256_file(tar_path), bytes=tar_path.stat().st_size, parts=parts,
                    metrics=metrics)
        tar_path.unlink()
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        (staging / "log.txt").write_text(_collapse_bars(text)[-LOG_TAIL:])
        write_json(staging / "result.json", body)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for old in self.out_dir.glob("result.tar.*"):
            old.unlink()
        for path in staging.iterdir():
            os.replace(path, self.out_dir / path.name)
        shutil.rmtree(staging, ignore_errors=True)
        return body


def _bundle_parts(bundle_dir: Path) -> tuple[dict, list[Path]]:
    """The manifest (from part-1) and the path of every part it lists."""
    manifest = read_manifest(bundle_dir / "part-1" / "manifest.json", f"bundle {bundle_dir}")
    files = [bundle_dir / f"part-{k}" / meta["name"] for k, meta in enumerate(manifest["parts"], 1)]
    return manifest, files


def unpack_bundle(bundle_dir: str | Path) -> Path:
    """Check every part, join and unpack them into `bundle_dir/work` (made anew); return it."""
    bundle_dir = Path(bundle_dir)
    manifest, files = _bundle_parts(bundle_dir)
    work = bundle_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    joined = bundle_dir / "bundle.tar"
    join_parts(files, manifest, f"bundle {bundle_dir}", joined)
    extract(joined, work, f"bundle {bundle_dir}")
    joined.unlink()
    return work


def install_wheels(work: Path, env: dict) -> dict:
    """Install the carried wheels into `work/site` (no registry, no dependencies: the image
    has them); return `env` with the package and that folder first on PYTHONPATH."""
    paths = [str(Path(__file__).resolve().parents[1])]
    wheels = sorted((work / "wheels").glob("*.whl"))
    if wheels:
        site = work / "site"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                               "--no-compile", "--upgrade", "--target", str(site), *map(str, wheels)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise TTDSError(f"cannot install the carried wheels: {proc.stderr.strip().splitlines()[-1:]}")
        paths.append(str(site.resolve()))
    return dict(env, PYTHONPATH=os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p]))


def run(bundle_dir: str | Path = ".gpu/bundle", out_dir: str | Path = "gpu-result", minutes: float = 9.0,
        reserve_minutes: float = 1.5, sets=(), rank_only: bool = False, warm_start: bool = False) -> dict:
    """Unpack the bundle and run the pipeline within `minutes` (module docstring)."""
    t0 = time.time()
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    if minutes <= 0 or reserve_minutes < 0:
        raise TTDSError(f"--minutes {minutes} / --reserve-minutes {reserve_minutes}: expected > 0 and >= 0")
    manifest, _ = _bundle_parts(bundle_dir)
    if rank_only and warm_start:
        raise TTDSError("--rank-only and --warm-start: choose one (rank the returned model, or train on from it)")
    for flag, wanted in (("--rank-only", rank_only), ("--warm-start", warm_start)):
        if wanted and not manifest.get("has_model"):
            raise TTDSError(f"{flag} needs a bundle packed with --resume <result folder> (it holds no model)")
    work = unpack_bundle(bundle_dir)
    env = install_wheels(work, dict(os.environ, PYTHONUNBUFFERED="1"))
    params = with_overrides(yaml.safe_load((work / "params.yaml").read_text()), parse_sets(sets), strict=True)
    from .schema import validate
    validate(params)
    versions = check_packages(env, gguf=str(params["model"]["path"]).endswith(".gguf"))
    log = work / "run.log"
    result = Result(out_dir, work, log, manifest["sha256"])
    result.status.update(versions=versions, minutes=minutes, rank_only=rank_only, warm_start=warm_start)
    stages = RANK_STAGES if rank_only else TRAIN_STAGES
    for stage in stages:
        if stage == "evaluate" and rank_only:
            shutil.copytree(work / RESUMED_MODEL, work / "data" / "model", dirs_exist_ok=True)
        if stage == "finetune":
            budget = minutes - (time.time() - t0) / 60.0 - reserve_minutes
            if budget <= 0:
                result.write("failed: no time left for training")
                raise TTDSError(f"no time left for training after {(time.time() - t0) / 60:.1f} of {minutes} minutes")
            cap = params["train"].get("max_minutes")
            params["train"]["max_minutes"] = round(budget if cap is None else min(cap, budget), 2)
            result.status["train_minutes"] = params["train"]["max_minutes"]
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        start = time.time()
        with open(log, "a") as fh:
            fh.write(f"\n=== {stage} ===\n")
            fh.flush()
            cmd = [sys.executable, "-m", "ttds_core.cli", stage.replace("_", "-"), "--params", "params.yaml"]
            if stage == "finetune" and warm_start:
                cmd += ["--warm-start", RESUMED_MODEL]
            proc = subprocess.run(cmd, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT)
        result.status["stages"][stage] = round(time.time() - start, 1)
        print(f"ttds gpu: {stage} {'done' if proc.returncode == 0 else 'FAILED'} in "
              f"{time.time() - start:.0f} s ({(time.time() - t0) / 60:.1f} min in all)", file=sys.stderr, flush=True)
        if proc.returncode != 0:
            result.write(f"failed at {stage}")
            tail = _collapse_bars(log.read_text(errors="replace")).strip().splitlines()[-1:]
            raise TTDSError(f"stage {stage} failed (exit {proc.returncode}): {tail[0] if tail else ''}")
        if stage in ("finetune", "evaluate"):
            result.write("trained" if stage == "finetune" else "done")
    result.status["minutes_used"] = round((time.time() - t0) / 60.0, 2)
    return result.write("done")


# ---------------------------------------------------------------- unpack (here)

def unpack(result_dir: str | Path, into: str | Path | None = None) -> Path:
    """Check a returned result's parts and unpack them into `into` (default: `<result>/unpacked`)."""
    result_dir = Path(result_dir)
    manifest = read_manifest(result_dir / "result.json", f"result {result_dir}")
    into = Path(into) if into is not None else result_dir / "unpacked"
    joined = into.parent / (into.name + ".tar")
    join_parts([result_dir / meta["name"] for meta in manifest["parts"]], manifest, f"result {result_dir}", joined)
    shutil.rmtree(into, ignore_errors=True)
    extract(joined, into, f"result {result_dir}")
    joined.unlink()
    return into
