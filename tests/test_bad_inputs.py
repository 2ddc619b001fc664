"""Every stage entry point, started with nothing upstream or with a bad parameter, stops with one
line on stderr (`error: ...`), exit code 2 and no file written: never a traceback, never a
half-written artifact."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ttds_core.cli import STAGES, run_stage

REPO = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text())


def _run(tmp_path, monkeypatch, capsys, stage: str, params: dict) -> str:
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    kwargs = {"name": "sasrec"} if stage == "baseline" else {}
    with pytest.raises(SystemExit) as info:
        run_stage(stage, "params.yaml", **kwargs)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    written = [p for p in Path(".").rglob("*") if p.is_file() and p.name != "params.yaml"]
    assert not written, f"{stage} wrote {written[:3]} before failing"
    return err


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_with_nothing_upstream_fails_in_one_line(tmp_path, monkeypatch, capsys, stage):
    params = copy.deepcopy(SHIPPED)
    params["data"]["root"] = str(tmp_path / "no-such-folder")
    params["model"]["path"] = str(tmp_path / "no-such-model.gguf")
    err = _run(tmp_path, monkeypatch, capsys, stage, params)
    assert "no-such" in err or "not found" in err or "no trained model" in err


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_refuses_a_misspelt_key_before_any_work(tmp_path, monkeypatch, capsys, stage):
    params = copy.deepcopy(SHIPPED)
    params["train"]["learning_rate"] = 1e-3
    err = _run(tmp_path, monkeypatch, capsys, stage, params)
    assert err == "error: params: unknown parameter 'train.learning_rate' (see params.yaml for the keys)"


@pytest.mark.parametrize("script", ["attention_share", "benchmark_report", "context_shift", "copy_bias",
                                    "popularity_prior", "user_profile"])
def test_a_bench_script_checks_the_workspace_params_before_any_work(tmp_path, script):
    """The bench scripts that read a workspace go through the params schema, as the stages do:
    a misspelt key is the schema's one-line error, not a KeyError deep inside."""
    import importlib

    from ttds_core.errors import TTDSError

    params = copy.deepcopy(SHIPPED)
    params["eval"]["beamz"] = 20
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    main = importlib.import_module(f"bench.{script}").main
    with pytest.raises(TTDSError, match="beamz"):
        main(["--root", str(tmp_path), "--out", str(tmp_path / "out.json")])


def test_a_bench_script_run_as_a_module_says_it_in_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("data: [1\n")
    run = subprocess.run([sys.executable, "-m", "bench.context_shift", "--root", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [f"error: {tmp_path / 'params.yaml'}: not valid YAML (ParserError)"]
