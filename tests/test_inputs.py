"""The `inputs` stage: every raw file params point at is fingerprinted (so `preprocess` re-runs
when one changes, wherever it lies), and paths resolve as documented (relative `*_file` inside
`data.root`; DVC temporary copies find the workspace's data; a null root works in DVC)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from test_preprocess import core_seqs, make_params, write_cascade, write_lcrec
from ttds_core import data_source, inputs, preprocess

REPO = Path(__file__).resolve().parents[1]


def fingerprint(params: dict) -> dict:
    return inputs.fingerprint(data_source.DataConfig.from_params(params))


def lcrec_root(tmp_path: Path) -> Path:
    return write_lcrec(tmp_path / "lc", core_seqs(), {i: f"Title {i}" for i in range(5)})


def test_every_file_a_reader_reads_is_fingerprinted(tmp_path):
    cascade = write_cascade(tmp_path)
    inter = tmp_path / "inter.csv"
    pd.DataFrame({"user": ["u"] * 3, "item": ["a", "b", "c"], "timestamp": [1, 2, 3]}).to_csv(inter, index=False)
    items = tmp_path / "items.csv"
    pd.DataFrame({"item": ["a", "b", "c"], "title": ["A", "B", "C"]}).to_csv(items, index=False)
    for params in (make_params(root=str(lcrec_root(tmp_path))),
                   make_params(format="amazon2018", root=str(cascade), name="Cat"),
                   make_params(format="generic", interactions_file=str(inter), items_file=str(items))):
        cfg = data_source.DataConfig.from_params(params)
        read = {Path(f) for f in preprocess.read_raw(cfg).files}
        assert read and read <= set(data_source.input_files(cfg)), params["data"]["format"]
        assert all(md5 for name, md5 in inputs.fingerprint(cfg)["files"].items()
                   if any(str(f).endswith(name) for f in read))


def test_edits_outside_the_root_and_new_fallbacks_change_the_fingerprint(tmp_path):
    root = lcrec_root(tmp_path)
    text = tmp_path / "elsewhere" / "text.json"
    text.parent.mkdir()
    text.write_text(json.dumps({f"A{i:03d}": {"title": f"T{i}"} for i in range(5)}))
    with_file = make_params(root=str(root), item_text_file=str(text))
    before = fingerprint(with_file)
    assert before == fingerprint(with_file)  # stable
    text.write_text(json.dumps({f"A{i:03d}": {"title": f"Edited {i}"} for i in range(5)}))
    assert fingerprint(with_file) != before

    plain = make_params(root=str(root))
    before = fingerprint(plain)
    assert before["files"]["T.item.json"] is None  # an absent fallback is recorded as absent
    (root / "T.item.json").write_text("{}")
    assert fingerprint(plain) != before


def test_relative_files_resolve_inside_the_root(tmp_path):
    root = lcrec_root(tmp_path)
    (root / "text.json").write_text(json.dumps({f"A{i:03d}": {"title": f"Own {i}"} for i in range(5)}))
    cfg = data_source.DataConfig.from_params(make_params(root=str(root), item_text_file="text.json"))
    assert cfg.item_text_file == root / "text.json"
    assert preprocess.read_raw(cfg).item_text["title"].tolist()[0] == "Own 0"


def test_a_relative_file_not_in_the_root_is_relative_to_the_repository(tmp_path, monkeypatch):
    root = lcrec_root(tmp_path)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "own.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    cfg = data_source.DataConfig.from_params(make_params(root=str(root), item_text_file="texts/own.json"))
    assert cfg.item_text_file == Path("texts/own.json")


def test_dvc_temporary_copies_find_the_workspace_data(tmp_path, monkeypatch):
    data = tmp_path / "shared" / "lc"
    write_lcrec(data, core_seqs(), {i: f"Title {i}" for i in range(5)})
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"  # where dvc exp run --temp runs
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    cfg = data_source.DataConfig.from_params(make_params(root="../shared/lc"))
    assert cfg.root.resolve() == data.resolve()
    assert preprocess.read_raw(cfg).inter.shape[0] == 30
    # the fingerprint names the files as the workspace run does, so preprocess is not re-run
    copy_names = set(inputs.fingerprint(cfg)["files"])
    monkeypatch.chdir(tmp_path / "repo")
    assert set(fingerprint(make_params(root="../shared/lc"))["files"]) == copy_names


def test_missing_root_is_one_line(tmp_path):
    with pytest.raises(Exception, match=r"'data.root' = '.*nope' is not a folder"):
        fingerprint(make_params(root=str(tmp_path / "nope")))


@pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc not installed")
def test_dvc_reads_the_pipeline_with_a_null_root(tmp_path):
    """`data.root: null` (generic format) used to make DVC fail with 'unexpected error'."""
    import yaml

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(format="generic", root=None, interactions_file="inter.csv", items_file="items.csv")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    out = subprocess.run(["dvc", "status", "inputs", "preprocess"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "unexpected error" not in out.stderr


def test_subset_says_what_it_kept(tmp_path, capsys):
    from test_preprocess import random_lcrec, run_to

    root = random_lcrec(tmp_path / "lc", n_users=300, n_items=40)
    run_to(tmp_path, make_params(root=str(root), max_users=100, sampler="users"))
    err = capsys.readouterr().err
    assert "data.max_users = 100 (users sampler): 100 of 300 users sampled" in err
    assert "preprocess: read 300 users, 40 items" in err and "the 5-core (0 rounds) kept 300 users" in err
    metrics = json.loads((tmp_path / "out" / "preprocess.json").read_text())
    collapse = dict(metrics, users=metrics["subset"]["sampled"]["users"] // 3)
    assert preprocess.subset_message(collapse).startswith("warning: ")
    run_to(tmp_path, make_params(root=str(root)))  # no subset: only the k-core line
    err = capsys.readouterr().err
    assert "max_users" not in err and err.count("\n") == 1


def test_list_valued_text_cells_become_text(tmp_path):
    from ttds_core.readers import item_text_table

    df = pd.DataFrame({"item": ["a", "b", "c"], "title": ["Pad", "[Prototype] 2", "Cable"],
                       "categories": ["['Games', 'PC']", '["Games", "Mac"]', "[Games]"]})
    out = item_text_table(df, tmp_path / "items.csv")
    assert out["categories"].tolist() == ["Games, PC", "Games, Mac", "[Games]"]
    assert out["title"].tolist() == ["Pad", "[Prototype] 2", "Cable"]


def test_the_catalogue_guide_lists_every_accepted_column():
    from ttds_core.readers import GENERIC_COLUMNS, ITEM_ID_COLUMNS, TEXT_COLUMNS

    guide = (REPO / "docs" / "own-catalogue.md").read_text()
    names = [n for ns in GENERIC_COLUMNS.values() for n in ns] + list(ITEM_ID_COLUMNS)
    names += [n for ns in TEXT_COLUMNS.values() for n in ns] + ["rating", "review", "summary"]
    assert not [n for n in names if f"`{n}`" not in guide]


def test_generic_files_are_named_alike_in_the_workspace_and_a_dvc_copy(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpxyz"
    copy.mkdir(parents=True)
    pd.DataFrame({"user": ["u"] * 3, "item": ["a", "b", "c"], "timestamp": [1, 2, 3]}).to_csv(repo / "inter.csv", index=False)
    params = make_params(format="generic", interactions_file="inter.csv")
    monkeypatch.chdir(repo)
    in_workspace = fingerprint(params)
    monkeypatch.chdir(copy)
    assert fingerprint(params) == in_workspace == {"format": "generic", "files": {"inter.csv": in_workspace["files"]["inter.csv"]}}
