"""Can models be told apart on a data subset? SASRec against MostPop on candidate subsets.

    python -m bench.bench_separability [--set data.max_users=5000 --set data.sampler=users ...]
                                       [--models mostpop sasrec] [--out FILE]

A comparison of recommenders means something only where a trained sequential model clearly
beats popularity (SPEC: judge TTDS where SASRec >= 1.5x MostPop on test NDCG@10). For each
candidate (one `--set` group per `--candidate`, params.yaml underneath), this runs the
`preprocess` stage into a scratch folder and the baselines on it, exactly as `dvc repro`
would, and reports the subset's size and, per model, test / validation NDCG@10 and HR@10
(unmasked and masked) with the ratio to MostPop. Nothing in the repository is written but
`--out`.

    python -m bench.bench_separability \\
        --candidate data.max_users=5000 data.sampler=users \\
        --candidate data.max_users=8000 data.sampler=users
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import yaml

from ttds_core import baselines, preprocess
from ttds_core.config import load_params
from ttds_core.io import write_json


def with_overrides(params: dict, sets: list[str]) -> dict:
    """params with `a.b=value` overrides (values parsed as YAML, as `dvc exp run -S` does)."""
    out = copy.deepcopy(params)
    for item in sets:
        key, _, raw = item.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def measure(params: dict, models: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="separability.") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        pre = preprocess.run(params, out_dir=tmp / "processed", metrics_path=tmp / "preprocess.json")
        result = {"users": pre.get("users"), "items": pre.get("items"), "interactions": pre.get("interactions"),
                  "preprocess_seconds": round(time.perf_counter() - start, 1), "models": {}}
        for name in models:
            m = baselines.run(params, name, processed_dir=tmp / "processed", metrics_dir=tmp / "metrics",
                              out_dir=tmp / "baselines")
            result["models"][name] = {split: {k: round(m[split][k], 4) for k in ("HR@10", "NDCG@10")}
                                      for split in ("test", "test_masked", "valid", "valid_masked")}
            result["models"][name]["seconds"] = m.get("seconds")
        pop = result["models"].get("mostpop")
        if pop:
            for name, m in result["models"].items():
                m["ndcg10_over_mostpop"] = {split: round(m[split]["NDCG@10"] / max(pop[split]["NDCG@10"], 1e-9), 2)
                                            for split in ("test", "test_masked", "valid", "valid_masked")}
    return result


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--candidate", nargs="+", action="append", default=None, metavar="KEY=VALUE",
                    help="one candidate subset: params overrides (repeat for several candidates)")
    ap.add_argument("--models", nargs="+", default=["mostpop", "sasrec"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    base = load_params(args.params)
    results = []
    for sets in args.candidate or [[]]:
        res = {"overrides": sets, **measure(with_overrides(base, sets), args.models)}
        print(json.dumps(res, indent=1), flush=True)
        results.append(res)
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
