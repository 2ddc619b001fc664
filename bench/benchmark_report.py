"""The separable benchmark's report: TTDS and every baseline on the same users, learning
curves and paired tests, from the outputs of one `make benchmark` run.

    python -m bench.benchmark_report [--root .] [--out docs/bench/benchmark]

Reads what `dvc exp run` left in the workspace at `--root` (docs/benchmark.md names the
command): `metrics/{preprocess,finetune,eval}.json`, `metrics/baselines/*.json`, the per-user
ranks `data/eval/ranks.parquet` and `data/baselines/<model>/ranks.parquet`, the baselines'
per-epoch validation `data/baselines/<model>/history.json`, and `params.yaml`. Writes into
`--out`:

- `results.json`: the subset, every model's valid/test HR@1/5/10 and NDCG@5/10 (unmasked and
  masked), epochs and seconds, the paired tests of TTDS against SASRec, Markov and MostPop,
  NDCG@10 by target popularity, and by whether the target's first code (TTDS's item index,
  `data/model/item_sids.parquet`) is new to the user or that of an earlier item of theirs
  (every model, and the `--against` runs' TTDS, on the same groups of users);
- `results.md`: the same as markdown tables (pasted into docs/benchmark.md);
- `curves/<model>.csv` (epoch, valid_NDCG@10) for `dvc plots show` (dvc.yaml, top-level
  `plots`) and `learning_curves.png`: validation NDCG@10 per epoch of every model;
- `ttds_ranks.parquet`: TTDS's per-user ranks (every split, masked and unmasked, ~15 kB), so
  that a later run of another TTDS setting can be paired with this one user by user:
  `--against docs/bench/<other run>` adds its TTDS (label: the folder's name) to the paired
  tests (same users and targets, checked).

Every model must have ranked the same users on the same targets: the paired test refuses
otherwise (`ttds_core.report.paired_test`).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from ttds_core.config import load_params
from ttds_core.errors import TTDSError
from ttds_core.io import atomic_path, read_json, read_parquet, write_json, write_parquet
from ttds_core.report import BASELINE_LABELS, METRICS, RANK_COLUMNS, paired_test, per_user

MODELS = ("mostpop", "markov", "gru4rec", "bert4rec", "fmlprec", "sasrec")  # table order; TTDS last
SECTIONS = ("test", "test_masked", "valid", "valid_masked")


def load(root: Path, masked: bool = False) -> dict:
    """Every model's metrics, ranks and validation curve from one benchmark workspace
    (`masked`: eval.mask_history, the validation every model selected on)."""
    models = {}
    for name in MODELS:
        metrics_path = root / "metrics" / "baselines" / f"{name}.json"
        if not metrics_path.exists():
            raise TTDSError(f"{metrics_path}: missing; the benchmark runs every baseline (see docs/benchmark.md)")
        history = root / "data" / "baselines" / name / "history.json"
        curve = [(int(e["epoch"]), float(e["valid_NDCG@10"])) for e in read_json(history)["epochs"]] \
            if history.exists() else []
        models[BASELINE_LABELS[name]] = {"metrics": read_json(metrics_path), "curve": curve,
                                          "ranks": read_parquet(root / "data" / "baselines" / name / "ranks.parquet",
                                                                RANK_COLUMNS)}
    finetune = read_json(root / "metrics" / "finetune.json")
    # TTDS validates after every pass over its training rows and once more where a budget
    # (train.max_minutes) ends training mid-epoch: x is the step in epochs (fractional there).
    per_epoch = finetune["planned_steps"] / finetune["epochs"]
    curve = [(round(v["step"] / per_epoch, 2), float(v["val_NDCG@10"])) for v in finetune.get("validation", [])]
    models["TTDS"] = {"metrics": read_json(root / "metrics" / "eval.json"), "curve": curve,
                      "ranks": read_parquet(root / "data" / "eval" / "ranks.parquet", RANK_COLUMNS),
                      "finetune": finetune, "steps_per_epoch": per_epoch}
    # MostPop and Markov do not train: each validation score is one flat line over the epochs shown.
    last = math.ceil(max((e for m in models.values() for e, _ in m["curve"]), default=1))
    for m in models.values():
        if not m["curve"]:
            valid = m["metrics"]["valid_masked" if masked else "valid"]["NDCG@10"]
            m["curve"] = [(e, float(valid)) for e in range(1, last + 1)]
    return models


def table(models: dict) -> dict:
    out = {}
    for name, m in models.items():
        metrics = m["metrics"]
        row = {s: {k: round(float(metrics[s][k]), 4) for k in METRICS} for s in SECTIONS}
        row["users"] = metrics.get("users")
        if name == "TTDS":
            ft, per_epoch = m["finetune"], m["steps_per_epoch"]
            row.update(epochs=round(ft["steps"] / per_epoch, 2), steps=ft.get("steps"),
                       best_epoch=round((ft.get("best") or {}).get("step", 0) / per_epoch, 2), best=ft.get("best"),
                       stopped_early=ft.get("stopped_early"), stopped_by_max_minutes=ft.get("stopped_by_max_minutes"),
                       train_seconds=ft.get("train_seconds"), eval_seconds=metrics.get("seconds"))
        else:
            row.update(epochs=metrics.get("epochs"), best_epoch=metrics.get("best_epoch"),
                       seconds=metrics.get("seconds"))
        out[name] = row
    users = {name: row["users"] for name, row in out.items()}
    if len(set(users.values())) != 1:
        raise TTDSError(f"models ranked different numbers of users {users}: not the same benchmark run")
    return out


def paired(models: dict, against: dict | None = None) -> dict:
    """TTDS against SASRec, Markov, MostPop and every earlier TTDS run in `against` (label -> ranks)."""
    ours = models["TTDS"]["ranks"]
    others = {name: models[name]["ranks"] for name in ("SASRec", "Markov", "MostPop")} | (against or {})
    out = {}
    for other, theirs in others.items():
        for split in ("test", "valid"):
            for masked in (False, True):
                key = f"{split}_masked" if masked else split
                out.setdefault(other, {})[key] = paired_test(ours, theirs, masked, theirs_name=other, split=split)
    return out


def earlier_runs(folders: list[str]) -> dict:
    """label (the folder's name) -> TTDS ranks kept by an earlier report in that folder."""
    out = {}
    for folder in folders:
        path = Path(folder) / "ttds_ranks.parquet"
        if not path.exists():
            raise TTDSError(f"--against {folder}: no ttds_ranks.parquet there (written by this report since "
                            "it keeps TTDS's ranks)")
        out[f"TTDS ({Path(folder).name})"] = read_parquet(path, RANK_COLUMNS)
    return out


def train_counts(sequences):
    """item -> how often it occurs in the training part of the sequences (`items[:-2]`)."""
    import pandas as pd

    return pd.Series([int(i) for items in sequences["items"] for i in items[:-2]]).value_counts()


def by_popularity(models: dict, counts, split: str = "test", masked: bool = False) -> dict:
    """Test NDCG@10 (unmasked, or with the history `masked`) per model on three equal-size groups
    of users, by how often their target item occurs in training (`counts`): does a model win on
    the head or the tail?"""
    import numpy as np

    out = {}
    for name, m in models.items():
        users = per_user(m["ranks"], masked=masked, split=split).sort_index()
        gain = users["ndcg10"].to_numpy()
        pop = users["target"].map(counts).fillna(0).to_numpy()
        order = np.argsort(pop, kind="stable")
        groups = np.array_split(order, 3)
        out[name] = {label: {"users": len(g), "target_train_count_median": float(np.median(pop[g])),
                             "NDCG@10": round(float(gain[g].mean()), 4)}
                     for label, g in zip(("tail", "middle", "head"), groups)}
    return out


def history_first_codes(sequences, item_codes: dict, split: str = "test") -> dict:
    """user -> whether the `split` target's first code (of TTDS's item index) is the first code
    of some item the user had before it (everything a masked ranking excludes)."""
    from ttds_core.cases import eval_cases

    return {c.user_id: any(item_codes[i][0] == item_codes[c.target][0] for i in c.seen)
            for c in eval_cases(sequences, split, max_history=1)}


def by_history_first_code(models: dict, shares: dict, split: str = "test", masked: bool = False) -> dict:
    """NDCG@10 per model on two groups of users: those whose target's first code is new to them
    (no earlier item under it) and those whose target shares its first code with an earlier
    item (`shares`: `history_first_codes`). Each group's `part_of_mean` is its part of the
    model's mean NDCG@10 (group sum / all users): the two add up to the mean, so the
    difference between two models splits into the two groups."""
    import numpy as np

    out = {}
    for name, m in models.items():
        users = per_user(m["ranks"], masked=masked, split=split).sort_index()
        missing = next((u for u in users.index if u not in shares), None)
        if missing is not None:
            raise TTDSError(f"{name}: user {missing} has no sequence in data/processed")
        gain = users["ndcg10"].to_numpy()
        inside = np.asarray([shares[u] for u in users.index])
        out[name] = {label: {"users": int(g.sum()), "NDCG@10": round(float(gain[g].mean()), 4) if g.any() else None,
                             "part_of_mean": round(float(gain[g].sum() / len(gain)), 4)}
                     for label, g in (("new_first_code", ~inside), ("first_code_in_history", inside))}
    return out


def masking_effect(models: dict, split: str = "test", depth: int = 20) -> dict:
    """What history masking changes for each model, per user: in these 5-core sequences the
    target is never a history item, so a target that ranks higher once the history is masked
    had some of the user's own items ranked above it. Ranks beyond `depth` (TTDS's beam width)
    count as unranked for every model, so the models are read the same way."""
    import numpy as np

    out = {}
    for name, m in models.items():
        plain, masked = (per_user(m["ranks"], masked=mk, split=split).sort_index() for mk in (False, True))
        if plain.index.has_duplicates or not plain.index.equals(masked.index):
            raise TTDSError(f"{name}: the masked and unmasked {split} ranks are not one row per user each, "
                            "for the same users")
        r0, r1 = (np.where(r <= depth, r, np.inf) for r in (plain["rank"].to_numpy(), masked["rank"].to_numpy()))
        out[name] = {"users": len(plain), "depth": depth,
                     "NDCG@10": round(float(plain["ndcg10"].mean()), 4),
                     "NDCG@10_masked": round(float(masked["ndcg10"].mean()), 4),
                     "target_rises": round(float(np.mean(r1 < r0)), 4),
                     "enters_top10": round(float(np.mean((r1 <= 10) & (r0 > 10))), 4)}
    return out


def top1_popularity(root: Path, sequences, counts) -> dict | None:
    """How popular TTDS's first recommendation is, from the serving cache (`precompute`:
    `serve.max_users` users, history masked): the share of top-1 items among the 10 most
    frequent training items, and the median training count of top-1 items against that of
    the same users' test targets."""
    import numpy as np

    path = root / "data" / "serving" / "topk.parquet"
    if not path.exists():
        return None
    top10 = set(counts.index[:10])
    cache = read_parquet(path, ["user_id", "items"])
    target = dict(zip(sequences["user_id"], (items[-1] for items in sequences["items"])))
    first = [int(items[0]) for items in cache["items"] if len(items)]
    return {"users": len(first), "top1_in_10_most_popular": round(float(np.mean([i in top10 for i in first])), 3),
            "top1_distinct_items": len(set(first)),
            "top1_train_count_median": float(np.median([counts.get(i, 0) for i in first])),
            "target_train_count_median": float(np.median([counts.get(int(target[u]), 0) for u in cache["user_id"]]))}


def write_curves(models: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, m in models.items():
        path = out / "curves" / f"{name.lower().replace('-', '')}.csv"
        with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "valid_NDCG@10"])
            w.writerows((e, f"{v:.5f}") for e, v in m["curve"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, m in models.items():
        if m["curve"]:
            xs, ys = zip(*m["curve"])
            flat = name in ("MostPop", "Markov")  # not trained: one value
            ax.plot(xs, ys, marker=None if flat else "o", ms=3, ls="--" if flat else "-",
                    lw=2.2 if name == "TTDS" else 1.2, label=name)
    ax.set_xlabel("epoch (pass over the training data)")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title("Learning curves on the separable benchmark")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    with atomic_path(out / "learning_curves.png", ".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def ttds_epochs(models: dict) -> list[dict]:
    """TTDS's validation at each epoch end: ranking quality next to the teacher-forced loss
    and whole-SID accuracy of the same targets (does the model fit the next SID better while
    ranking stalls?)."""
    per_epoch = models["TTDS"]["steps_per_epoch"]
    return [{"epoch": round(v["step"] / per_epoch, 2), "step": v["step"], "users": int(v.get("val_users", 0)),
             **{k: round(float(v[k]), 4) for k in ("val_NDCG@10", "val_HR@10", "val_loss", "val_sid_acc")}}
            for v in models["TTDS"]["finetune"].get("validation", [])]


def markdown(subset: dict, rows: dict, tests: dict, popularity: dict, top1: dict | None,
             epochs: list[dict] | None = None, masking: dict | None = None,
             popularity_masked: dict | None = None, first_code: dict | None = None) -> str:
    lines = [f"Subset: {subset['users']:,} users, {subset['items']:,} items, {subset['interactions']:,} "
             f"interactions; every model ranks all {rows['TTDS']['users']:,} users over all items.", ""]
    for section, title in (("test", "Test, unmasked"), ("test_masked", "Test, history masked"),
                           ("valid", "Validation, unmasked"), ("valid_masked", "Validation, history masked")):
        lines += [f"**{title}**", "", "| model | " + " | ".join(METRICS) + " | NDCG@10 / MostPop |",
                  "|---|" + "---|" * (len(METRICS) + 1)]
        pop = rows["MostPop"][section]["NDCG@10"]
        for name, row in rows.items():
            cells = [f"{row[section][k]:.4f}" for k in METRICS]
            bold = "**" if name == "TTDS" else ""
            lines.append(f"| {bold}{name}{bold} | " + " | ".join(cells) + f" | {row[section]['NDCG@10'] / pop:.2f}x |")
        lines.append("")
    lines += ["**Paired tests, TTDS against each model, per user** (NDCG@10: Wilcoxon signed-rank; HR@10: "
              "exact McNemar on the users where exactly one model hits)", "",
              "| vs | split | users | NDCG@10 TTDS vs other | Wilcoxon p | HR@10 TTDS vs other | "
              "hits only TTDS / only other | McNemar p |", "|---|---|---|---|---|---|---|---|"]
    for other, by in tests.items():
        for key, t in by.items():
            lines.append(f"| {other} | {key} | {t['users']} | {t['ndcg10_ours']:.4f} vs {t['ndcg10_theirs']:.4f} | "
                         f"{t['wilcoxon_p']:.2g} | {t['hit10_ours']:.4f} vs {t['hit10_theirs']:.4f} | "
                         f"{t['hits_only_ours']} / {t['hits_only_theirs']} | {t['mcnemar_p']:.2g} |")
    for how, by in (("unmasked", popularity), ("history masked", popularity_masked)):
        if not by:
            continue
        lines += ["", f"**Test NDCG@10 ({how}) by target popularity** (users split in three equal groups by how "
                  "often their test item occurs in training; median count in brackets)", "",
                  "| model | tail | middle | head |", "|---|---|---|---|"]
        for name, groups in by.items():
            lines.append(f"| {name} | " + " | ".join(f"{g['NDCG@10']:.4f} ({g['target_train_count_median']:.0f})"
                                                   for g in groups.values()) + " |")
    if first_code:
        lines += ["", "**Test NDCG@10 by whether the target's first code is new to the user** (TTDS's item "
                  "index; \"in history\": some earlier item of the user has the same first code; in brackets: "
                  "the group's part of the model's mean NDCG@10)", "",
                  "| model | users new / in history | new | in history | masked: new | masked: in history |",
                  "|---|---|---|---|---|---|"]
        for name in first_code["test"]:
            plain, masked = first_code["test"][name], first_code["test_masked"][name]
            cells = ["—" if g["NDCG@10"] is None else f"{g['NDCG@10']:.4f} ({g['part_of_mean']:.4f})"
                     for g in (*plain.values(), *masked.values())]
            lines.append(f"| {name} | {plain['new_first_code']['users']} / {plain['first_code_in_history']['users']} | "
                         + " | ".join(cells) + " |")
    if masking:
        depth = next(iter(masking.values()))["depth"]
        lines += ["", "**What history masking changes (test)**: the share of users whose target ranks higher "
                  f"once their own items are removed (some of them were ranked above it; ranks beyond {depth}, "
                  "TTDS's beam width, count as unranked for every model) and whose target enters the top 10",
                  "", "| model | NDCG@10 | masked | gain | target rises | enters top 10 |", "|---|---|---|---|---|---|"]
        for name, e in masking.items():
            lines.append(f"| {name} | {e['NDCG@10']:.4f} | {e['NDCG@10_masked']:.4f} | "
                         f"{e['NDCG@10_masked'] - e['NDCG@10']:+.4f} | {e['target_rises']:.1%} | {e['enters_top10']:.1%} |")
    if top1:
        lines += ["", f"**TTDS's first recommendation** ({top1['users']} users of the serving cache, history masked): "
                  f"{top1['top1_in_10_most_popular']:.0%} are among the 10 most frequent training items; "
                  f"{top1['top1_distinct_items']} distinct items; median training count {top1['top1_train_count_median']:.0f} "
                  f"against {top1['target_train_count_median']:.0f} for the same users' test targets."]
    if epochs:
        lines += ["", f"**TTDS at each validation** ({epochs[0]['users']:,} fixed validation users: "
                  "NDCG@10 / HR@10 of the constrained beam search, and the teacher-forced loss and whole-SID "
                  "arg-max accuracy of the same targets)", "",
                  "| epoch | step | NDCG@10 | HR@10 | loss | SID accuracy |", "|---|---|---|---|---|---|"]
        lines += [f"| {e['epoch']} | {e['step']} | {e['val_NDCG@10']:.4f} | {e['val_HR@10']:.4f} | "
                  f"{e['val_loss']:.3f} | {e['val_sid_acc']:.4f} |" for e in epochs]
    lines += ["", "**Training** (2-core CPU)", "", "| model | epochs run | best epoch | seconds |", "|---|---|---|---|"]
    for name, row in rows.items():
        if name == "TTDS":
            best = row.get("best") or {}
            lines.append(f"| TTDS | {row['epochs']} ({row['steps']} steps) | {row['best_epoch']} (step {best.get('step', '—')}) | "
                         f"{row['train_seconds']} train + {row['eval_seconds']} evaluate |")
        else:
            lines.append(f"| {name} | {row['epochs']} | {row['best_epoch']} | {row['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the workspace the benchmark ran in")
    ap.add_argument("--out", default="docs/bench/benchmark")
    ap.add_argument("--against", action="append", default=[], metavar="DIR",
                    help="an earlier report's folder: pair this TTDS with the TTDS ranks kept there (repeatable)")
    args = ap.parse_args(argv)
    root, out = Path(args.root), Path(args.out)
    params = load_params(root / "params.yaml")  # schema-checked
    models = load(root, masked=bool(params["eval"].get("mask_history")))
    against = earlier_runs(args.against)
    subset = read_json(root / "metrics" / "preprocess.json")
    rows = table(models)
    tests = paired(models, against)
    sequences = read_parquet(root / "data" / "processed" / "sequences.parquet", ["user_id", "items"])
    counts = train_counts(sequences)
    popularity, popularity_masked = by_popularity(models, counts), by_popularity(models, counts, masked=True)
    top1 = top1_popularity(root, sequences, counts)
    masking = masking_effect(models, depth=int(params["eval"]["beams"]))  # TTDS ranks no deeper
    item_sids = read_parquet(root / "data" / "model" / "item_sids.parquet", ["item_id", "codes"])
    item_codes = {int(i): [int(c) for c in codes] for i, codes in zip(item_sids["item_id"], item_sids["codes"])}
    first_code = {}
    for split in ("test", "valid"):
        shares = history_first_codes(sequences, item_codes, split)
        for masked in (False, True):
            first_code[split + ("_masked" if masked else "")] = by_history_first_code(
                models | {label: {"ranks": r} for label, r in against.items()}, shares, split, masked)
    result = {"subset": {k: subset.get(k) for k in ("users", "items", "interactions")},
              "params": {"data": params["data"], "train": params["train"], "eval": params["eval"]},
              "models": rows, "paired_tests": tests, "by_target_popularity": popularity,
              "by_target_popularity_masked": popularity_masked, "ttds_top1": top1,
              "masking_effect": masking, "by_history_first_code": first_code,
              "curves": {name: m["curve"] for name, m in models.items()}, "ttds_epochs": ttds_epochs(models)}
    write_json(out / "results.json", result)
    write_curves(models, out)
    write_parquet(out / "ttds_ranks.parquet", models["TTDS"]["ranks"])
    with atomic_path(out / "results.md", ".md") as tmp:
        tmp.write_text(markdown(result["subset"], rows, tests, popularity, top1, result["ttds_epochs"], masking,
                                popularity_masked, first_code))
    print((out / "results.md").read_text())
    return result


if __name__ == "__main__":
    from ttds_core.cli import user_errors

    with user_errors():
        main()
