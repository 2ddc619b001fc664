"""The user tower's text: a user's most recent reviews, else the titles of their items.

One rule, applied to different cut-offs of the same sequence:

- `preprocess` renders every user from the TRAINING interactions only (`splits=("train",)`):
  the text the user tokenizer is trained on. Validation and test rows are never read, so
  neither target nor its review can reach a training input.
- `evaluate` renders the test-time profile from the training AND validation interactions
  (`splits=("train", "valid")`, `user_profile.py`): everything before the test target, as the
  test prompt's item history already holds it. Still no leak: the validation interaction
  precedes the test target (where that order is not established, `user_profile.py` withholds
  the validation row).
- serving (`precompute`, `ttds recommend`) renders it from every known interaction
  (`splits=("train", "valid", "test")`): the next item comes after all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import get
from .text import truncate


@dataclass(frozen=True)
class UserTextRule:
    """`data.user_text_items`, `data.review_chars`, `data.user_text_chars`."""

    items: int            # the most recent reviews (or titles) rendered
    review_chars: int     # cap on each review
    text_chars: int       # cap on the whole text

    @classmethod
    def from_params(cls, params: dict) -> "UserTextRule":
        return cls(items=get(params, "data.user_text_items", int, min_value=1),
                   review_chars=get(params, "data.review_chars", int, default=200, min_value=16),
                   text_chars=get(params, "data.user_text_chars", int, default=512, min_value=16))


def user_texts(inter: pd.DataFrame, titles: np.ndarray, rule: UserTextRule,
               splits: tuple[str, ...] = ("train",)) -> tuple[list[str], int]:
    """Every user's text from their interactions in `splits`, most recent first;
    (texts, users with reviews). Row i of the texts is user id i.

    Where the user has reviews among those rows: their `rule.items` most recent reviews
    ("summary: review", each cut to `rule.review_chars`, repeats dropped). Otherwise: the
    titles of their `rule.items` most recent items. Rows of other splits are never read.
    `inter` must be sorted by user_id then pos, with columns user_id, item_id, split, review
    and summary; `titles[item_id]` is the item title.
    """
    n_users = int(inter["user_id"].max()) + 1
    rows = inter[inter["split"].isin(splits)]
    starts = np.searchsorted(rows["user_id"].to_numpy(), np.arange(n_users + 1))
    items = rows["item_id"].to_numpy()
    reviews = rows["review"].astype(object).where(rows["review"].notna(), None).tolist()
    summaries = rows["summary"].astype(object).where(rows["summary"].notna(), None).tolist()
    n = rule.items
    texts, with_reviews = [], 0
    for user in range(n_users):
        lo, hi = starts[user], starts[user + 1]
        entries = []
        for row in range(hi - 1, lo - 1, -1):
            if len(entries) == n:
                break
            parts = [p for p in (summaries[row], reviews[row]) if p]
            entry = truncate(": ".join(parts), rule.review_chars)
            # Amazon repeats one review over product variants: say it once.
            if parts and entry not in entries:
                entries.append(entry)
        if entries:
            with_reviews += 1
            texts.append(truncate("Reviews: " + " | ".join(entries), rule.text_chars))
        else:
            recent = [titles[i] for i in items[max(lo, hi - n):hi][::-1]]
            texts.append(truncate("Recent items: " + "; ".join(recent), rule.text_chars))
    return texts, with_reviews
