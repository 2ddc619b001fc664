"""preprocess on tiny fixtures written by the tests: formats, k-core, split, leakage,
subset determinism, text cleaning and every bad-input message."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ttds_core import preprocess
from ttds_core.cli import run_stage
from ttds_core.errors import TTDSError
from ttds_core.text import clean_text, truncate

OUTPUTS = ("items", "users", "sequences", "interactions")


# --------------------------------------------------------------------------- fixtures

def make_params(**data) -> dict:
    base = {"format": "lcrec", "root": None, "name": "T", "item_text_file": None,
            "interactions_file": None, "items_file": None, "require_text": True, "kcore": 5,
            "max_users": None, "sampler": "snowball", "max_history": 20, "user_text_items": 10,
            "item_text_chars": 512, "user_text_chars": 512, "review_chars": 200}
    return {"seed": 42, "data": base | data}


def write_lcrec(root: Path, seqs: dict[int, list[int]], titles: dict[int, str] | None,
                name: str = "T") -> Path:
    """LC-Rec layout: user index -> item indices; ASIN 'A<i>', reviewer 'R<u>'."""
    root.mkdir(parents=True, exist_ok=True)
    n_items = max(i for s in seqs.values() for i in s) + 1
    (root / f"{name}.inter.json").write_text(json.dumps({str(u): s for u, s in seqs.items()}))
    (root / f"{name}.item2id").write_text("".join(f"A{i:03d}\t{i}\n" for i in range(n_items)))
    (root / f"{name}.user2id").write_text("".join(f"R{u:03d}\t{u}\n" for u in seqs))
    if titles is not None:
        rows = ["lcrec_item_index\tasin\ttitle"] + [f"{i}\tA{i:03d}\t{t}" for i, t in titles.items()]
        (root / f"{name}.item2title.tsv").write_text("\n".join(rows) + "\n")
    return root


def write_json_lines(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def random_lcrec(root: Path, n_users=300, n_items=40, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    seqs = {u: rng.choice(n_items, size=int(rng.integers(6, 10)), replace=False).tolist()
            for u in range(n_users)}
    return write_lcrec(root, seqs, {i: f"Game title{i}x" for i in range(n_items)})


def run_to(tmp_path: Path, params: dict) -> dict:
    return preprocess.run(params, out_dir=tmp_path / "out" / "processed",
                          metrics_path=tmp_path / "out" / "preprocess.json")


def load(tmp_path: Path) -> dict[str, pd.DataFrame]:
    return {n: pd.read_parquet(tmp_path / "out" / "processed" / f"{n}.parquet") for n in OUTPUTS}


# A 5-core cascade: item Ix has 4 users (dropped in round 1), so users U06..U09 fall to 4
# (round 2), so item Iy falls to 1 user (round 3), so user U10 falls to 4 (round 4).
CORE_USERS = [f"U{u:02d}" for u in range(6)]
CORE_ITEMS = [f"I{i}" for i in range(5)]


def cascade_reviews() -> list[dict]:
    rows = []

    def add(user, item, ts, review=None, summary="ok"):
        rows.append({"reviewerID": user, "asin": item, "unixReviewTime": ts, "overall": 4.0,
                     "reviewText": review or f"review of {item} by {user}", "summary": summary})

    for u, user in enumerate(CORE_USERS):
        for k, item in enumerate(CORE_ITEMS):
            # U01 reviews I4 and I3 on the same day: the file order (I4 first) breaks the tie.
            ts = 1000 + 10 * k if not (user == "U01" and item in ("I3", "I4")) else 1050
            add(user, item, ts)
    for user in ("U06", "U07", "U08", "U09"):
        for k, item in enumerate(["Ix", "Iy", "I0", "I1", "I2"]):
            add(user, item, 2000 + k)
    for k, item in enumerate(["Iy", "I0", "I1", "I2", "I3"]):
        add("U10", item, 3000 + k)
    add("U00", "I0", 9999, review="a later duplicate")  # duplicate: the first (earliest) is kept
    # put U01's I4 line before its I3 line in the file
    i3 = next(i for i, r in enumerate(rows) if r["reviewerID"] == "U01" and r["asin"] == "I3")
    i4 = next(i for i, r in enumerate(rows) if r["reviewerID"] == "U01" and r["asin"] == "I4")
    rows[i3], rows[i4] = rows[i4], rows[i3]
    return rows


def cascade_meta() -> list[dict]:
    return [{"asin": a, "title": f"Product {a}", "brand": "Acme", "category": ["Beauty", "Skin"],
             "description": [f"<p>About {a}</p>"]} for a in CORE_ITEMS + ["Ix", "Iy"]]


def write_cascade(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    write_json_lines(root / "Cat_5.json.gz", cascade_reviews())
    write_json_lines(root / "meta_Cat.json.gz", cascade_meta())
    return root


# --------------------------------------------------------------------------- text

@pytest.mark.parametrize("raw, clean", [
    ("Pok&eacute;mon Ruby", "Pokémon Ruby"),
    ("Tom &amp; Jerry", "Tom & Jerry"),
    ("Pok&amp;eacute;mon &amp;amp; friends", "Pokémon & friends"),  # double-escaped
    ("<b>Bold</b><br/>text", "Bold text"),
    ("  many \n\t spaces&nbsp;here ", "many spaces here"),
    (["<p>Line one</p>", "", "Line&nbsp;two"], "Line one Line two"),
    (None, ""),
    (float("nan"), ""),
    ("5 < 6 and 7 > 3", "5 < 6 and 7 > 3"),
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_truncate_cuts_on_a_word_boundary():
    assert truncate("short", 10) == "short"
    out = truncate("alpha beta gamma delta", 12)
    assert len(out) <= 13 and out.startswith("alpha beta") and out.endswith("…")


# --------------------------------------------------------------------------- amazon2018 + k-core

def test_amazon2018_kcore_cascade_exact_sets(tmp_path):
    params = make_params(format="amazon2018", root=str(write_cascade(tmp_path)), name="Cat")
    metrics = run_to(tmp_path, params)
    out = load(tmp_path)
    assert out["users"]["original_id"].tolist() == CORE_USERS
    assert out["items"]["original_id"].tolist() == CORE_ITEMS
    assert metrics["kcore_rounds"] == 4
    assert metrics["duplicates_dropped"] == 1
    assert (metrics["raw_users"], metrics["raw_items"]) == (11, 7)
    assert (metrics["users"], metrics["items"], metrics["interactions"]) == (6, 5, 30)
    seqs = dict(zip(out["sequences"]["user_id"], out["sequences"]["items"].map(list)))
    assert seqs[0] == [0, 1, 2, 3, 4]
    assert seqs[1] == [0, 1, 2, 4, 3]  # same-day tie: file order
    inter = out["interactions"]
    first = inter[(inter.user_id == 0) & (inter.item_id == 0)]
    assert first["review"].tolist() == ["review of I0 by U00"]  # the earliest duplicate kept
    assert first["timestamp"].tolist() == [1000] and first["rating"].tolist() == [4.0]
    item0 = out["items"].iloc[0]
    assert item0["text"] == "Title: Product I0; Brand: Acme; Categories: Beauty, Skin; Description: About I0"


def test_split_positions_and_targets(tmp_path):
    seqs = {0: [0, 1, 2, 3, 4, 5], 1: [5, 4, 3, 2, 1], 2: [1, 2, 3, 4, 5, 0]}
    for u in range(3, 8):  # more users so every item is 5-core
        seqs[u] = [0, 1, 2, 3, 4, 5] if u % 2 else [5, 0, 1, 2, 3, 4]
    root = write_lcrec(tmp_path / "lc", seqs, {i: f"Title {i}" for i in range(6)})
    run_to(tmp_path, make_params(root=str(root)))
    out = load(tmp_path)
    got = dict(zip(out["sequences"]["user_id"], out["sequences"]["items"].map(list)))
    assert got == seqs  # full LC-Rec data: ids equal the LC-Rec indices, order is the file order
    inter = out["interactions"]
    for user, seq in seqs.items():
        rows = inter[inter.user_id == user].sort_values("pos")
        assert rows["item_id"].tolist() == seq
        assert rows["split"].tolist() == ["train"] * (len(seq) - 2) + ["valid", "test"]
    assert inter["timestamp"].isna().all() and inter["review"].isna().all()
    assert str(inter["timestamp"].dtype) == "Int64"


# --------------------------------------------------------------------------- leakage

def test_user_text_never_sees_validation_or_test_reviews(tmp_path):
    rows = cascade_reviews()
    for r in rows:
        if r["reviewerID"] == "U00" and r["asin"] == "I4" and r["unixReviewTime"] == 1040:
            r["reviewText"], r["summary"] = "zebraword test secret", "zebrasummary"
        if r["reviewerID"] == "U00" and r["asin"] == "I3":
            r["reviewText"] = "quokkaword validation secret"
    root = tmp_path / "raw"
    write_json_lines(root / "Cat_5.json.gz", rows)
    write_json_lines(root / "meta_Cat.json.gz", cascade_meta())
    metrics = run_to(tmp_path, make_params(format="amazon2018", root=str(root), name="Cat"))
    users = load(tmp_path)["users"]
    text = users.loc[users.original_id == "U00", "text"].item()
    assert "review of I0 by U00" in text and "review of I2 by U00" in text
    for word in ("zebraword", "zebrasummary", "quokkaword"):
        assert word not in " ".join(users["text"])
    assert metrics["users_with_review_text"] == 6


def test_user_text_titles_come_from_training_items_only(tmp_path):
    root = random_lcrec(tmp_path / "lc", n_users=120, n_items=20)
    run_to(tmp_path, make_params(root=str(root), user_text_items=50))
    out = load(tmp_path)
    titles = out["items"].set_index("item_id")["title"]
    texts = out["users"].set_index("user_id")["text"]
    for user, seq in zip(out["sequences"]["user_id"], out["sequences"]["items"]):
        seq = list(seq)
        for held_out in seq[-2:]:
            assert titles[held_out] not in texts[user]
        for trained in seq[:-2]:
            assert titles[trained] in texts[user]


# --------------------------------------------------------------------------- subset

def test_subset_is_deterministic_and_seed_dependent(tmp_path):
    root = random_lcrec(tmp_path / "lc")

    def files(seed, sub):
        params = make_params(root=str(root), max_users=80) | {"seed": seed}
        preprocess.run(params, out_dir=tmp_path / sub / "processed",
                       metrics_path=tmp_path / sub / "m.json")
        return {n: (tmp_path / sub / "processed" / f"{n}.parquet").read_bytes() for n in OUTPUTS}

    a, b, c = files(42, "a"), files(42, "b"), files(7, "c")
    assert a == b
    assert a["users"] != c["users"]


@pytest.mark.parametrize("sampler", ["snowball", "users"])
def test_subset_is_a_kcore_with_targets_seen_in_training(tmp_path, sampler):
    root = random_lcrec(tmp_path / "lc")
    metrics = run_to(tmp_path, make_params(root=str(root), max_users=120, sampler=sampler))
    out = load(tmp_path)
    inter = out["interactions"]
    assert 0 < metrics["users"] <= 120
    assert inter.groupby("user_id").size().min() >= 5
    assert inter.groupby("item_id").size().min() >= 5
    train_items = set(inter.loc[inter.split == "train", "item_id"])
    assert set(inter.loc[inter.split != "train", "item_id"]) <= train_items
    # dense ids, in the order of the source indices
    assert out["users"]["user_id"].tolist() == list(range(len(out["users"])))
    assert out["items"]["original_id"].is_monotonic_increasing
    assert out["users"]["original_id"].is_monotonic_increasing
    assert metrics["subset"]["sampler"] == sampler


# --------------------------------------------------------------------------- generic

def test_generic_format_orders_by_time_and_cleans_text(tmp_path):
    rows = []
    for u in ("bob", "alice", "carol", "dave"):
        for k, item in enumerate(["p1", "p2", "p3", "p4"]):
            rows.append((u, item, f"2021-01-0{k + 1}"))
    rows.append(("alice", "p9", "2021-01-02"))  # alice's p9 ties with p2 (file order after it)
    rows.append(("eve", "p1", "2021-01-01"))    # eve has 2 interactions: below 3, dropped
    rows.append(("eve", "p2", "2021-01-02"))
    rows.reverse()  # the file is not sorted by time
    inter_path = tmp_path / "inter.csv"
    pd.DataFrame(rows, columns=["user", "item", "timestamp"]).to_csv(inter_path, index=False)
    items_path = tmp_path / "items.csv"
    pd.DataFrame({"item": ["p1", "p2", "p3", "p4", "p9"],
                  "title": ["Caf&eacute; <i>Mug</i>", "Tea", "Pot", "Cup", "Spoon"],
                  "description": ["Hot &amp; cold", "", "", "", ""]}).to_csv(items_path, index=False)
    metrics = run_to(tmp_path, make_params(format="generic", interactions_file=str(inter_path),
                                           items_file=str(items_path), kcore=3))
    out = load(tmp_path)
    assert out["users"]["original_id"].tolist() == ["alice", "bob", "carol", "dave"]
    assert out["items"]["original_id"].tolist() == ["p1", "p2", "p3", "p4"]  # p9 has 1 user
    assert out["items"]["title"].iloc[0] == "Café Mug"
    assert out["items"]["text"].iloc[0] == "Title: Café Mug; Description: Hot & cold"
    for seq in out["sequences"]["items"]:
        assert list(seq) == [0, 1, 2, 3]
    ts = out["interactions"].query("user_id == 0")["timestamp"].tolist()
    assert ts == sorted(ts) and ts[0] == 1609459200  # 2021-01-01 UTC in seconds
    assert metrics["users"] == 4 and metrics["items_with_text"] == 4


def test_generic_tie_broken_by_file_order(tmp_path):
    rows = [(u, f"p{k}", 5) for u in ("a", "b", "c") for k in (3, 1, 2)]  # all at the same time
    path = tmp_path / "inter.parquet"
    pd.DataFrame(rows, columns=["user_id", "item_id", "time"]).to_parquet(path)
    run_to(tmp_path, make_params(format="generic", interactions_file=str(path), kcore=3,
                                 require_text=False))
    out = load(tmp_path)
    ids = out["items"].set_index("item_id")["original_id"]
    assert [ids[i] for i in out["sequences"]["items"].iloc[0]] == ["p3", "p1", "p2"]
    assert out["items"]["title"].tolist() == ["Item p1", "Item p2", "Item p3"]


# --------------------------------------------------------------------------- bad input

def assert_nothing_written(tmp_path: Path):
    out = tmp_path / "out"
    assert not (out / "processed").exists() and not (out / "preprocess.json").exists()
    assert not out.exists() or not any(p.name.startswith(".") for p in out.iterdir())


def expect_error(tmp_path, params, *fragments):
    with pytest.raises(TTDSError) as info:
        run_to(tmp_path, params)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert_nothing_written(tmp_path)
    return message


def test_malformed_json_line_names_file_and_line(tmp_path):
    root = write_cascade(tmp_path)
    path = root / "Cat_5.json.gz"
    lines = gzip.open(path, "rt").read().splitlines()
    lines[2] = lines[2][:-5]  # truncate the third record
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    expect_error(tmp_path, make_params(format="amazon2018", root=str(root), name="Cat"),
                 "Cat_5.json.gz", "line 3", "not valid JSON")


def test_missing_field_names_the_field(tmp_path):
    rows = cascade_reviews()
    del rows[4]["unixReviewTime"]
    root = tmp_path / "raw"
    write_json_lines(root / "Cat_5.json.gz", rows)
    expect_error(tmp_path, make_params(format="amazon2018", root=str(root), name="Cat"),
                 "line 5", "unixReviewTime")


def test_item_without_text_follows_require_text(tmp_path):
    root = write_cascade(tmp_path)
    meta = [m for m in cascade_meta() if m["asin"] != "I3"]
    write_json_lines(root / "meta_Cat.json.gz", meta)
    params = make_params(format="amazon2018", root=str(root), name="Cat")
    expect_error(tmp_path, params, "item 'I3'", "require_text")
    params["data"]["require_text"] = False
    metrics = run_to(tmp_path, params)
    items = load(tmp_path)["items"].set_index("original_id")
    assert items.loc["I3", "title"] == "Item I3" and not items.loc["I3", "has_text"]
    assert items.loc["I3", "text"] == "Title: Item I3"
    assert metrics["items_with_text"] == 4


def test_empty_after_filtering(tmp_path):
    root = write_cascade(tmp_path)
    expect_error(tmp_path, make_params(format="amazon2018", root=str(root), name="Cat", kcore=50),
                 "no interactions left", "data.kcore")


@pytest.mark.parametrize("key, value, fragment", [
    ("format", "csv", "'data.format' = 'csv', expected one of lcrec, amazon2018, generic"),
    ("kcore", "five", "'data.kcore' = 'five', expected an integer"),
    ("max_users", 0, "'data.max_users' = 0, expected at least 1"),
    ("require_text", "yes", "'data.require_text' = 'yes', expected true/false"),
    ("sampler", "random", "'data.sampler'"),
])
def test_bad_params(tmp_path, key, value, fragment):
    root = write_cascade(tmp_path)
    params = make_params(format="amazon2018", root=str(root), name="Cat")
    params["data"][key] = value
    expect_error(tmp_path, params, fragment)


def test_missing_files(tmp_path):
    root = write_lcrec(tmp_path / "lc", {0: [0, 1, 2]}, None)
    (root / "T.user2id").unlink()
    expect_error(tmp_path, make_params(root=str(root)), "T.user2id", "file not found")
    expect_error(tmp_path, make_params(root=str(tmp_path / "nowhere")), "'data.root'", "not a folder")
    expect_error(tmp_path, make_params(format="amazon2018", root=str(root), name="Cat"),
                 "Cat_5.json.gz", "file not found")
    expect_error(tmp_path, make_params(format="generic"), "'data.interactions_file'")


def test_lcrec_bad_item_index(tmp_path):
    root = write_lcrec(tmp_path / "lc", {0: [0, 1, 2]}, {0: "a", 1: "b", 2: "c"})
    (root / "T.inter.json").write_text(json.dumps({"0": [0, 1, 7]}))
    expect_error(tmp_path, make_params(root=str(root)), "item index 7", "T.item2id")


def test_failed_run_keeps_previous_outputs(tmp_path):
    root = write_cascade(tmp_path)
    params = make_params(format="amazon2018", root=str(root), name="Cat")
    run_to(tmp_path, params)
    before = {n: (tmp_path / "out" / "processed" / f"{n}.parquet").read_bytes() for n in OUTPUTS}
    params["data"]["kcore"] = 50
    with pytest.raises(TTDSError):
        run_to(tmp_path, params)
    after = {n: (tmp_path / "out" / "processed" / f"{n}.parquet").read_bytes() for n in OUTPUTS}
    assert before == after
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["preprocess.json", "processed"]


def test_stage_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(json.dumps(make_params(format="parquet")))
    with pytest.raises(SystemExit) as info:
        run_stage("preprocess", "params.yaml")
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: params: 'data.format'") and "\n" not in err
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------- lcrec text sources

def core_seqs(n_users=6, n_items=5) -> dict[int, list[int]]:
    return {u: [(u + k) % n_items for k in range(n_items)] for u in range(n_users)}


def test_lcrec_item_text_file_keyed_by_asin_wins(tmp_path):
    root = write_lcrec(tmp_path / "lc", core_seqs(), {i: f"TSV title {i}" for i in range(5)})
    user_file = tmp_path / "text.json"
    user_file.write_text(json.dumps({f"A{i:03d}": {"title": f"User &quot;title&quot; {i}",
                                                   "description": "<p>Nice</p>"} for i in range(5)}))
    run_to(tmp_path, make_params(root=str(root), item_text_file=str(user_file)))
    items = load(tmp_path)["items"]
    assert items["title"].tolist() == [f'User "title" {i}' for i in range(5)]
    assert items["text"].iloc[0] == 'Title: User "title" 0; Description: Nice'


def test_lcrec_item_json_keyed_by_index(tmp_path):
    root = write_lcrec(tmp_path / "lc", core_seqs(), None)
    (root / "T.item.json").write_text(json.dumps({str(i): {
        "title": f"Guitar {i}", "description": "", "brand": "Fender",
        "categories": "Musical Instruments,Guitars"} for i in range(5)}))
    run_to(tmp_path, make_params(root=str(root)))
    items = load(tmp_path)["items"]
    assert items["original_id"].tolist() == [f"A{i:03d}" for i in range(5)]
    assert items["text"].iloc[2] == "Title: Guitar 2; Brand: Fender; Categories: Musical Instruments,Guitars"


def test_lcrec_without_text_requires_the_switch(tmp_path):
    root = write_lcrec(tmp_path / "lc", core_seqs(), None)
    expect_error(tmp_path, make_params(root=str(root)), "item 'A000'", "5 of 5 items")


def test_generic_reviews_and_ratings(tmp_path):
    rows = [(u, f"p{k}", 100 + k, float(k + 1), f"{u} likes p{k}", "nice")
            for u in ("a", "b", "c") for k in range(3)]
    path = tmp_path / "inter.tsv"
    pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating", "review", "summary"]) \
        .to_csv(path, sep="\t", index=False)
    metrics = run_to(tmp_path, make_params(format="generic", interactions_file=str(path), kcore=3,
                                           require_text=False))
    out = load(tmp_path)
    assert out["interactions"]["rating"].tolist() == [1.0, 2.0, 3.0] * 3
    assert out["users"]["text"].tolist() == [f"Reviews: nice: {u} likes p0" for u in "abc"]
    assert metrics["users_with_review_text"] == 3 and metrics["test_targets_tied_in_time"] == 0
