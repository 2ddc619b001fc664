"""The budgeted GPU recipe rehearsed on the CPU: `ttds gpu pack | run | unpack` end to end on
a tiny random LLaMA and tiny LC-Rec data, the bundle carried part by part as the device
commands would, the return limits checked, and second runs from the result: ranking only, and
training on from it (warm start)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import make_tiny_llama, make_tokenizer
from test_finetune_helpers import REPO, toy_params
from test_preprocess import random_lcrec
from ttds_core import gpu_recipe
from ttds_core.errors import TTDSError
from ttds_core.finetune import warm_start_digest

RETURN_FILES, RETURN_FILE_MIB, RETURN_MIB = 8, 16, 64


def tiny_params(raw: Path, backbone: Path) -> dict:
    params = toy_params(**{
        "data.root": str(raw), "data.name": "T", "data.max_users": None, "data.max_history": 5,
        "model.path": str(backbone), "warmup.epochs": 4, "warmup.kmeans_sample": 200, "warmup.kmeans_iters": 3,
        "warmup.eval_every": 2, "warmup.dead_code_every": 2, "warmup.batch_size": 64,
        "index.codebook_size": 8, "index.max_suffix": 16, "train.epochs": 1, "train.max_steps": 3,
        "train.val_users": 4, "train.batch_size": 8, "eval.max_users": 12, "eval.batch_size": 6,
        "eval.beams": 10, "eval.ks": [1, 5, 10], "serve.topk": 5})
    return params


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Raw data, a tiny HF backbone folder and a params file, as a user has them here."""
    root = tmp_path_factory.mktemp("here")
    raw = random_lcrec(root / "raw", n_users=60, n_items=20)
    tok = make_tokenizer()
    model = make_tiny_llama(len(tok))
    model.save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    params = tiny_params(raw, root / "tiny-llama")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def carry(bundle: Path, device: Path) -> None:
    """What the device commands do: one part folder per command into the same ignored folder."""
    for part in sorted(bundle.glob("part-*")):
        shutil.copytree(part, device / part.name)


def check_return_limits(out: Path) -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= RETURN_FILES
    assert all(p.stat().st_size <= RETURN_FILE_MIB << 20 for p in files)
    assert sum(p.stat().st_size for p in files) <= RETURN_MIB << 20
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)


def test_pack_run_unpack_and_rank_again(source, tmp_path):
    bundle = tmp_path / "here" / "bundle"
    manifest = gpu_recipe.pack(source / "params.yaml", None, ["train.lr=0.004"], bundle, part_mib=0.05,
                               pinned=())
    parts = sorted(bundle.glob("part-*"))
    assert len(parts) == len(manifest["parts"]) >= 2
    for part in parts:
        files = sorted(p.name for p in part.iterdir())
        assert len(files) == 2 and "manifest.json" in files
        assert all(p.stat().st_size <= 0.05 * (1 << 20) for p in part.glob("bundle.tar.*"))
    assert "raw/T.inter.json" in manifest["files"] and "backbone/tiny-llama" in manifest["files"]

    device = tmp_path / "device" / "bundle"
    carry(bundle, device)
    out = tmp_path / "device" / "out"
    body = gpu_recipe.run(device, out, minutes=20, reserve_minutes=0.1)
    assert body["status"] == "done" and list(body["stages"]) == list(gpu_recipe.TRAIN_STAGES)
    assert 0 < body["train_minutes"] <= 20
    check_return_limits(out)
    assert {"result.json", "log.txt"} <= {p.name for p in out.iterdir()}
    assert "=== finetune ===" in (out / "log.txt").read_text()
    assert body["metrics"]["eval.json"]["users"] == 12 and "test" in body["metrics"]["eval.json"]
    assert body["metrics"]["finetune.json"]["steps"] == 3

    # back here: the result, then a ranking-only bundle for a second slot
    unpacked = gpu_recipe.unpack(out, tmp_path / "here" / "result")
    work_params = yaml.safe_load((unpacked / "params.yaml").read_text())
    assert work_params["train"]["lr"] == 0.004 and work_params["model"]["path"] == "backbone/tiny-llama"
    first = pd.read_parquet(unpacked / "data" / "eval" / "ranks.parquet")
    again = tmp_path / "here" / "bundle2"
    manifest2 = gpu_recipe.pack(source / "params.yaml", None, ["train.lr=0.004", "eval.batch_size=4"], again,
                                part_mib=1, resume=unpacked, pinned=())
    assert manifest2["has_model"]
    device2 = tmp_path / "device2" / "bundle"
    carry(again, device2)
    body2 = gpu_recipe.run(device2, tmp_path / "device2" / "out", minutes=20, rank_only=True)
    assert list(body2["stages"]) == list(gpu_recipe.RANK_STAGES)
    second = pd.read_parquet(gpu_recipe.unpack(tmp_path / "device2" / "out") / "data" / "eval" / "ranks.parquet")
    pd.testing.assert_frame_equal(first, second)  # the same model ranks the same users alike
    for key in ("test", "valid", "test_masked", "valid_masked"):
        assert body2["metrics"]["eval.json"][key] == body["metrics"]["eval.json"][key]

    # or a second slot trains on from the returned model (its weights and SID tables), then ranks
    out3 = tmp_path / "device2" / "out3"
    body3 = gpu_recipe.run(device2, out3, minutes=20, reserve_minutes=0.1, warm_start=True,
                           sets=["train.max_steps=2"])
    assert body3["status"] == "done" and body3["warm_start"] and list(body3["stages"]) == list(gpu_recipe.TRAIN_STAGES)
    check_return_limits(out3)
    warm = body3["metrics"]["finetune.json"]["warm_start"]
    assert warm["from"] == "resume/data/model" and body3["metrics"]["finetune.json"]["steps"] == 2
    assert warm["sha256"] == warm_start_digest(unpacked / "data" / "model", ["item", "user"])
    assert "warm start from resume/data/model" in (out3 / "log.txt").read_text()

    # a model trained with other params is not ranked as if it were this one
    with pytest.raises(TTDSError, match="train.lr"):
        gpu_recipe.pack(source / "params.yaml", None, [], tmp_path / "bad", part_mib=1, resume=unpacked,
                        pinned=())


def test_missing_or_damaged_parts_and_bad_arguments_are_one_line(source, tmp_path):
    bundle = tmp_path / "bundle"
    gpu_recipe.pack(source / "params.yaml", None, [], bundle, part_mib=0.05, pinned=())
    device = tmp_path / "device"
    carry(bundle, device)
    shutil.rmtree(device / "part-2")
    with pytest.raises(TTDSError, match=r"missing part 2 of \d+"):
        gpu_recipe.run(device, tmp_path / "out", minutes=5)
    shutil.copytree(bundle / "part-2", device / "part-2")
    damaged = next((device / "part-3").glob("bundle.tar.*"))
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    with pytest.raises(TTDSError, match="part 3 of .* is damaged"):
        gpu_recipe.run(device, tmp_path / "out", minutes=5)
    with pytest.raises(TTDSError, match="--rank-only needs a bundle packed with --resume"):
        gpu_recipe.run(bundle, tmp_path / "out", minutes=5, rank_only=True)
    with pytest.raises(TTDSError, match="--warm-start needs a bundle packed with --resume"):
        gpu_recipe.run(bundle, tmp_path / "out", minutes=5, warm_start=True)
    with pytest.raises(TTDSError, match="--rank-only and --warm-start: choose one"):
        gpu_recipe.run(bundle, tmp_path / "out", minutes=5, rank_only=True, warm_start=True)
    with pytest.raises(TTDSError, match="no part-1|no manifest"):
        gpu_recipe.run(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(TTDSError, match="--set train.nope: no such parameter"):
        gpu_recipe.pack(source / "params.yaml", None, ["train.nope=1"], tmp_path / "b2")
    with pytest.raises(TTDSError, match="expected KEY=VALUE"):
        gpu_recipe.pack(source / "params.yaml", None, ["train.lr"], tmp_path / "b2")
    with pytest.raises(TTDSError, match="--part-mib 63"):
        gpu_recipe.pack(source / "params.yaml", None, [], tmp_path / "b2", part_mib=63)
    with pytest.raises(TTDSError, match="train.epochs"):
        gpu_recipe.pack(source / "params.yaml", None, ["train.epochs=0"], tmp_path / "b2")


def test_pinned_wheels_travel_and_are_installed_before_the_image_packages(source, tmp_path, monkeypatch):
    """pack carries the wheels of the versions installed here (a stand-in wheel here, no
    registry); run installs them into a folder of its own, first on the stages' path."""
    import zipfile

    asked = []

    def fake_download(requirement, into):
        asked.append(requirement)
        into.mkdir(parents=True, exist_ok=True)
        wheel = into / "ttdsprobe-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("ttdsprobe/__init__.py", "WHERE = 'carried'\n")
            zf.writestr("ttdsprobe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: ttdsprobe\nVersion: 1.0\n")
            zf.writestr("ttdsprobe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            zf.writestr("ttdsprobe-1.0.dist-info/RECORD", "")
        return wheel

    monkeypatch.setattr(gpu_recipe, "download_wheel", fake_download)
    from importlib.metadata import version
    manifest = gpu_recipe.pack(source / "params.yaml", None, [], tmp_path / "bundle", part_mib=1)
    assert asked == [f"transformers=={version('transformers')}", f"peft=={version('peft')}"]
    assert manifest["wheels"] == ["ttdsprobe-1.0-py3-none-any.whl"] * 2
    env = gpu_recipe.install_wheels(gpu_recipe.unpack_bundle(tmp_path / "bundle"), {})
    out = subprocess.run([sys.executable, "-c", "import ttdsprobe; print(ttdsprobe.WHERE)"], env=env,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "carried"


def test_missing_packages_are_named_in_one_line(monkeypatch):
    import os

    gpu_recipe.check_packages(dict(os.environ), gguf=False)  # this machine has them all
    monkeypatch.setitem(gpu_recipe.NEEDED, "torch", "999")
    monkeypatch.setitem(gpu_recipe.NEEDED, "no-such-package-ttds", None)
    with pytest.raises(TTDSError, match=r"lacks no-such-package-ttds \(missing\), torch .* \(need >= 999\)"):
        gpu_recipe.check_packages(dict(os.environ), gguf=False)


def test_shipped_preset_is_valid_and_the_cli_errors_are_one_line(tmp_path):
    params = gpu_recipe.run_params(REPO / "params.yaml", REPO / "presets" / "gpu.yaml", [])
    assert params["train"]["packing"] and params["train"]["fused_optimizer"] and params["model"]["num_layers"] is None
    proc = subprocess.run([sys.executable, "-m", "ttds_core.cli", "gpu", "run", "--bundle", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "error:" in proc.stderr


def test_live_stand_in_without_dvclive(monkeypatch, tmp_path, capsys):
    import builtins

    from ttds_core.live import NoLive, open_live

    real_import = builtins.__import__

    def no_dvclive(name, *args, **kwargs):
        if name == "dvclive":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dvclive)
    live = open_live(str(tmp_path / "curves"))
    assert isinstance(live, NoLive) and "dvclive is not installed" in capsys.readouterr().err
    with live:
        live.log_metric("a", 1.0)
        live.next_step()
    assert not (tmp_path / "curves").exists()


def test_log_keeps_each_progress_bar_once_and_every_other_line():
    log = ("=== warmup ===\nwarmup:   0%|          | 0/5 [00:00<?, ?epoch/s]\rwarmup:  40%|####      | 2/5 [00:01<00:01]\n"
           "warmup: 100%|##########| 5/5 [00:02<00:00]\n\nwarmup:   0%|          | 0/5 [00:00<?]\n"
           "warmup: 100%|##########| 5/5 [00:01<00:00]\nfinetune: 100%|##| 6/6 [00:28<00:00]finetune: epoch 0: val 0.1\n"
           "finetune: 100%|##| 6/6 [00:31<00:00]\n")
    assert gpu_recipe._collapse_bars(log).splitlines() == [
        "=== warmup ===", "warmup: 100%|##########| 5/5 [00:02<00:00]", "warmup: 100%|##########| 5/5 [00:01<00:00]",
        "finetune: 100%|##| 6/6 [00:28<00:00]finetune: epoch 0: val 0.1", "finetune: 100%|##| 6/6 [00:31<00:00]"]
