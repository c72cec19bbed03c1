"""`lmforge convert`: checkpoints between lmforge, Hugging Face and llama2.c formats."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from lmforge.commands.args import (
    check_vocab,
    find_tokenizer_path,
    not_cwd,
    read_template,
    utf8_path,
    write_template,
)
from lmforge.errors import LMForgeError
from lmforge.files import check_output

FORMATS = ("hf", "llama2c", "lmforge")


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description="Convert a checkpoint. hf = a transformers directory "
                       "(config.json + safetensors), llama2c = a llama2.c .bin file (tokenizer.bin beside it), "
                       "lmforge = an lmforge checkpoint directory.")
    p.add_argument("src", help="source checkpoint")
    p.add_argument("dst", help="destination path")
    p.add_argument("--from", dest="src_format", choices=FORMATS, required=True)
    p.add_argument("--to", dest="dst_format", choices=FORMATS, required=True)
    p.add_argument("--tokenizer", help="tokenizer to carry along (default: found with the source)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.set_defaults(func=run)


_KINDS = {"hf": "a Hugging Face directory", "llama2c": "a llama2.c file", "lmforge": "an lmforge directory"}


def _format_of(src: Path) -> str | None:
    """The format ``src`` plainly is (None where unsure: its reader says what is wrong)."""
    from lmforge.checkpoint import is_lmforge_dir
    from lmforge.quant import QUANT_FILE

    if src.is_dir():
        if is_lmforge_dir(src) or (src / QUANT_FILE).is_file():
            return "lmforge"
        return "hf" if (src / "config.json").is_file() else None
    return "llama2c" if src.is_file() and src.suffix == ".bin" and not src.name.startswith("pytorch_model") else None


def _read_from(path: Path, sources: list[Path | None]) -> bool:
    """Whether ``path`` is one of ``sources`` or a file inside one of them."""
    target = path.resolve()
    return any(p is not None and p.exists() and (target == p.resolve() or p.resolve() in target.parents)
               for p in sources)


def _read(fmt: str, src: Path):
    from lmforge.checkpoint import build_model, is_lmforge_dir, load_checkpoint

    if fmt == "lmforge":
        from lmforge.quant import QUANT_FILE, load_quantized

        if (src / QUANT_FILE).is_file():  # `lmforge quantize` output: the other formats hold float weights
            from lmforge.peft.lora import dequantize_bases

            model = load_quantized(src)
            dequantize_bases(model)
            model.dequantized_note = (f"{src}: a quantized model: its weights are written dequantized (float32, as "
                                      "large as the float model)")
            return model
        if not is_lmforge_dir(src):
            raise LMForgeError(f"{src}: not an lmforge checkpoint directory (config.json with lmforge fields)")
        return load_checkpoint(src)
    if fmt == "hf":
        from lmforge.interop.hf import read_hf_dir

        if not src.is_dir():
            raise LMForgeError(f"{src}: a Hugging Face checkpoint is a directory")
        cfg, sd = read_hf_dir(src)
        return build_model(cfg, sd, str(src))
    from lmforge.interop.llama2c import read_llama2c

    cfg, sd = read_llama2c(src)
    return build_model(cfg, sd, str(src))


def run(args) -> None:
    from lmforge.checkpoint import model_state_dict, save_checkpoint
    from lmforge.model.heads import HEAD_CONFIG
    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.loader import NoTokenizerFiles

    src, dst = Path(args.src), Path(args.dst)
    utf8_path(args.dst, "destination")
    if args.dst_format != "llama2c":
        not_cwd(args.dst, "destination")
    if not src.exists():
        raise LMForgeError(f"{src}: no such file or directory")
    if src.is_file() and src.suffix == ".gguf":  # (it was 'not an lmforge checkpoint directory', 'implausible header')
        raise LMForgeError(f"{src}: a GGUF file, which convert does not read (--from is hf, llama2c or lmforge); "
                           f"lmforge quantize --model {src} --bits 4 --output DIR reads it, then convert --from "
                           "lmforge DIR (other commands take the .gguf as --model)")
    found = _format_of(src)
    if found is not None and found != args.src_format:  # (each reader failed its own way: 'Is a directory', ...)
        raise LMForgeError(f"{src}: {_KINDS[found]}, not {_KINDS[args.src_format]}: give --from {found}")
    if args.dst_format == "llama2c" and (args.dst.endswith(("/", os.sep)) or dst.is_dir()):  # (wrote a file 'x')
        raise LMForgeError(f"destination {args.dst}: is a directory; --to llama2c writes a file (e.g. {dst}/model.bin, "
                           "tokenizer.bin beside it)")
    if args.dst_format != "llama2c" and dst.exists() and not dst.is_dir():
        raise LMForgeError(f"destination {dst}: is a file; --to {args.dst_format} writes a directory")
    check_output(dst, args.overwrite, [src, Path(args.tokenizer) if args.tokenizer else None], "destination")
    model = _read(args.src_format, src)
    if args.dst_format == "llama2c":  # (refused before any note: one line)
        from lmforge.interop.llama2c import check_llama2c_compatible

        check_llama2c_compatible(model.cfg)
    if getattr(model, "dequantized_note", None):
        print(model.dequantized_note, file=sys.stderr)
    tok_path = Path(args.tokenizer) if args.tokenizer else find_tokenizer_path(src, model.cfg.vocab_size)
    try:
        tok = load_tokenizer(str(tok_path)) if tok_path is not None else None
    except NoTokenizerFiles:
        if args.tokenizer:
            raise
        tok = None
    if tok is not None:
        check_vocab(model.cfg, tok, str(src), str(tok_path))
        for where in (tok_path, src):  # transformers saves a template as chat_template.jinja: carried along
            read_template(where, tok)
    if tok is None:
        print(f"warning: no tokenizer found with {src}: converting the weights only (give --tokenizer PATH to carry "
              "one along)", file=sys.stderr)
    if (src / HEAD_CONFIG).is_file():
        print(f"warning: {src} is a reward/value model: its head ({HEAD_CONFIG}, value_head.safetensors) is not "
              f"converted; {dst} holds its language model only", file=sys.stderr)
    if args.dst_format == "lmforge":
        save_checkpoint(model, dst, tok)
        write_template(dst, tok)
    elif args.dst_format == "hf":
        from lmforge.interop.hf import write_hf_dir

        warning = write_hf_dir(dst, model.cfg, dict(model.state_dict()), tok)
        write_template(dst, tok)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    else:
        from lmforge.interop.llama2c import LLAMA2C_EPS, write_llama2c

        dst.parent.mkdir(parents=True, exist_ok=True)
        tok_dir = dst.parent / f".{dst.stem}.tok"
        beside = dst.parent / "tokenizer.bin"  # where llama2.c looks for it
        written = False
        try:
            if tok is not None:  # written first: an existing tokenizer.bin is refused before the model is written
                tok_dir.mkdir(exist_ok=True)
                tok.save(str(tok_dir))
                new = tok_dir / "tokenizer.bin"
                if new.exists() and beside.exists():
                    if new.read_bytes() == beside.read_bytes():  # already there: nothing replaced
                        new.unlink()
                        written = True
                    elif _read_from(beside, [src, tok_path]):  # (--overwrite replaced the input's own file)
                        raise LMForgeError(f"{beside}: the tokenizer is written beside {dst}, and would replace "
                                           "this file, which is being read; write elsewhere")
                    elif not args.overwrite:
                        raise LMForgeError(f"{beside}: exists; pass --overwrite to replace it (a llama2c model's "
                                           "tokenizer is written beside it)")
            write_llama2c(dst, model.cfg, model_state_dict(model) | {"lm_head.weight": model.lm_head.weight})
            if (tok_dir / "tokenizer.bin").exists():
                os.replace(tok_dir / "tokenizer.bin", beside)
            elif tok is not None and not written:
                print(f"warning: the {getattr(tok, 'kind', '')} tokenizer has no llama2.c form (tokenizer.bin): "
                      f"{dst} is written without it", file=sys.stderr)
            if model.cfg.norm_eps != LLAMA2C_EPS:
                print(f"warning: llama2.c computes RMSNorm with eps {LLAMA2C_EPS:g}, this model with "
                      f"{model.cfg.norm_eps:g}: its logits there differ slightly (the file holds no eps)",
                      file=sys.stderr)
        finally:
            shutil.rmtree(tok_dir, ignore_errors=True)
    print(f"wrote {dst} ({args.src_format} -> {args.dst_format}, {model.num_params():,} parameters)",
          file=sys.stderr)
