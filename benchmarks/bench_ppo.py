"""Seconds per PPO iteration (rollout + update) of lmforge's PPO and where the time goes: generation (KV-cache
sampling), scoring, the old-policy pass (log-probs, values, reference), and the minibatch updates.

    python benchmarks/bench_ppo.py [--iters 3] [--rollout-batch 16] [--max-new-tokens 48] [--model PATH]

Policy: the bundled stories260K (or --model), full actor + separate critic, reward: the rule-based story reward.
No TRL/OpenRLHF comparison yet (neither is installed here): this reports lmforge's seconds per iteration and its
generation / scoring / old-policy pass / update split.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lmforge.commands.common import load_model_and_tokenizer
from lmforge.data.sft import default_template
from lmforge.data.stories import heldout_prompts, story_reward
from lmforge.infer.chat import encode_chat, end_of_turn
from lmforge.model.heads import ScalarHeadModel
from lmforge.rl import rollout as R
from lmforge.stages import ppo as P
from lmforge.train.optim import make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rollout-batch", type=int, default=16)
    ap.add_argument("--minibatch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    actor, tok = load_model_and_tokenizer(a.model, None, "cpu")
    R.disable_dropout(actor)
    ref = copy.deepcopy(actor).requires_grad_(False)
    model = P.PPOModel(actor, ScalarHeadModel(copy.deepcopy(actor)))
    t = default_template(tok)
    _, stop = end_of_turn(t, tok)
    items = heldout_prompts(max(a.rollout_batch, 40))
    prompts = [encode_chat(tok, t, [{"role": "user", "content": x["instruction"]}]) for x in items]
    texts = [x["instruction"] for x in items]
    opts = P.PPOOptions(rollout_batch=a.rollout_batch, minibatch=a.minibatch, epochs=a.epochs,
                        max_new_tokens=a.max_new_tokens)
    times = {"generate": 0.0, "score": 0.0, "rollout_total": 0.0, "update": 0.0}
    sample = R.sample_rollout

    def timed_sample(*args, **kw):
        t0 = time.perf_counter()
        out = sample(*args, **kw)
        times["generate"] += time.perf_counter() - t0
        return out

    P.sample_rollout = timed_sample
    score_fn = P._fn_scorer(story_reward)

    def scorer(r, ps, rs):
        t0 = time.perf_counter()
        out = score_fn(r, ps, rs)
        times["score"] += time.perf_counter() - t0
        return out

    src = P.PPOSource(model, prompts, texts, opts, a.iters, scorer, tok.decode, list(stop), 0, 0, ref)
    loss_fn = P.make_loss_fn(src, opts)
    opt = make_optimizer(model, 1e-4, 0.0, (0.9, 0.95), 1e-8, False, "cpu")
    t_all = time.perf_counter()
    while not src.exhausted():
        t0 = time.perf_counter()
        fresh = src.at_boundary()
        b = src.next_batch()
        if fresh:
            times["rollout_total"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        loss, _, _ = loss_fn(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times["update"] += time.perf_counter() - t1
    total = time.perf_counter() - t_all
    old_pass = times["rollout_total"] - times["generate"] - times["score"]
    print(f"lmforge ppo: {total / a.iters:.3f} s/iteration over {a.iters} iterations "
          f"(batch {a.rollout_batch}, {a.max_new_tokens} new tokens, {a.epochs} epochs of {a.minibatch})")
    for k, v in (("generation", times["generate"]), ("scoring", times["score"]), ("old-policy pass", old_pass),
                 ("updates", times["update"])):
        print(f"  {k:16s} {v / a.iters:.3f} s/iteration ({100 * v / total:.0f} %)")


if __name__ == "__main__":
    main()
