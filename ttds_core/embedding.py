"""Text -> vector with the backbone LLM (paper eq. 6): X = mean of the last hidden states
over the real (non-pad) tokens of the text.

`mean_pool` is differentiable and is what fine-tuning calls on the LoRA model (dynamic
index, DM-VAE); `embed_texts` is the batched, inference-only path of the `embed` stage
(`embed.py`) and of an index refresh.
"""

from __future__ import annotations

import numpy as np
import torch

from .backbone import decoder_of
from .errors import TTDSError


def mean_pool(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, d] mean of `decoder`'s last hidden states over tokens where `attention_mask` is 1.

    Position ids count real tokens only, so a left-padded row embeds exactly as the
    same text would alone. Pad positions are zeroed with `where`, not multiplied: a
    fully-masked pad row may hold NaN, and NaN * 0 is still NaN.
    """
    mask = attention_mask.bool()
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, use_cache=False).last_hidden_state
    hidden = torch.where(mask.unsqueeze(-1), hidden.float(), 0.0)
    return hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def tokenize_texts(tokenizer, texts, max_tokens: int, label: str = "text") -> list[list[int]]:
    """Token ids of each text, truncated to `max_tokens`; an empty text is an error."""
    ids = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise TTDSError(f"{label} {i}: empty text (every entity needs text to embed)")
        ids.append(tokenizer(text, add_special_tokens=True, truncation=True,
                             max_length=max_tokens)["input_ids"])
        if not ids[-1]:
            raise TTDSError(f"{label} {i}: text has no tokens")
    return ids


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `rows`, padded on the left to the longest row."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, width - len(r):] = 1
    return input_ids, attention_mask


def length_sorted_batches(lengths, batch_size: int) -> list[np.ndarray]:
    """Index batches of similar length (longest first), so little compute goes to padding."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def embed_texts(model, tokenizer, texts, batch_size: int = 32, max_tokens: int = 64, device=None,
                progress: bool = True, label: str = "text", token_ids: list[list[int]] | None = None
                ) -> np.ndarray:
    """float32 [n, d] embeddings of `texts`, row i = texts[i]. `token_ids`: the texts already
    tokenised by `tokenize_texts` with the same `max_tokens` (a refresh re-embeds the same
    texts many times)."""
    from tqdm.auto import tqdm

    texts = list(texts)
    if batch_size < 1:
        raise TTDSError(f"params: 'embed.batch_size' = {batch_size}, expected at least 1")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    decoder = decoder_of(model)
    ids = tokenize_texts(tokenizer, texts, max_tokens, label) if token_ids is None else token_ids
    if len(ids) != len(texts):
        raise TTDSError(f"{len(ids)} tokenised {label}s for {len(texts)} texts")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    batches = length_sorted_batches([len(r) for r in ids], batch_size)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=f"embed {label}s", disable=not progress, unit="batch"):
            input_ids, attention_mask = left_pad([ids[i] for i in batch], pad_id)
            pooled = mean_pool(decoder, input_ids.to(device), attention_mask.to(device))
            out[batch] = pooled.cpu().numpy()
    return out
