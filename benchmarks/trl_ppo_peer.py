"""TRL's PPO trainer as a peer of `lmforge ppo` (benchmarks/bench_ppo.py runs it): seconds per PPO iteration
(rollout + update) and where the time goes, in another interpreter that has a TRL with ``PPOTrainer``. Imports
nothing from lmforge; prints one JSON line.

    /work/trlpeer/bin/python benchmarks/trl_ppo_peer.py --policy HF_DIR --reward HF_DIR --prompts ids.json \\
        [--rollout-batch 16 --minibatch 8 --epochs 2 --response-length 48 --temperature 1.0 --stop-token-id 2 \\
         --pad-token-id 0 --iters 3 --threads 2]

The peer's environment. 1.12.0 is the last TRL with the PPO trainer (the vwxyzjn "PPOv2" loop: ``trl.PPOTrainer``
from 0.12, moved to ``trl.experimental.ppo`` in 0.26, gone from 1.13 on); it runs on the system's transformers
5.24, accelerate and datasets (it needs transformers>=4.56.2, accelerate>=1.4, datasets>=4.7), so the venv sees the
system packages and shadows only trl; the constraint keeps pip from ever fetching another torch. Run with 1.12.0
(the ``trl.PPOTrainer`` fallback import for older releases is untried)::

    python -m venv --system-site-packages /work/trlpeer
    echo "torch==2.13.0" > /tmp/trlpeer-constraints.txt
    /work/trlpeer/bin/pip install -c /tmp/trlpeer-constraints.txt "trl==1.12.0"
    /work/trlpeer/bin/python -c "import torch, trl; print(torch.__version__, trl.__version__)"   # 2.13.0+cpu 1.12.0

Inputs: ``--policy`` a LlamaForCausalLM directory (policy, and a second load of it as the frozen reference),
``--reward`` a LlamaForSequenceClassification directory with num_labels=1 (the reward model, and a second load as
the value model: critic initialised from the reward model, as lmforge's ``ppo.critic_init auto`` does with
``--reward-model``), ``--prompts`` a JSON list of token-id lists (unpadded; left-padded here per batch with
``--pad-token-id``).

How the settings map onto TRL's PPOConfig (one optimizer step per minibatch, as lmforge does):

- rollout batch B -> per_device_train_batch_size = B, gradient_accumulation_steps = 1 (so TRL's local_batch_size,
  the prompts per iteration, is B; with gradient_accumulation_steps > 1 accelerate would also accumulate over the
  minibatches and step the optimizer less often);
- minibatch M -> num_mini_batches = B / M (each minibatch is one micro-batch of M: one forward/backward and one
  optimizer step);
- PPO epochs -> num_ppo_epochs; new tokens -> response_length; temperature -> temperature (TRL adds 1e-7);
  stop token -> stop_token_id (one id; lmforge's chat stop list may hold several, see below);
- local_rollout_forward_batch_size = B: the whole rollout is generated in one ``generate`` call, like lmforge's one
  batched generator call (lmforge runs its old-policy pass in minibatches of M, TRL in one batch of B);
- kl_coef -> kl_coef (TRL's is fixed; lmforge's adaptive controller only moves a number), kl_estimator k1,
  cliprange = cliprange_value = 0.2, vf_coef 0.1, gamma 1, lam 0.95 (lmforge's defaults, which are TRL's);
- learning rate --lr, constant, AdamW betas (0.9, 0.95), no weight decay (lmforge's PPO optimizer);
- total_episodes = iterations x B; num_sample_generations 0, no eval dataset, save_strategy no, report_to none,
  fp32 on the CPU (bf16 off, use_cpu), dropout off (TRL does it for all four models), tqdm off.

Timing: wall time between TRL's ``on_step_end`` callbacks (one per PPO iteration: rollout, update, TRL's own
logging/gc per iteration), the first iteration reported apart (warm-up). The split is taken by wrapping functions
of TRL's ppo_trainer module, leaving its code as is: ``batch_generation`` (generation, HF ``generate`` with
output_scores), ``get_reward`` when called with the reward model (scoring), the first gradient-enabled ``forward``
of an iteration (the start of the updates); the old-policy pass is the rest of the rollout (value and reference
forwards, GAE, whitening); ``other`` is the time from the end of the previous iteration to the start of
generation (TRL's per-iteration cleanup with ``gc.collect()``, which runs after ``on_step_end``, and the dataloader).

Differences from lmforge's PPO step (``lmforge/stages/ppo.py``) that move the time:

- TRL takes the old-policy log-probs from the generation scores (``output_scores=True``, logits of every step kept),
  lmforge recomputes them with one more forward of the policy over prompt + response; TRL's ``generate`` call has
  to keep (B, R, V) logits, lmforge's generator keeps only tokens.
- TRL has no early stop on approx-KL (bench_ppo.py turns lmforge's off for the comparison) and no adaptive KL.
- Response length: TRL sets its single stop_token_id as the policy's generation eos, so ``generate`` finishes a
  row at it and stops the batch when every row has (not a fixed response_length), then cuts after the first stop;
  lmforge's generator stops a row at its stop id only when there is one, and with several (the stories chat template
  stops at BOS or EOS) samples every row to max_new_tokens and cuts after the first of any of them. So a policy
  that ends its answers generates fewer columns in TRL than in lmforge here; ``gen_columns`` reports how many
  response columns TRL generated (the untrained stories260K rarely ends within 48 tokens: both run to the end).
- TRL puts the score one token past the stop token and trains the value one position further
  (``padding_mask_p1``); the reward model's head has no bias (lmforge's has one, 0 when fresh); TRL computes the
  entropy statistics without gradient, lmforge's forward returns it with gradient (ent_coef 0); TRL clips no
  gradient norm (lmforge clips to 1.0); TRL's value model is a LlamaForSequenceClassification (a full second
  backbone, like lmforge's separate critic).
- Prompts: both draw B prompts per iteration from the same pool of the same token ids, in different shuffles.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reward", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--rollout-batch", type=int, default=16)
    ap.add_argument("--minibatch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--response-length", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--stop-token-id", type=int, default=2)
    ap.add_argument("--pad-token-id", type=int, default=0)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)

    import torch

    torch.set_num_threads(a.threads)
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    try:  # TRL 0.26 - 1.12
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as ppo_mod
    except ImportError:  # TRL 0.12 - 0.25
        from trl import PPOConfig, PPOTrainer
        from trl.trainer import ppo_trainer as ppo_mod

    B, M = a.rollout_batch, a.minibatch
    if B % M:
        raise SystemExit(f"rollout batch {B} must be a multiple of the minibatch {M} (TRL's num_mini_batches)")
    prompts = json.loads(open(a.prompts).read())
    pad = a.pad_token_id
    if any(pad in p for p in prompts):
        raise SystemExit(f"--pad-token-id {pad} occurs in a prompt: TRL finds padding by comparing with it")

    torch.manual_seed(a.seed)
    kw = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(a.policy, **kw)
    ref = AutoModelForCausalLM.from_pretrained(a.policy, **kw)
    reward = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, **kw)
    value = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, **kw)
    V = policy.config.vocab_size
    # a tokenizer only for what TRL reads from it (pad/eos ids, padding side); the data are token ids already
    tk = Tokenizer(WordLevel({str(i): i for i in range(V)}, unk_token=str(pad)))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=str(pad), eos_token=str(a.stop_token_id),
                                               padding_side="left")
    for m in (policy, ref, reward, value):
        m.config.pad_token_id = pad
    policy.generation_config.pad_token_id = pad

    def collate(rows):
        n = max(len(r["input_ids"]) for r in rows)
        return {"input_ids": torch.tensor([[pad] * (n - len(r["input_ids"])) + list(r["input_ids"]) for r in rows])}

    cfg = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-peer-"), report_to="none", seed=a.seed,
        per_device_train_batch_size=B, gradient_accumulation_steps=1, num_mini_batches=B // M,
        num_ppo_epochs=a.epochs, local_rollout_forward_batch_size=B, response_length=a.response_length,
        temperature=a.temperature, stop_token_id=a.stop_token_id, kl_coef=a.kl_coef, kl_estimator="k1",
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False,
        missing_eos_penalty=None, total_episodes=a.iters * B, num_sample_generations=0, learning_rate=a.lr,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, lr_scheduler_type="constant", save_strategy="no",
        logging_steps=10**9, bf16=False, fp16=False, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)

    marks: dict[str, list[float]] = {"end": [], "gen_start": [], "gen": [], "score": [], "update_start": []}
    cur = {"gen_start": None, "gen": 0.0, "score": 0.0, "update_start": None, "gen_cols": 0}
    gen_cols: list[int] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks["end"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks["end"].append(time.perf_counter())
            marks["gen_start"].append(cur["gen_start"])
            marks["gen"].append(cur["gen"])
            marks["score"].append(cur["score"])
            marks["update_start"].append(cur["update_start"])
            gen_cols.append(cur["gen_cols"])
            cur.update(gen_start=None, gen=0.0, score=0.0, update_start=None)

    batch_generation, get_reward, forward = ppo_mod.batch_generation, ppo_mod.get_reward, ppo_mod.forward

    def timed_generation(*args, **kwargs):
        t = time.perf_counter()
        if cur["gen_start"] is None:
            cur["gen_start"] = t
        out = batch_generation(*args, **kwargs)
        cur["gen"] += time.perf_counter() - t
        cur["gen_cols"] = out[0].shape[1] - args[1].shape[1]
        return out

    def timed_reward(model, *args, **kwargs):
        t = time.perf_counter()
        out = get_reward(model, *args, **kwargs)
        if model is reward:
            cur["score"] += time.perf_counter() - t
        return out

    def timed_forward(*args, **kwargs):
        if torch.is_grad_enabled() and cur["update_start"] is None:
            cur["update_start"] = time.perf_counter()
        return forward(*args, **kwargs)

    ppo_mod.batch_generation, ppo_mod.get_reward, ppo_mod.forward = timed_generation, timed_reward, timed_forward

    names = inspect.signature(PPOTrainer.__init__).parameters
    models = ({"model": policy, "ref_model": ref} if "model" in names else {"policy": policy, "ref_policy": ref})
    trainer = PPOTrainer(args=cfg, processing_class=tok, reward_model=reward, value_model=value,
                         train_dataset=Dataset.from_dict({"input_ids": prompts}), data_collator=collate,
                         callbacks=[Timer()], **models)
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its metrics every iteration: stdout is the JSON
        trainer.train()

    ends = marks["end"]
    iters = []
    for i in range(len(ends) - 1):
        g0, u0, g = marks["gen_start"][i], marks["update_start"][i], marks["gen"][i]
        # other: from the end of the previous iteration to the start of generation (TRL's per-iteration cleanup,
        # gc.collect(), after on_step_end, and the dataloader)
        iters.append({"total": ends[i + 1] - ends[i], "generation": g, "scoring": marks["score"][i],
                      "old_policy_pass": u0 - g0 - g - marks["score"][i], "updates": ends[i + 1] - u0,
                      "other": g0 - ends[i]})
    print(json.dumps({"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "iterations": iters, "gen_columns": gen_cols}))


if __name__ == "__main__":
    main()
