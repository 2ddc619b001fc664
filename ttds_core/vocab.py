"""Extending a causal LM's vocabulary with semantic-ID tokens, and the one encoding
rule that training and decoding share.

Prompt and response are tokenised separately and concatenated as ids, so the
response always starts on a token boundary and decoding can begin exactly where the
prompt ends.
"""

from __future__ import annotations

from .errors import TTDSError


def extend_vocabulary(model, tokenizer, new_tokens: list[str]) -> list[int]:
    """Add `new_tokens` (in order) to tokenizer and model; return their ids.

    Existing rows are untouched, so the original vocabulary's outputs do not change.
    New rows are initialised by the caller (random or semantic, see `finetune`).
    """
    existing = set(tokenizer.get_vocab())
    clash = [t for t in new_tokens if t in existing]
    if clash:
        raise TTDSError(f"tokenizer already has token {clash[0]!r}: cannot add SID tokens twice")
    tokenizer.add_tokens(list(new_tokens))
    # pad to a multiple of 8 rows for tensor-core friendly shapes on GPU.
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8, mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(list(new_tokens))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise TTDSError("tokenizer did not accept the SID tokens")
    return ids


def encode_prompt(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_response(tokenizer, text: str) -> list[int]:
    """Response ids followed by EOS, which is what generation must stop on."""
    if tokenizer.eos_token_id is None:
        raise TTDSError("the backbone tokenizer has no EOS token")
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
