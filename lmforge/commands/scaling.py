"""`lmforge scaling`: scaling-law predictions (Chinchilla, Kaplan), fits to runs, a sweep, memory and FLOPs."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from lmforge.errors import LMForgeError

DESCRIPTION = (
    "Scaling laws. chinchilla/kaplan: compute-optimal parameters and tokens and the predicted loss from a compute "
    "budget, a parameter count or a token count. fit: fit L(N, D) = E + A/N^alpha + B/D^beta to lmforge runs. "
    "sweep: train a grid of small models, fit on all but the largest, predict it. memory: parameters, FLOPs per "
    "token and per-device memory of a config under ZeRO/FSDP and tensor/pipeline parallelism."
)
_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}


def number(text: str) -> float:
    """'1e21', '70B', '1.4T', '6.7e9' -> float."""
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?\d+)?)\s*([KMBGTP]?)\s*", text, flags=re.I)
    if not m:
        kind = "not a positive number" if text.strip().startswith("-") else "not a number"
        raise argparse.ArgumentTypeError(f"{kind}: {text!r} (e.g. 1e21, 70B, 1.4T)")
    try:
        value = float(m.group(1)) * _SUFFIX.get(m.group(2).upper(), 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= 1e40:  # (1e300 tokens overflowed the laws, 1e-300 params divided by zero)
        raise argparse.ArgumentTypeError(f"{text!r}: out of range (a count of FLOPs, parameters or tokens, 1 to 1e40)")
    return value


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description=DESCRIPTION)
    s = p.add_subparsers(dest="scaling_command", metavar="SUBCOMMAND")
    for law in ("chinchilla", "kaplan"):
        q = s.add_parser(law, help=f"{'Hoffmann et al. 2022' if law == 'chinchilla' else 'Kaplan et al. 2020'} "
                                   "predictions")
        q.add_argument("--compute", type=number, help="training FLOPs (e.g. 1e21)")
        q.add_argument("--params", type=number, help="parameters (e.g. 70B)")
        q.add_argument("--tokens", type=number, help="training tokens (e.g. 1.4T)")
        if law == "chinchilla":
            q.add_argument("--fit", default="hoffmann", choices=["hoffmann", "epoch"],
                           help="constants: Hoffmann et al. approach 3, or the Epoch AI replication's refit")
        q.add_argument("--json", action="store_true", help="print JSON")
        q.set_defaults(func=run_chinchilla if law == "chinchilla" else run_kaplan)
    q = s.add_parser("fit", help="fit L(N, D) to runs (their metrics.jsonl)")
    q.add_argument("runs", nargs="+", metavar="RUN", help="lmforge run directories")
    q.add_argument("--delta", type=float, default=1e-3, help="Huber delta (default 1e-3, as Hoffmann et al.)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=run_fit)
    q = s.add_parser("sweep", help="train a small grid, fit on all but the largest run, predict it")
    q.add_argument("--out", default="runs/scaling-sweep", help="directory of the runs (default runs/scaling-sweep)")
    q.add_argument("--sizes", default="1x32,2x48,3x64,4x96", help="LAYERSxWIDTH list (default 1x32,2x48,3x64,4x96)")
    q.add_argument("--iters", default="150,300,600", help="training steps list (default 150,300,600)")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--block-size", type=int, default=64)
    q.add_argument("--eval-iters", type=int, default=20)
    q.add_argument("--device", default="auto")
    q.add_argument("--overwrite", action="store_true",
                   help="train again the runs of --out trained with other settings (finished runs with the same "
                   "settings are reused either way), and write into an --out holding other files")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=run_sweep)
    q = s.add_parser("memory", help="parameters, FLOPs/token and memory per device of a config")
    q.add_argument("--model", required=True, help="a preset name (lmforge models) or a config.json / checkpoint dir")
    q.add_argument("--batch", type=int, default=1, help="micro-batch per device (sequences)")
    q.add_argument("--seq-len", type=int, help="sequence length (default: the model's context)")
    q.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    q.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage (3 = FSDP full shard)")
    q.add_argument("--fsdp", action="store_true", help="FSDP full sharding (same as --zero 3)")
    q.add_argument("--dp", type=int, default=1, help="data-parallel degree")
    q.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    q.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    q.add_argument("--recompute", default="none", choices=["none", "full"], help="activation recomputation")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=run_memory)
    p.set_defaults(func=lambda a: p.print_help())


def _print(obj: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(obj, indent=2))
    else:
        print("\n".join(lines))
    sys.stdout.flush()


def _h(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def run_chinchilla(args) -> None:
    from lmforge.scaling.laws import LAWS, chinchilla_report

    r = chinchilla_report(args.compute, args.params, args.tokens, LAWS[args.fit])
    law = r["law"]
    lines = [f"law: L(N, D) = {law['E']} + {law['A']}/N^{law['alpha']} + {law['B']}/D^{law['beta']}  "
             f"({law['source']}); N_opt ∝ C^{r['a']:.3f}, D_opt ∝ C^{r['b']:.3f}",
             f"compute {r['compute']:.3e} FLOPs: params {_h(r['params'])}, tokens {_h(r['tokens'])} "
             f"({r['tokens_per_param']:.3g} tokens/param), loss {r['loss']:.4f}"]
    if "optimal" in r:
        o = r["optimal"]
        lines.append(f"compute-optimal at the same compute: params {_h(o['params'])}, tokens {_h(o['tokens'])}, "
                     f"loss {o['loss']:.4f}")
    else:
        q = r["rule_20"]
        lines.append(f"20 tokens/param rule: params {_h(q['params'])}, tokens {_h(q['tokens'])}, loss {q['loss']:.4f}")
        for k, v in r["approaches"].items():
            lines.append(f"{k}: a={v['a']:.2f} b={v['b']:.2f}: params {_h(v['params'])}, tokens {_h(v['tokens'])}")
    _print(r, args.json, lines)


def run_kaplan(args) -> None:
    from lmforge.scaling.laws import kaplan_report

    r = kaplan_report(args.compute, args.params, args.tokens)
    e = r["efficient"]
    lines = [f"compute {r['compute']:.3e} FLOPs ({r['compute_pf_days']:.3g} PF-days): L(C_min) = {r['loss_C']:.4f}",
             f"compute-efficient (N ∝ C^0.73): params {_h(e['params'])} (non-embedding), tokens {_h(e['tokens'])}, "
             f"batch {_h(e['batch_tokens'])} tokens, steps {_h(e['steps'])}"]
    for k, label in (("loss_N", "L(N)"), ("loss_D", "L(D)"), ("loss_ND", "L(N, D)")):
        if k in r:
            lines.append(f"{label} = {r[k]:.4f}")
    lines.append(f"critical batch size: {_h(r['critical_batch_tokens'])} tokens")
    _print(r, args.json, lines)


def run_fit(args) -> None:
    from lmforge.scaling.fit import fit_law, read_run

    runs = [read_run(p) for p in args.runs]
    law, obj = fit_law(runs, args.delta)
    r = {"law": law.to_dict(), "objective": obj,
         "runs": [{"name": x.name, "params": x.params, "tokens": x.tokens, "loss": x.loss,
                   "fit_loss": law.loss(x.params, x.tokens)} for x in runs]}
    lines = [f"{x.name}: N={x.params:,.0f} D={x.tokens:,.0f} loss {x.loss:.4f} fit {law.loss(x.params, x.tokens):.4f}"
             for x in runs]
    lines.append(f"fit: E={law.E:.4f} A={law.A:.4g} B={law.B:.4g} alpha={law.alpha:.4f} beta={law.beta:.4f}")
    _print(r, args.json, lines)


def _pairs(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in x.lower().split("x")) for x in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise LMForgeError(f"--sizes {text!r}: expected LAYERSxWIDTH,... e.g. 1x32,2x48") from None


def run_sweep(args) -> None:
    from lmforge.scaling.sweep import SweepConfig, sweep

    try:
        iters = [int(x) for x in args.iters.split(",")]
    except ValueError:
        raise LMForgeError(f"--iters {args.iters!r}: expected a comma-separated list of integers") from None
    cfg = SweepConfig(out=args.out, sizes=_pairs(args.sizes), iters=iters, batch_size=args.batch_size,
                      block_size=args.block_size, eval_iters=args.eval_iters, device=args.device,
                      overwrite=args.overwrite)
    r = sweep(cfg)
    h, law = r["held_out"], r["law"]
    lines = [f"{x['name']}: N={x['params']:,.0f} D={x['tokens']:,.0f} C={x['compute']:.3e} loss {x['loss']:.4f}"
             for x in r["runs"]]
    lines += [f"fit on {len(r['runs']) - 1} runs: E={law['E']:.4f} A={law['A']:.4g} B={law['B']:.4g} "
              f"alpha={law['alpha']:.4f} beta={law['beta']:.4f}; compute spans {r['compute_decades']:.2f} decades",
              f"plot: {r['plot']}",
              f"held-out {h['name']}: measured {h['measured']:.4f} predicted {h['predicted']:.4f} "
              f"error {100 * h['rel_error']:.2f}%"]
    _print(r, args.json, lines)


def load_config(spec: str):
    from lmforge.config import ModelConfig
    from lmforge.presets import get_preset

    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file() and p.suffix == ".gguf":  # (it was read as JSON: "'utf-8' codec can't decode byte 0xc3")
        from lmforge.interop.gguf import config_from_gguf
        from lmforge.interop.gguf_file import read_tensors

        meta, tensors = read_tensors(p)
        return config_from_gguf(meta, {t.name for t in tensors}, str(p))
    if p.is_file():
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LMForgeError(f"{p}: cannot read a model config: {e}") from None
        if isinstance(d, dict) and "model_type" in d:  # a Hugging Face config.json
            from lmforge.interop.hf import config_from_hf

            return config_from_hf(d, str(p))[0]
        if not (isinstance(d, dict) and "n_layer" in d and "n_embd" in d):  # ({} was the defaults' 134M model)
            raise LMForgeError(f"{p}: not a model config (an lmforge config.json with n_layer and n_embd, or a "
                               "Hugging Face one with model_type)")
        try:
            return ModelConfig.from_dict(d, source=str(p))
        except (ValueError, TypeError) as e:
            raise LMForgeError(f"{p}: not an lmforge config.json: {e}") from None
    return get_preset(spec)


def run_memory(args) -> None:
    from lmforge.scaling.memory import Parallel, analytic_params, flops_per_token, memory_estimate

    if args.seq_len is not None and args.seq_len < 1:
        raise LMForgeError(f"--seq-len {args.seq_len}: must be >= 1 (leave it out for the model's context)")
    if args.fsdp and args.zero not in (0, 3):
        raise LMForgeError(f"--fsdp is full sharding (--zero 3); it cannot be combined with --zero {args.zero}")
    cfg = load_config(args.model)
    seq = args.seq_len or cfg.block_size
    par = Parallel(dp=args.dp, tp=args.tp, pp=args.pp, zero=3 if args.fsdp else args.zero, recompute=args.recompute)
    m = memory_estimate(cfg, args.batch, seq, args.precision, par)
    f = flops_per_token(cfg, seq)
    r = {"model": cfg.name, "params": analytic_params(cfg), "flops_per_token": f, "memory": m}
    g = m["gb"]
    lines = [f"{cfg.name}: {m['params']:,} parameters ({_h(m['params'])}); training {f['train']:.4g} FLOPs/token "
             f"(6N = {6 * f['non_embedding_params']:.4g}), seq {seq}",
             f"per device ({args.precision}, dp={par.dp} tp={par.tp} pp={par.pp} zero={par.zero}, "
             f"batch {args.batch}, recompute {par.recompute}):",
             f"  weights {g['weights']:.2f} GiB, gradients {g['gradients']:.2f} GiB, optimizer {g['optimizer']:.2f} "
             f"GiB, activations {g['activations']:.2f} GiB, total {g['total']:.2f} GiB"]
    if seq > cfg.block_size:  # (a length the model cannot run as it is: said beside the estimate)
        learned = cfg.position == "learned" or cfg.position == "glm2d" and cfg.glm2d == "learned"
        r["note"] = (f"--seq-len {seq:,} is beyond the model's context ({cfg.block_size:,}): the estimate is for the "
                     "model trained at that length" + (" (its learned position table would grow)" if learned else ""))
        print(f"note: {r['note']}", file=sys.stderr)
    _print(r, args.json, lines)
