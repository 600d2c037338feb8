"""A tiny Hugging Face tokenizer built in the test process (byte-level BPE, no download)."""

from __future__ import annotations

import json
import os
from typing import Any

SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
VOCAB_SIZE = 268  # 3 specials + 256 bytes + 9 merges: fits the llama fixture's vocab of 272
CORPUS = [
    "hello world, hello tessera",
    "the quick brown fox jumps over the lazy dog",
    "417+38=455 and 12*3=36",
]


def build(vocab_size: int = VOCAB_SIZE):
    """A `tokenizers.Tokenizer` whose post-processor adds `<s>` (as Llama's does), so tests see
    that tessera encodes without it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", SPECIALS.index("<s>"))]
    )
    return tok


def write(
    directory: str,
    config: dict[str, Any] | None = None,
    special_tokens_map: dict[str, Any] | None = None,
) -> str:
    """tokenizer.json (+ tokenizer_config.json / special_tokens_map.json when given) in
    `directory`; returns the tokenizer.json path. The default config names bos and eos."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    build().save(path)
    if config is None:
        config = {
            "bos_token": "<s>",
            "eos_token": {"content": "</s>", "special": True},
            "add_bos_token": True,
        }
    files = {"tokenizer_config.json": config, "special_tokens_map.json": special_tokens_map}
    for name, data in files.items():
        if data is not None:
            with open(os.path.join(directory, name), "w") as f:
                json.dump(data, f)
    return path
