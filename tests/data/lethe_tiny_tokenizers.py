"""Tiny tokenizers trained in-process for the data-layer tests (no download, ~10 ms).

Two flavours: chat tags as added special tokens (what orchestrator.models builds) and
chat tags left as plain text that BPE splits into pieces (what a pretrained hub tokenizer
without those tags does). Both are ByteLevel BPE with eos <|endoftext|> and pad <|pad|>.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TAGS = ["<|user|>", "<|assistant|>", "<|system|>"]

SENTENCES = [
    "What is 37 + 58? 37 + 58 = 95. The answer is 95.",
    "You are a careful assistant. Sort the list [3, 1, 2]. The answer is [1, 2, 3].",
    "The capital of Velmora is Drastel. Reverse the word 'blorvik'.",
    "Hello there, how are you today? I am fine, thank you very much.",
]


def build_tokenizer(
    tags_special: bool = True, texts: Iterable[str] | None = None, vocab_size: int = 300
) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [EOS, PAD] + (CHAT_TAGS if tags_special else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts) if texts is not None else SENTENCES * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
