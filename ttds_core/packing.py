"""Padding-free training batches (`train.packing: true`): several sequences per row.

A left-padded batch spends the pad positions' compute on nothing (17 % of the tokens of
the CPU default, 30-38 % on full Games), and the DM-VAE terms take two more forward
passes, one per tower, of a few short SID-only rows each. A packed batch puts whole
sequences end to end in each row, their position ids restarting at 0. transformers reads
a restart as a sequence boundary (its packed-sequence support: `attention_mask=None` plus
`position_ids`) and attends only within a sequence, so each sequence is computed as if it
were alone -- the padded batch's hidden states up to float rounding -- and the task rows
and both towers' SID-only rows go through *one* forward.

Rows are filled first-fit decreasing up to the longest sequence, so no row is longer
(attention costs no more) than in a padded batch; a row's leftover tail is the only
padding, each pad token a sequence of its own that attends to itself.

Everything the loss needs is laid out here, on the host, as index tensors: which flat
positions predict a label and whether that label is scored over the SID tokens + EOS or
the whole vocabulary, and which positions each DM-VAE entity mean-pools. The step itself
then needs no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .errors import TTDSError


@dataclass
class Segment:
    """One sequence of a packed batch."""
    ids: list[int]
    n_labels: int = 0                     # its last n_labels tokens are predicted (response + EOS)
    coded: bool = False                   # ...over the SID tokens + EOS only (a SID response)
    pool: tuple[str, int] | None = None   # (tower, slot): a DM-VAE entity's SID tokens, mean-pooled


@dataclass
class PackedBatch:
    input_ids: torch.Tensor               # [rows, width]
    position_ids: torch.Tensor            # [rows, width], restarting at each sequence
    coded_pos: torch.Tensor               # flat positions whose next token is a SID-scored label
    coded_target: torch.Tensor            # ...that label as a local SID row (n_rows = EOS)
    text_pos: torch.Tensor                # flat positions whose next token is a vocabulary-scored label
    text_target: torch.Tensor             # ...that token id
    n_labels: int                         # labels in all (the loss is their mean)
    n_task_tokens: int                    # tokens of the task sequences (not the DM-VAE rows)
    pools: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # tower -> (flat positions, entity slot of each, tokens per slot)

    def to(self, device) -> "PackedBatch":
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device)
            elif f.name == "pools":
                v = {t: tuple(x.to(device) for x in parts) for t, parts in v.items()}
            moved[f.name] = v
        return PackedBatch(**moved)

    @property
    def padding(self) -> float:
        """Share of the batch's positions that hold no token."""
        real = sum(len(p[0]) for p in self.pools.values()) + self.n_task_tokens
        return 1.0 - real / self.input_ids.numel()


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Indices per row: the longest sequence first, each into the first row with room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for j in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(room):
            if lengths[j] <= free:
                rows[r].append(j)
                room[r] -= lengths[j]
                break
        else:
            rows.append([j])
            room.append(width - lengths[j])
    return rows


def pack(segments: list[Segment], pad_id: int, sid_first: int, sid_rows: int, eos_id: int) -> PackedBatch:
    """Lay `segments` out in rows as wide as the longest one (see the module doc)."""
    if not segments:
        raise TTDSError("an empty training batch")
    width = max(len(s.ids) for s in segments)
    rows = first_fit([len(s.ids) for s in segments], width)
    # laid out in numpy and turned into tensors once: a torch write per segment would issue
    # a handful of operator calls each (thousands per step at batch 256)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)  # pads: 0 each, a sequence apiece
    coded_pos, coded_tgt, text_pos, text_tgt = [], [], [], []
    pool_pos: dict[str, list[int]] = {}
    pool_slot: dict[str, list[int]] = {}
    n_slots: dict[str, int] = {}
    n_task = 0
    for r, members in enumerate(rows):
        col = 0
        for j in members:
            s = segments[j]
            n = len(s.ids)
            if not 0 <= s.n_labels < n:
                raise TTDSError(f"a training sequence of {n} tokens cannot have {s.n_labels} labels")
            ids[r, col:col + n] = s.ids
            pos[r, col:col + n] = np.arange(n)
            base = r * width + col
            for k in range(n - s.n_labels, n):  # token k is predicted by the state at k - 1
                y = s.ids[k]
                if s.coded:
                    if sid_first <= y < sid_first + sid_rows:
                        local = y - sid_first
                    elif y == eos_id:
                        local = sid_rows
                    else:
                        raise TTDSError("a SID response holds a token that is neither a SID token nor EOS")
                    coded_pos.append(base + k - 1)
                    coded_tgt.append(local)
                else:
                    text_pos.append(base + k - 1)
                    text_tgt.append(y)
            if s.pool is not None:
                tower, slot = s.pool
                pool_pos.setdefault(tower, []).extend(range(base, base + n))
                pool_slot.setdefault(tower, []).extend([slot] * n)
                n_slots[tower] = max(n_slots.get(tower, 0), slot + 1)
            else:
                n_task += n
            col += n

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values, dtype=np.int64))

    pools = {}
    for tower, slots in pool_slot.items():
        counts = [0] * n_slots[tower]
        for slot in slots:
            counts[slot] += 1
        if 0 in counts:
            raise TTDSError(f"DM-VAE slots of the {tower} tower are not numbered 0..n-1")
        pools[tower] = (tensor(pool_pos[tower]), tensor(slots), tensor(counts))
    return PackedBatch(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(pos), coded_pos=tensor(coded_pos), coded_target=tensor(coded_tgt),
                       text_pos=tensor(text_pos), text_target=tensor(text_tgt),
                       n_labels=len(coded_pos) + len(text_pos), n_task_tokens=n_task, pools=pools)


def mean_pool(flat: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[slots, d]: the mean of `flat`'s rows at `positions` per slot (float32)."""
    out = flat.new_zeros((len(counts), flat.shape[-1]), dtype=torch.float32)
    out.index_add_(0, slots, flat[positions].float())
    return out / counts.unsqueeze(1).to(out.dtype)
