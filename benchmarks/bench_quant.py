"""Weight-only quantization: file size, resident memory, decode tokens/s and perplexity, fp32 vs int8 vs int4,
with transformers' ``generate`` (KV cache, greedy, fp32) on the same weights measured in the same run.

    python benchmarks/bench_quant.py [--models stories260K smollm2] [--tokens 128] [--rounds 3]

Models: the bundled stories260K, and SmolLM2-135M-Instruct if its GGUF is present ($LMFORGE_SMOLLM2_GGUF or
~/.cache/lmforge/smollm2/*.gguf; scripts/fetch_smollm2.sh fetches it); its fp32 weights are the GGUF's Q4_1/Q8_0
tensors dequantized. Each measurement of memory and speed runs in a fresh child process (peak RSS minus RSS
before loading); decoding is single stream from a short prompt, ``lmforge.infer.generate.stream`` vs
``model.generate(do_sample=False, use_cache=True)``; children alternate within a round and the best round counts.
Perplexity: held-out TinyStories text (../shared/data/corpora/en/tinystories_sample.txt) for stories260K,
corpus.en for SmolLM2. With llama-cpp-python installed (``pip install llama-cpp-python``: built from the registry's
source package), SmolLM2's GGUF also runs in llama.cpp (greedy, the same prompt ids and thread count). "int4-g32
lean" is the int4 directory decoded without PyTorch (``benchmarks/lean_decode.py``: ``lmforge.infer.lean``, what
`lmforge generate` runs for it; a process that never imports torch, as llama.cpp's). "fp32" is what `lmforge
generate` runs for the float32 checkpoint: SmolLM2 (64 MiB of block weights or more) decodes speculatively, its int4
copy proposing and the model checking several tokens a pass (greedy: the same tokens; the draft is built once per
loaded model, 0.4 s, in the warm-up); "fp32 no draft" is `--draft none` (stories260K: the two are the same). "RSS MB" is
the peak resident memory a child adds by loading and decoding; "total MB" the child process's peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- child: load one variant, measure memory and decode speed -----------------------------------------------


def child(kind: str, path: str, prompt: list[int], n_tokens: int, compute: str | None) -> None:
    torch.manual_seed(0)
    if kind == "hf":
        import transformers as T
        from transformers.models.llama import modeling_llama  # noqa: F401 - imported before the baseline

        base = rss_mb()
        model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        x = torch.tensor([prompt])
        kw = dict(max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0)
        with torch.inference_mode():
            model.generate(x, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            t = time.perf_counter()
            out = model.generate(x, **kw)
            dt = time.perf_counter() - t
        n = out.shape[1] - len(prompt)
        peak = rss_mb("VmHWM")
    else:
        from lmforge.checkpoint import load_model
        from lmforge.infer.generate import stream
        from lmforge.infer.sampling import SamplingParams
        from lmforge.quant import set_compute

        base = rss_mb()
        model = load_model(path).requires_grad_(False)  # as `lmforge generate` loads it
        draft = None if compute == "no-draft" else "auto"  # (`lmforge generate --draft none`)
        if compute and compute != "no-draft":
            set_compute(model, compute)
        params = SamplingParams(temperature=0, max_new_tokens=n_tokens)
        # warm-up: kernel layouts, and the int4 draft of a float32 model (once per loaded model)
        list(stream(model, prompt, SamplingParams(temperature=0, max_new_tokens=4), draft=draft))
        t = time.perf_counter()
        n = sum(1 for _ in stream(model, prompt, params, draft=draft))
        dt = time.perf_counter() - t
        peak = rss_mb("VmHWM")
    print(json.dumps({"rss_mb": peak - base, "total_mb": peak, "tok_s": n / dt, "n": n}))


def _status(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def run_child(kind: str, path: Path, prompt: list[int], n_tokens: int, compute: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(path), json.dumps(prompt), str(n_tokens), compute or ""]
    if kind == "llamacpp":  # its own script: a process without torch, so its memory is llama.cpp's own
        cmd = [sys.executable, str(ROOT / "benchmarks" / "llamacpp_peer.py"), str(path), json.dumps(prompt),
               str(n_tokens), compute or "2"]
    if kind == "lean":  # lmforge's runtime without torch (`lmforge generate`'s default for an int4 directory)
        cmd = [sys.executable, str(ROOT / "benchmarks" / "lean_decode.py"), str(path), json.dumps(prompt),
               str(n_tokens)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"child {kind} {path} failed:\n{r.stderr[-3000:]}\n{_status(r.returncode)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- parent ------------------------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model, seqs: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for s in seqs:
        x = torch.tensor([s])
        logits = model(x[:, :-1])
        nll += F.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum").item()
        n += len(s) - 1
    return math.exp(nll / n)


def load_source(name: str):
    """(fp32 model, tokenizer, held-out sequences, prompt ids)."""
    from lmforge.assets import STORIES260K, STORIES260K_TOKENIZER
    from lmforge.checkpoint import load_model

    if name == "stories260K":
        from lmforge.tokenizer import load_tokenizer

        model, tok = load_model(STORIES260K), load_tokenizer(str(STORIES260K_TOKENIZER))
        text = (SHARED / "corpora/en/tinystories_sample.txt").read_text(encoding="utf-8")
        seqs = [[tok.bos_id] + tok.encode(s.strip())[:511] for s in text.split("<|endoftext|>") if s.strip()]
        return model, tok, seqs, [tok.bos_id] + tok.encode("Once upon a time")
    from lmforge.interop.gguf import load_gguf_model, load_gguf_tokenizer

    path = smollm2_path()
    model, tok = load_gguf_model(path), load_gguf_tokenizer(path)
    ids = tok.encode((SHARED / "corpora/en/corpus.en").read_text(encoding="utf-8")[:24000])
    seqs = [ids[i : i + 512] for i in range(0, len(ids) - 511, 512)][:8]
    prompt = tok.encode("<|im_start|>user\nTell me a story about a dragon.<|im_end|>\n<|im_start|>assistant\n")
    return model, tok, seqs, prompt


def smollm2_path() -> Path | None:
    env = os.environ.get("LMFORGE_SMOLLM2_GGUF")
    if env:
        return Path(env) if Path(env).is_file() else None
    found = sorted((Path.home() / ".cache" / "lmforge" / "smollm2").glob("*.gguf"))
    return found[0] if found else None


def bench_model(name: str, n_tokens: int, rounds: int, tmp: Path) -> None:
    from lmforge.checkpoint import load_model, save_checkpoint
    from lmforge.interop.hf import write_hf_dir
    from lmforge.quant import QuantConfig, quantize_model, save_quantized, self_calibration, set_compute

    model, tok, seqs, prompt = load_source(name)
    cfg = model.cfg
    n_tokens = min(n_tokens, cfg.block_size - len(prompt) - 1)
    print(f"\n== {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{sum(len(s) for s in seqs)} held-out tokens, decode {n_tokens} tokens after a {len(prompt)}-token prompt")
    dirs: dict[str, Path] = {"fp32": tmp / f"{name}-fp32"}
    save_checkpoint(model, dirs["fp32"], tok)
    write_hf_dir(tmp / f"{name}-hf", cfg, {k: v for k, v in model.state_dict().items()})
    # int4: what `lmforge quantize --bits 4 --group-size 32` does. stories260K: symmetric GPTQ calibrated on 128 x 512
    # tokens the model samples itself (disjoint from the held-out text). SmolLM2: its block weights are Q4_1 in the
    # GGUF (asymmetric 4-bit, groups of 32), which asymmetric round to nearest keeps exactly (the command's choice
    # for such files). Both: the embedding table (and the tied output projection) as int8 per row.
    stories = name == "stories260K"
    variants = {"int8": QuantConfig(8), "int4-g32": QuantConfig(4, 32, stories, method="gptq" if stories else "rtn")}
    ppl = {"fp32": perplexity(model, seqs)}
    for v, q in variants.items():
        m = load_model(dirs["fp32"])
        t = time.perf_counter()
        calib = self_calibration(m, 128, 512, start_id=tok.bos_id) if q.method == "gptq" else None
        quantize_model(m, q, calib)
        qt = time.perf_counter() - t
        dirs[v] = tmp / f"{name}-{v}"
        save_quantized(m, dirs[v], tok)
        ppl[v] = perplexity(m, seqs)
        set_compute(m, "bfloat16")
        ppl[v + " bf16-act"] = perplexity(m, seqs)
        print(f"  quantized {v} ({q.method}, {'symmetric' if q.symmetric else 'asymmetric'}) in {qt:.1f} s")
    size = {v: (d / "model.safetensors").stat().st_size for v, d in dirs.items()}
    size["transformers"] = (tmp / f"{name}-hf" / "model.safetensors").stat().st_size
    runs = [("fp32", "lm", dirs["fp32"], None), ("fp32 no draft", "lm", dirs["fp32"], "no-draft"),
            ("int8", "lm", dirs["int8"], "auto"),
            ("int8 bf16-act", "lm", dirs["int8"], "bfloat16"), ("int4-g32", "lm", dirs["int4-g32"], "auto"),
            ("int4-g32 bf16-act", "lm", dirs["int4-g32"], "bfloat16"), ("transformers fp32", "hf", tmp / f"{name}-hf",
                                                                        None)]
    from lmforge.infer import lean

    why = lean.unsupported(dirs["int4-g32"])
    if why is None:
        runs.insert(4, ("int4-g32 lean", "lean", dirs["int4-g32"], None))
    else:
        print(f"  int4 without PyTorch (lmforge.infer.lean): skipped ({why})")
    if name == "smollm2":
        try:
            import llama_cpp  # noqa: F401
            runs.append(("llama.cpp Q4_1", "llamacpp", smollm2_path(), str(torch.get_num_threads())))
        except ImportError:
            print("  llama.cpp: skipped (pip install llama-cpp-python builds it from the registry's source package)")
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for label, kind, path, compute in list(runs):
            try:
                r = run_child(kind, path, prompt, n_tokens, compute)
            except RuntimeError as e:  # the peer's own build failing here is reported, not a reason to stop
                if kind != "llamacpp":
                    raise
                print(f"  llama.cpp: left out, its process failed ({str(e).strip().splitlines()[-1][:200]})")
                runs.remove((label, kind, path, compute))
                continue
            if label not in best or r["tok_s"] > best[label]["tok_s"]:
                best[label] = r
    ref = best["transformers fp32"]["tok_s"]
    if "llama.cpp Q4_1" in best:
        size["llama.cpp"] = smollm2_path().stat().st_size
    print(f"  {'variant':<20}{'file MB':>9}{'RSS MB':>9}{'total MB':>9}{'tok/s':>9}{'vs HF':>8}{'vs fp32':>9}"
          f"{'ppl':>9}{'Δppl':>8}")
    for label, _, _, _ in runs:
        v = label.split()[0] if label != "transformers fp32" else "transformers"
        r = best[label]
        p = ppl.get(label, ppl.get(v, ppl["fp32"]))  # the lean runtime: its directory's (PyTorch's forward)
        q = f"{p:>9.4f}{100 * (p / ppl['fp32'] - 1):>+7.2f}%" if v != "llama.cpp" else f"{'-':>9}{'-':>8}"
        print(f"  {label:<20}{size[v] / 1e6:>9.2f}{r['rss_mb']:>9.1f}{r['total_mb']:>9.1f}{r['tok_s']:>9.1f}"
              f"{r['tok_s'] / ref:>8.2f}{r['tok_s'] / best['fp32']['tok_s']:>9.2f}{q}")
    if "llama.cpp Q4_1" in best:
        lc = best["llama.cpp Q4_1"]
        for v in ("int4-g32", "int4-g32 lean"):
            if v in best:
                print(f"  {v} vs llama.cpp (the same Q4_1 weights): {best[v]['tok_s'] / lc['tok_s']:.2f}x tokens/s, "
                      f"{best[v]['total_mb']:.0f} vs {lc['total_mb']:.0f} MB peak resident (process)")
    print(f"  file size fp32/int8 = {size['fp32'] / size['int8']:.2f}x, fp32/int4 = "
          f"{size['fp32'] / size['int4-g32']:.2f}x; RSS fp32/int8 = "
          f"{best['fp32']['rss_mb'] / best['int8']['rss_mb']:.2f}x, fp32/int4 = "
          f"{best['fp32']['rss_mb'] / best['int4-g32']['rss_mb']:.2f}x")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, path, prompt, n, compute = sys.argv[2:7]
        child(kind, path, json.loads(prompt), int(n), compute or None)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["stories260K", "smollm2"])
    ap.add_argument("--tokens", type=int, default=128, help="tokens to decode per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            if name == "smollm2" and smollm2_path() is None:
                print("\n== smollm2: skipped (no GGUF; run scripts/fetch_smollm2.sh)")
                continue
            bench_model(name, args.tokens, args.rounds, Path(d))


if __name__ == "__main__":
    main()
