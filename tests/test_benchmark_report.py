"""The benchmark report keeps TTDS's per-user ranks and pairs a later run with them."""

import math

import pandas as pd
import pytest

from bench import benchmark_report
from ttds_core.errors import TTDSError
from ttds_core.io import write_parquet


def ranks(hits: list[int], targets: list[int] | None = None) -> pd.DataFrame:
    """One row per user, split and masking: rank 1 where `hits` says so, else outside the top 10."""
    targets = targets or list(range(len(hits)))
    return pd.concat([pd.DataFrame({"user_id": range(len(hits)), "split": split, "target": targets,
                                    "rank": [1 if h else 50 for h in hits], "masked": masked})
                      for split in ("test", "valid") for masked in (False, True)], ignore_index=True)


def test_earlier_run_is_paired_user_by_user(tmp_path):
    earlier = tmp_path / "benchmark-old"
    earlier.mkdir()
    write_parquet(earlier / "ttds_ranks.parquet", ranks([0] * 20))
    models = {name: {"ranks": ranks([0] * 20)} for name in ("SASRec", "Markov", "MostPop")}
    models["TTDS"] = {"ranks": ranks([1] * 10 + [0] * 10)}
    tests = benchmark_report.paired(models, benchmark_report.earlier_runs([str(earlier)]))
    assert set(tests) == {"SASRec", "Markov", "MostPop", "TTDS (benchmark-old)"}
    got = tests["TTDS (benchmark-old)"]["test"]
    assert (got["ndcg10_ours"], got["ndcg10_theirs"]) == (0.5, 0.0)
    assert (got["hits_only_ours"], got["hits_only_theirs"]) == (10, 0)
    assert got["mcnemar_p"] < 0.01


def test_earlier_run_on_other_targets_is_refused(tmp_path):
    earlier = tmp_path / "other-split"
    earlier.mkdir()
    write_parquet(earlier / "ttds_ranks.parquet", ranks([0] * 4, targets=[9, 9, 9, 9]))
    models = {name: {"ranks": ranks([0] * 4)} for name in ("SASRec", "Markov", "MostPop", "TTDS")}
    with pytest.raises(TTDSError, match="not the same split"):
        benchmark_report.paired(models, benchmark_report.earlier_runs([str(earlier)]))


def test_folder_without_ranks_is_one_line(tmp_path):
    with pytest.raises(TTDSError, match="no ttds_ranks.parquet"):
        benchmark_report.earlier_runs([str(tmp_path)])


def test_masking_effect_counts_targets_that_rise_with_the_history_masked():
    plain = [12, 2, None, 30, 11, 21, 10]
    masked = [3, 2, 15, 25, 10, 20, 10]
    # user 0: 12 -> 3 (rises, enters the top 10); 1: unchanged; 2: unranked -> 15 (rises);
    # 3: 30 -> 25, both beyond the depth of 20: unranked for every model, so no rise;
    # 4: 11 -> 10 (enters the top 10 at its edge); 5: 21 -> 20 (rises into the depth); 6: unchanged at 10
    users = list(range(len(plain)))
    frame = pd.concat([pd.DataFrame({"user_id": users, "split": "test", "target": users, "rank": plain, "masked": False}),
                       pd.DataFrame({"user_id": users[::-1], "split": "test", "target": users[::-1],
                                     "rank": masked[::-1], "masked": True})],  # another row order
                      ignore_index=True)
    got = benchmark_report.masking_effect({"SASRec": {"ranks": frame}}, depth=20)["SASRec"]
    assert got["target_rises"] == round(4 / 7, 4)
    assert got["enters_top10"] == round(2 / 7, 4)
    gain = lambda r: 1 / math.log2(r + 1)  # noqa: E731
    assert got["NDCG@10"] == round((gain(2) + gain(10)) / 7, 4)
    assert got["NDCG@10_masked"] == round((gain(3) + gain(2) + gain(10) + gain(10)) / 7, 4)


def test_masking_effect_refuses_ranks_of_other_users():
    frame = pd.DataFrame({"user_id": [0, 1], "split": "test", "target": [0, 1], "rank": [1, 1], "masked": [False, True]})
    with pytest.raises(TTDSError, match="same users"):
        benchmark_report.masking_effect({"SASRec": {"ranks": frame}})


def test_popularity_groups_read_the_masked_ranks_when_asked():
    # six users, targets 0..5 seen 0..5 times in training: two users per third
    frame = pd.concat([pd.DataFrame({"user_id": range(6), "split": "test", "target": range(6),
                                     "rank": rank, "masked": masked})
                       for rank, masked in (([50, 50, 50, 50, 1, 1], False), ([1, 50, 50, 50, 1, 1], True))],
                      ignore_index=True)
    counts = pd.Series({item: item for item in range(6)})
    plain = benchmark_report.by_popularity({"SASRec": {"ranks": frame}}, counts)["SASRec"]
    masked = benchmark_report.by_popularity({"SASRec": {"ranks": frame}}, counts, masked=True)["SASRec"]
    assert [g["NDCG@10"] for g in plain.values()] == [0.0, 0.0, 1.0]
    assert [g["NDCG@10"] for g in masked.values()] == [0.5, 0.0, 1.0]


def test_first_code_groups_split_each_models_mean_between_new_and_copied_first_codes():
    # users 0-1: target's first code new to them; users 2-3: an earlier item has it
    sequences = pd.DataFrame({"user_id": [0, 1, 2, 3],
                              "items": [[10, 11, 12, 13], [11, 10, 13, 12], [10, 12, 11, 14], [14, 11, 13, 10]]})
    codes = {10: [0, 1], 11: [1, 0], 12: [2, 3], 13: [3, 2], 14: [0, 2]}
    shares = benchmark_report.history_first_codes(sequences, codes, "test")
    assert shares == {0: False, 1: False, 2: True, 3: True}
    assert benchmark_report.history_first_codes(sequences, codes, "valid") == {0: False, 1: False, 2: False, 3: False}
    frame = pd.DataFrame({"user_id": range(4), "split": "test", "target": [13, 12, 14, 10],
                          "rank": [1, 50, 1, 1], "masked": False})
    got = benchmark_report.by_history_first_code({"TTDS": {"ranks": frame}}, shares)["TTDS"]
    assert got["new_first_code"] == {"users": 2, "NDCG@10": 0.5, "part_of_mean": 0.25}
    assert got["first_code_in_history"] == {"users": 2, "NDCG@10": 1.0, "part_of_mean": 0.5}
    with pytest.raises(TTDSError, match="user 0 has no sequence"):
        benchmark_report.by_history_first_code({"TTDS": {"ranks": frame}}, {1: True})
