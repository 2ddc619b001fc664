"""Instruction templates of the fine-tuning tasks (paper §4.2, SPEC "Tasks").

Plain text, no chat template, so any LLaMA-family checkpoint works. Training draws a
template at random per sample; evaluation uses `eval.template` (an index into
SEQREC). `{user}` is the clause naming the user SID; it is empty when the user tower
is off (STDS variants), so no user token ever appears in those prompts.
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


def user_clause(user_sid: str | None) -> str:
    """" <ua_1><ub_2>…" after "the user", or nothing when the user tower is off."""
    return f" {user_sid}" if user_sid else ""


def seqrec_prompt(history_sids: list[str], user_sid: str | None = None, template: int = 0) -> str:
    text = SEQREC[template % len(SEQREC)].format(user=user_clause(user_sid), history=", ".join(history_sids))
    return text + RESPONSE_PREFIX


def next_user_prompt(item_sid: str, user_sids: list[str], template: int = 0) -> str:
    text = NEXT_USER[template % len(NEXT_USER)].format(item=item_sid, users=", ".join(user_sids))
    return text + RESPONSE_PREFIX


def preference_prompt(history_sids: list[str], user_sid: str | None = None, template: int = 0,
                      has_reviews: bool = True) -> str:
    pool = PREFERENCE if has_reviews else PREFERENCE_TITLE
    text = pool[template % len(pool)].format(user=user_clause(user_sid), history=", ".join(history_sids))
    return text + RESPONSE_PREFIX
