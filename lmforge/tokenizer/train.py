"""Train tokenizers: byte-level BPE (GPT-2 style), LLaMA-style BPE (digits split, byte fallback), char-level."""

from __future__ import annotations

import codecs
import os
import shutil
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

from lmforge.data.io import BadRecords, check_format_flags, file_kind, iter_documents
from lmforge.errors import LMForgeError
from lmforge.files import MODEL_FILES
from lmforge.tokenizer.base import Tokenizer
from lmforge.tokenizer.char import CharTokenizer
from lmforge.tokenizer.hf import HFTokenizer

KINDS = ("bytelevel-bpe", "llama-bpe", "char")
SPECIALS = {"bytelevel-bpe": ["<|endoftext|>"], "llama-bpe": ["<unk>", "<s>", "</s>"]}
MAX_VOCAB = 1 << 24


def check_text_file(path: Path) -> int:
    """Characters of non-blank text in ``path``, checking it is UTF-8 (one-line error naming the file and line)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    done, lines, chars = 0, 1, 0
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                try:
                    text = dec.decode(chunk)
                except UnicodeDecodeError as e:  # e.object: the bytes held back from the last chunk + this one
                    at = done - (len(e.object) - len(chunk)) + e.start
                    line = lines + e.object[: e.start].count(b"\n")
                    raise LMForgeError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                                       f"{at}); is it a binary file?") from None
                done += len(chunk)
                lines += chunk.count(b"\n")
                chars += len(text) - text.count(" ") - text.count("\n") - text.count("\t") - text.count("\r")
            dec.decode(b"", final=True)
    except UnicodeDecodeError:
        raise LMForgeError(f"{path}: not UTF-8 text (it ends inside a character); is it a binary file?") from None
    except OSError as e:
        raise LMForgeError(f"{path}: cannot read: {e.strerror}") from None
    return chars


WRITTEN = {*HFTokenizer.FILES, *CharTokenizer.FILES}  # what a trained tokenizer writes: --overwrite replaces them


def check_output_dir(output: str, overwrite: bool = False) -> list[Path]:
    """The output must be a directory we can write (created if missing: the directories made are returned, innermost
    first) and, unless ``overwrite``, empty: checked before training. Nothing in it is removed here:
    :func:`save_tokenizer` replaces the files at the end."""
    out = Path(output)
    if out.is_symlink() and not out.exists():  # (mkdir said 'File exists')
        raise LMForgeError(f"{out}: a symbolic link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"{out}: exists and is not a directory; --output names a directory for the tokenizer")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        raise LMForgeError(f"{out}: not empty (holds {', '.join(held[:3])}{more}); give a new directory, or "
                           "--overwrite to replace the tokenizer in it")
    held_by = [n for n in (*MODEL_FILES, "index.json") if n in held]
    if held_by:  # (--overwrite: a model's or a prepared dataset's tokenizer must stay the one of its weights or ids)
        what = "prepared data" if held_by == ["index.json"] else "a model"
        raise LMForgeError(f"{out}: holds {what} ({', '.join(held_by)}), whose tokenizer must stay the one its "
                           f"{'token ids were' if what == 'prepared data' else 'weights were'} made with; give a new "
                           "directory for the tokenizer")
    made = [d for d in (out, *out.parents) if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LMForgeError(f"{out}: cannot write the tokenizer there: {e.strerror}") from None
    return made


def save_tokenizer(tok: Tokenizer, output: str) -> None:
    """Write ``tok``'s files into a temporary directory inside ``output``, then rename each over the old one and
    remove the files of a previous tokenizer of another kind: an interrupted or failed run leaves the old tokenizer
    whole (--overwrite deleted it before training: ^C during training left an empty directory)."""
    out = Path(output)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out))
    try:
        tok.save(str(tmp))
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            os.replace(tmp / name, out / name)
        for name in WRITTEN - set(names):
            (out / name).unlink(missing_ok=True)
    except OSError as e:
        raise LMForgeError(f"{out}: cannot write the tokenizer there: {e.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_tokenizer(files: list[str], vocab_size: int, kind: str, output: str | None = None,
                    special_tokens: list[str] | None = None, overwrite: bool = False, field: str = "text",
                    skip_bad: bool = False) -> Tokenizer:
    """A tokenizer of ``kind`` trained on ``files``, saved to ``output`` (a new or empty directory, or any with
    ``overwrite``) if given. Text files are read as they are; .jsonl, .json and .parquet files (and any ``.gz``) by
    the text of their records' ``field``, as ``data prepare`` reads them."""
    if kind not in KINDS:
        raise LMForgeError(f"--kind {kind!r}: allowed values are {list(KINDS)}")
    if kind == "char" and special_tokens:
        raise LMForgeError(f"--special-tokens {' '.join(special_tokens)}: a char tokenizer has no special tokens (one "
                           "token per character of the text); use --kind bytelevel-bpe or llama-bpe for them")
    specials = list(dict.fromkeys(SPECIALS.get(kind, []) + list(special_tokens or [])))  # (a repeat is one token)
    least = 1 if kind == "char" else 256 + len(specials) + 1  # BPE: the 256 bytes, the specials, one merge
    if not isinstance(vocab_size, int) or not least <= vocab_size <= MAX_VOCAB:
        raise LMForgeError(f"--vocab-size {vocab_size}: must be in [{least}, {MAX_VOCAB:,}] for {kind}")
    if not files:
        raise LMForgeError("no input files")
    for f in files:
        if Path(f).is_dir():
            raise LMForgeError(f"{f}: is a directory; --input takes text files")
        if Path(f).exists() and not Path(f).is_file():
            raise LMForgeError(f"{f}: not a regular file (a device or a pipe); --input takes text files, which "
                               "training reads more than once: write a pipe's text to a file first")
        if not Path(f).is_file():
            raise LMForgeError(f"{f}: no such input file")
    check_format_flags(files, field)
    if skip_bad and not any(_is_records(f) for f in files):
        raise LMForgeError("--skip-bad: no input is a file of records (.jsonl, .json, .parquet or .gz); a text file is "
                           "read whole and must be UTF-8: leave it out")
    # records' text is written out for the trainer beside --output, on the disk the user chose (a corpus of JSONL
    # filled a small /tmp), not in the system's temporary directory
    near = next((d for d in Path(output).resolve().parents if d.is_dir()), None) if output else None
    try:
        tmp_dir = (tempfile.TemporaryDirectory(prefix=".lmforge-tokenizer-", dir=near)
                   if any(_is_records(f) for f in files) else nullcontext(""))
    except OSError as e:
        where = output or tempfile.gettempdir()
        raise LMForgeError(f"{where}: cannot write the tokenizer there: {e.strerror}") from None
    with tmp_dir as tmp:
        try:
            texts = [_as_text(f, Path(tmp) / f"{i}.txt", field, skip_bad) for i, f in enumerate(files)]
        except OSError as e:
            raise LMForgeError(f"{tmp}: cannot write the records' text for training: {e.strerror}") from None
        chars = sum(check_text_file(Path(t)) for t in texts)
        if not chars:
            raise LMForgeError(f"{files[0]}: no text to train on (the input is empty)")
        made = check_output_dir(output, overwrite) if output else []
        try:
            if kind == "char":
                tok = CharTokenizer.from_text("".join(_read_exact(t) for t in texts))
            else:
                tok = _train_bpe(texts, vocab_size, kind, special_tokens)
        except BaseException:  # (^C too) directories made for the output are not left behind empty
            for d in made:
                if any(d.iterdir()):
                    break
                d.rmdir()
            raise
    if output:
        save_tokenizer(tok, output)
    return tok


def _is_records(path: str) -> bool:
    """Whether training reads ``path`` through data/io (records, or a .gz) rather than as the text file it is."""
    return file_kind(path) != "text" or path.lower().endswith(".gz")


def _as_text(path: str, tmp: Path, field: str, skip_bad: bool) -> str:
    """``path`` itself for a text file; for records (.jsonl, .json, .parquet) or a .gz file, ``tmp`` holding their
    documents' text one after another (a JSONL file was trained on as text: its keys, quotes and \\uXXXX escapes)."""
    if not _is_records(path):
        return path
    bad = BadRecords(skip_bad)
    docs = iter_documents([path], field=field, txt_split="raw", drop_empty=True, meta=False, bad=bad)
    n = 0
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        for d in docs:
            f.write(d.text if d.text.endswith("\n") else d.text + "\n")
            n += 1
    if bad.count and not n:  # (a wrong --field: not an empty input)
        raise LMForgeError(f"{path}: no document left: all {bad.count} records were skipped as bad (first: "
                           f"{bad.examples[0]})")
    if bad.count:
        print(f"skipped {bad.count} bad record(s) of {path} (first: {bad.examples[0]})", file=sys.stderr)
    return str(tmp)


def _read_exact(path: str) -> str:
    """The text of a file as stored: "\r\n" and a lone "\r" are kept (read_text turns them into "\n": a char
    vocabulary trained on CRLF files had no "\r", and encoding those files failed)."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _train_files(tok, files: list[str], trainer) -> None:
    """``tok.train(files)``; a path that is not UTF-8 (a GBK-named file: the library takes UTF-8 paths only, it
    failed 'surrogates not allowed') is given as a symbolic link with a plain name."""
    def utf8(f: str) -> bool:
        try:
            f.encode("utf-8")
            return True
        except UnicodeEncodeError:
            return False

    if all(map(utf8, files)):
        tok.train(files, trainer)
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-tokenizer-links-") as links:
        paths = []
        for i, f in enumerate(files):
            paths.append(f if utf8(f) else os.path.join(links, f"{i}.txt"))
            if paths[-1] != f:
                os.symlink(os.path.abspath(f), paths[-1])
        tok.train(paths, trainer)


def _train_bpe(files: list[str], vocab_size: int, kind: str, special_tokens: list[str] | None) -> Tokenizer:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    specials = list(dict.fromkeys(SPECIALS[kind] + list(special_tokens or [])))
    if kind == "bytelevel-bpe":
        tok = RawTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        _train_files(tok, files, trainer)
        return HFTokenizer(tok, kind, eos="<|endoftext|>")
    # LLaMA: sentencepiece-style BPE on "▁"-joined words, single digits, unknown bytes as <0xXX> tokens
    tok = RawTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("▁", "merged_with_next"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    # the characters of the text beyond what fits go to byte fallback (as sentencepiece's character_coverage): the
    # trainer kept every character seen, so a Chinese or emoji-rich text gave more tokens than --vocab-size. "▁" is
    # always kept: the decoder turns only a "▁" token into a space (a byte-fallback one would stay "▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False,
                                  initial_alphabet=["▁"], limit_alphabet=vocab_size - len(specials) - len(byte_tokens))
    _train_files(tok, files, trainer)
    return HFTokenizer(tok, kind, bos="<s>", eos="</s>")
