"""Benchmark of the `preprocess` stage: wall time per phase and peak memory.

Runs on the data of params.yaml with `data.max_users` overridden (default: null, i.e.
the full data set), writing into a temporary folder, and prints one JSON object and a
small table. Peak memory is the process's peak resident set size (ru_maxrss), which
includes the interpreter and the imported libraries. Not a test.

    python -m bench.bench_preprocess [--params params.yaml] [--max-users N]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from ttds_core import data_source, preprocess
from ttds_core.config import load_params


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def bench(params: dict) -> dict:
    rss_start = peak_rss_mb()
    cfg = data_source.DataConfig.from_params(params)
    t0 = time.perf_counter()
    raw = preprocess.read_raw(cfg)
    t1 = time.perf_counter()
    result = preprocess.process(cfg, raw)
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        preprocess.write_outputs(result, Path(tmp) / "processed", Path(tmp) / "preprocess.json")
    t3 = time.perf_counter()
    m = result.metrics
    return {"data": f"{cfg.format}:{cfg.name}", "max_users": cfg.max_users, "users": m["users"],
            "items": m["items"], "interactions": m["interactions"],
            "read_s": round(t1 - t0, 2), "process_s": round(t2 - t1, 2), "write_s": round(t3 - t2, 2),
            "total_s": round(t3 - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_before_mb": round(rss_start, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--max-users", type=int, default=None, help="default: all users")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    params["data"]["max_users"] = args.max_users
    row = bench(params)
    print(json.dumps(row))
    width = max(len(k) for k in row)
    for key, value in row.items():
        print(f"{key:<{width}}  {value}")
    return row


if __name__ == "__main__":
    main()
