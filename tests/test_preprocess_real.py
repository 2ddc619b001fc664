"""preprocess on the real data sets (skipped when the shared data folder is absent).

The LC-Rec benchmarks must come out exactly as published; the raw Amazon 2018 reader is
checked against an independent, plain-Python reading of the same rules.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from ttds_core import preprocess

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LCREC = DATA / "amazon2018"
BEAUTY = DATA / "amazon2018_raw" / "All_Beauty" / "All_Beauty_5.json.gz"


def params(**data) -> dict:
    base = {"format": "lcrec", "root": None, "name": None, "item_text_file": None,
            "interactions_file": None, "items_file": None, "require_text": True, "kcore": 5,
            "max_users": None, "sampler": "snowball", "max_history": 20, "user_text_items": 10,
            "item_text_chars": 512, "user_text_chars": 512, "review_chars": 200}
    return {"seed": 42, "data": base | data}


def run(tmp_path: Path, p: dict) -> tuple[dict, dict[str, pd.DataFrame]]:
    out = tmp_path / "processed"
    metrics = preprocess.run(p, out_dir=out, metrics_path=tmp_path / "preprocess.json")
    return metrics, {n: pd.read_parquet(out / f"{n}.parquet")
                     for n in ("items", "users", "sequences", "interactions")}


def read_map(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.rstrip("\n").split("\t") for line in open(path))}


@pytest.mark.skipif(not (LCREC / "Games" / "Games.inter.json").exists(), reason="no Games data")
def test_games_full_matches_lcrec(tmp_path):
    root = LCREC / "Games"
    metrics, out = run(tmp_path, params(root=str(root), name="Games"))
    assert (metrics["users"], metrics["items"], metrics["interactions"]) == (50546, 16859, 452989)
    assert metrics["items_with_text"] == 16859
    inter = json.loads((root / "Games.inter.json").read_text())
    user2id, item2id = read_map(root / "Games.user2id"), read_map(root / "Games.item2id")
    # compare through the original ids, so the check does not rely on index equality
    users = out["users"]["original_id"].tolist()
    items = out["items"]["original_id"].to_numpy()
    asin_of = {v: k for k, v in item2id.items()}
    for user_id, seq in zip(out["sequences"]["user_id"], out["sequences"]["items"]):
        expected = [asin_of[i] for i in inter[str(user2id[users[user_id]])]]
        assert items[seq[-1]] == expected[-1]  # test target = last item of the LC-Rec sequence
        assert list(items[seq]) == expected
    titles = out["items"]["title"]
    assert not titles.str.contains("&eacute;|&amp;|<br", regex=True).any()
    assert titles.str.contains("Pokémon").any()


@pytest.mark.skipif(not (LCREC / "Instruments" / "Instruments.inter.json").exists(),
                    reason="no Instruments data")
def test_instruments_full_without_text(tmp_path):
    root = LCREC / "Instruments"
    metrics, out = run(tmp_path, params(root=str(root), name="Instruments", require_text=False))
    assert (metrics["users"], metrics["items"], metrics["interactions"]) == (24772, 9922, 206153)
    assert metrics["items_with_text"] == 0
    assert (out["items"]["title"] == "Item " + out["items"]["original_id"]).all()


def reference_amazon(path: Path, kcore: int) -> dict[str, list[str]]:
    """The documented rules in plain Python: time order with file-order ties, first
    duplicate kept, iterative k-core on users and items."""
    rows = [json.loads(line) for line in gzip.open(path, "rt")]
    by_user: dict[str, list[tuple[int, int, str]]] = {}
    for n, r in enumerate(rows):
        by_user.setdefault(r["reviewerID"], []).append((r["unixReviewTime"], n, r["asin"]))
    seqs = {}
    for user, events in by_user.items():
        seen, seq = set(), []
        for _, _, asin in sorted(events):
            if asin not in seen:
                seen.add(asin)
                seq.append(asin)
        seqs[user] = seq
    while True:
        counts = Counter(a for s in seqs.values() for a in s)
        new = {u: [a for a in s if counts[a] >= kcore] for u, s in seqs.items()}
        new = {u: s for u, s in new.items() if len(s) >= kcore}
        if new == seqs:
            return seqs
        seqs = new


@pytest.mark.skipif(not BEAUTY.exists(), reason="no All_Beauty raw file")
def test_amazon2018_reader_on_real_all_beauty(tmp_path):
    asins = sorted({json.loads(line)["asin"] for line in gzip.open(BEAUTY, "rt")})
    meta = tmp_path / "meta.json.gz"
    with gzip.open(meta, "wt") as fh:
        for a in asins:
            fh.write(json.dumps({"asin": a, "title": f"Beauty &amp; care {a}",
                                 "brand": "", "category": ["All Beauty"]}) + "\n")
    metrics, out = run(tmp_path, params(format="amazon2018", root=str(BEAUTY.parent),
                                        name="All_Beauty", item_text_file=str(meta)))
    expected = reference_amazon(BEAUTY, kcore=5)
    assert metrics["raw_interactions"] == 5269
    assert (metrics["users"], metrics["items"]) == (len(expected), len({a for s in expected.values() for a in s}))
    users = out["users"]["original_id"].tolist()
    items = out["items"]["original_id"].to_numpy()
    got = {users[u]: list(items[s]) for u, s in zip(out["sequences"]["user_id"], out["sequences"]["items"])}
    assert got == expected
    assert out["items"]["title"].str.startswith("Beauty & care ").all()
    assert metrics["items_with_text"] == metrics["items"]
    inter = out["interactions"]
    assert inter["timestamp"].notna().all() and inter["rating"].between(1, 5).all()
    assert metrics["users_with_review_text"] == metrics["users"]
    assert out["users"]["text"].str.startswith("Reviews: ").all()
