"""HR@K / NDCG@K from 1-based ranks, against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ttds_core.metrics import hit_rate, metric_table, ndcg, rank_of


def test_target_at_rank_one():
    assert hit_rate([1], 1) == 1.0
    assert ndcg([1], 5) == 1.0  # 1 / log2(2)


def test_target_at_rank_k_counts_and_just_beyond_does_not():
    assert hit_rate([5], 5) == 1.0 and hit_rate([6], 5) == 0.0
    assert ndcg([5], 5) == pytest.approx(1 / math.log2(6))  # 0.38685
    assert ndcg([6], 5) == 0.0
    assert ndcg([10], 10) == pytest.approx(1 / math.log2(11))  # 0.28906


def test_missing_ranks_are_misses():
    for missing in (None, float("nan"), 0, np.nan):
        assert hit_rate([missing], 10) == 0.0
        assert ndcg([missing], 10) == 0.0


def test_table_averages_over_users():
    ranks = [1, 3, None, 7, 12]
    table = metric_table(ranks, (1, 5, 10))
    assert table["HR@1"] == pytest.approx(1 / 5)
    assert table["HR@5"] == pytest.approx(2 / 5)
    assert table["HR@10"] == pytest.approx(3 / 5)
    assert table["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 5)  # (1 + 0.5) / 5 = 0.3
    assert table["NDCG@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(8)) / 5)  # + 1/3
    assert set(table) == {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"}


def test_empty_and_rank_of():
    assert hit_rate([], 5) == 0.0 and ndcg([], 5) == 0.0
    assert rank_of(7, [3, 7, 9]) == 2
    assert rank_of(4, [3, 7, 9]) is None
