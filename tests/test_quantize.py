"""RQ-VAE (eq. 10-11, 13), k-means init, dead codes, LSH and random quantizers, the registry, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ttds_core.errors import TTDSError
from ttds_core.quantize import (QUANTIZERS, LSHQuantizer, Quantizer, RandomQuantizer, RQVAE, build_quantizer,
                                default_widths, load_quantizer, save_quantizer)
from ttds_core.warmup import train_rqvae


def clustered(n=400, d=32, clusters=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (clusters, d))
    return (centers[rng.integers(0, clusters, n)] + rng.normal(0, 0.5, (n, d))).astype(np.float32)


def fitted_rqvae(x, length=3, size=16, code_dim=16):
    q = RQVAE(x.shape[1], code_dim=code_dim, length=length, codebook_size=size)
    q.fit_normalisation(x)
    q.init_kmeans(x, sample=10_000, iters=20, seed=0)
    return q


def test_default_widths_follow_the_paper_rule():
    assert default_widths(4096, 256) == [4096, 2048, 1024, 512, 256]
    assert default_widths(576, 256) == [576, 512, 256]
    assert default_widths(32, 16) == [32, 16]
    q = RQVAE(576, code_dim=256, length=4, codebook_size=256)
    linears = [m for m in q.encoder if isinstance(m, torch.nn.Linear)]
    assert [m.in_features for m in linears] == [576, 512] and linears[-1].out_features == 256
    assert q.codebook(3).shape == (256, 256)
    assert [m.out_features for m in q.decoder if isinstance(m, torch.nn.Linear)][-1] == 576


def test_residual_norms_shrink_level_by_level():
    x = clustered()
    q = fitted_rqvae(x, length=4)
    out = q(x)
    norms = [float(n) for n in out["residual_norms"]]
    assert len(norms) == 5
    assert all(a > b for a, b in zip(norms, norms[1:])), norms
    # codes are the argmin of eq. 10 at every level
    z = q.encode(torch.as_tensor(x))
    first = torch.cdist(z, q.codebook(0)).argmin(1)
    assert torch.equal(out["codes"][:, 0], first)
    assert torch.equal(q.codes(x), out["codes"])


def test_losses_reach_every_part():
    x = clustered()
    q = fitted_rqvae(x)
    out = q(x)
    assert set(out) >= {"recon", "codes", "z", "z_q", "loss", "loss_recon", "loss_codebook", "loss_commit"}
    torch.testing.assert_close(out["loss"], out["loss_recon"] + out["loss_codebook"] + 0.25 * out["loss_commit"])
    q.rq_loss(x).backward()
    for part in (q.encoder[0].weight, q.decoder[-1].weight, q.codebooks):
        assert part.grad is not None and part.grad.abs().sum() > 0


def test_kmeans_with_fewer_points_than_codes():
    x = clustered(n=5)
    q = fitted_rqvae(x, size=16)
    assert torch.isfinite(q.codebooks).all()
    assert q.codes(x).shape == (5, 3)


def test_reseed_dead_codes_moves_unused_codes():
    x = clustered()
    q = fitted_rqvae(x)
    with torch.no_grad():
        q.codebooks[0, :4] = 1e3  # far from every residual: never chosen
    assert (q.codes(x)[:, 0] < 4).sum() == 0
    moved = q.reseed_dead_codes(x, seed=1)
    assert moved >= 4
    assert (q.codebooks[0, :4].abs() < 1e2).all()


def test_training_lowers_the_loss_and_is_deterministic():
    x = clustered(n=300)
    cfg = dict(length=3, codebook_size=16, code_dim=16, beta=0.25, epochs=6, batch_size=64, lr=1e-3,
               kmeans_sample=1000, kmeans_iters=10, dead_code_every=2)
    q1, h1 = train_rqvae(x, cfg, seed=3, progress=False)
    q2, h2 = train_rqvae(x, cfg, seed=3, progress=False)
    assert h1[-1]["loss"] < h1[0]["loss"]
    assert len(h1) == 7 and 0 < h1[-1]["usage_0"] <= 1 and h1[-1]["perplexity_0"] >= 1
    for k, v in q1.state_dict().items():
        assert torch.equal(v, q2.state_dict()[k]), k
    assert torch.equal(q1.codes(x), q2.codes(x))


def test_lsh_codes_and_power_of_two():
    x = clustered()
    q = LSHQuantizer(32, length=4, codebook_size=16, seed=0)
    q.fit_normalisation(x, scale=False)
    codes = q.codes(x)
    assert codes.shape == (len(x), 4) and codes.min() >= 0 and codes.max() < 16
    again = LSHQuantizer(32, length=4, codebook_size=16, seed=0)
    again.fit_normalisation(x, scale=False)
    assert torch.equal(again.codes(x), codes)
    assert len(torch.unique(codes[:, 0])) > 1
    with pytest.raises(TTDSError, match="index.codebook_size.*power of two"):
        LSHQuantizer(32, length=4, codebook_size=12)


def test_random_codes_are_keyed_by_entity():
    q = RandomQuantizer(32, length=5, codebook_size=8, seed=7)
    all_codes = q.codes(ids=np.arange(50))
    assert all_codes.shape == (50, 5) and all_codes.max() < 8
    assert torch.equal(q.codes(ids=[17, 3]), all_codes[[17, 3]])
    assert not torch.equal(RandomQuantizer(32, 5, 8, seed=8).codes(ids=np.arange(50)), all_codes)
    with pytest.raises(TTDSError, match="entity id"):
        q.codes(np.zeros((2, 32), dtype=np.float32))


@pytest.mark.parametrize("length,size,name", [(0, 16, "index.length"), (3, 1, "index.codebook_size")])
def test_bad_index_shape_names_the_parameter(length, size, name):
    for kind in ("rq", "lsh", "random"):
        with pytest.raises(TTDSError, match=name):
            build_quantizer({"kind": kind, "in_dim": 32, "length": length, "codebook_size": size, "code_dim": 16})
    with pytest.raises(TTDSError, match="index.kind"):
        build_quantizer({"kind": "pq", "in_dim": 32, "length": 3, "codebook_size": 16})


@pytest.mark.parametrize("kind", ["rq", "lsh", "random"])
def test_checkpoint_round_trip_and_dim_check(tmp_path, kind):
    x = clustered()
    q = build_quantizer({"kind": kind, "in_dim": 32, "length": 3, "codebook_size": 16, "code_dim": 16, "seed": 5})
    if kind != "random":
        q.fit_normalisation(x)
    if kind == "rq":
        q.init_kmeans(x, iters=5)
    path = tmp_path / f"{kind}.safetensors"
    save_quantizer(path, q)
    q2, cfg = load_quantizer(path, in_dim=32)
    assert cfg["kind"] == kind and cfg["length"] == 3
    ids = np.arange(len(x))
    assert torch.equal(q.codes(x, ids=ids), q2.codes(x, ids=ids))
    with pytest.raises(TTDSError, match="32-dim.*dim 64"):
        load_quantizer(path, in_dim=64)
    if kind != "random":
        with pytest.raises(TTDSError, match="input dim 32"):
            q2.codes(np.zeros((2, 64), dtype=np.float32))


class _ModQuantizer(Quantizer):
    """A new index kind for the registry test: code[e, m] = (e + m) mod N."""

    kind = "mod"

    def __init__(self, in_dim: int, length: int, codebook_size: int):
        super().__init__()
        self.in_dim, self.length, self.codebook_size = in_dim, length, codebook_size

    def codes(self, x=None, ids=None):
        return (torch.as_tensor(ids)[:, None] + torch.arange(self.length)) % self.codebook_size

    @classmethod
    def from_config(cls, cfg):
        return cls(int(cfg["in_dim"]), int(cfg["length"]), int(cfg["codebook_size"]))


def test_a_new_quantizer_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    """What the pipeline asks of a kind is the `Quantizer` interface: a subclass registered in
    QUANTIZERS is saved and loaded like the shipped ones, and the fine-tuning side (tied rows,
    L_Token, refresh) takes its "nothing of that kind" defaults."""
    from ttds_core import dynamic

    monkeypatch.setitem(QUANTIZERS, "mod", _ModQuantizer)
    save_quantizer(tmp_path / "q.safetensors", build_quantizer({"kind": "mod", "in_dim": 8, "length": 3,
                                                                 "codebook_size": 4}))
    q, cfg = load_quantizer(tmp_path / "q.safetensors", in_dim=8)
    assert isinstance(q, _ModQuantizer) and cfg == {"kind": "mod", "in_dim": 8, "length": 3, "codebook_size": 4}
    x = np.zeros((5, 8), dtype=np.float32)
    assert dynamic.quantize_codes(q, x).tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 0], [3, 0, 1], [0, 1, 2]]
    assert dynamic.codebook_matrix(q, 3) is None  # no code vectors: SID rows stay free
    assert float(dynamic.dmvae_terms(torch.zeros(2, 8), q, torch.ones(2, 8))["token"]) == 0.0
    assert q.sticky_codes(x, None, 0.2) is None and not q.learns  # a refresh re-derives with `codes`
