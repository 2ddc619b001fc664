"""Padding-free packed batches: the layout, and the same losses and gradients as the
left-padded batch with its separate DM-VAE forwards."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ttds_core import batches, packing
from ttds_core.errors import TTDSError
from ttds_core.model import TTDSModule

from test_dynamic import _extended

torch.set_num_threads(1)


def test_first_fit_fills_rows_longest_first_and_never_overflows():
    lengths = [7, 3, 5, 2, 2, 1, 7]
    rows = packing.first_fit(lengths, 7)
    assert sorted(j for r in rows for j in r) == list(range(len(lengths)))
    assert all(sum(lengths[j] for j in r) <= 7 for r in rows)
    assert rows == [[0], [6], [2, 3], [1, 4, 5]]


def test_pack_lays_out_positions_labels_and_pools():
    sid_first, n_rows, eos, pad = 100, 10, 2, 1
    segments = [packing.Segment([5, 6, 7, 103, 104, eos], n_labels=3, coded=True),
                packing.Segment([8, 9, 11, 12, eos], n_labels=3),
                packing.Segment([101, 102], pool=("item", 0)),
                packing.Segment([105, 106], pool=("item", 1))]
    b = packing.pack(segments, pad, sid_first, n_rows, eos)
    # rows as wide as the longest sequence; the two short ones share the third row
    assert b.input_ids.tolist() == [[5, 6, 7, 103, 104, eos], [8, 9, 11, 12, eos, pad],
                                    [101, 102, 105, 106, pad, pad]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0], [0, 1, 0, 1, 0, 0]]
    assert b.padding == pytest.approx(3 / 18)
    # state k-1 predicts token k; coded labels become local rows (EOS = n_rows)
    assert b.coded_pos.tolist() == [2, 3, 4] and b.coded_target.tolist() == [3, 4, n_rows]
    assert b.text_pos.tolist() == [7, 8, 9] and b.text_target.tolist() == [11, 12, eos]
    assert b.n_labels == 6 and b.n_task_tokens == 11
    pos, slot, counts = b.pools["item"]
    flat = b.input_ids.reshape(-1)
    assert flat[pos].tolist() == [101, 102, 105, 106] and slot.tolist() == [0, 0, 1, 1]
    assert counts.tolist() == [2, 2]
    with pytest.raises(TTDSError, match="neither a SID token nor EOS"):
        packing.pack([packing.Segment([5, 6, 7], n_labels=1, coded=True)], pad, sid_first, n_rows, eos)


def _pairs(tok, sid_ids):
    names = tok.convert_ids_to_tokens(sid_ids)

    def sid(*k):
        return "".join(names[j] for j in k)
    return [("history " + sid(0, 5) + " " + sid(1, 6) + " next?", sid(2, 7)),
            ("the user " + sid(12, 17) + " bought", sid(3, 4)),
            ("Write the title of the next item", "great fun works well love it kids would buy again"),
            ("items " + sid(1, 4), sid(0, 6))]


@pytest.mark.parametrize("softmax", ["vocab", "sid"])
def test_packed_step_equals_the_padded_step(tiny_lm, softmax):
    """One packed forward (task rows + DM-VAE rows of both towers) gives the losses and the
    gradients of the left-padded batch with its two extra DM-VAE forwards."""
    model, tok = tiny_lm
    lm, sid, ids = _extended(model, tok, tie=True)
    lm.eval()  # no dropout: the two layouts must compute the same function
    cfg = SimpleNamespace(sid_softmax=softmax, alpha=0.1, beta=0.25, max_response_tokens=6, seed=0,
                          towers=["item", "user"], dmvae_batch=3)
    module = TTDSModule(lm, sid, cfg, tok.eos_token_id)
    pairs = _pairs(tok, ids)
    rng = np.random.default_rng(0)
    strings = {"item": ["".join(tok.convert_ids_to_tokens([ids[a], ids[4 + b]])) for a, b in [(0, 1), (2, 3), (1, 0)]],
               "user": ["".join(tok.convert_ids_to_tokens([ids[11 + a], ids[15 + b]])) for a, b in [(0, 2), (1, 1)]]}
    dm = {t: (s, rng.standard_normal((len(s), model.config.hidden_size)).astype(np.float32)) for t, s in strings.items()}

    def grads(losses):
        module.zero_grad()
        losses["total"].backward()
        return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    padded_batch = batches.collate(pairs, tok, cfg.max_response_tokens, sid.first_id)
    padded_dm = {}
    from ttds_core import dynamic
    for t, (s, x) in dm.items():
        padded_dm[t] = (*dynamic.encode_sids(tok, s, "cpu"), torch.as_tensor(x))
    padded = module(**padded_batch, dm=padded_dm)
    g_padded = grads(padded)
    batch, dm_x = batches.packed_batch(pairs, dm, tok, cfg, sid)
    assert batch.input_ids.numel() < padded_batch["input_ids"].numel() + sum(
        v[0].numel() for v in padded_dm.values())  # less padding than the three padded batches
    packed = module(packed=batch, dm_x=dm_x)
    g_packed = grads(packed)
    for k in ("llm", "id", "token", "total"):
        torch.testing.assert_close(packed[k], padded[k], rtol=1e-5, atol=1e-6)
    assert set(g_packed) == set(g_padded) and any("lora" in n for n in g_packed)
    for n in g_padded:
        torch.testing.assert_close(g_packed[n], g_padded[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_mask_built_on_the_device_equals_transformers_own(tiny_lm, attn, monkeypatch):
    """The packed rows' 4D mask (`model.packed_mask`, no host sync) gives the very losses
    transformers computes when it finds the sequences in the position ids itself."""
    from ttds_core import model as ttds_model

    model, tok = tiny_lm
    model.config._attn_implementation = attn
    lm, sid, ids = _extended(model, tok, tie=True)
    lm.eval()
    cfg = SimpleNamespace(sid_softmax="sid", alpha=0.1, beta=0.25, max_response_tokens=6, seed=0,
                          towers=["item", "user"], dmvae_batch=3)
    module = TTDSModule(lm, sid, cfg, tok.eos_token_id)
    batch, dm_x = batches.packed_batch(_pairs(tok, ids), {}, tok, cfg, sid)
    ours = module(packed=batch, dm_x=dm_x)
    mask = ttds_model.packed_mask(batch.position_ids, model.config, torch.float32)
    assert mask is not None and mask.shape[-2:] == (batch.input_ids.shape[1],) * 2
    monkeypatch.setattr(ttds_model, "packed_mask", lambda *args: None)
    theirs = module(packed=batch, dm_x=dm_x)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)
