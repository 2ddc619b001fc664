"""Readers for the three input formats of `preprocess` (`data.format`).

Each reader returns a `RawData`: interactions as integer codes into `user_ids` /
`item_ids` (codes follow the canonical order of the source, so a later dense
re-indexing that sorts by code is stable), plus an item-text table keyed by original id.
Readers do no filtering and no sorting beyond recording the file order in `order`;
`preprocess` owns chronology, duplicates, k-core and the split.

- `lcrec`: LC-Rec layout `X.inter.json` (user index -> chronological item indices),
  `X.item2id` / `X.user2id` (original id <TAB> index) and item text from
  `data.item_text_file`, else `X.item2title.tsv`, else LC-Rec `X.item.json`.
- `amazon2018`: the official `<X>_5.json.gz` reviews and `meta_<X>.json.gz` metadata
  (JSON lines, optionally uncompressed).
- `generic`: an interactions table (user, item, timestamp [, rating, review, summary]) and
  an item table (item + title/text columns); CSV, TSV, parquet or JSON lines.
"""

from __future__ import annotations

import ast
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from .errors import TTDSError
from .text import clean_text, is_missing

# Accepted column names in item / interaction tables (first match wins).
ITEM_ID_COLUMNS = ("original_id", "asin", "item", "item_id", "parent_asin")
TEXT_COLUMNS = {
    "title": ("title", "name"),
    "description": ("description", "text"),
    "brand": ("brand",),
    "categories": ("categories", "category"),
}
TEXT_FIELDS = tuple(TEXT_COLUMNS)


@dataclass
class RawData:
    """Interactions as codes plus item text, exactly as read (no filtering yet).

    `inter` columns: user, item (int64 codes), order (int64, position in the source:
    file line or sequence position, the tie-breaker for equal timestamps), timestamp
    (Int64), rating (Float64), review, summary (string; <NA> where absent).
    `item_text` columns: original_id + TEXT_FIELDS, cleaned strings ("" when absent).
    """

    inter: pd.DataFrame
    user_ids: np.ndarray
    item_ids: np.ndarray
    item_text: pd.DataFrame
    has_reviews: bool
    chronological: str  # how `order`/`timestamp` define time order, for metrics/docs
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers

def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise TTDSError(f"{path}: file not found (expected {what})")
    return path


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for a JSON-lines file (.gz or plain); blank lines skipped."""
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TTDSError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise TTDSError(f"{path}: line {lineno}: expected a JSON object")
                yield lineno, obj
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TTDSError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None


def _read_json_file(path: Path):
    try:
        with _open_text(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise TTDSError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TTDSError(f"{path}: cannot read ({exc.__class__.__name__})") from None


def read_id_map(path: Path) -> dict[str, int]:
    """LC-Rec `X.item2id` / `X.user2id`: `original_id<TAB>index` lines, indices 0..n-1."""
    mapping: dict[str, int] = {}
    with open(require_file(path, "original_id<TAB>index lines"), encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
                raise TTDSError(f"{path}: line {lineno}: expected 'original_id<TAB>integer index'")
            mapping[parts[0]] = int(parts[1])
    indices = sorted(mapping.values())
    if indices != list(range(len(indices))):
        raise TTDSError(f"{path}: indices must be unique and run 0..{len(indices) - 1}")
    return mapping


def read_table(path: Path, what: str) -> pd.DataFrame:
    """A CSV / TSV / parquet / JSON-lines table as a DataFrame (all columns as read)."""
    require_file(path, what)
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
        if name.endswith((".tsv", ".tsv.gz", ".txt")):
            return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
        if name.endswith((".csv", ".csv.gz")):
            return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise TTDSError(f"{path}: cannot parse as a table ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        return pd.DataFrame([obj for _, obj in iter_json_lines(path)])
    if name.endswith(".json"):
        return _json_to_table(path, _read_json_file(path))
    raise TTDSError(f"{path}: unknown table type (expected .csv, .tsv, .parquet, .json, .jsonl or .json.gz)")


def _json_to_table(path: Path, data) -> pd.DataFrame:
    """A JSON list of records, or a mapping id -> record / id -> title string."""
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return pd.DataFrame(data)
    if isinstance(data, dict):
        rows = []
        for key, value in data.items():
            if isinstance(value, dict):
                rows.append({**value, "original_id": key})
            elif isinstance(value, str):
                rows.append({"original_id": key, "title": value})
            else:
                raise TTDSError(f"{path}: entry '{key}': expected an object or a title string")
        return pd.DataFrame(rows)
    raise TTDSError(f"{path}: expected a JSON list of records or a mapping id -> record")


def _pick_column(df: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((c for c in names if c in df.columns), None)


def item_text_table(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Normalise an item table to original_id + TEXT_FIELDS (cleaned; first row per id wins)."""
    id_col = _pick_column(df, ITEM_ID_COLUMNS)
    if id_col is None:
        raise TTDSError(f"{path}: no item id column (expected one of {', '.join(ITEM_ID_COLUMNS)})")
    fields = {f: _pick_column(df, names) for f, names in TEXT_COLUMNS.items()}
    if fields["title"] is None and fields["description"] is None:
        raise TTDSError(f"{path}: no text column (expected 'title' and/or 'description')")
    out = pd.DataFrame({"original_id": df[id_col].map(_id_string)})
    for name, col in fields.items():
        # categories: Amazon nests them ([["Games", "PC"]] in 2014, ["Games", "PC"] in 2018)
        sep = ", " if name == "categories" else " "
        out[name] = df[col].map(lambda v, s=sep: clean_text(_flatten(v), sep=s)) if col else ""
    out = out[out["original_id"] != ""]
    return out.drop_duplicates("original_id", keep="first").reset_index(drop=True)


def _listed(value: str):
    """A CSV cell holding a list written as Python or JSON (`['Games', 'PC']`) as that list;
    anything else unchanged. Only literals are parsed (`ast.literal_eval`), and only a list of
    strings counts, so a title such as `[Prototype]` stays text."""
    text = value.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return value
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value
    flat = _flatten(parsed) if isinstance(parsed, list) else None
    return flat if flat is not None and all(isinstance(v, str) for v in flat) else value


def _flatten(value):
    if isinstance(value, str):
        return _listed(value)
    if isinstance(value, (list, tuple)):
        flat = []
        for v in value:
            flat.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
        return flat
    if isinstance(value, np.ndarray):
        return _flatten(value.tolist())
    return value


def _id_string(value) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _empty_item_text() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in ("original_id", *TEXT_FIELDS)})


def _inter_frame(users, items, order, timestamp=None, rating=None, review=None, summary=None):
    n = len(users)
    return pd.DataFrame({
        "user": np.asarray(users, dtype=np.int64),
        "item": np.asarray(items, dtype=np.int64),
        "order": np.asarray(order, dtype=np.int64),
        "timestamp": pd.array(timestamp if timestamp is not None else [None] * n, dtype="Int64"),
        "rating": pd.array(rating if rating is not None else [None] * n, dtype="Float64"),
        "review": pd.array(review if review is not None else [None] * n, dtype="string"),
        "summary": pd.array(summary if summary is not None else [None] * n, dtype="string"),
    })


def encode_ids(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(codes, sorted unique ids): codes follow the sorted original ids, so they are stable."""
    uniques, codes = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64), uniques


# --------------------------------------------------------------------------- lcrec

def read_lcrec(root: Path, name: str, item_text_file: Path | None) -> RawData:
    inter_path = require_file(root / f"{name}.inter.json", "LC-Rec sequences {user index: [item indices]}")
    item2id = read_id_map(root / f"{name}.item2id")
    user2id = read_id_map(root / f"{name}.user2id")
    sequences = _read_json_file(inter_path)
    if not isinstance(sequences, dict):
        raise TTDSError(f"{inter_path}: expected a mapping user index -> list of item indices")

    item_ids = np.empty(len(item2id), dtype=object)
    for asin, idx in item2id.items():
        item_ids[idx] = asin
    user_ids = np.empty(len(user2id), dtype=object)
    for reviewer, idx in user2id.items():
        user_ids[idx] = reviewer

    users, items = [], []
    for key, seq in sequences.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < len(user_ids)):
            raise TTDSError(f"{inter_path}: user key '{key}' is not an index of {name}.user2id")
        if not isinstance(seq, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                for i in seq):
            raise TTDSError(f"{inter_path}: user '{key}': expected a list of integer item indices")
        users.extend([int(key)] * len(seq))
        items.extend(seq)
    items_arr = np.asarray(items, dtype=np.int64)
    bad = (items_arr < 0) | (items_arr >= len(item_ids))
    if bad.any():
        raise TTDSError(f"{inter_path}: item index {int(items_arr[bad][0])} is not in {name}.item2id "
                        f"(expected 0..{len(item_ids) - 1})")
    # LC-Rec sequences are already chronological: the position in the file is the time order.
    inter = _inter_frame(users, items_arr, np.arange(len(items_arr)))

    files = [str(inter_path), str(root / f"{name}.item2id"), str(root / f"{name}.user2id")]
    item_text, text_file = _lcrec_item_text(root, name, item_text_file, item_ids)
    if text_file:
        files.append(text_file)
    return RawData(inter, user_ids.astype(str), item_ids.astype(str), item_text,
                   has_reviews=False, chronological="LC-Rec sequence order", files=files)


def _lcrec_item_text(root: Path, name: str, item_text_file: Path | None,
                     item_ids: np.ndarray) -> tuple[pd.DataFrame, str | None]:
    """Item text keyed by original id: user file, else X.item2title.tsv, else X.item.json."""
    if item_text_file is not None:
        return item_text_table(read_table(item_text_file, "item text keyed by original id"),
                               item_text_file), str(item_text_file)
    titles = root / f"{name}.item2title.tsv"
    if titles.is_file():
        return item_text_table(read_table(titles, "item titles"), titles), str(titles)
    item_json = root / f"{name}.item.json"
    if item_json.is_file():
        data = _read_json_file(item_json)
        if not isinstance(data, dict):
            raise TTDSError(f"{item_json}: expected a mapping item index -> {{title, description, ...}}")
        rows = []
        for key, record in data.items():
            if not (key.isdigit() and int(key) < len(item_ids)) or not isinstance(record, dict):
                raise TTDSError(f"{item_json}: entry '{key}': expected an item index of "
                                f"{name}.item2id mapping to an object")
            rows.append({**record, "original_id": item_ids[int(key)]})
        return item_text_table(pd.DataFrame(rows), item_json), str(item_json)
    return _empty_item_text(), None


def candidate_files(fmt: str, root: Path | None, name: str, item_text_file: Path | None = None,
                    interactions_file: Path | None = None, items_file: Path | None = None) -> list[Path]:
    """Every file the reader of `fmt` reads or would fall back to, existing or not.

    The `inputs` stage fingerprints these, so editing, adding or removing any of them
    re-runs `preprocess` (a fallback such as `X.item.json` counts: creating `X.item2title.tsv`
    changes what is read). `RawData.files` is always a subset (tested).
    """
    if fmt == "lcrec":
        files = [root / f"{name}.{suffix}" for suffix in ("inter.json", "item2id", "user2id")]
        files += [item_text_file] if item_text_file is not None else [
            root / f"{name}.item2title.tsv", root / f"{name}.item.json"]
        return files
    if fmt == "amazon2018":
        files = [root / f"{name}_5.json.gz", root / f"{name}_5.json"]
        files += [item_text_file] if item_text_file is not None else [
            root / f"meta_{name}.json.gz", root / f"meta_{name}.json"]
        return files
    return [f for f in (interactions_file, items_file) if f is not None]


# --------------------------------------------------------------------------- amazon2018

def _first_existing(root: Path, names: list[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_file()), None)


def read_amazon2018(root: Path, name: str, item_text_file: Path | None) -> RawData:
    reviews_path = _first_existing(root, [f"{name}_5.json.gz", f"{name}_5.json"])
    if reviews_path is None:
        raise TTDSError(f"{root / (name + '_5.json.gz')}: file not found "
                        "(expected the Amazon 2018 5-core reviews, one JSON object per line)")
    users, items, times, ratings, reviews, summaries = [], [], [], [], [], []
    for lineno, rec in iter_json_lines(reviews_path):
        for key in ("reviewerID", "asin", "unixReviewTime"):
            if is_missing(rec.get(key)):
                raise TTDSError(f"{reviews_path}: line {lineno}: missing field '{key}'")
        ts = _unix_seconds(rec["unixReviewTime"])
        if ts is None:
            raise TTDSError(f"{reviews_path}: line {lineno}: 'unixReviewTime' = {rec['unixReviewTime']!r}, "
                            "expected an integer (seconds)")
        rating = rec.get("overall")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, (int, float))):
            raise TTDSError(f"{reviews_path}: line {lineno}: 'overall' = {rating!r}, expected a number")
        users.append(str(rec["reviewerID"]))
        items.append(str(rec["asin"]))
        times.append(ts)
        ratings.append(None if rating is None else float(rating))
        reviews.append(rec.get("reviewText"))
        summaries.append(rec.get("summary"))
    if not users:
        raise TTDSError(f"{reviews_path}: no reviews found (expected one JSON object per line)")
    user_codes, user_ids = encode_ids(users)
    item_codes, item_ids = encode_ids(items)
    inter = _inter_frame(user_codes, item_codes, np.arange(len(users)), times, ratings,
                         _text_or_na(reviews), _text_or_na(summaries))

    files = [str(reviews_path)]
    meta = item_text_file or _first_existing(root, [f"meta_{name}.json.gz", f"meta_{name}.json"])
    if meta is None:
        item_text = _empty_item_text()
    else:
        item_text = item_text_table(read_table(meta, "item metadata"), meta)
        files.append(str(meta))
    return RawData(inter, user_ids, item_ids, item_text, has_reviews=True,
                   chronological="unixReviewTime, ties in file order", files=files)


def _unix_seconds(value) -> int | None:
    """An integer number of seconds (int, integral float or digit string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _text_or_na(values: list) -> list:
    """Cleaned review text; None where absent or empty after cleaning."""
    out = []
    for v in values:
        text = clean_text(v) if isinstance(v, str) else ""
        out.append(text or None)
    return out


# --------------------------------------------------------------------------- generic

GENERIC_COLUMNS = {"user": ("user", "user_id", "reviewerID"),
                   "item": ("item", "item_id", "asin"),
                   "timestamp": ("timestamp", "time", "unixReviewTime")}


def read_generic(interactions_file: Path | None, items_file: Path | None) -> RawData:
    if interactions_file is None:
        raise TTDSError("params: 'data.interactions_file' is null, expected a CSV/TSV/parquet file "
                        "with user, item, timestamp columns (format generic)")
    df = read_table(interactions_file, "interactions with user, item, timestamp columns")
    cols = {}
    for key, names in GENERIC_COLUMNS.items():
        col = _pick_column(df, names)
        if col is None:
            raise TTDSError(f"{interactions_file}: missing column '{key}' (accepted: {', '.join(names)})")
        cols[key] = col
    if df.empty:
        raise TTDSError(f"{interactions_file}: no rows")
    for key in ("user", "item"):
        empty = df[cols[key]].map(_id_string) == ""
        if empty.any():
            raise TTDSError(f"{interactions_file}: row {int(np.flatnonzero(empty.to_numpy())[0]) + 1}: "
                            f"empty '{cols[key]}'")
    timestamps = _parse_timestamps(df[cols["timestamp"]], interactions_file, cols["timestamp"])
    user_codes, user_ids = encode_ids(df[cols["user"]].map(_id_string).tolist())
    item_codes, item_ids = encode_ids(df[cols["item"]].map(_id_string).tolist())
    rating = None
    if "rating" in df.columns:
        rating = pd.to_numeric(df["rating"].replace("", None), errors="coerce")
        if rating.isna().sum() > (df["rating"].replace("", None).isna()).sum():
            raise TTDSError(f"{interactions_file}: column 'rating': expected numbers")
        rating = rating.astype("Float64")
    text = {c: (_text_or_na(df[c].tolist()) if c in df.columns else None) for c in ("review", "summary")}
    inter = _inter_frame(user_codes, item_codes, np.arange(len(df)), timestamps, rating,
                         text["review"], text["summary"])
    has_reviews = any(text[c] is not None and any(t is not None for t in text[c])
                      for c in ("review", "summary"))
    files = [str(interactions_file)]
    if items_file is None:
        item_text = _empty_item_text()
    else:
        item_text = item_text_table(read_table(items_file, "item text with item + title/text columns"),
                                    items_file)
        files.append(str(items_file))
    return RawData(inter, user_ids, item_ids, item_text, has_reviews=has_reviews,
                   chronological=f"'{cols['timestamp']}', ties in file order", files=files)


def _parse_timestamps(col: pd.Series, path: Path, name: str) -> pd.array:
    """Integers (e.g. unix seconds) as they are; date strings as unix seconds."""
    as_num = pd.to_numeric(col, errors="coerce")
    if as_num.notna().all() and (as_num == as_num.round()).all():
        return pd.array(as_num.astype("int64"), dtype="Int64")
    try:
        dates = pd.to_datetime(col, utc=True, format="mixed")
    except (ValueError, TypeError):
        raise TTDSError(f"{path}: column '{name}': expected integer timestamps or dates") from None
    if dates.isna().any():
        raise TTDSError(f"{path}: column '{name}': row {int(np.flatnonzero(dates.isna())[0]) + 1} "
                        "has no timestamp")
    seconds = (dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return pd.array(seconds.astype("int64"), dtype="Int64")
