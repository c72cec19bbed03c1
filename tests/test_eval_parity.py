"""Parity: lmforge eval's per-question choices on MMLU (the shared dev files) and ARC equal those of an independent
log-likelihood computation with transformers (the lmforge model exported with lmforge's HF export, each
(context, continuation) pair scored in its own forward, tokenized and truncated as lm-evaluation-harness does)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import model_state_dict
from lmforge.eval import EvalConfig, evaluate
from lmforge.interop.hf import write_hf_dir
from lmforge.model import Decoder
from lmforge.presets import get_preset

T = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "eval"


def shared(sub: str) -> Path:
    p = SHARED / sub
    if not p.exists():
        pytest.skip(f"{p} absent (the shared eval data)")
    return p


def harness_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def hf_choices(hf, tok, records: list[dict], max_len: int) -> list[int]:
    """argmax over choices of sum log p(continuation | context), one forward per (context, continuation)."""
    out, memo = [], {}
    for rec in records:
        scores = []
        for c in rec["choices"]:
            ctx, cont = harness_pair(tok, rec["prompt"], " " + c)
            inp = tuple((ctx + cont)[-(max_len + 1):][:-1])
            if inp not in memo:  # one-token choices of a question share their input: run it once
                memo = {inp: torch.log_softmax(hf(torch.tensor([inp])).logits[0].double(), -1)}
            lp = memo[inp][-len(cont):]
            scores.append(float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
        out.append(max(range(len(scores)), key=lambda j: (scores[j], -j)))
    return out


def first_subjects(mmlu: Path, k: int, tmp_path: Path) -> Path:
    """A folder of the first ``k`` subjects of ``mmlu`` (``--limit`` counts per subject, as the harness does)."""
    d = tmp_path / "mmlu"
    d.mkdir()
    for f in sorted(mmlu.glob("*.csv"))[:k]:
        (d / f.name).symlink_to(f)
    return d


def check_parity(model, tok, tmp_path: Path, configs: list[EvalConfig]) -> None:
    write_hf_dir(tmp_path / "hf", model.cfg, model_state_dict(model))
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    for cfg in configs:
        res = evaluate(model, tok, cfg)
        ref = hf_choices(hf, tok, res.records, model.cfg.block_size)
        mine = [r["choice"] for r in res.records]
        agree = sum(a == b for a, b in zip(mine, ref)) / len(ref)
        acc_ref = sum(c == r["gold"] for c, r in zip(ref, res.records)) / len(ref)
        assert agree >= 0.99, f"{cfg.task}: {agree:.3f} of choices agree"
        assert abs(res.metrics["acc"] - acc_ref) <= 0.005, (cfg.task, res.metrics["acc"], acc_ref)


def test_tiny_random_llama_matches_transformers(stories, tmp_path):
    _, tok = stories  # its 512-token sentencepiece vocabulary
    torch.manual_seed(0)
    model = Decoder(get_preset("tiny-llama").replace(block_size=256, n_kv_head=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    mmlu, arc = first_subjects(shared("mmlu_dev"), 5, tmp_path), shared("arc") / "arc_challenge_dev.jsonl"
    check_parity(model, tok, tmp_path, [
        EvalConfig("mmlu", str(mmlu), fewshot_data=str(mmlu), shots=2, limit=5),  # 5 subjects, some truncated
        EvalConfig("arc", str(arc), limit=30),
    ])


def _smollm2_path() -> Path | None:
    env = os.environ.get("LMFORGE_SMOLLM2_GGUF")
    if env:
        return Path(env) if Path(env).is_file() else None
    found = sorted((Path.home() / ".cache" / "lmforge" / "smollm2").glob("*.gguf"))
    return found[0] if found else None


def test_smollm2_matches_transformers(tmp_path):
    path = _smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found ($LMFORGE_SMOLLM2_GGUF or ~/.cache/lmforge/smollm2/*.gguf)")
    from lmforge.interop.gguf import load_gguf_model, load_gguf_tokenizer

    model, tok = load_gguf_model(path), load_gguf_tokenizer(path)
    mmlu, arc = first_subjects(shared("mmlu_dev"), 2, tmp_path), shared("arc") / "arc_easy_dev.jsonl"
    check_parity(model, tok, tmp_path, [
        EvalConfig("mmlu", str(mmlu), fewshot_data=str(mmlu), shots=1, limit=3),
        EvalConfig("arc", str(arc), limit=5),
    ])
