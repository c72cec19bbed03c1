"""Argument parsing and model/tokenizer file helpers shared by the commands that take ``--model``, without torch
(``lmforge.commands.common`` re-exports them beside the helpers that need torch)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lmforge.errors import LMForgeError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="lmforge checkpoint dir (also `lmforge quantize` output), Hugging Face dir, "
                                   "llama2.c .bin or GGUF file (default: the bundled stories260K)")
    p.add_argument("--tokenizer", help="tokenizer path (default: found with the model)")
    p.add_argument("--adapter", help="a PEFT adapter directory (lmforge sft --peft output, or PEFT's "
                                     "adapter_config.json + adapter_model.safetensors) applied to --model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")


MAX_SEED = 2**63 - 1


def seed_type(value: str) -> int:
    """``--seed``: an integer in [0, 2**63 - 1] (torch's and NumPy's generators take no more), else argparse's line."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {value!r}") from None
    if not 0 <= n <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value}: must be in [0, 2**63 - 1]")
    return n


def origin_type(value: str) -> str:
    """``--cors-origin``: ``*`` or a web origin as browsers send it (``scheme://host[:port]``, no path), which is
    what CORS compares byte for byte: ``localhost:3000`` or ``http://x/`` would never match and CORS stayed off."""
    from urllib.parse import urlsplit

    if value == "*":
        return value
    try:
        u = urlsplit(value)
        port = u.port
    except ValueError:
        u, port = None, None
    if (u is None or u.scheme not in ("http", "https") or not u.hostname or u.path or u.query or u.fragment
            or u.username or u.password or value != value.strip() or (port is not None and not 0 < port < 65536)):
        raise argparse.ArgumentTypeError(f"{value!r}: not a web origin; give scheme://host[:port] (e.g. "
                                         "http://localhost:3000, no path) or '*'")
    return value.lower()  # (browsers send the scheme and host in lower case; CORS compares exactly)


def utf8_text(text: str, what: str) -> str:
    """``text`` (from the command line or stdin, where bytes that are not UTF-8 arrive as lone surrogates), or one
    line naming ``what`` and the first such byte (the tokenizer failed with "Unable to cast ... to C++ type")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        byte = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"character U+{ch:04X}"
        raise LMForgeError(f"{what}: not UTF-8 text ({byte} at character {e.start})") from None
    return text


def not_cwd(path: str, what: str) -> None:
    """A directory output that is (or holds) the current directory refused: it is replaced whole, by a rename
    ('ValueError: PosixPath('.') has an empty name')."""
    target = Path(path).resolve()
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise LMForgeError(f"{what} {path}: the current directory (or one holding it); the output directory is "
                           "replaced whole: name another one")


def utf8_path(path: str, what: str) -> None:
    """An output path that is not UTF-8 refused before any work: safetensors reads UTF-8 paths only, so no command
    could load the model from there (and tokenizers' save failed with UnicodeEncodeError once it was converted)."""
    try:
        utf8_text(path, f"{what} {os.fsencode(path).decode('utf-8', 'backslashreplace')}")
    except LMForgeError as e:
        raise LMForgeError(f"{e}: safetensors reads models from UTF-8 paths only (none could load it from there)") \
            from None


def add_kv_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", choices=("auto", "float16", "float32"), default="auto",
                   help="the lean runtime's key/value cache: float16 reads half the bytes in attention (llama.cpp's "
                        "default; logits within about 1e-3 of float32's), float32 gives the PyTorch runtime's numbers "
                        "exactly; auto (default): float16 (PyTorch keeps the model's dtype)")


def lean_kv_dtype(args) -> str:
    """The lean runtime's cache dtype for ``--kv-cache-dtype``."""
    return "float32" if getattr(args, "kv_cache_dtype", "auto") == "float32" else "float16"


def check_torch_kv_cache(args) -> None:
    """``--kv-cache-dtype`` with the PyTorch runtime: auto only (its cache keeps the model's dtype), else one line."""
    if getattr(args, "kv_cache_dtype", "auto") != "auto":
        raise LMForgeError(f"--kv-cache-dtype {args.kv_cache_dtype}: a choice of the lean runtime (an int4 directory "
                           "on a CPU); PyTorch keeps the cache in the model's dtype")


def find_tokenizer_path(model_path: Path, vocab_size: int) -> Path | None:
    """Tokenizer beside a model: the checkpoint dir itself, or llama2.c's tokenizer.bin / tok{vocab}.bin."""
    if model_path.is_dir() or model_path.suffix == ".gguf":  # GGUF files carry their tokenizer
        return model_path
    for name in ("tokenizer.bin", f"tok{vocab_size}.bin", "tokenizer.model"):
        if (model_path.parent / name).exists():
            return model_path.parent / name
    return None


def find_tokenizer_files(path: Path) -> bool:
    return any((path / n).is_file() for n in ("tokenizer_config.json", "tokenizer.bin", "tokenizer.model"))


def read_template(path: Path, tok) -> None:
    """The chat template a fine-tuned model (or adapter) was trained with, saved beside it."""
    template = path / "chat_template.jinja"
    if path.is_dir() and template.is_file():
        tok.chat_template = template.read_text(encoding="utf-8")


def write_template(path: Path, tok) -> None:
    """The tokenizer's chat template beside a model written to ``path`` (a directory), where ``read_template`` and
    transformers read it; nothing when it has none."""
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template.strip() and Path(path).is_dir():
        (Path(path) / "chat_template.jinja").write_text(template, encoding="utf-8")


def max_vocab_padding(tok_vocab: int) -> int:
    """How many more rows a model's embedding may have than its tokenizer has ids: checkpoints round the vocabulary
    up for speed (GPT-2 50,257 -> 50,304, GPT-NeoX 50,277 -> 50,432, Qwen2 151,665 -> 151,936): up to 128 rows or
    1/256 of the vocabulary, whichever is more."""
    return max(128, tok_vocab // 256)


def check_vocab(cfg, tok, model_src: str, tok_src: str) -> None:
    """Refuse a tokenizer that does not belong to the model, both ways: every tokenizer id must be a row of the
    model, the model's vocabulary may exceed the tokenizer's only by padding (else it would generate ids that have
    no text), and the model's BOS/EOS ids must be tokens of the tokenizer."""
    if tok.vocab_size > cfg.vocab_size:
        raise LMForgeError(f"{tok_src}: tokenizer has {tok.vocab_size:,} tokens but the model {model_src} only "
                           f"{cfg.vocab_size:,}: not the model's tokenizer")
    if cfg.vocab_size - tok.vocab_size > max_vocab_padding(tok.vocab_size):
        raise LMForgeError(f"{tok_src}: tokenizer has {tok.vocab_size:,} tokens but the model {model_src} has "
                           f"{cfg.vocab_size:,} (ids {tok.vocab_size:,}..{cfg.vocab_size - 1:,} would have no text): "
                           "not the model's tokenizer")
    for name in ("bos_id", "eos_id"):
        i = getattr(cfg, name)
        if i is not None and not 0 <= i < tok.vocab_size:
            raise LMForgeError(f"{tok_src}: the model {model_src} has {name.replace('_id', '').upper()} token {i}, "
                               f"outside the tokenizer's {tok.vocab_size:,} tokens: not the model's tokenizer")


def take_model_ends(cfg, tok) -> None:
    """Give the tokenizer the model's end ids (its EOS and a transformers config's others), so every generation
    stops at them as transformers' does."""
    tok.end_ids = tuple(i for i in cfg.end_ids if 0 <= i < tok.vocab_size and i not in (tok.eos_id, tok.bos_id))


def template_arg(value: str | None) -> str | None:
    """``--template``: a built-in name, a Jinja file's text or a Jinja string (None: the tokenizer's own)."""
    from lmforge.infer.chat import BUILTIN, compile_template, get_template

    if value is None or value.lower() in BUILTIN:
        return value
    if not value.strip():  # (Path("") is ".": "is a directory")
        raise LMForgeError(f"--template {value!r}: empty; give a built-in name ({', '.join(BUILTIN)}), a Jinja file "
                           "or a Jinja string")
    p = Path(value)
    jinja = "{{" in value or "{%" in value
    if not jinja and p.is_dir():
        raise LMForgeError(f"{p}: is a directory; --template takes a built-in name, a Jinja file or a Jinja string")
    if not jinja and not p.is_file() and ("/" in value or p.suffix):
        raise LMForgeError(f"--template {value}: no such file (nor a built-in: {', '.join(BUILTIN)})")
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LMForgeError(f"{p}: not UTF-8 text; --template takes a Jinja chat template file") from None
        except OSError as e:
            raise LMForgeError(f"{p}: cannot read the template: {e.strerror}") from None
        if "{{" not in text and "{%" not in text:
            raise LMForgeError(f"{p}: not a Jinja chat template (no {{{{ }}}} or {{% %}} in it)")
        try:
            compile_template(text)  # parsed now: a broken file is refused at start, not at the first request
        except LMForgeError as e:
            raise LMForgeError(f"{p}: {e}") from None
        return text
    get_template(value)  # a Jinja string (else an error naming the choices), parsed now
    compile_template(value)
    return value


def check_sampling_args(args) -> None:
    """--temperature, --top-p, --top-k and --min-p in range, else one line naming them."""
    if not args.temperature >= 0 or not 0 < args.top_p <= 1:
        raise LMForgeError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.top_k < 0 or not 0 <= args.min_p <= 1:
        raise LMForgeError("--top-k must be >= 0 and --min-p in [0, 1]")
