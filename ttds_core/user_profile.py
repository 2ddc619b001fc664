"""The user's SID at test time, from a profile that is not one purchase stale.

The user tower's text, and so the user's SID, is built from the training interactions only
(`user_text.py`). For the validation target that profile holds everything before the target;
for the test target it is one purchase stale: the validation item is in the test prompt's
item history but never in the user text. `eval.user_profile: fresh` re-derives every user's
SID for the test prompts from the text of the training AND validation interactions, the way
the model's own table was derived:

- a static index (`index.dynamic: false`): the text embedded by the backbone exactly as the
  `embed` stage embeds it, then coded by the model's quantizer (on the training-time text this
  reproduces the model's user table);
- a dynamic index: what one more refresh would do with the new texts (`dynamic.refresh_tower`):
  embedded by the trained LLM (by the backbone under `index.refresh_embeddings: backbone`, as
  its refreshes do), the quantizer's normalisation re-fitted on them, and each user's codes kept
  unless the new ones win by `index.refresh_margin` (hysteresis).

Collisions are resolved among all users, as `build_sids` does (a collision set larger than
`index.max_suffix` is an error for a static index, as in `build_sids`; a dynamic index keeps the
model's table with a warning, as a refresh does).

No leakage: the profile reads only rows before the test target. Where that order is not
established, the validation row is withheld and the user keeps the training-only text: its
timestamp equals the test row's (day-level Amazon timestamps: the split then rests on source
order), or its review is the test row's review (Amazon repeats one review over the variants of
a product, so the user's words about the test item would enter its prompt). `evaluate` records
how many users that is. Chosen on validation (docs/benchmark.md, "The test-time user
profile"): a profile one purchase stale cost the validation NDCG@10 about an eighth.

Serving (`serve.user_profile: fresh`, `serve.py`) derives the table the same way from every
known interaction, test rows included: at serving time they are all the past.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import get
from .errors import TTDSError
from .io import read_parquet
# schema's copy of dynamic.REFRESH_EMBEDDINGS (a test keeps them equal): dynamic imports torch,
# and a serving cache hit reads these settings without loading it
from .schema import REFRESH_EMBEDDINGS
from .user_text import UserTextRule, user_texts

log = logging.getLogger(__name__)

PROFILES = ("fresh", "training")
TEST_TIME_SPLITS = ("train", "valid")  # everything before the test target
SERVING_SPLITS = ("train", "valid", "test")  # at serving time every known interaction is the past


@dataclass(frozen=True)
class SidDerivation:
    """Every param the derivation of SIDs from the user texts reads (beside the model files and
    the backbone's other `model.*` settings); `fresh_user_sids` reads its settings only from here."""

    embed_batch_size: int
    max_text_tokens: int
    dynamic: bool
    refresh_margin: float
    refresh_embeddings: str
    max_suffix: int

    @classmethod
    def from_params(cls, params: dict) -> "SidDerivation":
        return cls(embed_batch_size=get(params, "embed.batch_size", int, 32, min_value=1),
                   max_text_tokens=get(params, "model.max_text_tokens", int, 64, min_value=1),
                   dynamic=get(params, "index.dynamic", bool),
                   refresh_margin=get(params, "index.refresh_margin", float, 0.2, min_value=0.0),
                   refresh_embeddings=get(params, "index.refresh_embeddings", str, "llm",
                                          choices=REFRESH_EMBEDDINGS),
                   max_suffix=get(params, "index.max_suffix", int, min_value=0))


def profile_settings(params: dict) -> dict:
    """What a fresh profile's SIDs depend on beside the model files, the processed data and
    `model.*`: the user text rule and the derivation, read by the same two records the profile
    code reads, so a new setting cannot reach the profile without reaching a cache key too."""
    return {"text": asdict(UserTextRule.from_params(params)), "derivation": asdict(SidDerivation.from_params(params))}


def withheld_validation_rows(inter: pd.DataFrame) -> pd.Series:
    """Per user (indexed by user_id), True where the validation row may not precede the test
    target: the same timestamp, or the same review text (module docstring)."""
    rows = inter.set_index("user_id")
    valid = rows[rows["split"] == "valid"]
    test = rows[rows["split"] == "test"].reindex(valid.index)
    withheld = pd.Series(False, index=valid.index)
    for column in ("timestamp", "review"):
        a, b = valid[column], test[column]
        both = (a.notna() & b.notna()).to_numpy()
        same = np.zeros(len(valid), dtype=bool)
        same[both] = a.to_numpy(dtype=object)[both] == b.to_numpy(dtype=object)[both]
        withheld |= same
    return withheld


def _interactions_and_titles(processed_dir: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The processed interactions sorted by user and position, and the item titles by item id."""
    inter = read_parquet(processed_dir / "interactions.parquet",
                         ["user_id", "item_id", "pos", "split", "timestamp", "review", "summary"])
    items = read_parquet(processed_dir / "items.parquet", ["item_id", "title"]).sort_values("item_id")
    if not np.array_equal(items["item_id"].to_numpy(), np.arange(len(items))):
        raise TTDSError(f"{processed_dir / 'items.parquet'}: 'item_id' must be 0..n-1 without gaps")
    return inter.sort_values(["user_id", "pos"]).reset_index(drop=True), items["title"].to_numpy()


def test_time_texts(processed_dir: str | Path, params: dict) -> tuple[list[str], int]:
    """Every user's text from their training and validation interactions (row i = user i), and
    the number of users whose validation row was withheld (`withheld_validation_rows`)."""
    inter, titles = _interactions_and_titles(Path(processed_dir))
    withheld = withheld_validation_rows(inter)
    drop = (inter["split"] == "valid") & inter["user_id"].map(withheld).fillna(False).astype(bool)
    inter = inter.assign(split=inter["split"].where(~drop, "withheld"))
    texts = user_texts(inter, titles, UserTextRule.from_params(params), TEST_TIME_SPLITS)[0]
    return texts, int(withheld.sum())


def serving_texts(processed_dir: str | Path, params: dict) -> list[str]:
    """Every user's text from all their interactions (row i = user i): at serving time the
    next item comes after every known one, so nothing is withheld."""
    inter, titles = _interactions_and_titles(Path(processed_dir))
    return user_texts(inter, titles, UserTextRule.from_params(params), SERVING_SPLITS)[0]


def fresh_user_sids(texts: list[str], own: pd.DataFrame, quantizer, embedder, tokenizer, params: dict, *,
                    purpose: str = "test time") -> pd.DataFrame:
    """The user SID table of `texts` (row i = user i), derived as the model's own table `own`
    was (module docstring). `embedder`: the trained LLM for a dynamic index whose refreshes
    re-embed (`index.refresh_embeddings: llm`), else the backbone (`user_sids_of` picks it). `purpose`
    ("test time", "serving") names the derivation in its messages."""
    from .dynamic import quantize_codes, table_codes
    from .embedding import embed_texts
    from .sids import resolve_collisions, sid_table

    own = own.sort_values("user_id").reset_index(drop=True)
    if not np.array_equal(own["user_id"].to_numpy(), np.arange(len(texts))):
        raise TTDSError(f"the model's user table (user ids 0..{len(own) - 1} expected, {len(own)} rows) does not "
                        f"match the {len(texts)} users of the processed data (data/processed and data/model "
                        "are from different runs?)")
    settings = SidDerivation.from_params(params)
    dynamic = settings.dynamic
    x = embed_texts(embedder, tokenizer, texts, batch_size=settings.embed_batch_size,
                    max_tokens=settings.max_text_tokens, progress=False, label="user")
    if not np.isfinite(x).all():
        raise TTDSError(f"user profile at {purpose}: non-finite embeddings (try model.dtype: float32)")
    if dynamic:
        quantizer.fit_normalisation(x)
        previous = table_codes(own, "user_id")
        codes = quantize_codes(quantizer, x, previous, settings.refresh_margin)
    else:
        codes = quantize_codes(quantizer, x)
    ids = own["user_id"].to_numpy()
    try:
        suffix = resolve_collisions(codes, ids, max_suffix=settings.max_suffix)
    except TTDSError as exc:
        if not dynamic:
            raise TTDSError(f"user profile at {purpose}: {exc}") from None
        log.warning("user profile at %s: %s; the model's user SIDs kept (as a refresh would)", purpose, exc)
        return own
    return sid_table(ids, codes, suffix, "user")


def user_sids_of(texts: list[str], params: dict, rec, model_dir: str | Path,
                 backbone_dir: str | Path, purpose: str = "test time") -> pd.DataFrame:
    """The user SID table the trained model in `model_dir` (loaded as `rec`) gives `texts`
    (row i = user i), derived as its own table was (`fresh_user_sids`, whose messages name
    `purpose`): the final user quantizer, and the trained LLM (a dynamic index that re-embeds
    at each refresh) or the backbone (a static index, or refreshes from the backbone's vectors)."""
    import torch

    from .backbone import load_backbone
    from .recommender import load_final_quantizers

    quantizers = load_final_quantizers(model_dir)  # loaded per call: a dynamic derivation re-fits it
    if "user" not in quantizers:
        raise TTDSError(f"{Path(model_dir) / 'quantizers.safetensors'}: no user quantizer "
                        "(the model has a user table; rerun finetune)")
    settings = SidDerivation.from_params(params)
    if settings.dynamic and settings.refresh_embeddings == "llm":
        # a refresh embeds with the training LLM (LoRA unmerged); the merged model is the same
        # function up to rounding
        return fresh_user_sids(texts, rec.user_sids, quantizers["user"], rec.model, rec.tokenizer, params,
                               purpose=purpose)
    backbone, tokenizer = load_backbone(params, device=rec.device, backbone_dir=backbone_dir)
    table = fresh_user_sids(texts, rec.user_sids, quantizers["user"], backbone, tokenizer, params, purpose=purpose)
    del backbone  # a second copy of the backbone beside the recommender: free it before ranking
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return table


def share_changed(own: pd.DataFrame | None, table: pd.DataFrame | None, users=None) -> float | None:
    """Share of `users` (default: all of the model's) whose SID in `table` is not their SID in the
    model's own table `own`; None without a user tower."""
    if own is None or table is None:
        return None
    a, b = own.set_index("user_id")["sid"], table.set_index("user_id")["sid"]
    users = list(a.index if users is None else users)
    return round(float((a.loc[users].to_numpy() != b.loc[users].to_numpy()).mean()), 4)


def test_user_sids(profile: str, params: dict, rec, processed_dir: str | Path, model_dir: str | Path,
                   backbone_dir: str | Path) -> tuple[pd.DataFrame | None, int]:
    """The user table for the test prompts under `eval.user_profile` = `profile`: the model's
    own table (`training`), or re-derived from the test-time texts (`fresh`); None without a user
    tower. Also the number of users whose validation row was withheld from their text."""
    if rec.user_sids is None or profile == "training":
        return rec.user_sids, 0
    texts, withheld = test_time_texts(processed_dir, params)
    return user_sids_of(texts, params, rec, model_dir, backbone_dir), withheld


def serving_user_sids(profile: str, params: dict, rec, processed_dir: str | Path, model_dir: str | Path,
                      backbone_dir: str | Path) -> pd.DataFrame | None:
    """The user table of serving prompts under `serve.user_profile` = `profile`: the model's own
    (`training`), or re-derived from every known interaction (`fresh`); None without a user tower."""
    if rec.user_sids is None or profile == "training":
        return rec.user_sids
    return user_sids_of(serving_texts(processed_dir, params), params, rec, model_dir, backbone_dir, "serving")
