"""The benchmark report keeps TTDS's per-user ranks and pairs a later run with them."""

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
