"""`ttds report`: the paper's Tables 1-3 on our split, a bar chart and a significance test.

Inputs
- TTDS runs: the experiments of `dvc exp show --json` (one per variant of
  `ttds_core.variants`, named like `dvc_exp_command` names them), or a JSON file
  `{name: metrics}` where metrics has the `metrics/eval.json` format. The workspace's
  `metrics/eval.json` stands in for TTDS when no experiment of that name exists.
- Baselines: `metrics/baselines/<name>.json` (same format).
- Per-user ranks for the paired test: `data/eval/ranks.parquet` (TTDS, the workspace
  run) and `data/baselines/<best>/ranks.parquet`.

Unmasked and history-masked results are reported separately: the two are not
comparable with each other (SPEC, "History masking changes the numbers a lot").
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from .config import get
from .errors import TTDSError
from .io import atomic_path, read_json, read_parquet
from .metrics import metric_table
from .variants import VARIANTS, variant_name

METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")
BASELINE_LABELS = {"mostpop": "MostPop", "markov": "Markov", "gru4rec": "GRU4Rec", "bert4rec": "BERT4Rec", "fmlprec": "FMLP-Rec",
                   "sasrec": "SASRec"}
TABLE2 = ("TTDS", "STDS", "TTSS", "TTDS-DM", "STDS-DM", "TTDS-HO")
TABLE3 = ("TTDS", "TTDS-3", "TTDS-5", "TTSS", "TT-DLSH", "TT-SLSH", "TT-SR")

# Source: the TTDS paper, Table 1 (test HR@1, HR@5, HR@10, NDCG@5, NDCG@10; full ranking,
# leave-one-out, LLaMA-7B backbone for TTDS). A subset of its rows: the ID-based models we
# re-run and the generative baselines closest to TTDS.
PAPER_TABLE1 = {
    "Instruments": {
        "GRU4Rec": (0.0571, 0.0821, 0.1031, 0.0698, 0.0765),
        "BERT4Rec": (0.0435, 0.0671, 0.0822, 0.0560, 0.0608),
        "SASRec": (0.0503, 0.0751, 0.0947, 0.0627, 0.0690),
        "TIGER": (0.0608, 0.0863, 0.1064, 0.0738, 0.0803),
        "LC-Rec (LoRA)": (0.0576, 0.0817, 0.1009, 0.0698, 0.0760),
        "TTDS": (0.0714, 0.1028, 0.1281, 0.0872, 0.0947),
    },
    "Games": {
        "GRU4Rec": (0.0176, 0.0586, 0.0964, 0.0381, 0.0502),
        "BERT4Rec": (0.0136, 0.0482, 0.0763, 0.0311, 0.0401),
        "SASRec": (0.0145, 0.0581, 0.0940, 0.0365, 0.0481),
        "TIGER": (0.0188, 0.0599, 0.0939, 0.0392, 0.0501),
        "LC-Rec (LoRA)": (0.0165, 0.0520, 0.0835, 0.0342, 0.0443),
        "TTDS": (0.0254, 0.0704, 0.1083, 0.0480, 0.0597),
    },
    "Arts": {
        "GRU4Rec": (0.0421, 0.0749, 0.0964, 0.0590, 0.0659),
        "BERT4Rec": (0.0337, 0.0559, 0.0713, 0.0451, 0.0500),
        "SASRec": (0.0225, 0.0757, 0.1016, 0.0508, 0.0592),
        "TIGER": (0.0465, 0.0788, 0.1012, 0.0631, 0.0703),
        "LC-Rec (LoRA)": (0.0367, 0.0637, 0.0837, 0.0504, 0.0569),
        "TTDS": (0.0639, 0.1002, 0.1260, 0.0823, 0.0906),
    },
}
# Source: the TTDS paper, Tables 2 and 3 (Amazon Instruments only). "Baseline" is the
# paper's best baseline per metric.
PAPER_ABLATION = {
    "TTDS": (0.0711, 0.1018, 0.1281, 0.0864, 0.0947),
    "STDS": (0.0701, 0.1010, 0.1230, 0.0860, 0.0929),
    "TTSS": (0.0621, 0.0828, 0.1005, 0.0727, 0.0784),
    "TTDS-DM": (0.0685, 0.0986, 0.1224, 0.0835, 0.0911),
    "STDS-DM": (0.0610, 0.0919, 0.1159, 0.0769, 0.0845),
    "TTDS-HO": (0.0696, 0.1007, 0.1236, 0.0852, 0.0926),
    "TTDS-3": (0.0686, 0.1004, 0.1222, 0.0844, 0.0914),
    "TTDS-5": (0.0697, 0.1007, 0.1233, 0.0853, 0.0926),
    "TT-DLSH": (0.0677, 0.0976, 0.1228, 0.0829, 0.0909),
    "TT-SLSH": (0.0660, 0.0918, 0.1131, 0.0790, 0.0859),
    "TT-SR": (0.0110, 0.0405, 0.0713, 0.0251, 0.0349),
    "Baseline": (0.0608, 0.0863, 0.1136, 0.0738, 0.0803),
}


# ---------------------------------------------------------------- reading results

def _eval_metrics(metrics_files: dict) -> dict | None:
    """The `metrics/eval.json` entry of one `dvc exp show` revision, if it has data."""
    for path, entry in (metrics_files or {}).items():
        if str(path).replace("\\", "/").endswith("eval.json") and isinstance(entry, dict):
            data = entry.get("data")
            if isinstance(data, dict) and "test" in data:
                return data
    return None


def _exp_nodes(payload) -> list[tuple[str, str, dict]]:
    """(name, git rev, eval metrics) of every revision of `dvc exp show --json` output.

    Walks the nested revisions defensively (the layout has changed across DVC
    versions): any dict with a `name` (or `rev`) and `data.metrics` holding an
    `eval.json` counts. The workspace entry is named (and its rev is) "workspace".
    """
    found: list[tuple[str, str, dict]] = []

    def walk(node):
        if isinstance(node, list):
            for child in node:
                walk(child)
            return
        if not isinstance(node, dict):
            return
        data = node.get("data")
        if isinstance(data, dict):
            metrics = _eval_metrics(data.get("metrics"))
            name = node.get("name") or node.get("rev")
            if metrics is not None and name:
                found.append((str(name), str(node.get("rev") or name), metrics))
        for key in ("experiments", "revs"):
            walk(node.get(key))

    walk(payload)
    return found


def parse_exp_show(payload) -> dict[str, dict]:
    """{experiment name: eval metrics} from `dvc exp show --json` output (first of a name wins)."""
    found: dict[str, dict] = {}
    for name, _, metrics in _exp_nodes(payload):
        found.setdefault(name, metrics)
    return found


def exp_show_revs(payload) -> dict[str, str]:
    """{experiment name: git rev} from `dvc exp show --json` output (first of a name wins)."""
    found: dict[str, str] = {}
    for name, rev, _ in _exp_nodes(payload):
        found.setdefault(name, rev)
    return found


def baseline_of_exp_show(payload) -> tuple[str, dict | None]:
    """(commit, eval metrics) of the baseline commit in `dvc exp show --json --rev X` output:
    the top-level entry that is not the workspace."""
    for node in payload if isinstance(payload, list) else []:
        if isinstance(node, dict) and node.get("rev") not in (None, "workspace"):
            return str(node["rev"]), _eval_metrics((node.get("data") or {}).get("metrics"))
    return "?", None


def _exp_show(rev: str | None = None) -> list:
    cmd = ["dvc", "exp", "show", "--json"] + (["--rev", rev] if rev else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise TTDSError(f"`{' '.join(cmd)}` could not run: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise TTDSError(f"`{' '.join(cmd)}` failed: {last}")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise TTDSError(f"`{' '.join(cmd)}`: output is not JSON") from None


def _scores(metrics: dict) -> dict:
    """What a run scored (every split's metrics and the user count), without its timings."""
    return {k: v for k, v in metrics.items() if k in ("users",) or isinstance(v, dict)}


def experiments_of_revs(payloads: dict[str, list]) -> tuple[dict[str, dict], dict[str, str]]:
    """({name: metrics}, {name: git rev}) from the `dvc exp show --json --rev R` output of
    several baseline commits (a grid run in sittings, across commits that did not change
    the results).

    They may be combined only when every baseline commit scored the same TTDS metrics
    (timings aside); the first one's become the TTDS row. An experiment name
    found under two commits is ambiguous and refused."""
    runs: dict[str, dict] = {}
    source: dict[str, str] = {}
    revs: dict[str, str] = {}
    first: tuple[str, dict, str] | None = None
    for rev, payload in payloads.items():
        commit, base = baseline_of_exp_show(payload)
        if base is None:
            raise TTDSError(f"--rev {rev}: commit {commit[:7]} has no metrics/eval.json to compare its experiments with")
        if first is None:
            first = (rev, base, commit)
        elif _scores(base) != _scores(first[1]):
            raise TTDSError(f"--rev {rev} and --rev {first[0]}: their baseline commits have different "
                            "metrics/eval.json, so their experiments are not comparable; report them separately")
        baseline_node = next(n for n in payload if isinstance(n, dict) and n.get("rev") == commit)
        for name, exp_rev, metrics in _exp_nodes(baseline_node.get("experiments") or []):
            if name in source:
                raise TTDSError(f"experiment {name!r} exists under both --rev {source[name]} and --rev {rev}; "
                                "pass only one of them or remove one with `dvc exp remove`")
            runs[name], source[name], revs[name] = metrics, rev, exp_rev
    runs["TTDS"], revs["TTDS"] = first[1], first[2]
    return runs, revs


def load_experiments(experiments: str | None, eval_path: Path, revs: list[str] | None = None
                     ) -> tuple[dict[str, dict], dict[str, str]]:
    """({variant or run name: metrics}, {name: git rev of the run, "workspace" for the
    working tree}): from a JSON file (no revs for a `{name: metrics}` file), from the
    experiments of the given baseline commits, else from `dvc exp show --json` (HEAD's)."""
    run_revs: dict[str, str] = {}
    if experiments is not None and revs:
        raise TTDSError("--experiments and --rev: give one of them")
    if experiments is not None:
        raw = read_json(experiments)
        if isinstance(raw, list):  # saved `dvc exp show --json` output
            runs, run_revs = parse_exp_show(raw), exp_show_revs(raw)
        elif isinstance(raw, dict) and all(isinstance(v, dict) for v in raw.values()):
            runs = raw
        else:
            raise TTDSError(f"{experiments}: expected a JSON object {{experiment name: metrics}}")
    elif revs:
        runs, run_revs = experiments_of_revs({rev: _exp_show(rev) for rev in revs})
    else:
        try:
            payload = _exp_show()
            runs, run_revs = parse_exp_show(payload), exp_show_revs(payload)
        except TTDSError:
            runs = {}  # no DVC / no commit yet: fall back to the workspace metrics file
        if "workspace" not in runs and eval_path.exists():
            runs["workspace"], run_revs["workspace"] = read_json(eval_path), "workspace"
    named, named_revs = {}, {}
    for name, metrics in runs.items():
        if "test" not in metrics:
            raise TTDSError(f"experiment {name!r}: metrics have no 'test' section")
        named[variant_name(name) or name] = metrics
        if name in run_revs:
            named_revs[variant_name(name) or name] = run_revs[name]
    if "TTDS" not in named and "workspace" in named:
        named["TTDS"] = named["workspace"]
        named_revs["TTDS"] = named_revs.get("workspace", "workspace")
    return named, named_revs


def load_baselines(metrics_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(metrics_dir.glob("*.json")):
        metrics = read_json(path)
        if "test" not in metrics:
            raise TTDSError(f"{path}: no 'test' section, expected the metrics/eval.json format")
        out[path.stem] = metrics
    return out


def align_users(baselines: dict[str, dict], eval_ranks: Path, baseline_dir: Path) -> dict[str, dict]:
    """Baseline metrics on exactly the users TTDS was evaluated on.

    `evaluate` may rank a seeded sample of users (`eval.max_users`) while the baselines
    rank everyone; a table mixing the two user sets would compare a sample with the
    population. When the TTDS run covers fewer users, each baseline's metrics are
    recomputed from its per-user ranks on those users.
    """
    if not eval_ranks.exists():
        return baselines
    users = set(read_parquet(eval_ranks, ["user_id"])["user_id"].unique())
    out = {}
    for name, metrics in baselines.items():
        path = baseline_dir / name / "ranks.parquet"
        if metrics.get("users") == len(users) or not path.exists():
            out[name] = metrics
            continue
        ranks = read_parquet(path, ["user_id", "split", "rank", "masked"])
        ranks = ranks[ranks["user_id"].isin(users)]
        aligned = dict(metrics, users=len(users), users_total=metrics.get("users"))
        for split in ("valid", "test"):
            for masked in (False, True):
                rows = ranks[(ranks["split"] == split) & (ranks["masked"] == masked)]
                aligned[f"{split}_masked" if masked else split] = metric_table(rows["rank"].tolist())
        out[name] = aligned
    return out


# ---------------------------------------------------------------- tables

def _section(metrics: dict, masked: bool) -> dict | None:
    return metrics.get("test_masked" if masked else "test")


def _row(values) -> list[str]:
    return ["—" if v is None else f"{v:.4f}" for v in values]


def _values(section: dict | None) -> list[float | None]:
    return [None if section is None or m not in section else float(section[m]) for m in METRICS]


def best_baseline(baselines: dict[str, dict], masked: bool) -> dict[str, float]:
    """Per metric, the best value over our baselines (the paper's "Baseline" row)."""
    out = {}
    for m in METRICS:
        vals = [s[m] for b in baselines.values() if (s := _section(b, masked)) and m in s]
        if vals:
            out[m] = max(vals)
    return out


def improvement(ours: dict | None, best: dict) -> list[str]:
    cells = []
    for m in METRICS:
        if ours is None or m not in ours or not best.get(m):
            cells.append("—")
        else:
            cells.append(f"{(ours[m] - best[m]) / best[m]:+.1%}")
    return cells


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def table1(baselines: dict, runs: dict, masked: bool, paper_dataset: str | None) -> str:
    """Our rows, and the paper's Table 1 beside them when the catalogue is one of the paper's
    (`paper_dataset`; None: ours only, the paper has no numbers for it)."""
    if paper_dataset is None:
        rows = [[label, *_row(_values(_section(baselines[key], masked)))]
                for key, label in BASELINE_LABELS.items() if key in baselines]
        ours = _section(runs["TTDS"], masked) if "TTDS" in runs else None
        rows.append(["**TTDS**", *_row(_values(ours))])
        rows.append(["Improvement vs best baseline", *improvement(ours, best_baseline(baselines, masked))])
        return _markdown(["model", *METRICS], rows) + "\n\nImprovement = (TTDS - best) / best per metric."
    paper = PAPER_TABLE1[paper_dataset]
    header = ["model", *METRICS, *(f"paper {m}" for m in METRICS)]
    rows = []
    for key, label in BASELINE_LABELS.items():
        if key in baselines:
            rows.append([label, *_row(_values(_section(baselines[key], masked))),
                         *_row(paper.get(label, (None,) * 5))])
    for label in ("TIGER", "LC-Rec (LoRA)"):
        rows.append([label, *_row([None] * 5), *_row(paper[label])])
    ours = _section(runs["TTDS"], masked) if "TTDS" in runs else None
    rows.append(["**TTDS**", *_row(_values(ours)), *_row(paper["TTDS"])])
    paper_best = {m: max(v[i] for k, v in paper.items() if k != "TTDS") for i, m in enumerate(METRICS)}
    paper_ttds = dict(zip(METRICS, paper["TTDS"]))
    rows.append(["Improvement vs best baseline", *improvement(ours, best_baseline(baselines, masked)),
                 *improvement(paper_ttds, paper_best)])
    return _markdown(header, rows) + (
        "\n\nImprovement = (TTDS - best) / best per metric; for the paper columns the best is taken "
        "over the paper rows listed here (the paper's own row compares with the best of all its baselines).")


def ablation_table(names, baselines: dict, runs: dict, masked: bool) -> str:
    header = ["variant", "overrides", *METRICS, *(f"paper {m}" for m in METRICS)]
    rows = []
    for name in names:
        sets = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "(defaults)"
        ours = _section(runs[name], masked) if name in runs else None
        rows.append([name, sets, *_row(_values(ours)), *_row(PAPER_ABLATION[name])])
    best = best_baseline(baselines, masked)
    rows.append(["Baseline", "best of our baselines per metric",
                 *_row([best.get(m) for m in METRICS]), *_row(PAPER_ABLATION["Baseline"])])
    return _markdown(header, rows)


# ---------------------------------------------------------------- significance

def per_user(ranks: pd.DataFrame, masked: bool, split: str = "test") -> pd.DataFrame:
    part = ranks[(ranks["split"] == split) & (ranks["masked"] == masked)]
    r = pd.to_numeric(part["rank"], errors="coerce").to_numpy(float)
    r = np.where(np.isfinite(r) & (r > 0), r, np.inf)  # missing rank: outside the list
    return pd.DataFrame({"user_id": part["user_id"].to_numpy(), "target": part["target"].to_numpy(), "rank": r,
                         "ndcg10": np.where(r <= 10, 1.0 / np.log2(r + 1.0), 0.0),
                         "hit10": r <= 10}).set_index("user_id")


def paired_test(ours: pd.DataFrame, theirs: pd.DataFrame, masked: bool, ours_name: str = "TTDS",
                theirs_name: str = "baseline", split: str = "test") -> dict:
    """Paired tests on the `split` users both runs ranked, after checking it is the same split.

    NDCG@10: Wilcoxon signed-rank and paired t-test on per-user values. HR@10: exact
    McNemar test (binomial test on the users where exactly one model hits).
    """
    from scipy import stats

    a, b = per_user(ours, masked, split), per_user(theirs, masked, split)
    if a.index.has_duplicates or b.index.has_duplicates:
        raise TTDSError("ranks.parquet: a user appears twice for the same split and masking")
    extra = a.index.difference(b.index)
    if len(extra):
        raise TTDSError(f"{theirs_name} ranks: user {extra[0]} ranked by {ours_name} is missing "
                        "(not the same split)")
    common = a.index
    if not len(common):
        raise TTDSError(f"{ours_name} ranks: no {split} users to compare")
    b = b.loc[common]
    differs = a["target"].to_numpy() != b["target"].to_numpy()
    if differs.any():
        user = common[np.argmax(differs)]
        raise TTDSError(f"ranks.parquet: user {user} has target {a.loc[user, 'target']} in {ours_name} "
                        f"but {b.loc[user, 'target']} in {theirs_name} (not the same split)")
    d = a["ndcg10"].to_numpy() - b["ndcg10"].to_numpy()
    wilcoxon = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    ttest = float(stats.ttest_rel(a["ndcg10"], b["ndcg10"]).pvalue) if np.any(d != 0) else 1.0
    only_a = int((a["hit10"].to_numpy() & ~b["hit10"].to_numpy()).sum())
    only_b = int((~a["hit10"].to_numpy() & b["hit10"].to_numpy()).sum())
    mcnemar = float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    return {"users": len(common), "ndcg10_ours": float(a["ndcg10"].mean()),
            "ndcg10_theirs": float(b["ndcg10"].mean()), "wilcoxon_p": wilcoxon, "ttest_p": ttest,
            "hit10_ours": float(a["hit10"].mean()), "hit10_theirs": float(b["hit10"].mean()),
            "hits_only_ours": only_a, "hits_only_theirs": only_b, "mcnemar_p": mcnemar}


def significance_section(baselines: dict, eval_ranks: Path, baseline_dir: Path) -> str:
    if not eval_ranks.exists():
        return f"Not computed: `{eval_ranks.as_posix()}` does not exist (run `evaluate`)."
    ours = read_parquet(eval_ranks, columns=["user_id", "split", "target", "rank", "masked"])
    rows = []
    for masked in (False, True):
        section = "test_masked" if masked else "test"
        ranked = [(b[section]["NDCG@10"], k) for k, b in baselines.items() if section in b]
        if not ranked or not (ours["masked"] == masked).any():
            continue
        best = max(ranked)[1]
        path = baseline_dir / best / "ranks.parquet"
        theirs = read_parquet(path, columns=["user_id", "split", "target", "rank", "masked"])
        t = paired_test(ours, theirs, masked, theirs_name=f"{best} ({path.as_posix()})")
        rows.append([section, BASELINE_LABELS.get(best, best), str(t["users"]),
                     f"{t['ndcg10_ours']:.4f} vs {t['ndcg10_theirs']:.4f}", f"{t['wilcoxon_p']:.2g}",
                     f"{t['ttest_p']:.2g}", f"{t['hit10_ours']:.4f} vs {t['hit10_theirs']:.4f}",
                     f"{t['hits_only_ours']} / {t['hits_only_theirs']}", f"{t['mcnemar_p']:.2g}"])
    if not rows:
        return "Not computed: no baseline metrics or no matching TTDS ranks."
    header = ["split", "best baseline", "users", "NDCG@10 TTDS vs baseline", "Wilcoxon p", "paired t p",
              "HR@10 TTDS vs baseline", "hits only TTDS / only baseline", "McNemar p"]
    return _markdown(header, rows)


RANK_COLUMNS = ["user_id", "split", "target", "rank", "masked"]


def ranks_at(rev: str, eval_ranks: Path) -> pd.DataFrame:
    """A TTDS run's per-user ranks: the working tree's file, or the file as DVC tracked it
    at a git rev (an experiment or a commit; read from the local DVC cache)."""
    if rev == "workspace":
        return read_parquet(eval_ranks, columns=RANK_COLUMNS)
    import io

    import dvc.api

    try:
        with dvc.api.open(eval_ranks.as_posix(), rev=rev, mode="rb") as f:
            return pd.read_parquet(io.BytesIO(f.read()), columns=RANK_COLUMNS)
    except Exception as exc:  # DVC raises many types: unknown rev, output not in the cache, ...
        raise TTDSError(f"{eval_ranks.as_posix()} at {rev[:7]}: not readable ({type(exc).__name__})") from None


def ablation_significance(run_revs: dict[str, str], read_ranks) -> str:
    """Each variant against TTDS, user by user (`paired_test`) on the test split, masked and
    not, and on validation (where the two can disagree), from the ranks each run wrote;
    `read_ranks(rev)` returns them. Experiments that are no SPEC variant (another
    `train.seed`, a param sweep) follow the variants, by name."""
    if "TTDS" not in run_revs:
        return "Not computed: no TTDS run with per-user ranks."
    try:
        ttds = read_ranks(run_revs["TTDS"])
    except TTDSError as exc:
        return f"Not computed: TTDS {exc}"
    rows, unreadable = [], []
    # named experiments only: unnamed revisions (commits, the workspace) carry their rev as name
    others = sorted(n for n, rev in run_revs.items() if n not in VARIANTS and n != rev)
    for name in [n for n in VARIANTS if n != "TTDS" and n in run_revs] + others:
        try:
            ranks = read_ranks(run_revs[name])
        except TTDSError as exc:
            unreadable.append(f"{name}: {exc}")
            continue
        for split, masked in (("test", False), ("test", True), ("valid", False)):
            have = [((r["split"] == split) & (r["masked"] == masked)).any() for r in (ranks, ttds)]
            if not all(have):
                continue
            t = paired_test(ranks, ttds, masked, ours_name=name, theirs_name="TTDS", split=split)
            rows.append([name, split + ("_masked" if masked else ""), str(t["users"]),
                         f"{t['ndcg10_ours']:.4f} vs {t['ndcg10_theirs']:.4f}", f"{t['wilcoxon_p']:.2g}",
                         f"{t['hit10_ours']:.4f} vs {t['hit10_theirs']:.4f}",
                         f"{t['hits_only_ours']} / {t['hits_only_theirs']}", f"{t['mcnemar_p']:.2g}"])
    if not rows:
        text = "Not computed: no other run with per-user ranks."
    else:
        text = _markdown(["run", "split", "users", "NDCG@10 run vs TTDS", "Wilcoxon p",
                          "HR@10 run vs TTDS", "hits only run / only TTDS", "McNemar p"], rows)
        text += ("\n\nOne test per row, no correction for multiple comparisons: with this many rows a "
                 "p below 0.05 can occur by chance.")
    return text + "".join(f"\n\nNot compared: {u}" for u in unreadable)


# ---------------------------------------------------------------- chart

def bar_chart(path: Path, baselines: dict, runs: dict) -> None:
    """HR@10 and NDCG@10 of every baseline and TTDS run, unmasked and masked panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [(label, baselines[k]) for k, label in BASELINE_LABELS.items() if k in baselines]
    models += [(k, v) for k, v in baselines.items() if k not in BASELINE_LABELS]
    models += [(k, runs[k]) for k in VARIANTS if k in runs]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 0.9 * len(models) + 3), 4), sharey=True)
    x = np.arange(len(models))
    for ax, masked in zip(axes, (False, True)):
        for i, metric in enumerate(("HR@10", "NDCG@10")):
            vals = [(_section(m, masked) or {}).get(metric, 0.0) for _, m in models]
            ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=metric)
        ax.set_xticks(x, [name for name, _ in models], rotation=45, ha="right")
        ax.set_title("test, history masked" if masked else "test, unmasked")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- entry point

def provenance_section(baselines: dict, runs: dict, run_revs: dict | None = None) -> str:
    """How each number above was produced: the command, the commit whose metrics file the
    row reads (experiments and the TTDS row of `--rev` reports come from older commits) and
    the seconds that file records (training + evaluation for a baseline, evaluation only
    for a TTDS run)."""
    run_revs = run_revs or {}

    def seconds(m: dict) -> str:
        return f"{m['seconds']:.0f}" if isinstance(m.get("seconds"), (int, float)) else "—"

    def source(name: str) -> str:
        rev = run_revs.get(name)
        return "working tree" if rev in (None, "workspace") else f"`{rev[:7]}`"

    rows = []
    for key, m in baselines.items():
        epochs = f"{m['epochs']} ({m.get('best_epoch', '?')})" if m.get("epochs") else "—"
        rows.append([BASELINE_LABELS.get(key, key), "`dvc repro baseline` (stage `baseline@<name>`)",
                     "working tree", epochs, seconds(m)])
    for name, m in runs.items():
        if name not in VARIANTS:  # `workspace` / branch rows repeat the TTDS one
            continue
        cmd = "`make repro` (i.e. `dvc repro`)" if name == "TTDS" else f"`scripts/grid.sh --variant {name}`"
        rows.append([name, cmd, source(name), "—", seconds(m)])
    table = _markdown(["run", "command", "metrics from", "epochs (best)", "seconds recorded"], rows)
    return (table + "\n\nSeconds are what each run's metrics file records: training and evaluation for a "
            "baseline, the `evaluate` stage for a TTDS run (its fine-tuning time is in "
            "`metrics/finetune.json`). \"metrics from\" is the commit (or experiment) whose metrics "
            "file the row reads; re-runs of the same code record other seconds. The machine and the "
            "stage times of the CPU default are in docs/results-cpu-default.md.")


def data_summary(dataset: str, data: dict | None) -> str:
    """What `preprocess` actually produced (its metrics file), not what params say now."""
    if not data:
        return f"Dataset **{dataset}** (no metrics/preprocess.json: run `dvc repro preprocess`)"
    subset = data.get("subset")
    how = (f"a {subset['sampler']} sample of {subset['max_users']:,} users (seed {subset['seed']}), "
           f"re-filtered to the {data.get('kcore')}-core" if subset else f"every user of the {data.get('kcore')}-core")
    def count(key):
        return f"{data[key]:,}" if isinstance(data.get(key), int) else "?"

    return (f"Dataset **{data.get('name') or dataset}** ({data.get('format')}): {count('users')} users, "
            f"{count('items')} items, {count('interactions')} interactions; {how}")


def render(params: dict, baselines: dict, runs: dict, significance: str, ablations: str = "",
           run_revs: dict | None = None, data: dict | None = None) -> str:
    """The report. `data`: `metrics/preprocess.json` of the catalogue the numbers are on."""
    dataset = get(params, "data.name", str)
    fmt = (data or {}).get("format", get(params, "data.format", str, "lcrec"))
    # The paper's Table 1 only beside the paper's own catalogues (read by the Amazon readers).
    paper_dataset = dataset if dataset in PAPER_TABLE1 and fmt != "generic" else None
    users = next((m.get("users") for m in [*baselines.values(), *runs.values()] if m.get("users")), None)
    paper_note = (f"paper: the TTDS paper (Table 1 for {paper_dataset}; " if paper_dataset else
                  "paper: the TTDS paper reports no numbers for this catalogue (")
    parts = [
        "# Results: TTDS and baselines on our split",
        "",
        f"{data_summary(dataset, data)}. "
        f"{users if users is not None else '?'} test users, leave-one-out, full ranking over all items "
        "(no candidate sampling). Ours: measured by `evaluate` / `baseline`; " + paper_note +
        "Tables 2-3 are on Instruments, LLaMA-7B backbone). "
        "'—' = not run. Unmasked and history-masked numbers are not comparable with each other; "
        "the paper's baseline rows look masked (SPEC).",
    ]
    for masked in (False, True):
        tag = "history masked" if masked else "unmasked"
        parts += ["", f"## Table 1 — overall comparison (test, {tag})", "",
                  table1(baselines, runs, masked, paper_dataset),
                  "", f"## Table 2 — architecture ablation (test, {tag})", "",
                  ablation_table(TABLE2, baselines, runs, masked),
                  "", f"## Table 3 — index ablation (test, {tag})", "",
                  ablation_table(TABLE3, baselines, runs, masked)]
    parts += ["", "## Significance: TTDS vs the best baseline (per-user, test)", "", significance, ""]
    if ablations:
        parts += ["## Significance: each variant and other experiment vs TTDS (per-user)", "", ablations, ""]
    parts += ["![HR@10 and NDCG@10](results.png)", "",
              "## How these numbers were produced", "", provenance_section(baselines, runs, run_revs), "",
              "Regenerate: `ttds report` (experiments from `dvc exp show --json`; "
              "`--experiments runs.json` takes a `{name: metrics}` file or saved `dvc exp show --json` "
              "output instead; `--rev <commit>`, repeatable, takes the experiments of those baseline "
              "commits once HEAD has moved past them).", ""]
    return "\n".join(parts)


def report_cli(params: dict, out: str, experiments: str | None = None, revs: list[str] | None = None,
               metrics_dir: str | Path = "metrics/baselines", eval_path: str | Path = "metrics/eval.json",
               preprocess_path: str | Path = "metrics/preprocess.json",
               eval_ranks: str | Path = "data/eval/ranks.parquet",
               baseline_dir: str | Path = "data/baselines") -> Path:
    """Write the markdown report to `out` and the bar chart beside it (same stem, .png)."""
    out = Path(out)
    if out.suffix != ".md":
        raise TTDSError(f"--out {out}: expected a markdown file name ending in .md")
    baselines = load_baselines(Path(metrics_dir))
    runs, run_revs = load_experiments(experiments, Path(eval_path), revs)
    if not baselines and not runs:
        raise TTDSError(f"nothing to report: no {Path(metrics_dir).as_posix()}/*.json and no experiments")
    baselines = align_users(baselines, Path(eval_ranks), Path(baseline_dir))
    significance = significance_section(baselines, Path(eval_ranks), Path(baseline_dir))
    ablations = ablation_significance(run_revs, lambda rev: ranks_at(rev, Path(eval_ranks)))
    data = read_json(preprocess_path) if Path(preprocess_path).exists() else None
    text = render(params, baselines, runs, significance, ablations, run_revs, data).replace("(results.png)", f"({out.stem}.png)")
    bar_chart(out.with_suffix(".png"), baselines, runs)
    with atomic_path(out, ".md") as tmp:
        tmp.write_text(text)
    return out
