"""`lmforge quantize`: weight-only int8 / int4 quantization of a model's linear layers into a loadable directory."""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge.commands.args import check_vocab, not_cwd, seed_type, utf8_path
from lmforge.errors import LMForgeError
from lmforge.files import check_output


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Quantize the weights of a model (norms and biases stay float32): its linear layers as int8 with "
        "one scale per output channel, or int4 in groups of 32/64/128 columns (symmetric or asymmetric); the token "
        "embedding table as int8 per row, shared by a tied output projection (--float-embedding keeps it float). "
        "int4 uses GPTQ by default, calibrated on --calibration text or, without it, on samples the model writes "
        "itself (a GGUF whose block weights are already Q4_1 is kept exactly: asymmetric round to nearest). "
        "The output directory (config.json, quantization.json, model.safetensors, tokenizer files) loads "
        "anywhere a model path is accepted, e.g. `lmforge generate --model DIR`.")
    p.add_argument("--model", help="lmforge checkpoint dir, Hugging Face dir, llama2.c .bin or .gguf "
                                   "(default: the bundled stories260K)")
    p.add_argument("--tokenizer", help="tokenizer path (default: found with the model)")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True, help="8 or 4")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 or 128 (default 32)")
    p.add_argument("--asymmetric", action="store_true", help="int4 with a per-group offset (min..max levels)")
    p.add_argument("--lm-head", action="store_true",
                   help="also quantize an untied output projection (round to nearest; a tied one follows the "
                        "embedding table)")
    p.add_argument("--float-embedding", action="store_true",
                   help="keep the token embedding table (and a tied output projection) float32")
    p.add_argument("--method", choices=("rtn", "gptq"), default=None,
                   help="rtn = round to nearest; gptq = error-compensating (int4 only; default for int4)")
    p.add_argument("--calibration", help="text file to calibrate GPTQ on (default: text sampled from the model)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default 128)")
    p.add_argument("--calib-len", type=int, default=None,
                   help="tokens per calibration sequence (default 512, at most the model's context): calibrate on "
                        "the positions the model is used at")
    p.add_argument("--seed", type=seed_type, default=None, help="seed for self-generated calibration (default 0)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)


def _load_tokenizer(model_path: Path, tok_arg: str | None, vocab_size: int):
    """(tokenizer object or None, raw tokenizer file to copy or None)."""
    from lmforge.commands.args import find_tokenizer_path

    if tok_arg is None and model_path.suffix == ".gguf":
        from lmforge.interop.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(model_path), None
    tok_path = Path(tok_arg) if tok_arg else find_tokenizer_path(model_path, vocab_size)
    if tok_path is None:
        return None, None
    try:
        from lmforge.tokenizer import load_tokenizer

        return load_tokenizer(str(tok_path)), None
    except ImportError as e:  # tokenizer formats not available in this build: carry the file along
        print(f"lmforge quantize: warning: cannot load the tokenizer ({e}); copying {tok_path} instead",
              file=sys.stderr)
        return None, tok_path if tok_path.is_file() else None


def _check_calibration_flags(args, method: str) -> None:
    """Calibration flags only where GPTQ calibrates (round to nearest ignored them: --calibration was never read), and
    --seed only where it samples (without --calibration); then their defaults."""
    if method != "gptq":
        flags = {"--calibration": args.calibration, "--seed": args.seed, "--calib-samples": args.calib_samples,
                 "--calib-len": args.calib_len}
        why = "--bits 8 rounds to nearest" if args.bits == 8 else "--method rtn rounds to nearest"
        if args.method is None and args.bits == 4:  # a Q4_1 GGUF kept exactly (sizes passed to be sure: taken)
            why = "a Q4_1 GGUF's weights are kept as they are (round to nearest)"
            del flags["--calib-samples"], flags["--calib-len"]
        given = [f for f, v in flags.items() if v is not None]
        if given:
            raise LMForgeError(f"{given[0]}: {why} and takes no calibration; GPTQ (--bits 4 --method gptq) "
                               "calibrates")
    elif args.calibration and args.seed is not None:
        raise LMForgeError("--seed: seeds the calibration text the model samples itself; with --calibration "
                           f"{args.calibration} nothing is sampled")
    args.calib_samples = 128 if args.calib_samples is None else args.calib_samples
    args.calib_len = 512 if args.calib_len is None else args.calib_len
    args.seed = 0 if args.seed is None else args.seed


def _calibration_text(args) -> str:
    """The --calibration file's text (read once), or one line naming it."""
    if getattr(args, "calibration_text", None) is None:
        try:
            args.calibration_text = Path(args.calibration).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LMForgeError(f"--calibration {args.calibration}: cannot read: {e}") from None
    return args.calibration_text


def _calibration_ids(args, tok, model):
    import torch

    if not args.calibration:
        return None
    if tok is None:
        raise LMForgeError(f"--calibration {args.calibration}: needs a tokenizer (pass --tokenizer)")
    text = _calibration_text(args)
    ids = tok.encode(text, bos=True)
    n = min(args.calib_len, model.cfg.block_size)
    chunks = [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)][: args.calib_samples]
    if not chunks:
        raise LMForgeError(f"--calibration {args.calibration}: {len(ids)} tokens, fewer than --calib-len {n}")
    if len(chunks) < args.calib_samples:  # (said: GPTQ calibrated on fewer sequences than asked without a word)
        print(f"lmforge quantize: --calibration {args.calibration} holds {len(ids):,} tokens: {len(chunks)} "
              f"sequences of {n} of the {args.calib_samples} asked (--calib-samples)", file=sys.stderr)
    return torch.tensor(chunks)


def run(args) -> None:
    from lmforge.assets import STORIES260K
    from lmforge.checkpoint import load_model
    from lmforge.model.cache import kv_cache_len
    from lmforge.peft import is_adapter_dir
    from lmforge.quant import (
        QuantConfig,
        QuantLinear,
        head_is_tied,
        quantize_model,
        save_quantized,
        self_calibration,
        weight_bytes,
    )

    if args.bits == 4 and args.group_size is None:
        args.group_size = 32
    path = Path(args.model) if args.model else STORIES260K
    method, symmetric = args.method, not args.asymmetric
    if path.is_dir() and is_adapter_dir(path) and not (path / "config.json").is_file():  # ("not a checkpoint")
        raise LMForgeError(f"{path}: an adapter directory; merge it into its base first (lmforge peft merge "
                           f"--adapter {path} --output MERGED), then quantize MERGED")
    kept = ""
    if args.bits == 4 and method is None and args.group_size == 32 and path.suffix == ".gguf" and path.is_file():
        from lmforge.interop.gguf import gguf_block_weight_types

        if gguf_block_weight_types(path) == {"Q4_1"}:  # already 4-bit: keep those weights exactly
            method, symmetric = "rtn", False
            kept = (f"lmforge quantize: {path.name} holds its block weights as Q4_1 (asymmetric 4-bit, groups of 32): "
                    f"storing them as int4-g32 asymmetric, round to nearest, which keeps them exactly (--method gptq "
                    f"re-quantizes)")
    method = method or ("gptq" if args.bits == 4 else "rtn")
    _check_calibration_flags(args, method)
    utf8_path(args.output, "--output")
    not_cwd(args.output, "--output")
    if Path(args.output).exists() and not Path(args.output).is_dir():  # (--overwrite left .NAME.old-PID behind)
        raise LMForgeError(f"--output {args.output}: is a file; quantize writes a directory")
    check_output(Path(args.output), args.overwrite, [path, Path(args.tokenizer) if args.tokenizer else None],
                 "--output")
    if kept:  # (after the checks: a refusal is its one line)
        print(kept, file=sys.stderr)
    qcfg = QuantConfig(bits=args.bits, group_size=args.group_size, symmetric=symmetric,
                       lm_head=args.lm_head, embedding=not args.float_embedding, method=method)
    qcfg.validate()
    if args.calib_samples <= 0 or args.calib_len < 2:
        raise LMForgeError("--calib-samples must be > 0 and --calib-len >= 2")
    if method == "gptq" and args.calibration:
        _calibration_text(args)  # (a missing or unreadable file was said only once the model was loaded)
    model = load_model(path)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise LMForgeError(f"{path}: the model is already quantized")
    if args.lm_head and model.cfg.tie_embeddings and qcfg.embedding:  # (it was ignored: the table's int8 is used)
        raise LMForgeError(f"--lm-head: {path}'s output projection is tied to the embedding table and computes with "
                           "its int8 copy; --lm-head quantizes an untied one (with --float-embedding, the tied one "
                           "apart from the float table)")
    before = weight_bytes(model)
    tok, raw_tok = _load_tokenizer(path, args.tokenizer, model.cfg.vocab_size)
    if tok is not None:  # refused here, as `generate` would refuse the output
        check_vocab(model.cfg, tok, str(path), args.tokenizer or str(path))
    calib = None
    if method == "gptq":
        calib = _calibration_ids(args, tok, model)
        if calib is None:
            try:  # the samples are generated together (the cache's own message named a --max-len quantize lacks)
                kv_cache_len(model.cfg, args.calib_samples, min(args.calib_len, model.cfg.block_size))
            except LMForgeError:
                raise LMForgeError(f"--calib-samples {args.calib_samples}: generating them together needs a key/value "
                                   "cache larger than this machine's memory allows; lower --calib-samples") from None
            print(f"lmforge quantize: sampling {args.calib_samples} x {min(args.calib_len, model.cfg.block_size)} "
                  f"calibration tokens from the "
                  f"model", file=sys.stderr)
            start = tok.bos_id if tok is not None and tok.bos_id is not None else None
            calib = self_calibration(model, args.calib_samples, args.calib_len, args.seed, start, progress=True)
    model = quantize_model(model, qcfg, calib, progress=True)
    out = save_quantized(model, args.output, tok, [raw_tok] if raw_tok is not None else None)
    after = weight_bytes(model)
    n_layers = sum(isinstance(m, QuantLinear) for m in model.modules()) - int(head_is_tied(model))
    kind = f"int{qcfg.bits}" + (f"-g{qcfg.group_size}{'' if qcfg.symmetric else '-asym'}" if qcfg.bits == 4 else "")
    emb = ""
    if qcfg.embedding:
        emb = "; embedding table" + (" and tied output projection" if head_is_tied(model) else "") + " as int8"
    print(f"{out}: {n_layers} linear layers as {kind} ({method}){emb}; weights {before / 1e6:.2f} MB -> "
          f"{after / 1e6:.2f} MB ({before / after:.2f}x smaller)")
