"""Text cleaning and rendering for item and user texts.

Amazon metadata is scraped HTML: titles carry entities (`Pok&eacute;mon`, sometimes
double-escaped as `&amp;eacute;`), descriptions carry tags (`<br />`, `<b>`), and some
fields are lists. Everything that reaches the backbone goes through `clean_text`.
"""

from __future__ import annotations

import html
import math
import re

# An HTML tag (`<br/>`, `</p>`, `<a href="…">`) or comment; a bare '<' as in "5 < 6 > 3"
# is text. Attributes are bounded so a stray '<' cannot swallow the rest of the text.
_TAG = re.compile(r"<!--.*?-->|<\s*/?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]{0,500})?\s*/?\s*>", re.S)
_SPACE = re.compile(r"\s+")
_MAX_UNESCAPE_ROUNDS = 4  # '&amp;amp;eacute;' needs three; more means garbage anyway


def is_missing(value) -> bool:
    """None, NaN/pd.NA, or an empty string/list."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, (str, list, tuple)) and len(value) == 0:
        return True
    try:  # pd.NA and friends
        return bool(value != value)
    except (TypeError, ValueError):
        return False


def clean_text(value, sep: str = " ") -> str:
    """HTML-unescape (repeatedly, for double escaping), strip tags, collapse whitespace.

    Lists (Amazon `description`, `category`) are cleaned item by item and joined with `sep`;
    empty parts are dropped. Missing values give "".
    """
    if is_missing(value):
        return ""
    if isinstance(value, (list, tuple)):
        parts = (clean_text(v) for v in value)
        return sep.join(p for p in parts if p)
    text = str(value)
    for _ in range(_MAX_UNESCAPE_ROUNDS):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    # Tags become spaces so that "a<br>b" does not glue words together.
    text = _TAG.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def truncate(text: str, max_chars: int) -> str:
    """Cut `text` to at most `max_chars` characters, on a word boundary when possible."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    if space > max_chars // 2:
        cut = cut[:space]
    return cut.rstrip(" ;,.") + "…"


def render_fields(fields: list[tuple[str, str]], max_chars: int) -> str:
    """'Label: value; Label: value' over the non-empty fields, cut to `max_chars`."""
    text = "; ".join(f"{label}: {value}" for label, value in fields if value)
    return truncate(text, max_chars)
