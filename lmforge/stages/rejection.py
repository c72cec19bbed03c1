"""Rejection sampling (best-of-K, ``lmforge rejection-sample``): K samples per prompt from a policy with the batched
KV-cache generator, scored by a reward model; the best one per prompt is written as SFT data (OpenAI ``messages``
JSONL, which ``lmforge sft`` reads), with its reward and the K scores beside it."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from lmforge.data.preference import PreferenceRecord, read_prompts
from lmforge.errors import LMForgeError
from lmforge.files import write_text_atomic
from lmforge.infer.chat import apply_template, encode_text_with_specials, end_of_turn
from lmforge.infer.generate import generate_batch
from lmforge.infer.sampling import SamplingParams
from lmforge.loading import load_model_and_tokenizer
from lmforge.stages.reward import (
    encode_group,
    load_reward_model,
    pad_id_of,
    pick_template,
    score_groups,
    scoring_len,
)


def encode_prompt(tok, template, messages: list[dict[str, str]], text: str | None) -> tuple[list[int], list[int]]:
    """(prompt ids, stop ids) for generation: the chat template's generation prompt, or the plain text after BOS."""
    if template is None:
        if text is None:
            text = "\n".join(m["content"] for m in messages)
        ids = tok.encode(text)
        if tok.bos_id is not None and getattr(tok, "add_bos", True) and (not ids or ids[0] != tok.bos_id):
            ids = [tok.bos_id, *ids]
        return ids, [tok.eos_id] if tok.eos_id is not None else []
    prompt = apply_template(template, messages, add_generation_prompt=True, tokenizer=tok)
    _, stop = end_of_turn(template, tok)
    return encode_text_with_specials(tok, prompt), stop


def decode_response(tok, prompt_ids: list[int], new_ids: list[int], plain: bool) -> str:
    """The generated text; for plain text, the continuation as it reads after the prompt (leading space kept)."""
    if not plain:
        return tok.decode(new_ids).strip()
    whole, head = tok.decode(prompt_ids + new_ids), tok.decode(prompt_ids)
    return whole[len(head):] if whole.startswith(head) else tok.decode(new_ids)


def run_rejection(model: str, reward: str, prompts: str, out: str, k: int = 8, temperature: float = 1.0,
                  top_p: float = 1.0, max_new_tokens: int = 128, batch_size: int = 16, seed: int = 0,
                  device: str = "auto", tokenizer: str | None = None, log=None) -> dict[str, Any]:
    """Best-of-``k`` per prompt by the reward model, written to ``out`` as OpenAI-messages JSONL."""
    log = log or (lambda m: print(m, file=sys.stderr))
    if k < 1:
        raise LMForgeError(f"--k {k}: must be >= 1")
    policy, tok = load_model_and_tokenizer(model, tokenizer, device)
    policy.eval().requires_grad_(False)  # inference only
    template = pick_template(tok, "")
    rm, rtok, rtemplate = load_reward_model(reward, device)
    rm_len = scoring_len(reward, rm)  # as the reward model was trained
    items = read_prompts(prompts)
    ctx = policy.cfg.block_size - policy.num_virtual_tokens
    encoded_all = [encode_prompt(tok, template, msgs, text) for msgs, text in items]
    fits = [i for i, (ids, _) in enumerate(encoded_all) if len(ids) < ctx]
    if len(fits) < len(items):  # no room to answer: left out, not written as a blank reply
        first = next(i for i, (ids, _) in enumerate(encoded_all) if len(ids) >= ctx)
        log(f"rejection-sample: {len(items) - len(fits)} of {len(items)} prompts leave no room in the policy's "
            f"context of {ctx} tokens and are left out (the first: prompt {first + 1}, "
            f"{len(encoded_all[first][0])} tokens)")
        if not fits:
            raise LMForgeError(f"--prompts {prompts}: no prompt fits the policy's context of {ctx} tokens")
    items, encoded_all = [items[i] for i in fits], [encoded_all[i] for i in fits]
    torch.manual_seed(seed)
    per = max(1, batch_size // k)
    best_scores, mean_scores = [], []
    lines = []
    blank = 0
    for s in range(0, len(items), per):
        chunk = items[s : s + per]
        encoded = encoded_all[s : s + per]
        rows = [ids for ids, _ in encoded for _ in range(k)]
        params = [SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                 stop_ids=list(stop), seed=seed + s * k + j)
                  for j, (_, stop) in enumerate(e for e in encoded for _ in range(k))]
        with torch.no_grad():
            outs = generate_batch(policy, rows, params, tok)
        for c, ((msgs, text), (ids, _)) in enumerate(zip(chunk, encoded)):
            resp = [decode_response(tok, ids, outs[c * k + j], template is None) for j in range(k)]
            resp = [r if r.strip() else " " for r in resp]  # an empty sample scores as a blank reply
            rec = PreferenceRecord(msgs, resp, text)
            group = encode_group(rtok, rec, rtemplate, rm_len)
            scores = score_groups(rm, [group], pad_id_of(rtok), batch_size=1)[0]  # the prompt once for all k
            j = max(range(k), key=lambda i: scores[i])
            best_scores.append(scores[j])
            mean_scores.append(sum(scores) / k)
            if not resp[j].strip():  # a blank reply is no SFT example
                blank += 1
                continue
            lines.append(json.dumps({"messages": [*msgs, {"role": "assistant", "content": resp[j]}],
                                     "reward": scores[j], "rewards": scores}))
    if blank:
        log(f"rejection-sample: {blank} prompts whose best sample was empty are left out")
    if not lines:
        raise LMForgeError(f"rejection-sample: every best sample was empty; nothing written to {out}")
    write_text_atomic(out, "\n".join(lines) + "\n")
    n = len(best_scores)
    result = {"prompts": n, "k": k, "mean_best_reward": sum(best_scores) / n, "mean_reward": sum(mean_scores) / n}
    log(f"rejection-sample: {n} prompts x {k} samples; mean reward {result['mean_reward']:.4f}, best-of-{k} "
        f"{result['mean_best_reward']:.4f}; written to {out}")
    return result
