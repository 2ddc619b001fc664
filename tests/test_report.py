"""`ttds report`: tables, chart, experiment parsing and the paired significance test."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ttds_core.errors import TTDSError
from ttds_core.report import (ablation_significance, experiments_of_revs, paired_test, parse_exp_show,
                               provenance_section, report_cli)


def _metrics(scale: float, users: int = 50) -> dict:
    table = {"HR@1": 0.02 * scale, "HR@5": 0.05 * scale, "HR@10": 0.08 * scale,
             "NDCG@5": 0.035 * scale, "NDCG@10": 0.045 * scale}
    return {"test": table, "valid": table, "test_masked": {k: v * 1.1 for k, v in table.items()},
            "valid_masked": table, "users": users}


def _ranks(ranks_by_user: dict[int, int], targets: dict[int, int]) -> pd.DataFrame:
    rows = []
    for split in ("valid", "test"):
        for masked in (False, True):
            for u, r in ranks_by_user.items():
                rows.append({"user_id": u, "split": split, "target": targets[u],
                             "rank": None if r is None else max(1, r - int(masked)), "masked": masked})
    df = pd.DataFrame(rows)
    df["rank"] = df["rank"].astype("Int64")
    return df


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "metrics" / "baselines").mkdir(parents=True)
    for name, scale in (("mostpop", 0.5), ("sasrec", 1.0), ("gru4rec", 0.9)):
        (tmp_path / "metrics" / "baselines" / f"{name}.json").write_text(json.dumps(_metrics(scale)))
    rng = np.random.default_rng(0)
    users = range(200)
    targets = {u: int(rng.integers(0, 500)) for u in users}
    base_ranks = {u: int(rng.integers(1, 60)) for u in users}
    # TTDS is clearly better on most users; some ranks missing (outside the beam)
    ttds_ranks = {u: (None if u % 17 == 0 else max(1, r // 4)) for u, r in base_ranks.items()}
    (tmp_path / "data" / "baselines" / "sasrec").mkdir(parents=True)
    _ranks(base_ranks, targets).to_parquet(tmp_path / "data" / "baselines" / "sasrec" / "ranks.parquet")
    (tmp_path / "data" / "eval").mkdir(parents=True)
    _ranks(ttds_ranks, targets).to_parquet(tmp_path / "data" / "eval" / "ranks.parquet")
    exps = {"ttds": _metrics(1.3), "ttds-ho": _metrics(1.2), "tt-sr": _metrics(0.4)}
    (tmp_path / "exps.json").write_text(json.dumps(exps))
    return tmp_path, targets, base_ranks, ttds_ranks


def _report(root, experiments):
    return report_cli({"data": {"name": "Games", "max_users": 1500}}, out=str(root / "docs" / "results.md"),
                      experiments=str(experiments), metrics_dir=root / "metrics" / "baselines",
                      eval_path=root / "metrics" / "eval.json", eval_ranks=root / "data" / "eval" / "ranks.parquet",
                      baseline_dir=root / "data" / "baselines", preprocess_path=root / "metrics" / "preprocess.json")


def test_report_renders_tables_chart_and_significance(workspace):
    root = workspace[0]
    out = _report(root, root / "exps.json")
    text = out.read_text()
    png = root / "docs" / "results.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for heading in ("Table 1", "Table 2", "Table 3", "Significance"):
        assert heading in text
    assert text.count("history masked") >= 3 and "unmasked" in text
    # our numbers: TTDS test NDCG@10 = 0.045 * 1.3; improvement over best baseline (sasrec) = +30%
    assert "| **TTDS** | 0.0260 |" in text and "+30.0%" in text
    # paper numbers for Games sit beside ours; TTDS-HO row has our value and the paper's
    assert "0.0597" in text and "| TTDS-HO | tasks.high_order=False | 0.0240 |" in text
    # variants that were not run show a dash, not a number
    assert "| STDS | tower.user=False | — |" in text
    sig = text.split("## Significance")[1]
    assert "| test | SASRec | 200 |" in sig and "| test_masked | SASRec | 200 |" in sig
    how = text.split("## How these numbers were produced")[1]
    assert "| TTDS | `make repro`" in how and "`scripts/grid.sh --variant TTDS-HO`" in how


def test_parse_exp_show_layout():
    payload = [
        {"rev": "workspace", "name": None, "data": {"metrics": {"metrics/eval.json": {"data": _metrics(1.0)}}},
         "experiments": None},
        {"rev": "abc", "name": "main", "data": {"metrics": {"metrics/eval.json": {"error": {"type": "x"}}}},
         "experiments": [{"name": "ttds-ho", "executor": None, "revs": [
             {"rev": "def", "name": "ttds-ho", "data": {"metrics": {"metrics/eval.json": {"data": _metrics(2.0)}}},
              "experiments": None}]}]},
    ]
    runs = parse_exp_show(payload)
    assert set(runs) == {"workspace", "ttds-ho"}
    assert runs["ttds-ho"]["test"]["HR@10"] == pytest.approx(0.16)


def _exp_show_payload(commit: str, base: dict, experiments: dict[str, dict]) -> list:
    """`dvc exp show --json --rev <commit>` output: the workspace, the commit, its experiments."""
    return [
        {"rev": "workspace", "name": None, "data": {"metrics": {"metrics/eval.json": {"data": _metrics(9.0)}}},
         "experiments": None},
        {"rev": commit, "name": "main", "data": {"metrics": {"metrics/eval.json": {"data": base}}},
         "experiments": [{"name": name, "executor": None, "revs": [
             {"rev": name + "sha", "name": name, "data": {"metrics": {"metrics/eval.json": {"data": m}}},
              "experiments": None}]} for name, m in experiments.items()]},
    ]


def test_experiments_of_several_baseline_commits_combine_only_when_their_ttds_agrees():
    base = _metrics(1.0)
    old = _exp_show_payload("aaa", base, {"ttss": _metrics(0.9), "ttds-ho": _metrics(0.8)})
    new = _exp_show_payload("bbb", {**base, "seconds": 816.1}, {"stds": _metrics(0.7)})  # timings may differ
    runs, revs = experiments_of_revs({"aaa": old, "bbb": new})
    # the baseline commits' TTDS metrics are the TTDS row, not the (different) workspace
    assert set(runs) == {"TTDS", "ttss", "ttds-ho", "stds"} and runs["TTDS"] == base
    assert revs == {"TTDS": "aaa", "ttss": "ttsssha", "ttds-ho": "ttds-hosha", "stds": "stdssha"}
    with pytest.raises(TTDSError, match="different metrics/eval.json"):
        experiments_of_revs({"aaa": old, "ccc": _exp_show_payload("ccc", _metrics(1.1), {})})
    with pytest.raises(TTDSError, match="'ttss' exists under both"):
        experiments_of_revs({"aaa": old, "ddd": _exp_show_payload("ddd", base, {"ttss": _metrics(1.0)})})


def test_each_variant_is_tested_against_ttds_user_by_user(workspace):
    _, targets, base_ranks, ttds_ranks = workspace
    by_rev = {"r-ttds": _ranks(base_ranks, targets), "r-ho": _ranks(ttds_ranks, targets),
              "r-ttss": _ranks(base_ranks, targets)}

    def read(rev):
        if rev not in by_rev:
            raise TTDSError(f"data/eval/ranks.parquet at {rev}: not readable (missing)")
        return by_rev[rev]

    text = ablation_significance({"TTDS": "r-ttds", "TTDS-HO": "r-ho", "TTSS": "r-ttss", "TT-SR": "gone",
                                  "ttds-tseed1": "r-ttss", "r-ho": "r-ho"}, read)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines()
            if line.lower().startswith("| tt")}
    # an experiment that is no SPEC variant (another train.seed) is compared too, after the variants
    assert rows[("ttds-tseed1", "test")].rstrip(" |").endswith("| 1")
    assert text.index("| ttds-tseed1 |") > text.index("| TTSS |")
    assert "| r-ho |" not in text  # an unnamed revision is no experiment of its own
    # TTDS-HO's ranks are much better than these TTDS ranks: a tiny p; TTSS is identical: p = 1
    ho = rows[("TTDS-HO", "test")].split("|")
    assert float(ho[5]) < 1e-3 and float(ho[8]) < 1e-3
    assert rows[("TTSS", "test_masked")].rstrip(" |").endswith("| 1")
    assert "Not compared: TT-SR: data/eval/ranks.parquet at gone" in text
    assert ablation_significance({"TTSS": "r-ttss"}, read).startswith("Not computed")
    assert ablation_significance({"TTDS": "gone", "TTSS": "r-ttss"}, read).startswith("Not computed: TTDS")


def test_report_reads_saved_exp_show_output_and_uses_workspace_as_ttds(workspace):
    root = workspace[0]
    payload = [{"rev": "workspace", "name": None,
                "data": {"metrics": {"metrics/eval.json": {"data": _metrics(2.0)}}}, "experiments": None}]
    (root / "show.json").write_text(json.dumps(payload))
    text = _report(root, root / "show.json").read_text()
    assert "| **TTDS** | 0.0400 |" in text and "+100.0%" in text


def test_paired_test_detects_better_model_and_rejects_other_splits(workspace):
    _, targets, base_ranks, ttds_ranks = workspace
    ours, theirs = _ranks(ttds_ranks, targets), _ranks(base_ranks, targets)
    t = paired_test(ours, theirs, masked=False)
    assert t["users"] == 200 and t["ndcg10_ours"] > t["ndcg10_theirs"]
    assert t["wilcoxon_p"] < 1e-3 and t["mcnemar_p"] < 1e-3
    same = paired_test(theirs, theirs, masked=False)
    assert same["wilcoxon_p"] == 1.0 and same["mcnemar_p"] == 1.0
    moved = {**targets, 5: targets[5] + 1}
    with pytest.raises(TTDSError, match="user 5 has target"):
        paired_test(ours, _ranks(base_ranks, moved), masked=False)
    with pytest.raises(TTDSError, match="missing"):
        paired_test(ours, _ranks({u: r for u, r in base_ranks.items() if u != 3}, targets), masked=False)


def test_report_errors_are_one_line(tmp_path):
    with pytest.raises(TTDSError, match="ending in .md"):
        report_cli({}, out=str(tmp_path / "r.txt"), experiments=None)
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(TTDSError, match="not valid JSON"):
        report_cli({}, out=str(tmp_path / "r.md"), experiments=str(tmp_path / "bad.json"),
                   metrics_dir=tmp_path)


def test_grid_commands_match_the_variants_table(capsys, monkeypatch):
    import subprocess

    from ttds_core.grid import grid_cli, grid_commands
    from ttds_core.variants import VARIANTS

    commands = grid_commands(queue=True)
    assert commands[-1] == "dvc exp run --run-all"
    assert len(commands) == len(VARIANTS) + 1
    for cmd, (name, sets) in zip(commands, VARIANTS.items()):
        assert cmd.startswith(f"dvc exp run --queue --name {name.lower()}")
        assert cmd.count(" -S ") == len(sets)
        for key, value in sets.items():
            expected = str(value).lower() if isinstance(value, bool) else str(value)
            assert f"-S {key}={expected}" in cmd
    assert [c.replace("--queue ", "") for c in commands[:-1]] == grid_commands()  # workspace mode
    assert grid_commands(["TTDS-HO"], force=True, queue=True)[0] == \
        "dvc exp run --force --queue --name ttds-ho -S tasks.high_order=false"
    assert grid_commands(["ttds-ho"]) == grid_commands(["TTDS-HO"])  # names in any case, as the README writes them
    with pytest.raises(TTDSError, match="unknown"):
        grid_commands(["TTDS-X"])

    def no_subprocess(*args, **kwargs):
        raise AssertionError("--dry-run must not run anything")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    grid_cli(["TTSS", "TT-SR"], dry_run=True)
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["dvc exp run --name ttss -S index.dynamic=false",
                       "dvc exp run --name tt-sr -S index.kind=random -S index.dynamic=false"]
    grid_cli(["TTSS"], dry_run=True, queue=True)
    assert capsys.readouterr().out.splitlines()[:2] == ["dvc exp run --queue --name ttss -S index.dynamic=false",
                                                       "dvc exp run --run-all"]


def test_provenance_names_the_commit_each_row_reads():
    runs = {"TTDS": {**_metrics(1.0), "seconds": 690.7}, "TTDS-HO": {**_metrics(1.1), "seconds": 705.0}}
    text = provenance_section({"sasrec": {**_metrics(0.9), "epochs": 13, "best_epoch": 8, "seconds": 32.3}},
                              runs, {"TTDS": "f355cdf0123", "TTDS-HO": "abcdef9876"})
    assert "| TTDS | `make repro` (i.e. `dvc repro`) | `f355cdf` | — | 691 |" in text
    assert "| TTDS-HO | `scripts/grid.sh --variant TTDS-HO` | `abcdef9` | — | 705 |" in text
    assert "| working tree | 13 (8) | 32 |" in text


def test_header_says_what_preprocess_produced_and_paper_rows_only_for_the_papers_catalogues(workspace):
    from ttds_core.report import render

    root = workspace[0]
    data = {"format": "generic", "users": 385, "items": 1200, "interactions": 4000, "kcore": 5,
            "subset": {"sampler": "snowball", "max_users": 1500, "seed": 42}}
    text = render({"data": {"name": "Games"}}, {}, {"TTDS": _metrics(1.0)}, "", data=data)
    assert "385 users, 1,200 items, 4,000 interactions; a snowball sample of 1,500 users" in text
    assert "reports no numbers for this catalogue" in text and "0.0597" not in text  # a generic "Games"
    lcrec = dict(data, format="lcrec")
    del lcrec["subset"]
    text = render({"data": {"name": "Games"}}, {}, {"TTDS": _metrics(1.0)}, "", data=lcrec)
    assert "every user of the 5-core" in text and "0.0597" in text
