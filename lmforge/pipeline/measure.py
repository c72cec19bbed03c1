"""What the pipeline measures on a policy after each stage that changes it, on data no stage trains on:
perplexity of held-out text, responses to held-out instructions (the rate that follow them, the mean preference
score, a few samples shown in the report) and, for the alignment stages, the KL from the policy they started from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lmforge.data.preference import PreferenceRecord, read_prompts
from lmforge.data.sft import default_template
from lmforge.data.stories import sample_responses
from lmforge.errors import LMForgeError
from lmforge.eval import run_task
from lmforge.infer.chat import encode_chat, end_of_turn
from lmforge.loading import load_model_and_tokenizer
from lmforge.pipeline.spec import MeasureConfig, resolve_value
from lmforge.rl.rollout import policy_logprobs, sample_rollout
from lmforge.stages.ppo import load_reward_fn
from lmforge.stages.reward import encode_group, load_reward_model, pad_id_of, score_groups, scoring_len


def check_measure(cfg: MeasureConfig) -> None:
    """Refuse unusable ``measure`` settings before any stage runs (they were used only after the first stage that
    made a policy, or never, when every stage was cached)."""
    for key in ("prompts", "text"):
        v = getattr(cfg, key)
        if v:
            path = Path(str(resolve_value(v, {}, None)))  # (an unknown builtin: one line naming it)
            if not path.exists():
                raise LMForgeError(f"measure.{key} {v}: no such file or directory")
    if cfg.prompts and not held_out_prompts(cfg):
        raise LMForgeError(f"measure.prompts {cfg.prompts}: no prompts in it")
    for key in ("follow", "preference"):
        v = getattr(cfg, key)
        if v:
            try:
                load_reward_fn(v)
            except LMForgeError as e:
                raise LMForgeError(f"measure.{key}: {str(e).removeprefix('--reward ')}") from None
    for name, v in (("samples", cfg.samples), ("max_new_tokens", cfg.max_new_tokens)):
        if not isinstance(v, int) or v < (0 if name == "samples" else 1):
            raise LMForgeError(f"measure.{name} {v!r}: must be an integer >= {0 if name == 'samples' else 1}")


def held_out_prompts(cfg: MeasureConfig) -> list[str]:
    if not cfg.prompts:
        return []
    return [p.user_text for p in read_prompts(str(resolve_value(cfg.prompts, {}, None)))]


def measure_policy(model_path: str | Path, cfg: MeasureConfig, device: str = "auto",
                   reward_model: str | Path | None = None) -> dict[str, Any]:
    """``{ppl, bits_per_byte, follow_rate, preference, rm_score, samples: [{prompt, response}]}`` of one model (the
    keys whose data is configured; ``rm_score``, the mean normalised score of a reward model, with one)."""
    model, tok = load_model_and_tokenizer(str(model_path), None, device)
    model.eval().requires_grad_(False)  # inference only
    out: dict[str, Any] = {}
    if cfg.text:
        spec = {"task": "perplexity", "data": str(resolve_value(cfg.text, {}, None))}
        if cfg.context:
            spec["context"] = int(cfg.context)
        m = run_task(model, tok, spec)
        out["ppl"] = m.get("ppl")
        out["bits_per_byte"] = m.get("bits_per_byte")
    for spec in cfg.tasks or []:
        spec = {k: resolve_value(v, {}, None) for k, v in spec.items()}
        for k, v in run_task(model, tok, spec).items():
            if k != "n":
                out[f"{spec['task']}_{k}"] = v
    prompts = held_out_prompts(cfg)
    if prompts:
        with torch.inference_mode():
            responses = sample_responses(model, tok, prompts, max_new_tokens=cfg.max_new_tokens)
        if cfg.follow:
            follows = load_reward_fn(cfg.follow)
            out["follow_rate"] = sum(bool(follows(p, r)) for p, r in zip(prompts, responses)) / len(prompts)
        if cfg.preference:
            scores = load_reward_fn(cfg.preference)(prompts, responses)
            out["preference"] = sum(scores) / len(scores)
        if reward_model:
            scores = rm_scores(reward_model, prompts, responses, device)
            out["rm_score"] = sum(scores) / len(scores)
        out["samples"] = [{"prompt": p, "response": r} for p, r in zip(prompts[: cfg.samples],
                                                                       responses[: cfg.samples])]
    return out


@torch.inference_mode()
def kl_from(policy_path: str | Path, reference_path: str | Path, cfg: MeasureConfig, device: str = "auto",
            seed: int = 0) -> float:
    """KL(policy || reference) per response on the held-out prompts, in nats: responses sampled from the policy
    (temperature 1), the mean over them of sum_t log p_policy - log p_reference (the k1 estimator, unbiased)."""
    prompts = held_out_prompts(cfg)
    if not prompts:
        return math.nan
    policy, tok = load_model_and_tokenizer(str(policy_path), None, device)
    ref, ref_tok = load_model_and_tokenizer(str(reference_path), None, device)
    if ref.cfg.vocab_size != policy.cfg.vocab_size:
        raise LMForgeError(f"{reference_path}: not the vocabulary of {policy_path}; no KL between them")
    policy.eval()
    ref.eval()
    template = default_template(tok)
    _, stop_ids = end_of_turn(template, tok)
    ids = [encode_chat(tok, template, [{"role": "user", "content": p}]) for p in prompts]
    pad = tok.pad_id if getattr(tok, "pad_id", None) is not None else 0
    rollout = sample_rollout(policy, ids, cfg.max_new_tokens, 1.0, stop_ids, seed=seed, pad_id=pad)
    lp = policy_logprobs(policy, rollout)
    lr = policy_logprobs(ref, rollout)
    return float((lp - lr).sum(-1).mean())


@torch.inference_mode()
def rm_scores(reward_dir: str | Path, prompts: list[str], responses: list[str], device: str = "auto") -> list[float]:
    """A reward model's normalised score of each (prompt, response)."""
    model, tok, template = load_reward_model(reward_dir, device)
    ml = scoring_len(reward_dir, model)  # as it was trained (a length of 0 here cut the prompt away)
    groups = [encode_group(tok, PreferenceRecord([{"role": "user", "content": p}], [r]), template, ml)
              for p, r in zip(prompts, responses)]
    return [g[0] for g in score_groups(model, groups, pad_id_of(tok))]
