"""A byte-level tokenizer the project builds itself (no download), with the Nemotron chat format.

Every byte is one token, so any text round-trips exactly; special tokens follow the ChatML
convention the Nemotron-H chat models use, including the ``<think>`` reasoning markers. It is a
byte-level BPE with one merge, of two NUL bytes (text never holds them, so every real text still
tokenizes byte by byte): llama.cpp's GPT-2 vocabulary needs merges to exist.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(6)
BYTE_OFFSET = len(SPECIAL_TOKENS)
NUL_PAIR = "\u0100\u0100"          # GPT-2's byte-to-unicode form of b"\x00\x00"
TOKENIZER_VOCAB = BYTE_OFFSET + 256 + 1

# ChatML with Nemotron's reasoning switch: thinking mode opens a <think> block, instruct mode
# emits an empty one (`enable_thinking=False`).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>"
    "{% else %}<think>\n{% endif %}{% endif %}"
)


def build_tokenizer():
    """Return a ``PreTrainedTokenizerFast`` over bytes plus the special tokens above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: BYTE_OFFSET + i for i, ch in enumerate(byte_chars)})
    vocab[NUL_PAIR] = BYTE_OFFSET + 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(NUL_PAIR[0], NUL_PAIR[1])], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    code = ord(char)
    if code in printable:
        return code
    shifted = [b for b in range(256) if b not in printable]
    return shifted[code - 256]


def save_tokenizer(directory: str | Path) -> None:
    build_tokenizer().save_pretrained(str(directory))
