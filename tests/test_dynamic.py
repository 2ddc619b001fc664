"""SID rows (vocabulary extension, tied codebooks, SA-Init) and the index refresh."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ttds_core import dynamic, tasks
from ttds_core.errors import TTDSError
from ttds_core.quantize import RQVAE
from ttds_core.vocab import extend_vocabulary

torch.set_num_threads(1)


def _extended(model, tok, tie: bool, length=2, size=4, max_suffix=3, dim_code=8):
    from peft import LoraConfig, get_peft_model

    layouts = dynamic.make_layouts(["item", "user"], length, size, max_suffix)
    ids = extend_vocabulary(model, tok, [t for lay in layouts for t in lay.tokens()])
    torch.manual_seed(0)
    qs = {t: RQVAE(model.config.hidden_size, code_dim=dim_code, length=length, codebook_size=size,
                   widths=[model.config.hidden_size, dim_code]) for t in ("item", "user")}
    sid = dynamic.SidVocab(ids[0], layouts, model.config.hidden_size, tied_head=dynamic.is_tied(model),
                           quantizers=qs, tie_codebooks=tie)
    dynamic.init_rows(sid, 0.02, torch.Generator().manual_seed(0))
    lm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"))
    dynamic.install(lm, sid)
    return lm, sid, ids


@pytest.mark.parametrize("tie", [False, True])
def test_extension_keeps_original_vocabulary_outputs(tiny_lm, tie):
    model, tok = tiny_lm
    n_orig = len(tok)
    ids = torch.tensor([tok("Please predict the most suitable item for the user")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    lm, sid, new_ids = _extended(model, tok, tie)
    lm.eval()
    with torch.no_grad():
        after = lm(input_ids=ids).logits
    assert new_ids[0] == n_orig and after.shape[-1] >= n_orig + sid.n_rows
    torch.testing.assert_close(after[..., :n_orig], before, rtol=0, atol=1e-5)
    # the new columns are the SID rows, i.e. really computed from them
    hidden = lm.get_base_model().model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(after[..., sid.first_id:sid.last_id], hidden @ sid.out_weight().T)


def test_only_lora_and_sid_rows_train(tiny_lm):
    model, tok = tiny_lm
    lm, sid, _ = _extended(model, tok, tie=False)
    frozen = lm.get_input_embeddings().base.weight
    assert not frozen.requires_grad
    names = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and any(n.endswith(".sid.rows") for n in names)
    # every backbone weight is frozen: what trains is LoRA and the SidVocab module
    assert all("lora_" in n or ".sid." in n for n in names)


def test_tied_codebooks_receive_the_recommendation_gradient(tiny_lm):
    model, tok = tiny_lm
    lm, sid, ids = _extended(model, tok, tie=True)
    lm.train()
    assert set(sid.proj) == {"item", "user"}
    params = [sid.rows, *sid.proj.parameters(), *sid.quantizers.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.5)
    prompt = torch.tensor([tok("the next item")["input_ids"] + [ids[1], ids[5]]])
    book = sid.quantizers["item"].codebooks
    for _ in range(2):  # the projection starts at zero: step 1 moves it, step 2 reaches the codebooks
        opt.zero_grad()
        logits = lm(input_ids=prompt[:, :-1]).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, prompt[:, -1])
        loss.backward()
        opt.step()
    assert book.grad is not None and book.grad.abs().sum() > 0
    # the embedding of item code token (level 0, code 1) is the projected codebook row
    lay = sid.layout("item")
    expect = sid.rows[1] + sid.proj["item"](book[0, 1])
    torch.testing.assert_close(sid.in_weight()[lay.offset + 1], expect)


def test_semantic_init_is_mean_text_embedding_of_entities_under_the_token(tiny_lm):
    model, tok = tiny_lm
    layouts = dynamic.make_layouts(["item"], 2, 3, 2)
    ids = extend_vocabulary(model, tok, layouts[0].tokens())
    sid = dynamic.SidVocab(ids[0], layouts, model.config.hidden_size, tied_head=True)
    texts = ["Mario game", "switch cable", "great fun"]
    emb = dynamic.token_text_embeddings(model, tok, texts, max_tokens=8)
    codes = np.array([[0, 2], [0, 1], [1, 1]])
    dynamic.init_rows(sid, 0.02, torch.Generator().manual_seed(0), {"item": (codes, emb)})
    torch.testing.assert_close(sid.rows[0], (emb[0] + emb[1]) / 2)  # <a_0>: entities 0, 1
    torch.testing.assert_close(sid.rows[1], emb[2])                  # <a_1>
    torch.testing.assert_close(sid.rows[3 + 1], (emb[1] + emb[2]) / 2)  # <b_1>
    torch.testing.assert_close(sid.rows[3 + 2], emb[0])                 # <b_2>
    assert sid.rows[2].abs().max() < 0.2  # <a_2> unused: random N(0, 0.02)


def test_refresh_changes_sids_when_the_backbone_changes_and_targets_follow(tiny_lm):
    model, tok = tiny_lm
    tok.padding_side = "left"
    texts = [f"Mario game number {i} with a controller" for i in range(10)]
    from ttds_core.embedding import embed_texts
    from ttds_core.quantize import LSHQuantizer

    x0 = embed_texts(model, tok, texts, batch_size=4, max_tokens=16, progress=False)
    q = LSHQuantizer(x0.shape[1], length=2, codebook_size=4, seed=0)
    q.fit_normalisation(torch.as_tensor(x0))
    lay = dynamic.TowerLayout("item", 0, 2, 4, 10)
    table0 = dynamic.make_table("item", np.arange(10), dynamic.quantize_codes(q, x0))
    kwargs = {"batch_size": 4, "max_tokens": 16, "device": "cpu", "progress": False}
    # same backbone: same SIDs (nothing moves without a reason)
    x1, same, churn0 = dynamic.refresh_tower(model, tok, q, texts, table0, lay, kwargs)
    assert churn0["churn"] == 0.0 and same["sid"].tolist() == table0["sid"].tolist()
    np.testing.assert_allclose(x1, x0, atol=1e-5)
    # a changed backbone re-embeds differently, so SIDs move
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x2, moved, churn1 = dynamic.refresh_tower(model, tok, q, texts, table0, lay, kwargs)
    assert churn1["churn"] > 0 and not np.allclose(x2, x0)
    assert churn1["churn_level_1"] <= churn1["churn_level_2"] == churn1["churn"]  # prefix churn grows
    # training targets are rendered from the current table
    seqs = pd.DataFrame({"user_id": [0], "items": [[0, 1, 2, 3, 4]]})
    items = pd.DataFrame({"item_id": range(10), "title": texts})
    changed = int(np.flatnonzero(moved["sid"].to_numpy() != table0["sid"].to_numpy())[0])
    seqs.loc[0, "items"] = [(changed + 1) % 10, changed, 5, 6, 7]
    data = tasks.build_task_data(seqs, items, None, max_history=5, max_next_user=3)
    sample = tasks.Sample("seqrec", 0, 1)
    old_target = tasks.render(sample, data, tasks.SidTables(item=table0["sid"].tolist()), 0)[1]
    new_target = tasks.render(sample, data, tasks.SidTables(item=moved["sid"].tolist()), 0)[1]
    assert old_target == table0["sid"][changed] and new_target == moved["sid"][changed] != old_target


def test_refresh_keeps_the_table_when_suffixes_run_out(tiny_lm):
    model, tok = tiny_lm
    tok.padding_side = "left"
    from ttds_core.quantize import RandomQuantizer

    q = RandomQuantizer(model.config.hidden_size, length=1, codebook_size=2, seed=0)
    lay = dynamic.TowerLayout("item", 0, 1, 2, 2)  # 2 codes, 2 suffixes: 6 entities cannot fit
    old = dynamic.make_table("item", np.arange(6), np.zeros((6, 1), dtype=np.int64) + np.arange(6)[:, None] % 2)
    texts = [f"item {i}" for i in range(6)]
    _, table, churn = dynamic.refresh_tower(model, tok, q, texts, old, lay,
                                            {"batch_size": 4, "max_tokens": 8, "device": "cpu", "progress": False})
    assert table is old and churn["churn"] == 0.0


def test_sticky_codes_keep_old_codes_inside_the_margin():
    from ttds_core.quantize import RQVAE

    torch.manual_seed(0)
    q = RQVAE(16, code_dim=8, length=3, codebook_size=8, widths=[16, 8])
    x = torch.randn(200, 16)
    q.fit_normalisation(x)
    q.init_kmeans(x, iters=5)
    nearest = q.codes(x)
    # margin 0 is plain nearest-code quantisation, whatever the previous codes
    np.testing.assert_array_equal(q.sticky_codes(x, torch.zeros_like(nearest), 0.0), nearest)
    # previous = nearest: nothing moves at any margin
    np.testing.assert_array_equal(q.sticky_codes(x, nearest, 0.5), nearest)
    # a perturbed input moves fewer codes the larger the margin
    moved = x + 0.3 * torch.randn_like(x)
    changed = [float((q.sticky_codes(moved, nearest, m) != nearest).any(1).float().mean())
               for m in (0.0, 0.2, 0.6)]
    assert changed[0] > changed[1] > changed[2]
    with pytest.raises(TTDSError, match="refresh_margin"):
        q.sticky_codes(x, nearest, 1.0)


def test_lsh_sticky_codes_flip_only_bits_that_crossed_by_more_than_the_margin():
    from ttds_core.quantize import LSHQuantizer

    torch.manual_seed(0)
    q = LSHQuantizer(16, length=3, codebook_size=16, seed=1)
    x = torch.randn(300, 16)
    q.fit_normalisation(x)
    hashed = q.codes(x)
    np.testing.assert_array_equal(q.sticky_codes(x, torch.zeros_like(hashed), 0.0), hashed)
    np.testing.assert_array_equal(q.sticky_codes(x, hashed, 0.5), hashed)
    moved = x + 0.3 * torch.randn_like(x)
    sticky = q.sticky_codes(moved, hashed, 0.2)
    changed = [float((q.sticky_codes(moved, hashed, m) != hashed).any(1).float().mean()) for m in (0.0, 0.2, 0.6)]
    assert changed[0] > changed[1] > changed[2]
    # bit by bit: a flipped bit's projection is beyond 0.2 std on its new side; a kept
    # bit that plain hashing would flip lies inside the band
    proj = torch.einsum("bd,mkd->bmk", q.normalise(moved), q.hyperplanes)
    band = 0.2 * proj.std(0, keepdim=True)
    bit = lambda c: (c[:, :, None] & q.weights).ne(0)  # noqa: E731
    flipped = bit(sticky) != bit(hashed)
    assert (proj.abs()[flipped] > band.expand_as(proj)[flipped]).all()
    held = (bit(q.codes(moved)) != bit(hashed)) & ~flipped
    assert held.any() and (proj.abs()[held] <= band.expand_as(proj)[held]).all()
    with pytest.raises(TTDSError, match="refresh_margin"):
        q.sticky_codes(x, hashed, 1.0)


@pytest.mark.parametrize("softmax", ["vocab", "sid"])
def test_response_loss_scores_only_the_labelled_positions(tiny_lm, softmax):
    """The loss of `model.response_loss` (logits only where a label is) equals cross-
    entropy over the full forward's logits: the whole vocabulary, or for SID responses
    the SID columns + EOS."""
    import torch.nn.functional as F

    from ttds_core.model import response_loss

    model, tok = tiny_lm
    lm, sid, ids = _extended(model, tok, tie=True)
    lm.eval()
    eos = tok.eos_token_id
    prompt = tok("history of the user", add_special_tokens=False)["input_ids"]
    sid_resp = [ids[0], ids[5], eos]                                  # a SID response
    text_resp = tok("a title", add_special_tokens=False)["input_ids"] + [eos]  # a text response
    rows = [prompt + sid_resp, prompt[:3] + text_resp]
    r = max(len(sid_resp), len(text_resp))
    width = max(len(x) for x in rows)
    input_ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    labels = torch.full((2, r), -100)
    for j, (row, resp) in enumerate(zip(rows, [sid_resp, text_resp])):
        input_ids[j, width - len(row):] = torch.tensor(row)
        mask[j, width - len(row):] = 1
        labels[j, r - len(resp):] = torch.tensor(resp)
    with torch.no_grad():
        loss, correct = response_loss(lm, sid, eos, input_ids, mask, labels, softmax)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = lm(input_ids=input_ids, attention_mask=mask, position_ids=pos).logits[:, width - r - 1:width - 1]
    terms = []
    for j in range(2):
        for k in range(r):
            y = int(labels[j, k])
            if y == -100:
                continue
            row = logits[j, k]
            if softmax == "sid" and j == 0:
                cols = list(range(sid.first_id, sid.last_id)) + [eos]
                terms.append(F.cross_entropy(row[cols][None], torch.tensor([cols.index(y)])))
            else:
                terms.append(F.cross_entropy(row[None], torch.tensor([y])))
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-4, atol=1e-5)
    assert correct.shape == labels.shape and bool(correct[labels == -100].all())
