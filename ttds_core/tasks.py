"""The fine-tuning task mixture (paper §4.2.4, SPEC "Tasks").

Samples are *structural*: `(task, key, pos)` points into the training data and carries
no SID text. They are rendered to (prompt, response) strings at batch time with the
*current* SID tables, so a dynamic refresh of the index changes prompts and targets
without rebuilding the sample list.

- `seqrec` (key = user, pos = index of the target in the user's training sequence):
  the last `max_history` training items before the target -> the target item's SID.
  One sample per prefix of each training sequence (`items[:-2]`).
  With `tasks.seqrec_format: packed` (see `prompts`) a sample is a window of consecutive
  training items ending at pos (exclusive): the user's first `max_history + 1` items,
  whose items 2.. are all targets, then, for longer sequences, windows of
  `max_history + 1` items whose last S = ceil(max_history / 2) items are the targets.
  Every target of the `prefix` format is trained exactly once; in the first window with
  exactly its `prefix` history, later with the last max_history - S + 1 .. max_history
  items (the `prefix` format shows max_history), so a long sequence costs one window per
  S targets instead of one full prompt per target.
- `next_user` (key = item, pos = index of the target user in the item's user list):
  the item's SID and the users before it (at most `max_next_user`) -> the next user's SID.
  Users are ordered by the time of their interaction with the item; without timestamps
  the proxy is the interaction's relative position in the user's training sequence
  (pos / length), ties broken by user id.
- `preference` (key = user, pos as in seqrec): the history -> the user's review (or
  summary) of the next training item when there is one, else that item's title.
- `ts_align` (TS-Align of TS-Rec; `tasks.ts_align`; key = prefix depth d, pos = item): the
  first d tokens of the item's *current* SID alone -> the `tasks.ts_align_words` title words
  shared by most items under that prefix (document frequency, ties alphabetical), so each
  SID token means something in words before it is used in a recommendation. One sample per
  (depth 1 .. index.length - 1, item): a prefix is drawn as often as it has items. Titles
  are item text, never interactions, so no split is involved.

Mixture size (`tasks.weights`): `seqrec` keeps round(w * N) of its N samples (1.0 = all;
packed: N counts windows, not targets);
every other task draws round(w * N) samples (relative to the same seqrec count N) from its
own pool, without replacement and capped at the pool size. All draws are seeded.
Only `split == 'train'` interactions are ever read here: validation/test items and their
reviews never reach a training input.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import prompts
from .errors import TTDSError
from .text import clean_text, is_missing

@dataclass(frozen=True)
class Sample:
    task: str
    key: int   # user id (seqrec, preference) or item id (next_user)
    pos: int   # index of the target inside the key's sequence


@dataclass
class TaskData:
    """Everything the renderer needs, all restricted to training interactions."""
    train_seqs: dict[int, list[int]]          # user -> chronological training items
    item_users: dict[int, list[int]]          # item -> training users in time order
    reviews: dict[tuple[int, int], str]       # (user, item) -> review text (train only)
    titles: dict[int, str]                    # item -> title
    max_history: int
    max_next_user: int
    packed: bool = False                      # tasks.seqrec_format == "packed"
    align_depth: int = 0                      # ts_align: prefixes of 1 .. align_depth tokens
    align_words: int = 5                      # ts_align: words per response
    _align_cache: tuple = (None, {})          # (key of the SID table, prefix -> words)


def train_sequences(sequences: pd.DataFrame) -> dict[int, list[int]]:
    """user -> items[:-2] (the last two items are the validation and test targets)."""
    return {int(u): [int(i) for i in items[:-2]] for u, items in zip(sequences["user_id"], sequences["items"])}


def item_user_lists(train_seqs: dict[int, list[int]], interactions: pd.DataFrame | None) -> dict[int, list[int]]:
    """item -> its training users in time order.

    Timestamps are used when every training interaction has one; otherwise the proxy is
    the interaction's relative position in the user's training sequence (a user who
    bought the item early in their history comes first). Ties: user id.
    """
    stamps: dict[tuple[int, int], float] = {}
    if interactions is not None and "timestamp" in interactions.columns:
        train = interactions[interactions["split"] == "train"]
        if len(train) and train["timestamp"].notna().all():
            stamps = {(int(u), int(i)): float(t) for u, i, t in
                      zip(train["user_id"], train["item_id"], train["timestamp"])}
    events: dict[int, list[tuple[float, int]]] = {}
    for user, items in train_seqs.items():
        n = max(len(items), 1)
        for p, item in enumerate(items):
            when = stamps.get((user, item), p / n) if stamps else p / n
            events.setdefault(item, []).append((when, user))
    return {item: [u for _, u in sorted(ev)] for item, ev in events.items()}


def train_reviews(interactions: pd.DataFrame | None) -> dict[tuple[int, int], str]:
    """(user, item) -> review (else summary) text of TRAINING interactions only."""
    if interactions is None:
        return {}
    train = interactions[interactions["split"] == "train"]
    out = {}
    for field in ("summary", "review"):  # review wins over summary when both exist
        if field not in train.columns:
            continue
        for u, i, text in zip(train["user_id"], train["item_id"], train[field]):
            if not is_missing(text):
                text = clean_text(text)
                if text:
                    out[(int(u), int(i))] = text
    return out


def build_task_data(sequences: pd.DataFrame, items: pd.DataFrame, interactions: pd.DataFrame | None,
                    max_history: int, max_next_user: int, packed: bool = False, align_depth: int = 0,
                    align_words: int = 5) -> TaskData:
    """Everything the task samplers need, from the training part of each sequence only.
    `packed`: seqrec rows are packed windows (`prompts.seqrec_packed(params)`), else one
    prefix per target. `align_depth`: the deepest SID prefix ts_align describes."""
    seqs = train_sequences(sequences)
    return TaskData(train_seqs=seqs, item_users=item_user_lists(seqs, interactions),
                    reviews=train_reviews(interactions),
                    titles={int(i): clean_text(t) for i, t in zip(items["item_id"], items["title"])},
                    max_history=max_history, max_next_user=max_next_user, packed=packed,
                    align_depth=align_depth, align_words=align_words)


# Words that say nothing about an item cluster (English function words and catalogue filler).
STOPWORDS = frozenset("""a an and are as at be by for from in into is it its of on or the this that to with
    without your you new edition version pack set game games video""".split())
_SID_TOKEN = re.compile(r"<[^>]+>")


def title_words(title: str) -> list[str]:
    """Distinct content words of a title, in order: lowercase letters and digits (any
    script), >= 3 characters, no stopwords."""
    seen = dict.fromkeys(w for w in re.findall(r"[^\W_]+", title.lower()) if len(w) >= 3 and w not in STOPWORDS)
    return list(seen)


def prefix_words(item_sids: list[str], titles: dict[int, str], depth: int, k: int) -> dict[str, str]:
    """SID prefix (1 .. depth tokens) -> its `k` most shared title words, ", "-joined."""
    counts: dict[str, Counter] = {}
    for item, sid in enumerate(item_sids):
        words = title_words(titles.get(item, ""))
        tokens = _SID_TOKEN.findall(sid)
        for d in range(1, min(depth, len(tokens)) + 1):
            counts.setdefault("".join(tokens[:d]), Counter()).update(words)
    return {prefix: ", ".join(w for w, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:k])
            for prefix, c in counts.items()}


def _aligned_words(data: TaskData, item_sids: list[str]) -> dict[str, str]:
    """`prefix_words` of the current SID table, recomputed only after an index refresh."""
    key = (data.align_depth, data.align_words, hash(tuple(item_sids)))
    if data._align_cache[0] != key:
        data._align_cache = (key, prefix_words(item_sids, data.titles, data.align_depth, data.align_words))
    return data._align_cache[1]


def _stride(max_history: int) -> int:
    return max(1, (max_history + 1) // 2)


def window_ends(length: int, max_history: int) -> list[int]:
    """Ends (exclusive) of the packed windows of a sequence of `length` items, in order:
    the first max_history + 1 items, then windows ending every S items back from the end."""
    if length < 2:
        return []
    first = min(length, max_history + 1)
    return [first] + list(range(length, first, -_stride(max_history)))[::-1]


def window_start(end: int, max_history: int) -> int:
    return max(0, end - max_history - 1)


def window_targets(end: int, max_history: int) -> range:
    """Positions a window labels: all but its first item in the first window (end <=
    max_history + 1), else its last S items (never reaching into the first window)."""
    if end <= max_history + 1:
        return range(1, end)
    return range(max(max_history + 1, end - _stride(max_history)), end)


@dataclass
class SidTables:
    """Current SID strings, indexed by entity id (users None when the user tower is off)."""
    item: list[str]
    user: list[str] | None = None


class Task:
    """One task of the mixture (LC-Rec style: one class per task). A task knows its pool of
    structural samples, how to render one with the current SID tables, how many prompt
    templates it has, and a prompt-length proxy for bucketing. Adding a task: a subclass
    here, its prompts in `prompts.py`, one line in `REGISTRY`, its weight under
    `tasks.weights` (and its name in `schema.TASKS`)."""

    name: str = ""
    group: str = "high_order"   # when it runs: "core" always, "high_order" with tasks.high_order,
                                # "ts_align" with tasks.ts_align
    needs_user_tower: bool = False
    names_user: bool = False    # its prompt names the user by SID (user{user}): user-token dropout applies

    def pool(self, data: TaskData) -> list[Sample]:
        raise NotImplementedError

    def render(self, sample: Sample, data: TaskData, sids: SidTables, template: int,
               eos: str | None) -> tuple[str, str]:
        raise NotImplementedError

    def n_templates(self) -> int:
        raise NotImplementedError

    def approx_length(self, sample: Sample, data: TaskData) -> int:
        return min(sample.pos, data.max_history)


def _prefix_samples(task: str, data: TaskData) -> list[Sample]:
    """One sample per target of each training sequence (pos = the target's index)."""
    return [Sample(task, u, p) for u, seq in sorted(data.train_seqs.items()) for p in range(1, len(seq))]


def _history(sample: Sample, data: TaskData, sids: SidTables) -> tuple[int, list[str], str | None]:
    """(target item, SIDs of the last max_history training items before it, user SID)."""
    seq = data.train_seqs[sample.key]
    history = [sids.item[i] for i in seq[max(0, sample.pos - data.max_history):sample.pos]]
    return seq[sample.pos], history, sids.user[sample.key] if sids.user is not None else None


class SeqRec(Task):
    """history -> next item's SID; packed: a window of a user's items, every next SID a target."""

    name, group, names_user = "seqrec", "core", True

    def pool(self, data):
        if data.packed:
            return [Sample(self.name, u, e) for u, seq in sorted(data.train_seqs.items())
                    for e in window_ends(len(seq), data.max_history)]
        return _prefix_samples(self.name, data)

    def render(self, sample, data, sids, template, eos):
        if data.packed:
            seq = data.train_seqs[sample.key]
            start, first = window_start(sample.pos, data.max_history), window_targets(sample.pos, data.max_history)[0]
            user = sids.user[sample.key] if sids.user is not None else None
            return (prompts.seqrec_prompt([sids.item[i] for i in seq[start:first]], user, template, packed=True, eos=eos),
                    prompts.packed_response([sids.item[i] for i in seq[first:sample.pos]], eos))
        target, history, user = _history(sample, data, sids)
        return prompts.seqrec_prompt(history, user, template), sids.item[target]

    def n_templates(self):
        return min(len(prompts.SEQREC), len(prompts.SEQREC_PACKED))

    def approx_length(self, sample, data):
        if data.packed:
            return sample.pos - window_start(sample.pos, data.max_history)
        return min(sample.pos, data.max_history)


class Preference(Task):
    """history -> the user's review of the next training item, else its title."""

    name, names_user = "preference", True

    def pool(self, data):
        return _prefix_samples(self.name, data)

    def render(self, sample, data, sids, template, eos):
        target, history, user = _history(sample, data, sids)
        review = data.reviews.get((sample.key, target))
        prompt = prompts.preference_prompt(history, user, template, has_reviews=review is not None)
        return prompt, review if review is not None else data.titles[target]

    def n_templates(self):
        return min(len(prompts.PREFERENCE), len(prompts.PREFERENCE_TITLE))


class NextUser(Task):
    """an item's SID and its earlier users -> the next user's SID."""

    name, needs_user_tower = "next_user", True

    def pool(self, data):
        return [Sample(self.name, i, k) for i, users in sorted(data.item_users.items()) for k in range(1, len(users))]

    def render(self, sample, data, sids, template, eos):
        if sids.user is None:
            raise TTDSError("tasks: next_user needs the user tower (tower.user: true)")
        users = data.item_users[sample.key]
        before = users[max(0, sample.pos - data.max_next_user):sample.pos]
        prompt = prompts.next_user_prompt(sids.item[sample.key], [sids.user[u] for u in before], template)
        return prompt, sids.user[users[sample.pos]]

    def n_templates(self):
        return len(prompts.NEXT_USER)

    def approx_length(self, sample, data):
        return min(sample.pos, data.max_next_user)


class TsAlign(Task):
    """a SID prefix alone -> the title words its items share (TS-Align of TS-Rec)."""

    name, group = "ts_align", "ts_align"

    def pool(self, data):
        return [Sample(self.name, d, i) for d in range(1, data.align_depth + 1) for i in sorted(data.titles)]

    def render(self, sample, data, sids, template, eos):
        prefix = "".join(_SID_TOKEN.findall(sids.item[sample.pos])[:sample.key])
        words = _aligned_words(data, sids.item)[prefix] or data.titles[sample.pos]
        return prompts.ts_align_prompt(prefix, template), words

    def n_templates(self):
        return len(prompts.TS_ALIGN)

    def approx_length(self, sample, data):
        return 1


REGISTRY: dict[str, Task] = {task.name: task for task in (SeqRec(), NextUser(), Preference(), TsAlign())}
TASKS = tuple(REGISTRY)


def task(name: str) -> Task:
    if name not in REGISTRY:
        raise TTDSError(f"tasks.weights: unknown task {name!r}, expected one of {', '.join(TASKS)}")
    return REGISTRY[name]


def _pool(name: str, data: TaskData) -> list[Sample]:
    return task(name).pool(data)


def enabled_tasks(weights: dict, high_order: bool, user_tower: bool, ts_align: bool = False) -> dict[str, float]:
    """The tasks that run: seqrec always; high-order ones only with `tasks.high_order`,
    next_user only with the user tower (STDS has no user tokens at all), ts_align only
    with `tasks.ts_align`."""
    switches = {"core": True, "high_order": high_order, "ts_align": ts_align}
    out = {}
    for name, t in REGISTRY.items():
        if not switches[t.group] or (t.needs_user_tower and not user_tower):
            continue
        if t.group == "ts_align" and name not in weights:
            raise TTDSError(f"params: 'tasks.{name}' is on but 'tasks.weights.{name}' is missing")
        out[name] = float(weights.get(name, 1.0 if t.group == "core" else 0.0))
    for name, w in out.items():
        if not 0.0 <= w or (name == "seqrec" and not 0.0 < w <= 1.0):
            raise TTDSError(f"params: 'tasks.weights.{name}' = {w}, expected seqrec in (0, 1] and others >= 0")
    return {k: w for k, w in out.items() if w > 0}


def build_samples(data: TaskData, weights: dict[str, float], seed: int) -> list[Sample]:
    """The training mixture (see module docstring for how weights size it)."""
    rng = np.random.default_rng(seed)
    seqrec = _pool("seqrec", data)
    if not seqrec:
        raise TTDSError("sequences.parquet: no user has two or more training items, nothing to train on")
    n_ref = len(seqrec)
    out: list[Sample] = []
    for task, w in weights.items():
        pool = seqrec if task == "seqrec" else _pool(task, data)
        n = min(len(pool), int(round(w * n_ref)))
        if n == len(pool):
            out += pool
        elif n > 0:
            out += [pool[j] for j in sorted(rng.choice(len(pool), size=n, replace=False))]
    return out


def render(sample: Sample, data: TaskData, sids: SidTables, template: int, eos: str | None = None,
           drop_user: bool = False) -> tuple[str, str]:
    """(prompt, response) text of one sample with the current SID tables. `eos` (the
    tokenizer's EOS text) separates the items of a packed seqrec row. `drop_user`
    (`train.user_token_dropout`) renders a prompt that names its user without the user SID,
    as the STDS prompts do; a task whose target is a user SID keeps it."""
    t = task(sample.task)
    if drop_user and t.names_user:
        sids = SidTables(sids.item, None)
    return t.render(sample, data, sids, template, eos)


def n_templates(name: str) -> int:
    return task(name).n_templates()


def approx_length(sample: Sample, data: TaskData) -> int:
    """Prompt length proxy (entities shown) for length-bucketed batching, before rendering."""
    return task(sample.task).approx_length(sample, data)


def validation_samples(sequences: pd.DataFrame, n_users: int, seed: int) -> list[tuple[int, list[int], int]]:
    """A fixed, seeded set of (user, history, validation target): history = items[:-2]."""
    rows = [(int(u), [int(i) for i in items]) for u, items in zip(sequences["user_id"], sequences["items"])
            if len(items) >= 3]
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(rows), size=min(n_users, len(rows)), replace=False)) if rows else []
    return [(rows[j][0], rows[j][1][:-2], rows[j][1][-2]) for j in pick]
