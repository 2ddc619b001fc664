"""Names of the semantic-ID tokens added to the LLM vocabulary.

Separate namespaces per tower and per level, so an item code can never be read as a
user code: items use `<a_17><b_3><c_250><d_9>`, users `<ua_5><ub_0>…`, and the
collision suffixes (paper §4.2.5) `<p_j>` for items and `<up_j>` for users.
"""

from __future__ import annotations

import re
import string

from .errors import TTDSError

TOWERS = ("item", "user")
_LETTERS = string.ascii_lowercase[:15]  # a..o; 'p' is reserved for the suffix
_PREFIX = {"item": "", "user": "u"}
_TOKEN_RE = re.compile(r"<[a-z]+_\d+>")


def _check(tower: str, level: int | None = None) -> None:
    if tower not in TOWERS:
        raise TTDSError(f"unknown tower {tower!r}, expected 'item' or 'user'")
    if level is not None and not 0 <= level < len(_LETTERS):
        raise TTDSError(f"index.length: at most {len(_LETTERS)} levels are supported")


def code_token(tower: str, level: int, code: int) -> str:
    """Token of `code` at `level` (0-based) for `tower`."""
    _check(tower, level)
    return f"<{_PREFIX[tower]}{_LETTERS[level]}_{int(code)}>"


def suffix_token(tower: str, j: int) -> str:
    """Token of rank `j` inside a collision set."""
    _check(tower)
    return f"<{_PREFIX[tower]}p_{int(j)}>"


def sid_tokens(tower: str, codes, suffix: int = -1) -> list[str]:
    """Token list of one SID; `suffix` < 0 means the code tuple is unique (no suffix)."""
    toks = [code_token(tower, m, c) for m, c in enumerate(codes)]
    if suffix is not None and suffix >= 0:
        toks.append(suffix_token(tower, suffix))
    return toks


def sid_string(tower: str, codes, suffix: int = -1) -> str:
    return "".join(sid_tokens(tower, codes, suffix))


def split_sid(sid: str) -> list[str]:
    """`'<a_1><b_2>'` -> `['<a_1>', '<b_2>']`."""
    return _TOKEN_RE.findall(sid)


def tower_vocabulary(tower: str, length: int, codebook_size: int, max_suffix: int) -> list[str]:
    """Every token a tower may ever use: `length` x `codebook_size` codes + suffixes.

    The vocabulary is fixed before training so a dynamic refresh of the index never
    needs to resize the embedding matrix; `max_suffix` bounds the collision-set size.
    """
    toks = [code_token(tower, m, c) for m in range(length) for c in range(codebook_size)]
    toks += [suffix_token(tower, j) for j in range(max_suffix)]
    return toks
