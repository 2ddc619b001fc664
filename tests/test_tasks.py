"""Task mixture: sample construction, rendering with the current SID tables, no leakage,
and the variants' task combinations."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from ttds_core import tasks, variants
from ttds_core.config import load_params
from ttds_core.errors import TTDSError
from ttds_core.train_config import TrainConfig

from test_finetune_helpers import REPO


def _data(timestamps: bool = False) -> tasks.TaskData:
    # user 0: 1 2 3 4 | valid 5 | test 6 ; user 1: 3 1 4 | valid 2 | test 0
    seqs = pd.DataFrame({"user_id": [0, 1], "items": [[1, 2, 3, 4, 5, 6], [3, 1, 4, 2, 0]]})
    items = pd.DataFrame({"item_id": range(7), "title": [f"title &amp; {i}" for i in range(7)]})
    rows = []
    for u, seq in zip(seqs["user_id"], seqs["items"]):
        for p, i in enumerate(seq):
            split = "train" if p < len(seq) - 2 else ("valid" if p == len(seq) - 2 else "test")
            rows.append({"user_id": u, "item_id": i, "pos": p, "split": split,
                         "timestamp": (100 * u + p) if timestamps else None,
                         "review": f"review {u}-{i}", "summary": None})
    inter = pd.DataFrame(rows)
    return tasks.build_task_data(seqs, items, inter, max_history=2, max_next_user=1)


def _sids(n_items=7, n_users=2, users=True) -> tasks.SidTables:
    return tasks.SidTables(item=[f"<a_{i}><b_0>" for i in range(n_items)],
                           user=[f"<ua_{u}><ub_1>" for u in range(n_users)] if users else None)


def test_seqrec_one_sample_per_training_prefix():
    data = _data()
    samples = tasks.build_samples(data, {"seqrec": 1.0}, seed=0)
    # user 0 trains on [1 2 3 4] -> targets 2 3 4; user 1 on [3 1 4] -> targets 1 4
    assert sorted((s.key, s.pos) for s in samples) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    prompt, target = tasks.render(tasks.Sample("seqrec", 0, 3), data, _sids(), template=0)
    assert target == "<a_4><b_0>"
    # history = the last max_history (2) items before the target, user SID present
    assert "<a_2><b_0>, <a_3><b_0>" in prompt and "<a_1><b_0>" not in prompt
    assert "<ua_0><ub_1>" in prompt


@pytest.mark.parametrize("length,max_history", [(1, 20), (2, 20), (21, 20), (22, 20), (60, 20), (9, 2), (30, 1)])
def test_packed_windows_train_every_prefix_target_once(length, max_history):
    """Every target of the prefix format (item k >= 1) is a label in exactly one window;
    in the first window behind exactly the prefix history, later behind at least
    max_history - S + 1 and at most max_history items."""
    seen = []
    stride = (max_history + 1) // 2
    for e in tasks.window_ends(length, max_history):
        start = tasks.window_start(e, max_history)
        for k in tasks.window_targets(e, max_history):
            assert start < k < e
            if k <= max_history:
                assert k - start == k
            else:
                assert max_history - stride + 1 <= k - start <= max_history
            seen.append(k)
    assert sorted(seen) == list(range(1, length))


def test_packed_seqrec_row_is_the_items_in_order_closed_by_eos():
    seqs = pd.DataFrame({"user_id": [0, 1], "items": [[1, 2, 3, 4, 5, 6], [3, 1, 4, 2, 0]]})
    items = pd.DataFrame({"item_id": range(7), "title": [f"t{i}" for i in range(7)]})
    data = tasks.build_task_data(seqs, items, None, max_history=2, max_next_user=1, packed=True)
    samples = tasks.build_samples(data, {"seqrec": 1.0}, seed=0)
    # user 0 trains on [1 2 3 4]: the first 3 items [1 2 3] (targets 2, 3), then [2 3 | 4];
    # user 1 on [3 1 4]: one window
    assert [(s.key, s.pos) for s in samples] == [(0, 3), (0, 4), (1, 3)]
    prompt, response = tasks.render(samples[0], data, _sids(), 0, eos="<E>")
    assert prompt.endswith(":\n<a_1><b_0><E>") and "<ua_0><ub_1>" in prompt
    assert response == "<a_2><b_0><E><a_3><b_0>"  # the collator closes the last SID with EOS
    prompt, response = tasks.render(samples[1], data, _sids(), 0, eos="<E>")
    assert prompt.endswith(":\n<a_2><b_0><E><a_3><b_0><E>") and response == "<a_4><b_0>"
    # evaluation asks for the continuation of the same kind of prompt
    from ttds_core.prompts import seqrec_packed, seqrec_prompt
    assert seqrec_prompt(["<a_3><b_0>", "<a_4><b_0>"], "<ua_0><ub_1>", 0, True, "<E>").endswith(
        "<a_3><b_0><E><a_4><b_0><E>")
    with pytest.raises(TTDSError, match="tasks.seqrec_format"):
        seqrec_packed({"tasks": {"seqrec_format": "stacked"}})


def test_validation_and_test_items_never_reach_training():
    data = _data()
    held_out = {0: {5, 6}, 1: {2, 0}}  # each user's validation and test items
    for u, seq in data.train_seqs.items():
        assert not held_out[u] & set(seq)
    assert (0, 5) not in data.reviews and (1, 2) not in data.reviews and (0, 6) not in data.reviews
    samples = tasks.build_samples(data, {"seqrec": 1.0, "preference": 1.0, "next_user": 1.0}, seed=0)
    for s in samples:
        prompt, response = tasks.render(s, data, _sids(), template=0)
        if s.key == 0 and s.task != "next_user":
            assert "<a_5>" not in prompt + response and "<a_6>" not in prompt + response
        assert "review 0-5" not in response and "review 1-2" not in response


def test_preference_uses_train_review_else_title():
    data = _data()
    data.reviews.pop((0, 3))
    _, with_review = tasks.render(tasks.Sample("preference", 0, 1), data, _sids(), 0)
    _, without = tasks.render(tasks.Sample("preference", 0, 2), data, _sids(), 0)
    assert with_review == "review 0-2"
    assert without == "title & 3"  # HTML entities cleaned


def test_next_user_order_timestamps_and_proxy():
    # item 4: user 0 bought it at train position 3 of 4, user 1 at position 2 of 3
    proxy = _data(timestamps=False)
    assert proxy.item_users[4] == [1, 0]  # 2/3 < 3/4: relative-position proxy
    stamped = _data(timestamps=True)
    assert stamped.item_users[4] == [0, 1]  # timestamps 3 < 102
    prompt, target = tasks.render(tasks.Sample("next_user", 4, 1), stamped, _sids(), 0)
    assert "<a_4><b_0>" in prompt and "<ua_0><ub_1>" in prompt and target == "<ua_1><ub_1>"


def test_mixture_weights_are_ratios_of_seqrec_count():
    data = _data()
    n_seq = 5
    samples = tasks.build_samples(data, {"seqrec": 1.0, "preference": 0.4}, seed=3)
    counts = {t: sum(s.task == t for s in samples) for t in ("seqrec", "preference")}
    assert counts == {"seqrec": n_seq, "preference": 2}
    assert samples == tasks.build_samples(data, {"seqrec": 1.0, "preference": 0.4}, seed=3)
    half = tasks.build_samples(data, {"seqrec": 0.6}, seed=3)
    assert len(half) == 3


def test_bad_weight_is_one_line_error():
    with pytest.raises(TTDSError, match="tasks.weights.seqrec"):
        tasks.enabled_tasks({"seqrec": 0.0}, True, True)


def test_render_follows_the_current_tables():
    data = _data()
    s = tasks.Sample("seqrec", 1, 2)
    before = tasks.render(s, data, _sids(), 0)
    moved = _sids()
    moved.item[4] = "<a_9><b_9><p_0>"
    after = tasks.render(s, data, moved, 0)
    assert before[1] == "<a_4><b_0>" and after[1] == "<a_9><b_9><p_0>"


@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_variants_give_the_intended_combination(name):
    params = variants.apply(load_params(REPO / "params.yaml"), name)
    cfg = TrainConfig.from_params(params)
    enabled = tasks.enabled_tasks(params["tasks"]["weights"], params["tasks"]["high_order"], params["tower"]["user"])
    user_tower = name not in ("STDS", "STDS-DM")
    assert ("user" in cfg.towers) == user_tower
    assert cfg.dynamic == (name not in ("TTSS", "TT-SLSH", "TT-SR"))
    assert cfg.dm_vae == (name not in ("TTDS-DM", "STDS-DM"))
    if name == "TTDS-HO":
        assert set(enabled) == {"seqrec"}
    elif user_tower:
        assert set(enabled) == {"seqrec", "next_user", "preference"}
    else:
        assert set(enabled) == {"seqrec", "preference"}
    # single tower: no user token can appear in any prompt
    data = _data()
    sids = _sids(users=user_tower)
    samples = tasks.build_samples(data, enabled, seed=0)
    for k, s in enumerate(samples):
        prompt, response = tasks.render(s, data, sids, template=k)
        assert bool(re.search(r"<u[a-z]_\d+>", prompt + response)) == (user_tower and (
            s.task == "next_user" or "<ua_" in prompt))
        if not user_tower:
            assert "<u" not in prompt and "<u" not in response


def test_validation_sample_is_fixed_and_uses_validation_target():
    seqs = pd.DataFrame({"user_id": range(5), "items": [[1, 2, 3, 4]] * 5})
    a = tasks.validation_samples(seqs, 3, seed=1)
    assert a == tasks.validation_samples(seqs, 3, seed=1)
    assert len(a) == 3 and all(h == [1, 2] and t == 3 for _, h, t in a)
    assert np.unique([u for u, _, _ in a]).size == 3


def test_ts_align_describes_a_prefix_by_the_words_its_items_share():
    titles = {0: "Racing Wheel Pro", 1: "Racing Pedals for the Wheel", 2: "Puzzle Quest", 3: "Quest of Puzzles"}
    sids = ["<a_1><b_0><c_5>", "<a_1><b_2><c_5>", "<a_7><b_0><c_1>", "<a_7><b_0><c_2>"]
    words = tasks.prefix_words(sids, titles, depth=2, k=2)
    assert words["<a_1>"] == "racing, wheel"          # shared by both items under <a_1>
    assert words["<a_7><b_0>"] == "quest, puzzle"     # quest in both; puzzle and puzzles once each: alphabetical
    assert "<a_1><b_0><c_5>" not in words             # depth 2: no full SIDs
    assert tasks.title_words("The NEW Game of the Year - 2 pack") == ["year"]  # stopwords, short words


def test_ts_align_task_follows_the_switch_and_the_current_sid_table():
    data = _data()
    data.align_depth = 1
    with pytest.raises(TTDSError, match="tasks.weights.ts_align"):
        tasks.enabled_tasks({"seqrec": 1.0}, False, True, ts_align=True)
    assert "ts_align" not in tasks.enabled_tasks({"seqrec": 1.0, "ts_align": 0.5}, False, True)
    weights = tasks.enabled_tasks({"seqrec": 1.0, "ts_align": 1.0}, False, True, ts_align=True)
    samples = tasks.build_samples(data, weights, seed=0)
    align = [s for s in samples if s.task == "ts_align"]
    assert len(align) == 5  # round(1.0 x 5 seqrec samples) of the 7 (depth, item) pairs
    sample = tasks.Sample("ts_align", 1, 3)
    prompt, words = tasks.render(sample, data, _sids(), template=0)
    assert "<a_3>" in prompt and "<b_0>" not in prompt and words == "title"  # '&amp;' cleaned, digits < 3 chars
    moved = tasks.SidTables(item=[f"<a_{i % 2}><b_0>" for i in range(7)])  # after a refresh: new prefixes
    prompt, _ = tasks.render(sample, data, moved, template=0)
    assert "<a_1>" in prompt


def test_a_new_task_is_one_class_and_one_registry_line(monkeypatch):
    """The mixture, the template count, bucketing and rendering all go through the registry."""

    class ItemTitle(tasks.Task):
        name = "item_title"

        def pool(self, data):
            return [tasks.Sample(self.name, i, i) for i in sorted(data.titles)]

        def render(self, sample, data, sids, template, eos):
            return f"What is {sids.item[sample.key]}?", data.titles[sample.key]

        def n_templates(self):
            return 1

    monkeypatch.setitem(tasks.REGISTRY, "item_title", ItemTitle())
    data = _data()
    weights = tasks.enabled_tasks({"seqrec": 1.0, "item_title": 0.5}, high_order=True, user_tower=True)
    assert weights["item_title"] == 0.5
    assert tasks.enabled_tasks({"seqrec": 1.0, "item_title": 0.5}, high_order=False, user_tower=True) == {"seqrec": 1.0}
    samples = tasks.build_samples(data, weights, seed=0)
    added = [s for s in samples if s.task == "item_title"]
    assert added and tasks.n_templates("item_title") == 1
    assert tasks.render(added[0], data, _sids(), 0) == (f"What is <a_{added[0].key}><b_0>?", f"title & {added[0].key}")
    assert tasks.approx_length(added[0], data) == min(added[0].pos, data.max_history)


def test_user_token_dropout_removes_only_the_prompts_user_sid():
    """`drop_user` renders seqrec and preference prompts without the user SID (history and
    target unchanged); a next-user sample, whose target is a user SID, keeps the users."""
    data = _data()
    for name in ("seqrec", "preference"):
        sample = tasks.Sample(name, 0, 3)
        (shown, target), (dropped, target2) = (tasks.render(sample, data, _sids(), 0, drop_user=d)
                                               for d in (False, True))
        assert "<ua_0><ub_1>" in shown and "<ua_0><ub_1>" not in dropped
        assert target == target2 and dropped == shown.replace(" <ua_0><ub_1>", "")
    nu = tasks.Sample("next_user", 3, 1)
    assert tasks.render(nu, data, _sids(), 0, drop_user=True) == tasks.render(nu, data, _sids(), 0)


def test_user_token_drops_are_seeded_per_epoch_and_off_by_default():
    from ttds_core.batches import user_token_drops
    cfg = TrainConfig.from_params(load_params(REPO / "params.yaml"))
    assert cfg.user_dropout == 0.0 and user_token_drops(1000, cfg, 0) is None
    cfg.user_dropout = 0.5
    a, b, c = user_token_drops(4000, cfg, 0), user_token_drops(4000, cfg, 0), user_token_drops(4000, cfg, 1)
    assert (a == b).all() and not (a == c).all() and 0.45 < a.mean() < 0.55


def test_user_token_dropout_without_user_tower_is_one_line_error():
    params = load_params(REPO / "params.yaml")
    params["tower"]["user"] = False
    params["train"]["user_token_dropout"] = 0.5
    with pytest.raises(TTDSError, match="user_token_dropout.*tower.user"):
        TrainConfig.from_params(params)
