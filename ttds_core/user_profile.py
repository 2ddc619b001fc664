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
  embedded by the trained LLM, the quantizer's normalisation re-fitted on them, and each
  user's codes kept unless the new ones win by `index.refresh_margin` (hysteresis).

Collisions are resolved among all users, as `build_sids` does. No leakage: the validation
interaction precedes the test target. Chosen on validation (docs/benchmark.md, "The test-time
user profile"): a profile one purchase stale cost the validation NDCG@10 about an eighth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .config import get
from .errors import TTDSError
from .io import read_parquet
from .user_text import UserTextRule, user_texts

PROFILES = ("fresh", "training")
TEST_TIME_SPLITS = ("train", "valid")  # everything before the test target


def test_time_texts(processed_dir: str | Path, params: dict) -> list[str]:
    """Every user's text from their training and validation interactions (row i = user i)."""
    processed_dir = Path(processed_dir)
    inter = read_parquet(processed_dir / "interactions.parquet",
                         ["user_id", "item_id", "pos", "split", "review", "summary"])
    items = read_parquet(processed_dir / "items.parquet", ["item_id", "title"]).sort_values("item_id")
    if not np.array_equal(items["item_id"].to_numpy(), np.arange(len(items))):
        raise TTDSError(f"{processed_dir / 'items.parquet'}: 'item_id' must be 0..n-1 without gaps")
    inter = inter.sort_values(["user_id", "pos"]).reset_index(drop=True)
    return user_texts(inter, items["title"].to_numpy(), UserTextRule.from_params(params), TEST_TIME_SPLITS)[0]


def fresh_user_sids(texts: list[str], own: pd.DataFrame, quantizer, embedder, tokenizer, params: dict,
                    dynamic: bool) -> pd.DataFrame:
    """The user SID table of `texts` (row i = user i), derived as the model's own table `own`
    was (module docstring). `embedder`: the backbone for a static index, the trained LLM for a
    dynamic one."""
    from .dynamic import quantize_codes
    from .embedding import embed_texts
    from .sids import resolve_collisions, sid_table

    own = own.sort_values("user_id").reset_index(drop=True)
    if not np.array_equal(own["user_id"].to_numpy(), np.arange(len(texts))):
        raise TTDSError(f"the model's user table has {len(own)} users, the processed data "
                        f"{len(texts)} (data/processed and data/model are from different runs?)")
    x = embed_texts(embedder, tokenizer, texts, batch_size=get(params, "embed.batch_size", int, 32, min_value=1),
                    max_tokens=get(params, "model.max_text_tokens", int, 64, min_value=1), progress=False)
    if not np.isfinite(x).all():
        raise TTDSError("user profile: the backbone produced non-finite embeddings (try model.dtype: float32)")
    if dynamic:
        quantizer.fit_normalisation(x)
        previous = np.asarray([list(c) for c in own["codes"]], dtype=np.int64)
        margin = get(params, "index.refresh_margin", float, 0.2, min_value=0.0)
        codes = quantize_codes(quantizer, x, previous, margin)
    else:
        codes = quantize_codes(quantizer, x)
    ids = own["user_id"].to_numpy()
    max_suffix = get(params, "index.max_suffix", int, min_value=0)
    try:
        suffix = resolve_collisions(codes, ids, max_suffix=max_suffix)
    except TTDSError as exc:
        raise TTDSError(f"user profile at test time: {exc}") from None
    return sid_table(ids, codes, suffix, "user")


def test_user_sids(params: dict, rec, processed_dir: str | Path, model_dir: str | Path,
                   backbone_dir: str | Path) -> pd.DataFrame | None:
    """The user table for the test prompts under `eval.user_profile`: the model's own table
    (`training`), or re-derived from the test-time texts (`fresh`); None without a user tower."""
    if rec.user_sids is None or get(params, "eval.user_profile", str, "fresh", choices=PROFILES) == "training":
        return rec.user_sids
    from .backbone import load_backbone
    from .recommender import load_final_quantizers

    quantizers = load_final_quantizers(model_dir)
    if "user" not in quantizers:
        raise TTDSError(f"{Path(model_dir) / 'quantizers.safetensors'}: no user quantizer "
                        "(the model has a user table; rerun finetune)")
    dynamic = get(params, "index.dynamic", bool, True)
    if dynamic:
        embedder, tokenizer = rec.model, rec.tokenizer
    else:
        embedder, tokenizer = load_backbone(params, device=rec.device, backbone_dir=backbone_dir)
    return fresh_user_sids(test_time_texts(processed_dir, params), rec.user_sids, quantizers["user"],
                           embedder, tokenizer, params, dynamic)
