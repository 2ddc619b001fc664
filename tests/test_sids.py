"""Collision suffixes (§4.2.5), SID tables and stats, and warmup -> build_sids end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ttds_core import build_sids, sids, warmup
from ttds_core.errors import TTDSError
from ttds_core.io import write_npy


def test_unique_tuples_get_no_suffix():
    codes = np.array([[0, 1], [1, 0], [2, 2]])
    assert sids.resolve_collisions(codes).tolist() == [-1, -1, -1]


def test_all_entities_colliding_still_get_unique_sids():
    codes = np.zeros((7, 3), dtype=np.int64)
    ids = np.array([40, 3, 12, 7, 99, 0, 5])
    suffix = sids.resolve_collisions(codes, ids)
    # rank by entity id inside the set: 0 -> p_0, 3 -> p_1, 5 -> p_2, ...
    assert suffix.tolist() == [5, 1, 4, 3, 6, 0, 2]
    table = sids.sid_table(ids, codes, suffix, "item")
    assert table["sid"].is_unique
    assert table.loc[table.item_id == 0, "sid"].item() == "<a_0><b_0><c_0><p_0>"


def test_mixed_collisions_and_user_tokens():
    codes = np.array([[1, 2], [3, 4], [1, 2], [3, 4], [5, 6], [1, 2]])
    suffix = sids.resolve_collisions(codes)
    assert suffix.tolist() == [0, 0, 1, 1, -1, 2]
    table = sids.sid_table(np.arange(6), codes, suffix, "user")
    assert list(table.columns) == ["user_id", "codes", "suffix", "sid"]
    assert table.sid[4] == "<ua_5><ub_6>" and table.sid[5] == "<ua_1><ub_2><up_2>"
    assert table["sid"].is_unique and table.codes[0] == [1, 2]
    stats = sids.index_stats(codes, suffix, codebook_size=8)
    assert stats["collision_rate"] == pytest.approx(5 / 6)
    assert stats["max_collision_set"] == 3 and stats["unique_tuples"] == 3 and stats["max_sid_length"] == 3
    assert stats["usage"] == [3 / 8, 3 / 8]
    p = np.array([3, 2, 1]) / 6
    assert stats["perplexity"][0] == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_collision_set_larger_than_max_suffix_is_an_error():
    with pytest.raises(TTDSError, match="index.max_suffix.*at least 5"):
        sids.resolve_collisions(np.zeros((5, 2), dtype=np.int64), max_suffix=4)


def test_churn():
    old = pd.DataFrame({"item_id": [0, 1, 2, 3], "sid": ["<a_1>", "<a_2>", "<a_3>", "<a_4>"]})
    new = pd.DataFrame({"item_id": [3, 2, 1, 0], "sid": ["<a_4>", "<a_9>", "<a_2>", "<a_1>"]})
    assert sids.churn(old, new) == 0.25
    assert sids.churn(old, old) == 0.0


def _params(kind="rq", length=4, user=True, size=16):
    return {"seed": 1, "tower": {"user": user},
            "index": {"kind": kind, "length": length, "codebook_size": size, "code_dim": 16, "max_suffix": 64},
            "warmup": {"epochs": 3, "batch_size": 64, "lr": 1e-3, "beta": 0.25, "kmeans_sample": 1000,
                       "kmeans_iters": 10, "dead_code_every": 1}}


def _embeddings(tmp_path, n_items=240, n_users=90, d=32):
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (20, d))
    emb = tmp_path / "embeddings"
    for name, n in (("items", n_items), ("users", n_users)):
        write_npy(emb / f"{name}.npy", (centers[rng.integers(0, 20, n)] + rng.normal(0, 1, (n, d))).astype(np.float32))
    return emb


def _pipeline(tmp_path, params, tag="run"):
    emb = tmp_path / "embeddings"
    out = tmp_path / tag
    warmup.run(params, embeddings_dir=emb, out_dir=out / "quantizer", metrics_path=out / "warmup.json",
               live_dir=str(out / "live"))
    build_sids.run(params, embeddings_dir=emb, quantizer_dir=out / "quantizer", out_dir=out / "sids",
             metrics_path=out / "sids.json")
    return out


@pytest.mark.parametrize("kind,length", [("rq", 3), ("rq", 4), ("rq", 5), ("lsh", 4), ("random", 3), ("random", 5)])
def test_warmup_and_build_sids_end_to_end(tmp_path, kind, length):
    _embeddings(tmp_path)
    out = _pipeline(tmp_path, _params(kind, length))
    metrics = json.loads((out / "sids.json").read_text())
    for tower, name, n in (("item", "items", 240), ("user", "users", 90)):
        table = pd.read_parquet(out / "sids" / f"{name}.parquet")
        assert table[sids.ID_COLUMN[tower]].tolist() == list(range(n))
        assert table["sid"].is_unique
        assert all(len(c) == length for c in table["codes"])
        assert metrics[tower]["length"] == length and len(metrics[tower]["usage"]) == length
        assert 0 <= metrics[tower]["collision_rate"] <= 1
    config = json.loads((out / "quantizer" / "config.json").read_text())
    assert config["item"]["kind"] == kind and config["user"]["in_dim"] == 32
    wm = json.loads((out / "warmup.json").read_text())
    assert wm["kind"] == kind
    assert (out / "live" / "plots" / "metrics").is_dir()  # a dvc.yaml output, whatever the kind
    if kind == "rq":
        assert len(wm["item"]["usage"]) == length and wm["item"]["epochs"] == 3
        assert (out / "live" / "metrics.json").exists()


def test_same_seed_same_sids_and_item_tower_only(tmp_path):
    _embeddings(tmp_path)
    params = _params("rq", 4, user=False)
    a, b = _pipeline(tmp_path, params, "a"), _pipeline(tmp_path, params, "b")
    ta, tb = pd.read_parquet(a / "sids" / "items.parquet"), pd.read_parquet(b / "sids" / "items.parquet")
    assert ta.equals(tb)
    assert not (a / "sids" / "users.parquet").exists()
    assert set(json.loads((a / "sids.json").read_text())) == {"item"}


def test_stale_tokenizer_and_wrong_dimension_are_errors(tmp_path):
    _embeddings(tmp_path)
    out = _pipeline(tmp_path, _params("rq", 3, user=False))
    with pytest.raises(TTDSError, match="index.length=3.*rerun the warmup"):
        build_sids.run(_params("rq", 4, user=False), embeddings_dir=tmp_path / "embeddings",
                 quantizer_dir=out / "quantizer", out_dir=out / "sids2", metrics_path=out / "s.json")
    _embeddings(tmp_path, d=48)
    with pytest.raises(TTDSError, match="item.safetensors.*32-dim.*dim 48"):
        build_sids.run(_params("rq", 3, user=False), embeddings_dir=tmp_path / "embeddings",
                 quantizer_dir=out / "quantizer", out_dir=out / "sids2", metrics_path=out / "s.json")


def test_lsh_needs_a_power_of_two(tmp_path):
    _embeddings(tmp_path)
    with pytest.raises(TTDSError, match="index.codebook_size"):
        _pipeline(tmp_path, _params("lsh", 4, size=12))
