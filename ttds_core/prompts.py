"""Instruction templates of the fine-tuning tasks (paper §4.2, SPEC "Tasks").

Plain text, no chat template, so any LLaMA-family checkpoint works. Training draws a
template at random per sample; evaluation uses `train.template` (an index into the
seqrec templates). `{user}` is the clause naming the user SID; it is empty when the user
tower is off (STDS variants), so no user token ever appears in those prompts.

Two seqrec formats (`tasks.seqrec_format`):
- `prefix` (the paper): one sample per prefix, "... historical interactions: <SID>, <SID>.
  Response: " -> the next item's SID + EOS.
- `packed`: the instruction, then the items in order, each SID closed by EOS exactly as a
  response is. Predicting item k is predicting the continuation after items 1..k-1, so one
  forward pass trains every prefix of a sequence at once (the same history -> next-item
  pairs, 5-8x fewer tokens per target), and evaluation asks for the continuation of the
  user's last `max_history` items.
"""

from __future__ import annotations

RESPONSE_PREFIX = "\nResponse: "

SEQREC = [
    "You are an expert in sequential recommendation. Please predict the most suitable item for the user{user}, "
    "based on the historical interactions: {history}.",
    "Given the items the user{user} has interacted with in order: {history}. Which item will the user "
    "interact with next?",
    "Here is the purchase history of the user{user}: {history}. Recommend the next item.",
]

SEQREC_PACKED = [
    "You are an expert in sequential recommendation. These are the items the user{user} interacted with, "
    "in order, each followed by the next one:\n",
    "The user{user} bought the following items, one after the other:\n",
    "Purchase history of the user{user}, in time order:\n",
]
SEQREC_FORMATS = ("prefix", "packed")

NEXT_USER = [
    "You are a recommendation expert. The item {item} has been clicked by the following users: "
    "{users}. Can you predict another user who is interested in this item?",
    "The users who bought {item}, in time order, are: {users}. Which user will buy it next?",
]

PREFERENCE = [
    "The user{user} has interacted with the following items in order: {history}. Write what the user "
    "will say about the next item.",
    "Based on the history {history}, describe the preference of the user{user} for the next item.",
]

PREFERENCE_TITLE = [
    "The user{user} has interacted with the following items in order: {history}. What is the title of "
    "the next item the user will interact with?",
    "Based on the history {history}, name the next item that the user{user} will choose.",
]

# TS-Align (TS-Rec): a SID prefix alone -> the words the titles of the items under it share.
TS_ALIGN = [
    "The semantic ID prefix {prefix} groups similar items. Which words do their titles share?",
    "Items whose semantic ID starts with {prefix} are alike. Describe them in a few words.",
]


def seqrec_packed(params: dict) -> bool:
    """Whether `tasks.seqrec_format` is the packed one (packed when unset, as in params.yaml)."""
    from .config import get
    return get(params, "tasks.seqrec_format", str, "packed", choices=SEQREC_FORMATS) == "packed"


def user_clause(user_sid: str | None) -> str:
    """" <ua_1><ub_2>…" after "the user", or nothing when the user tower is off."""
    return f" {user_sid}" if user_sid else ""


def seqrec_prompt(history_sids: list[str], user_sid: str | None = None, template: int = 0,
                  packed: bool = False, eos: str | None = None) -> str:
    """The prompt whose continuation is the next item's SID (+ EOS), in either format.

    `packed` needs `eos`, the tokenizer's EOS token text (special tokens inside the text
    are tokenized as themselves)."""
    if packed:
        if not eos:
            raise ValueError("the packed seqrec format needs the EOS token text")
        text = SEQREC_PACKED[template % len(SEQREC_PACKED)].format(user=user_clause(user_sid))
        return text + "".join(sid + eos for sid in history_sids)
    text = SEQREC[template % len(SEQREC)].format(user=user_clause(user_sid), history=", ".join(history_sids))
    return text + RESPONSE_PREFIX


def packed_response(sids: list[str], eos: str) -> str:
    """Items 2..n of a packed row: each SID closed by EOS (the final EOS comes from the
    response encoder, as for every response)."""
    return eos.join(sids)


def next_user_prompt(item_sid: str, user_sids: list[str], template: int = 0) -> str:
    text = NEXT_USER[template % len(NEXT_USER)].format(item=item_sid, users=", ".join(user_sids))
    return text + RESPONSE_PREFIX


def preference_prompt(history_sids: list[str], user_sid: str | None = None, template: int = 0,
                      has_reviews: bool = True) -> str:
    pool = PREFERENCE if has_reviews else PREFERENCE_TITLE
    text = pool[template % len(pool)].format(user=user_clause(user_sid), history=", ".join(history_sids))
    return text + RESPONSE_PREFIX


def ts_align_prompt(prefix_sid: str, template: int = 0) -> str:
    return TS_ALIGN[template % len(TS_ALIGN)].format(prefix=prefix_sid) + RESPONSE_PREFIX
