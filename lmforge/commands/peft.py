"""`lmforge peft`: merge an adapter into its base model, export an adapter (PEFT's layout, lmforge's, or merged)."""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge.commands.args import read_template, write_template
from lmforge.errors import LMForgeError
from lmforge.files import check_output

EXPORT_FORMATS = ("peft", "lmforge", "hf")


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description="Work with PEFT adapters (adapter_config.json + "
                       "adapter_model.safetensors, made by `lmforge sft --peft ...` or by Hugging Face peft).")
    ps = p.add_subparsers(dest="peft_command", metavar="SUBCOMMAND", required=True)
    m = ps.add_parser("merge", help="add a LoRA adapter into its base: a plain lmforge checkpoint",
                      description="Load --model, apply the adapter in --adapter, add every LoRA update into its "
                      "base weight (a 4-bit QLoRA base is dequantized first, so the merged model computes what "
                      "the adapted one did) and write a plain lmforge checkpoint directory with the tokenizer.")
    m.add_argument("--model", help="base model: lmforge dir, HF dir, llama2.c .bin, .gguf or quantized dir "
                                   "(default: the adapter's base_model_name_or_path)")
    m.add_argument("--adapter", required=True, help="adapter directory")
    m.add_argument("--output", required=True, help="output checkpoint directory")
    m.add_argument("--tokenizer", help="tokenizer to carry along (default: found with the base)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    m.set_defaults(func=run_merge)
    e = ps.add_parser("export", help="rewrite an adapter in PEFT's layout, lmforge's, or as a merged HF model",
                      description="peft: adapter_config.json + adapter_model.safetensors keyed as peft names them "
                      "on the transformers export of the base (`peft.PeftModel.from_pretrained` reads it); "
                      "lmforge: the same files keyed by lmforge's module names (any method, any base); "
                      "hf: the base with the adapter merged, as a transformers directory.")
    e.add_argument("--adapter", required=True, help="adapter directory")
    e.add_argument("--output", required=True, help="output directory")
    e.add_argument("--format", choices=EXPORT_FORMATS, default="peft", help="peft (default), lmforge or hf")
    e.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    e.add_argument("--base-name", help="base_model_name_or_path to record (default: the base path)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    e.set_defaults(func=run_export)


def _base_path(args) -> Path:
    if args.model:
        return Path(args.model)
    from lmforge.peft import read_adapter_base

    cfg_file = Path(args.adapter) / "adapter_config.json"
    base = read_adapter_base(args.adapter)
    if not base:
        raise LMForgeError(f"{cfg_file}: no base_model_name_or_path; pass --model BASE")
    if not Path(base).exists():
        raise LMForgeError(f"{cfg_file}: base_model_name_or_path {base!r} is not a local path; pass --model BASE")
    return Path(base)


def _load(args):
    from lmforge.checkpoint import load_model
    from lmforge.peft import load_adapter

    path = _base_path(args)
    tok = Path(args.tokenizer) if getattr(args, "tokenizer", None) else None
    # before any work: never over the adapter, the base or the tokenizer, nor over an output without --overwrite
    check_output(Path(args.output), args.overwrite, [Path(args.adapter), path, tok], "--output")
    model = load_model(path)
    resolved = load_adapter(model, args.adapter)
    return path, model.eval(), resolved


def _templates(tok, base: Path, adapter: str) -> None:
    """The chat template the merged weights answer to: the adapter's (what it was trained with), else the base's."""
    read_template(base, tok)
    read_template(Path(adapter), tok)


def run_merge(args) -> None:
    from lmforge.checkpoint import save_checkpoint
    from lmforge.commands.args import check_vocab
    from lmforge.commands.quantize import _load_tokenizer
    from lmforge.peft.lora import lora_layers, unwrap

    path, model, resolved = _load(args)
    if not lora_layers(model):
        raise LMForgeError(f"{args.adapter}: a {resolved['method']} adapter has no weights to merge (only LoRA "
                           f"and QLoRA adapters merge)")
    n = len(lora_layers(model))
    unwrap(model)
    tok, _ = _load_tokenizer(path, args.tokenizer, model.cfg.vocab_size)
    if tok is not None:  # refused here, as `generate` would refuse the output
        check_vocab(model.cfg, tok, str(path), args.tokenizer or str(path))
        _templates(tok, path, args.adapter)
    out = save_checkpoint(model, args.output, tok)
    write_template(Path(out), tok)
    print(f"{out}: {resolved['method']} adapter merged into {n} layers of {path}")


def run_export(args) -> None:
    from lmforge.commands.quantize import _load_tokenizer
    from lmforge.interop.hf import write_hf_dir
    from lmforge.peft import save_adapter
    from lmforge.peft.lora import lora_layers, unwrap

    path, model, resolved = _load(args)
    method = resolved.pop("method")
    if args.format == "hf":
        if not lora_layers(model):
            raise LMForgeError(f"--format hf: a {method} adapter cannot be merged into the weights; use peft/lmforge")
        unwrap(model)
        tok, _ = _load_tokenizer(path, None, model.cfg.vocab_size)
        if tok is not None:
            _templates(tok, path, args.adapter)
        warning = write_hf_dir(Path(args.output), model.cfg, dict(model.state_dict()), tok)
        write_template(Path(args.output), tok)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{args.output}: the base with the adapter merged, as a transformers checkpoint"
              f"{'' if tok is not None else ' (no tokenizer found with the base: weights only)'}")
        return
    out = save_adapter(model, args.output, args.base_name or str(path), resolved, method, args.format)
    print(f"{out}: {method} adapter in {args.format}'s layout")
