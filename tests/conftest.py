"""Shared fixtures: a tiny random LLaMA and a byte-level tokenizer built in code.

Nothing is downloaded: the tokenizer is trained on a few sentences in milliseconds and
the model is a 2-layer LlamaConfig with random weights.
"""

from __future__ import annotations

import pytest
import torch

_CORPUS = [
    "You are an expert in sequential recommendation. Please predict the most suitable item for the user",
    "based on the historical interactions. Response: Which item will the user interact with next?",
    "The users who bought this item in time order. Write what the user will say about the next item.",
    "Super Mario Bros. Nintendo Switch PlayStation 4 Xbox One controller game headset cable charger",
    "great fun works well love it kids would buy again the title of the next item",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<pad>")


def make_tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_lm(tiny_tokenizer):
    """(model, tokenizer): random 2-layer LLaMA sized to the tiny tokenizer."""
    return make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer
