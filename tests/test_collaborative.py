"""index.cf_mix: item vectors mixed with their training neighbours before the index is built."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ttds_core import build_sids, collaborative, dynamic, warmup
from ttds_core.errors import TTDSError
from ttds_core.io import write_npy


def test_mix_is_the_count_weighted_mean_of_training_neighbours():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [5.0, 5.0]], dtype=np.float32)
    pairs = np.array([[0, 1], [0, 1], [1, 2]])
    out = collaborative.mix(x, pairs, 0.5)
    np.testing.assert_allclose(out[0], 0.5 * x[0] + 0.5 * x[1])                        # 1 twice
    np.testing.assert_allclose(out[1], 0.5 * x[1] + 0.5 * (2 * x[0] + x[2]) / 3, rtol=1e-6)  # both ways
    np.testing.assert_allclose(out[2], 0.5 * x[2] + 0.5 * x[1])
    np.testing.assert_array_equal(out[3], x[3])  # no neighbour: unchanged
    assert out.dtype == x.dtype
    assert collaborative.mix(x, pairs, 0.0) is x
    with pytest.raises(TTDSError, match="index.cf_mix"):
        collaborative.mix(x, pairs, 1.5)
    with pytest.raises(TTDSError, match="item 7.*4 rows"):
        collaborative.mix(x, np.array([[0, 7]]), 0.5)


def test_transitions_come_from_the_training_part_only():
    # items[-2] is the validation target, items[-1] the test target: neither step counts
    pairs = collaborative.transition_pairs([np.array([0, 1, 2, 3, 4]), np.array([5, 6, 7])])
    assert pairs.tolist() == [[0, 1], [1, 2]]


def _inputs(tmp_path, held_out):
    rng = np.random.default_rng(0)
    n, d = 120, 16
    write_npy(tmp_path / "embeddings" / "items.npy", rng.normal(0, 1, (n, d)).astype(np.float32))
    rows = [{"user_id": u, "items": [int(i) for i in rng.choice(n, 6, replace=False)[:4]] + held_out(u)}
            for u in range(80)]
    processed = tmp_path / "processed"
    processed.mkdir(exist_ok=True)
    pd.DataFrame(rows).to_parquet(processed / "sequences.parquet", index=False)
    return processed


def _sids(tmp_path, processed, gamma, tag):
    params = {"seed": 1, "tower": {"user": False},
              "index": {"kind": "rq", "length": 2, "codebook_size": 8, "code_dim": 8, "max_suffix": 64,
                        "cf_mix": gamma},
              "warmup": {"epochs": 3, "batch_size": 64, "lr": 1e-3, "beta": 0.25, "kmeans_sample": 1000,
                         "kmeans_iters": 10, "dead_code_every": 1}}
    out = tmp_path / tag
    warmup.run(params, embeddings_dir=tmp_path / "embeddings", out_dir=out / "quantizer",
               metrics_path=out / "warmup.json", live_dir=str(out / "live"), processed_dir=processed)
    build_sids.run(params, embeddings_dir=tmp_path / "embeddings", quantizer_dir=out / "quantizer",
                   out_dir=out / "sids", metrics_path=out / "sids.json", processed_dir=processed)
    return pd.read_parquet(out / "sids" / "items.parquet")


def test_stages_quantize_the_mixed_vectors_and_never_see_held_out_steps(tmp_path):
    processed = _inputs(tmp_path, lambda u: [u % 120, (u + 1) % 120])
    plain = _sids(tmp_path, processed, 0.0, "plain")
    mixed = _sids(tmp_path, processed, 0.9, "mixed")
    assert not plain["sid"].equals(mixed["sid"])
    # other validation and test targets (the last two items): the very same SIDs
    other = tmp_path / "other"
    other.mkdir()
    (other / "embeddings").symlink_to(tmp_path / "embeddings")
    changed = _inputs(other, lambda u: [(7 * u) % 120, (7 * u + 3) % 120])
    assert _sids(other, changed, 0.9, "mixed")["sid"].equals(mixed["sid"])


def test_a_refresh_quantizes_the_transformed_vectors(tiny_lm):
    model, tok = tiny_lm
    tok.padding_side = "left"
    from ttds_core.embedding import embed_texts
    from ttds_core.quantize import LSHQuantizer

    texts = [f"Mario game number {i} with a controller" for i in range(10)]
    kwargs = {"batch_size": 4, "max_tokens": 16, "device": "cpu", "progress": False}
    x0 = embed_texts(model, tok, texts, **kwargs)
    q = LSHQuantizer(x0.shape[1], length=2, codebook_size=4, seed=0)
    q.fit_normalisation(torch.as_tensor(x0))
    lay = dynamic.TowerLayout("item", 0, 2, 4, 10)
    table0 = dynamic.make_table("item", np.arange(10), dynamic.quantize_codes(q, x0))
    pairs = np.array([[0, 1], [2, 3], [4, 5]])
    x1, _, _ = dynamic.refresh_tower(model, tok, q, texts, table0, lay, kwargs,
                                     transform=lambda v: collaborative.mix(v, pairs, 0.5))
    np.testing.assert_allclose(x1, collaborative.mix(x0, pairs, 0.5), atol=1e-5)


def test_code_sharing_counts_pairs_under_one_prefix():
    from bench.code_sharing import sharing

    codes = np.array([[0, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 2]])
    pairs = np.array([[0, 1], [0, 3], [1, 2], [2, 3]])
    got = sharing(codes, pairs)
    assert got[1]["consecutive"] == 0.5   # 0-1 and 0-3 share the first code
    assert got[2]["consecutive"] == 0.25  # only 0-3 shares the first two
    assert set(got) == {1, 2} and 0 <= got[1]["shuffled"] <= 1
