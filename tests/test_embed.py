"""Mean pooling (eq. 6) with left padding, batched embedding order, and the embed stage."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ttds_core import backbone, backbone_export, embed, embedding
from ttds_core.errors import TTDSError

TEXTS = ["Super Mario Bros", "Nintendo Switch controller", "game", "PlayStation 4 headset cable charger for kids",
         "Xbox One", "great fun works well love it"]


def test_mean_pool_left_padding_matches_unpadded(tiny_lm):
    model, tokenizer = tiny_lm
    decoder = backbone.decoder_of(model)
    rows = [tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    input_ids, mask = embedding.left_pad(rows, tokenizer.pad_token_id)
    assert mask.sum(1).tolist() == [len(r) for r in rows] and mask[:, -1].all()
    with torch.no_grad():
        batched = embedding.mean_pool(decoder, input_ids, mask)
        for i, r in enumerate(rows):
            alone = embedding.mean_pool(decoder, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-4)
    # the mean is over real tokens only: equal to averaging the unpadded hidden states
    with torch.no_grad():
        h = decoder(input_ids=torch.tensor([rows[0]])).last_hidden_state[0]
    torch.testing.assert_close(batched[0], h.mean(0), atol=1e-5, rtol=1e-4)


def test_mean_pool_is_differentiable(tiny_lm):
    model, tokenizer = tiny_lm
    input_ids, mask = embedding.left_pad([tokenizer(t)["input_ids"] for t in TEXTS[:2]], tokenizer.pad_token_id)
    embedding.mean_pool(backbone.decoder_of(model), input_ids, mask).pow(2).sum().backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_embed_texts_keeps_original_order(tiny_lm):
    model, tokenizer = tiny_lm
    x = embedding.embed_texts(model, tokenizer, TEXTS, batch_size=4, progress=False)
    assert x.shape == (len(TEXTS), model.config.hidden_size) and x.dtype == np.float32
    perm = [3, 0, 5, 1, 4, 2]
    y = embedding.embed_texts(model, tokenizer, [TEXTS[i] for i in perm], batch_size=2, progress=False)
    np.testing.assert_allclose(y, x[perm], atol=1e-5)
    assert len({row.tobytes() for row in x}) == len(TEXTS)


def test_truncation_to_max_tokens(tiny_lm):
    model, tokenizer = tiny_lm
    long_text = " ".join(TEXTS * 5)
    x = embedding.embed_texts(model, tokenizer, [long_text], max_tokens=4, progress=False)
    first4 = tokenizer.decode(tokenizer(long_text)["input_ids"][:4])
    y = embedding.embed_texts(model, tokenizer, [first4], max_tokens=64, progress=False)
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_empty_text_names_the_entity(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(TTDSError, match="item 1: empty text"):
        embedding.embed_texts(model, tokenizer, ["ok", "  "], progress=False, label="item")


def _stage_inputs(tmp_path, tiny_lm, item_ids=None):
    model, tokenizer = tiny_lm
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = {"seed": 0, "model": {"path": str(folder), "num_layers": None, "dtype": "auto", "max_text_tokens": 16},
              "embed": {"batch_size": 2}}
    backbone_export.run(params, backbone_dir=tmp_path / "backbone")
    processed = tmp_path / "processed"
    processed.mkdir()
    ids = list(range(len(TEXTS))) if item_ids is None else item_ids
    pd.DataFrame({"item_id": ids[::-1], "text": [TEXTS[i] for i in range(len(ids))][::-1]}).to_parquet(
        processed / "items.parquet")
    pd.DataFrame({"user_id": [0, 1], "text": ["Super Mario Bros, Xbox One", "game"]}).to_parquet(
        processed / "users.parquet")
    return params, processed


def test_embed_stage_writes_contract_and_is_deterministic(tmp_path, tiny_lm):
    params, processed = _stage_inputs(tmp_path, tiny_lm)
    outs = []
    for run in range(2):
        out = tmp_path / f"emb{run}"
        embed.run(params, processed_dir=processed, out_dir=out, backbone_dir=tmp_path / "backbone",
                  metrics_path=tmp_path / f"embed{run}.json")
        outs.append(out)
    items, users = np.load(outs[0] / "items.npy"), np.load(outs[0] / "users.npy")
    meta = json.loads((outs[0] / "meta.json").read_text())
    assert items.shape == (len(TEXTS), 32) and users.shape == (2, 32)
    assert meta["dim"] == 32 and meta["n_items"] == len(TEXTS) and meta["n_users"] == 2
    # rows follow item_id even though the parquet is stored in reverse order
    model, tokenizer = tiny_lm
    np.testing.assert_allclose(items[2], embedding.embed_texts(model, tokenizer, [TEXTS[2]], progress=False)[0], atol=1e-5)
    for name in ("items.npy", "users.npy", "meta.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    assert json.loads((tmp_path / "embed0.json").read_text())["items"]["texts"] == len(TEXTS)


def test_embed_stage_rejects_gapped_ids(tmp_path, tiny_lm):
    params, processed = _stage_inputs(tmp_path, tiny_lm, item_ids=[0, 1, 2, 3, 4, 7])
    with pytest.raises(TTDSError, match="items.parquet.*item_id"):
        embed.run(params, processed_dir=processed, out_dir=tmp_path / "emb", backbone_dir=tmp_path / "backbone",
                  metrics_path=tmp_path / "embed.json")
