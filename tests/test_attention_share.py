"""bench.attention_share splits a packed prompt into the parts it reports."""

import pytest

from bench.attention_share import parts_of
from ttds_core.errors import TTDSError

EOS, ITEMS, USERS = 0, {10, 11, 12, 13}, {20, 21}


def test_a_packed_prompt_splits_into_instruction_user_older_items_newest_item_and_itself():
    #      instr  user    instr  item 1      item 2      item 3 (newest)
    ids = [5, 6, 20, 21, 7, 10, 11, EOS, 12, 13, EOS, 11, 12, EOS]
    parts = parts_of(ids, EOS, ITEMS, USERS)
    assert parts == {"newest_item": [11, 12], "older_items": [5, 6, 7, 8, 9, 10], "user": [2, 3],
                     "instruction": [0, 1, 4], "itself": [13]}
    assert sorted(p for v in parts.values() for p in v) == list(range(len(ids)))  # every position once


def test_a_prompt_of_one_item_or_not_ending_with_eos_is_one_line():
    with pytest.raises(TTDSError, match="at least two items"):
        parts_of([5, 10, 11, EOS], EOS, ITEMS, USERS)
    with pytest.raises(TTDSError, match="at least two items"):
        parts_of([5, 10, EOS, 11, 12], EOS, ITEMS, USERS)
    with pytest.raises(TTDSError, match="at least two items"):
        parts_of([5, 6, EOS, 7, EOS], EOS, ITEMS, USERS)  # no item token at all
