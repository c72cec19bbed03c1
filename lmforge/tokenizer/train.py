"""Train tokenizers: byte-level BPE (GPT-2 style), LLaMA-style BPE (digits split, byte fallback), char-level."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.tokenizer.base import Tokenizer

KINDS = ("bytelevel-bpe", "llama-bpe", "char")
SPECIALS = {"bytelevel-bpe": ["<|endoftext|>"], "llama-bpe": ["<unk>", "<s>", "</s>"]}


def train_tokenizer(files: list[str], vocab_size: int, kind: str, output: str | None = None,
                    special_tokens: list[str] | None = None) -> Tokenizer:
    for f in files:
        if not Path(f).is_file():
            raise LMForgeError(f"{f}: no such input file")
    if kind == "char":
        from lmforge.tokenizer.char import CharTokenizer

        text = "".join(Path(f).read_text(encoding="utf-8") for f in files)
        tok = CharTokenizer.from_text(text)
    elif kind in ("bytelevel-bpe", "llama-bpe"):
        tok = _train_bpe(files, vocab_size, kind, special_tokens)
    else:
        raise LMForgeError(f"--kind {kind!r}: allowed values are {list(KINDS)}")
    if output:
        tok.save(output)
    return tok


def _train_bpe(files: list[str], vocab_size: int, kind: str, special_tokens: list[str] | None) -> Tokenizer:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    from lmforge.tokenizer.hf import HFTokenizer

    specials = SPECIALS[kind] + [s for s in (special_tokens or []) if s not in SPECIALS[kind]]
    if kind == "bytelevel-bpe":
        tok = RawTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train(files, trainer)
        return HFTokenizer(tok, kind, eos="<|endoftext|>")
    # LLaMA: sentencepiece-style BPE on "▁"-joined words, single digits, unknown bytes as <0xXX> tokens
    tok = RawTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("▁", "merged_with_next"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train(files, trainer)
    return HFTokenizer(tok, kind, bos="<s>", eos="</s>")
