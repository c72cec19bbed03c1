"""Seconds per PPO iteration (rollout + update) of lmforge's PPO against TRL's PPO trainer on the same policy,
reward model, prompts and batch, and where the time goes: generation (sampling), scoring (the reward model), the
old-policy pass (log-probs, values, reference, GAE) and the minibatch updates.

    python benchmarks/bench_ppo.py                        # lmforge vs TRL (when /work/trlpeer exists), 3 iterations
    python benchmarks/bench_ppo.py --iters 2              # a quick check that everything runs
    python benchmarks/bench_ppo.py --reward rule          # lmforge only, the rule-based story reward
    python benchmarks/bench_ppo.py [--rollout-batch 16 --minibatch 8 --epochs 2 --max-new-tokens 48
                                    --temperature 1.0 --threads 2 --model PATH --peer-python PY]

Policy: the bundled stories260K (or --model; it must export to a transformers Llama for the comparison), full actor
+ separate critic, the left-padded chat prompts of lmforge.data.stories.heldout_prompts.

``--reward model`` (default): the reward model is the policy with a fresh scalar head (ScalarHeadModel, seeded),
saved as an lmforge reward-model directory and loaded back and scored as ``lmforge ppo --reward-model DIR`` does
(``load_scalar_model``, ``_model_scorer``, the critic a copy of the reward model as ``ppo.critic_init auto``). Policy
and reward model are exported to transformers (LlamaForCausalLM; LlamaForSequenceClassification with num_labels=1:
the decoder's weights, ``score.weight`` = the head's weight x its normalisation gain; lmforge's head also has a bias
and a normalisation bias, both 0 for a fresh head, which a constant shift of every score would need: printed if
not 0). Then benchmarks/trl_ppo_peer.py runs TRL's PPOTrainer in the peer venv on the same token ids, batch,
minibatch, epochs, new tokens, temperature, learning rate and threads (its docstring holds the venv's install
command, how the settings map onto TRL's and the differences between the two PPO steps). Without the venv a one-line
note is printed and lmforge's figures still are.

``--reward rule``: lmforge only, the rule-based ``lmforge.data.stories:story_reward`` (no peer).

The first iteration of each is reported apart (warm-up: TRL's first ``generate`` can take seconds more); the
s/iteration figures and the ratio TRL / lmforge are the mean of iterations 2..N (the first alone with --iters 1).
Both sides use --threads intra-op threads (default 2, the cores here); on a machine shared with another job, two
threads swing by up to 10x between runs (oversubscription), --threads 1 is steadier.

Settings against `lmforge ppo`'s defaults (PPOOptions, run_ppo): rollout batch 16, minibatch 8, 2 epochs, 48 new
tokens, temperature 1.0, the stop ids of the chat template, the command's learning rate rule, no weight decay, Adam
betas (0.9, 0.95), gradient clipping 1.0 are the command's. Different: with the reward model the early stop on
approx-KL is off (``ppo.early_stop_kl 0``: TRL has none, so both run every minibatch of every epoch; the rule mode
keeps the command's 0.1); the loop is the bench's own, not the Trainer's, so the command's per-rollout checkpoint,
metrics.jsonl and log lines are not in the time (the Trainer's step_s leaves checkpoints out too); TRL gets one
stop id (the tokenizer's EOS) where lmforge stops at BOS or EOS (the stories chat template); TRL's padding id is a
token found in no prompt (TRL finds padding by comparing ids).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lmforge.data.sft import default_template
from lmforge.data.stories import heldout_prompts, story_reward
from lmforge.infer.chat import encode_chat, end_of_turn
from lmforge.loading import load_model_and_tokenizer
from lmforge.model.heads import ScalarHeadModel, load_scalar_model, save_scalar_model
from lmforge.quant import weight_count
from lmforge.rl import rollout as R
from lmforge.stages import ppo as P
from lmforge.stages.sft import POLICY_LR_SCALE, suggested_lr
from lmforge.train.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = "/work/trlpeer/bin/python"
PARTS = ("generation", "scoring", "old_policy_pass", "updates", "other")


# ---- exports -----------------------------------------------------------------------------------------------------


def export_policy(model, out: Path) -> Path:
    from lmforge.checkpoint import model_state_dict
    from lmforge.interop.hf import write_hf_dir

    write_hf_dir(out, model.cfg, model_state_dict(model))
    return out


def export_reward(rm: ScalarHeadModel, out: Path) -> Path:
    """A LlamaForSequenceClassification directory (num_labels 1) scoring like ``rm.score``: the decoder's weights
    and ``score.weight`` = head weight x normalisation gain (HF's score layer has no bias)."""
    from safetensors.torch import load_file, save_file

    from lmforge.checkpoint import model_state_dict
    from lmforge.interop.hf import write_hf_dir

    write_hf_dir(out, rm.cfg, model_state_dict(rm.decoder))
    f = out / "model.safetensors"
    sd = load_file(str(f))
    sd.pop("lm_head.weight", None)
    sd["score.weight"] = (rm.head.weight.detach().float() * rm.norm_gain.item()).contiguous()
    shift = rm.head.bias.item() * rm.norm_gain.item() + rm.norm_bias.item()
    if shift != 0:
        print(f"note: the reward head's bias terms add {shift:.4g} to every lmforge score; the exported score has no "
              "bias (a constant shift of the reward)")
    save_file(sd, str(f), metadata={"format": "pt"})
    c = json.loads((out / "config.json").read_text())
    c.update(architectures=["LlamaForSequenceClassification"], num_labels=1, id2label={"0": "LABEL_0"},
             label2id={"LABEL_0": 0}, tie_word_embeddings=False)
    (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    return out


# ---- lmforge --------------------------------------------------------------------------------------------------


def run_lmforge(actor, tok, prompts, texts, opts: P.PPOOptions, iters: int, scorer, critic, lr: float) -> list[dict]:
    """PPO iterations as `lmforge ppo` runs them (PPOSource + make_loss_fn + the optimizer step), timed per
    iteration."""
    t = default_template(tok)
    _, stop = end_of_turn(t, tok)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
    ref = copy.deepcopy(actor).requires_grad_(False).eval()
    model = P.PPOModel(actor, critic)
    cur = {"generation": 0.0, "scoring": 0.0}
    sample = R.sample_rollout

    def timed_sample(*args, **kw):
        t0 = time.perf_counter()
        out = sample(*args, **kw)
        cur["generation"] += time.perf_counter() - t0
        return out

    def timed_scorer(r, ps, rs):
        t0 = time.perf_counter()
        out = scorer(r, ps, rs)
        cur["scoring"] += time.perf_counter() - t0
        return out

    P.sample_rollout = timed_sample
    try:
        src = P.PPOSource(model, prompts, texts, opts, iters, timed_scorer, tok.decode, list(stop), pad, 0, ref)
        loss_fn = P.make_loss_fn(src, opts)
        opt = make_optimizer(model, lr, 0.0, (0.9, 0.95), 1e-8, False, "cpu")
        its: list[dict] = []
        it = None
        while not src.exhausted():
            t0 = time.perf_counter()
            if src.at_boundary():  # a new rollout: the previous iteration is done
                if it is not None:
                    its.append(_close(it, t0))
                cur.update(generation=0.0, scoring=0.0)
                b = src.next_batch()
                it = {"start": t0, "rollout": time.perf_counter() - t0, "updates": 0.0, **cur}
            else:
                b = src.next_batch()
            t1 = time.perf_counter()
            loss, _, _ = loss_fn(model, b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            it["updates"] += time.perf_counter() - t1
        its.append(_close(it, time.perf_counter()))
    finally:
        P.sample_rollout = sample
    print(f"  (lmforge: {src.early_stops} early stops, last score {src.stats.get('score', float('nan')):.3f}, "
          f"mean response {src.stats.get('response_len', float('nan')):.1f} tokens)")
    return its


def _close(it: dict, end: float) -> dict:
    total = end - it["start"]
    return {"total": total, "generation": it["generation"], "scoring": it["scoring"],
            "old_policy_pass": it["rollout"] - it["generation"] - it["scoring"], "updates": it["updates"],
            "other": total - it["rollout"] - it["updates"]}


# ---- the peer -----------------------------------------------------------------------------------------------------


def run_trl(peer: str, policy_dir: Path, reward_dir: Path, prompts: list[list[int]], a, stop_id: int, pad_id: int,
            lr: float, work: Path) -> dict:
    f = work / "prompts.json"
    f.write_text(json.dumps(prompts))
    cmd = [peer, str(ROOT / "benchmarks" / "trl_ppo_peer.py"), "--policy", str(policy_dir), "--reward",
           str(reward_dir), "--prompts", str(f), "--rollout-batch", str(a.rollout_batch), "--minibatch",
           str(a.minibatch), "--epochs", str(a.epochs), "--response-length", str(a.max_new_tokens), "--temperature",
           str(a.temperature), "--stop-token-id", str(stop_id), "--pad-token-id", str(pad_id), "--iters",
           str(a.iters), "--threads", str(a.threads), "--lr", repr(lr)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ACCELERATE_MIXED_PRECISION")}
    env.update(OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- report -------------------------------------------------------------------------------------------------------


def summary(its: list[dict]) -> tuple[dict, dict]:
    """(mean of iterations 2..N, or the first alone; the first)."""
    rest = its[1:] or its[:1]
    mean = {k: sum(i[k] for i in rest) / len(rest) for k in ("total", *PARTS)}
    return mean, its[0]


def report(name: str, its: list[dict]) -> dict:
    mean, first = summary(its)
    steady = f"mean of iterations 2-{len(its)}" if len(its) > 1 else "1 iteration, warm-up included"
    print(f"{name}: {mean['total']:.3f} s/iteration ({steady}; first {first['total']:.3f} s)")
    for k in PARTS:
        print(f"  {k.replace('_', ' '):16s} {mean[k]:.3f} s/iteration ({100 * mean[k] / mean['total']:.0f} %)")
    return mean


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rollout-batch", type=int, default=16)
    ap.add_argument("--minibatch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--reward", choices=("model", "rule"), default="model",
                    help="model: a reward model, lmforge vs TRL; rule: lmforge only, the rule-based story reward")
    ap.add_argument("--peer-python", default=PEER_PYTHON, help="the interpreter of the TRL venv")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    actor, tok = load_model_and_tokenizer(a.model, None, "cpu")
    R.disable_dropout(actor)
    t = default_template(tok)
    _, stop = end_of_turn(t, tok)
    items = heldout_prompts(max(a.rollout_batch, 40))
    prompts = [encode_chat(tok, t, [{"role": "user", "content": x["instruction"]}]) for x in items]
    texts = [x["instruction"] for x in items]
    lr = suggested_lr(None, weight_count(actor)) * POLICY_LR_SCALE  # as `lmforge ppo` chooses it
    setting = (f"batch {a.rollout_batch}, {a.max_new_tokens} new tokens, {a.epochs} epochs of minibatches of "
               f"{a.minibatch}, temperature {a.temperature:g}, lr {lr:.3g}, {a.threads} threads")

    if a.reward == "rule":
        opts = P.PPOOptions(rollout_batch=a.rollout_batch, minibatch=a.minibatch, epochs=a.epochs,
                            max_new_tokens=a.max_new_tokens, temperature=a.temperature)
        critic = ScalarHeadModel(copy.deepcopy(actor)).requires_grad_(True)
        its = run_lmforge(actor, tok, prompts, texts, opts, a.iters, P._fn_scorer(story_reward), critic, lr)
        report(f"lmforge ppo, rule-based reward ({setting})", its)
        return

    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as d:
        work = Path(d)
        save_scalar_model(ScalarHeadModel(copy.deepcopy(actor)), work / "rm", tok)
        # as `lmforge ppo --reward-model DIR` loads, scores and starts the critic (ppo.critic_init auto -> reward)
        reward_model = R.disable_dropout(load_scalar_model(work / "rm")).requires_grad_(False)
        critic = R.disable_dropout(copy.deepcopy(reward_model).requires_grad_(True))
        peer_note = None
        if not Path(a.peer_python).exists():
            peer_note = (f"TRL peer skipped: no {a.peer_python} (the venv: see benchmarks/trl_ppo_peer.py's "
                         "docstring)")
        else:
            policy_dir = export_policy(actor, work / "hf-policy")
            reward_dir = export_reward(reward_model, work / "hf-reward")
        opts = P.PPOOptions(rollout_batch=a.rollout_batch, minibatch=a.minibatch, epochs=a.epochs,
                            max_new_tokens=a.max_new_tokens, temperature=a.temperature, early_stop_kl=0.0)
        its = run_lmforge(actor, tok, prompts, texts, opts, a.iters, P._model_scorer(reward_model), critic, lr)
        trl_out = None
        if peer_note is None:
            used = {x for p in prompts for x in p} | set(stop)
            pad_id = next(i for i in range(actor.cfg.vocab_size) if i not in used)
            stop_id = tok.eos_id if tok.eos_id in stop else stop[0]
            try:
                trl_out = run_trl(a.peer_python, policy_dir, reward_dir, prompts, a, stop_id, pad_id, lr, work)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                peer_note = f"TRL peer failed: {e}"
    print(f"PPO iterations, reward model ({setting})")
    lm = report("lmforge ppo", its)
    if trl_out is None:
        print(peer_note)
        return
    tr = report(f"TRL {trl_out['trl']} PPOTrainer (transformers {trl_out['transformers']})", trl_out["iterations"])
    print(f"  (TRL generated {trl_out['gen_columns']} response columns per iteration)")
    rest_lm, rest_tr = lm["total"] - lm["generation"], tr["total"] - tr["generation"]
    print(f"TRL / lmforge: {tr['total'] / lm['total']:.2f}x per iteration "
          f"(generation {tr['generation'] / lm['generation']:.2f}x, everything else {rest_tr / rest_lm:.2f}x)")


if __name__ == "__main__":
    main()
