"""PPO for RLHF as InstructGPT describes it, on the one Trainer.

Four models: the actor (the policy), the critic (a value head), the frozen reference and the reward (a reward-model
directory or a Python function). Two layouts:

- full (default): the actor is trained whole; the critic is a separate ``ScalarHeadModel`` initialised from the
  reward model (or from the policy with a fresh head); the reference is a frozen copy of the initial policy.
- ``peft.method lora``: actor and critic share one base with LoRA adapters and the value head reads the adapted
  hidden states; the reference is the same base with the adapters disabled (no second copy of the weights).

One PPO iteration: rollout (KV-cache batched sampling) -> scoring -> old-policy pass (log-probs, values, reference
log-probs, in exactly the minibatches of the first epoch so the first ratio of each rollout is exactly 1) ->
per-token rewards (-beta KL, score at the true last token, optional no-EOS penalty) -> GAE and returns -> several
minibatch epochs of the clipped policy loss + clipped value loss - entropy bonus (+ gamma x pretraining loss,
PPO-ptx), stopped early when the approx-KL to the rollout policy passes ``ppo.early_stop_kl``; then the adaptive KL
controller moves beta. ``PPOSource`` is the Trainer's batch source (one minibatch per optimizer step, a new rollout
when the buffer is spent); ``PPOModel`` holds actor and critic so one optimizer and one checkpoint hold both.
Checkpoints are taken at rollout boundaries only, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.assets import default_model
from lmforge.checkpoint import save_checkpoint
from lmforge.data.preference import read_prompts
from lmforge.errors import LMForgeError
from lmforge.files import read_utf8, write_text_atomic
from lmforge.loading import load_model_and_tokenizer
from lmforge.losses import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    cross_entropy,
    entropy_from_logits,
    gae,
    masked_mean,
    masked_whiten,
    policy_loss,
    ppo_rewards,
    ptx_loss,
    token_logprobs,
    value_loss,
)
from lmforge.matmul import call
from lmforge.model.heads import ScalarHeadModel, load_scalar_model, save_scalar_model
from lmforge.peft import apply_peft, save_adapter
from lmforge.peft.base import disable_adapter
from lmforge.quant import weight_count
from lmforge.rl.rollout import (
    Rollout,
    disable_dropout,
    policy_logprobs,
    response_hidden,
    rollout_scores,
    rollout_values,
    sample_rollout,
)
from lmforge.train import distributed as D
from lmforge.train.batches import TokenWindows, check_stream
from lmforge.train.config import TrainConfig, _fill, apply_defaults
from lmforge.train.loop import Trainer

RewardFn = Callable[[list[str], list[str]], list[float]]


@dataclass
class PPOOptions:
    rollout_batch: int = 16  # prompts (responses) per PPO iteration
    minibatch: int = 8  # responses per optimizer step
    epochs: int = 2  # passes over each rollout
    max_new_tokens: int = 48
    temperature: float = 1.0  # sampling temperature; log-probs are taken from logits / temperature
    clip: float = 0.2  # policy ratio clip range
    vf_clip: float = 0.2  # value clip range (negative: off)
    vf_coef: float = 0.1
    ent_coef: float = 0.0  # entropy bonus
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # initial beta
    adaptive_kl: bool = True
    kl_target: float = 4.0  # target KL to the reference (nats per response) of the adaptive controller
    kl_horizon: float = 0.0  # samples; 0: scaled to the run (steps x rollout_batch / 10; see kl_horizon())
    kl_estimator: str = "k1"
    early_stop_kl: float = 0.1  # stop a rollout's epochs when the approx-KL to the rollout policy passes this (0 off)
    whiten_rewards: bool = False  # scale rewards to unit std (mean kept)
    missing_eos_penalty: float = 0.0  # subtracted from the score of responses that never end
    critic_init: str = "auto"  # auto | reward | policy: the separate critic starts from the reward model or policy
    ptx_coef: float = 0.0  # PPO-ptx gamma
    ptx_batch: int = 4
    ptx_block: int = 64


# (option, lowest, highest, lowest allowed itself): every number must be finite and within its range
_RANGES = (("rollout_batch", 1, None, True), ("minibatch", 1, None, True), ("epochs", 1, None, True),
           ("max_new_tokens", 1, None, True), ("clip", 0, None, False), ("vf_clip", None, None, True),
           ("vf_coef", 0, None, True), ("ent_coef", 0, None, True), ("gamma", 0, 1, True), ("lam", 0, 1, True),
           ("kl_coef", 0, None, True), ("kl_target", 0, None, False), ("kl_horizon", 0, None, True),
           ("early_stop_kl", 0, None, True), ("missing_eos_penalty", None, None, True), ("ptx_coef", 0, None, True),
           ("ptx_batch", 1, None, True), ("ptx_block", 2, None, True))


def check_options(opts: PPOOptions) -> None:
    """Refuse, in one line naming it, a ``ppo.*`` value outside its range (a negative kl_coef made the KL penalty a
    bonus for leaving the reference; a NaN kl_target a NaN beta; a negative clip an inverted clip range)."""
    for name, low, high, closed in _RANGES:
        v = getattr(opts, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise LMForgeError(f"ppo.{name} {v}: must be a finite number")
        if (low is not None and (v < low or (v == low and not closed))) or (high is not None and v > high):
            where = (f"in [{low}, {high}]" if high is not None else
                     f"{'>=' if closed else '>'} {low}")
            raise LMForgeError(f"ppo.{name} {v:g}: must be {where}")
    if opts.kl_estimator not in KL_ESTIMATORS:
        raise LMForgeError(f"ppo.kl_estimator {opts.kl_estimator!r}: allowed values are {list(KL_ESTIMATORS)}")
    if opts.critic_init not in ("auto", "reward", "policy"):
        raise LMForgeError(f"ppo.critic_init {opts.critic_init!r}: allowed values are ['auto', 'reward', 'policy']")


def kl_horizon(opts: PPOOptions, steps: int) -> float:
    """The adaptive KL controller's horizon in samples: ``ppo.kl_horizon`` when set, else steps x rollout_batch / 10
    and at least one rollout batch. Ziegler et al.'s 10,000 suits their million-sample runs; over 30 iterations of 16
    it moves beta by 1 %. Scaled to the run, beta can change by (1 + 0.2 x 10 / steps)^steps over it, e^2 = 7.4x at
    most; the floor keeps one update within x0.8-1.2 (a horizon below a batch made beta negative in runs of 1-2
    steps whose KL was under target)."""
    if opts.kl_horizon > 0:
        if opts.kl_horizon < opts.rollout_batch:
            raise LMForgeError(f"ppo.kl_horizon {opts.kl_horizon:g} must be 0 (scaled to the run) or at least "
                               f"ppo.rollout_batch {opts.rollout_batch}: a shorter horizon moves beta by more than "
                               "x0.8-1.2 per update and can make it negative")
        return float(opts.kl_horizon)
    return float(max(opts.rollout_batch, steps * opts.rollout_batch / 10.0))


@dataclass
class PPOConfig:
    model: str = ""  # the initial policy (and reference)
    tokenizer: str = ""
    reward_model: str = ""  # a reward model directory (lmforge reward)
    reward: str = ""  # or a function: module:function or path/file.py:function
    prompts: str = ""  # JSONL (prompt / instruction / messages) or text, one prompt per line
    eval_prompts: str = ""  # held-out prompts: mean reward before and after training
    ptx_data: str = ""  # pretraining text for PPO-ptx
    template: str = ""  # chat template (default: the model's own, else alpaca, as for sft)
    steps: int = 20  # PPO iterations
    out: str = "runs/ppo"
    ppo: PPOOptions = field(default_factory=PPOOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_ppo_config(d: dict[str, Any], where: str) -> PPOConfig:
    return _fill(PPOConfig, d, where)


# ---- inputs ---------------------------------------------------------------------------------------------------


def load_reward_fn(spec: str) -> RewardFn:
    """``module:function`` or ``path/file.py:function`` -> the function."""
    if ":" not in spec:
        raise LMForgeError(f"--reward {spec!r}: expected module:function or path/file.py:function")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py") or Path(where).is_file():
            if not Path(where).is_file():
                raise LMForgeError(f"--reward {spec!r}: no file {where}")
            s = importlib.util.spec_from_file_location(f"lmforge_reward_{Path(where).stem}", where)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
        else:
            mod = importlib.import_module(where)
    except ImportError as e:
        raise LMForgeError(f"--reward {spec!r}: cannot import {where}: {e}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise LMForgeError(f"--reward {spec!r}: {where} has no function {name}")
    try:  # (a function of one argument failed only after the first rollout)
        inspect.signature(fn).bind([], [])
    except TypeError as e:
        raise LMForgeError(f"--reward {spec!r}: {name} must take (prompts, responses): {e}") from None
    except ValueError:  # no signature to read (a builtin): called as it is
        pass
    return fn


# ---- the models -----------------------------------------------------------------------------------------------


class PPOModel(nn.Module):
    """Actor and critic in one module (one optimizer, one checkpoint). ``critic`` is a separate ScalarHeadModel,
    or None: then ``value_head`` (initialised like a reward head) reads the actor's own (adapted) hidden states, the
    shared-base LoRA layout."""

    def __init__(self, actor: nn.Module, critic: ScalarHeadModel | None) -> None:
        super().__init__()
        self.actor = actor
        self.critic = critic
        self.value_head: nn.Linear | None = None
        if critic is None:
            d = actor.cfg.n_embd
            p = next(actor.parameters())
            self.value_head = nn.Linear(d, 1).to(device=p.device, dtype=torch.float32)
            with torch.no_grad():
                nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(d + 1))
                nn.init.zeros_(self.value_head.bias)

    @property
    def cfg(self):
        return self.actor.cfg

    @property
    def wte(self):
        return self.actor.wte

    def forward_rollout(self, rollout: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs, entropies, values), each (B, R), 0 off the response mask."""
        m = rollout.response_mask
        if self.critic is None:
            h = response_hidden(self.actor, rollout)
            logits = call(self.actor.lm_head, h)
            lp = token_logprobs(logits, rollout.responses, temperature).masked_fill(~m, 0.0)
            ent = entropy_from_logits(logits, temperature).masked_fill(~m, 0.0)
            v = self.value_head(h.float()).squeeze(-1).masked_fill(~m, 0.0)
            return lp, ent, v
        lp, ent = policy_logprobs(self.actor, rollout, temperature, with_entropy=True)
        return lp, ent, rollout_values(self.critic, rollout)


def _rollout_batch(r: Rollout) -> dict[str, Any]:
    return {"input_ids": r.input_ids, "attention_mask": r.attention_mask, "position_ids": r.position_ids,
            "response_mask": r.response_mask, "ended": r.ended, "prompt_len": r.prompt_len}


def _as_rollout(b: dict[str, Any]) -> Rollout:
    return Rollout(b["input_ids"], b["attention_mask"], b["position_ids"], b["response_mask"], b["ended"],
                   int(b["prompt_len"]))


class PPOSource:
    """The Trainer's batch source: ``next_batch()`` returns the next minibatch of the current rollout buffer and
    makes a new rollout (scored, old-policy pass, rewards, GAE) when the buffer is spent. Its state (iteration, KL
    controller, prompt position) is taken at rollout boundaries; everything random is seeded from it."""

    def __init__(self, model: PPOModel, prompts: list[list[int]], texts: list[str], opts: PPOOptions, steps: int,
                 scorer: Callable[[Rollout, list[str], list[str]], torch.Tensor], decode: Callable[[list[int]], str],
                 stop_ids: list[int], pad_id: int, seed: int, reference: nn.Module | None,
                 ptx: TokenWindows | None = None) -> None:
        if opts.minibatch < 1 or opts.rollout_batch < opts.minibatch or opts.epochs < 1:
            raise LMForgeError(f"ppo.rollout_batch {opts.rollout_batch} must be >= ppo.minibatch {opts.minibatch} "
                               f">= 1 and ppo.epochs {opts.epochs} >= 1")
        self.model, self.prompts, self.texts, self.o, self.steps = model, prompts, texts, opts, steps
        self.scorer, self.decode, self.stop_ids, self.pad_id, self.seed = scorer, decode, stop_ids, pad_id, seed
        self.reference, self.ptx = reference, ptx
        self.kl = (AdaptiveKLController(opts.kl_coef, opts.kl_target, kl_horizon(opts, steps)) if opts.adaptive_kl
                   else FixedKLController(opts.kl_coef))
        self.iteration, self.epoch, self.cursor, self.early_stops = 0, 0, 0, 0
        self.queue: list[dict[str, Any]] = []  # minibatches left of the current rollout
        self.stats: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    # ---- prompts ------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def _take_prompts(self, n: int) -> list[int]:
        out, order = [], self._order(self.epoch)
        while len(out) < n:
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order(self.epoch)
            out.append(order[self.cursor])
            self.cursor += 1
        return out

    # ---- one rollout ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def make_rollout(self) -> None:
        o, model = self.o, self.model
        idx = self._take_prompts(o.rollout_batch)
        it = self.iteration
        self.iteration += 1
        actor = model.actor
        r = sample_rollout(actor, [self.prompts[i] for i in idx], o.max_new_tokens, o.temperature, self.stop_ids,
                           seed=self.seed * 7919 + it * o.rollout_batch, pad_id=self.pad_id)
        responses = [self.decode([t for t in ids if t not in self.stop_ids]) for ids in r.response_lists()]
        scores = self.scorer(r, [self.texts[i] for i in idx], responses).float().to(r.input_ids.device)
        # the minibatches of every epoch (the first epoch's are also those of the old-policy pass: ratio exactly 1)
        B, mb = o.rollout_batch, o.minibatch
        g = torch.Generator().manual_seed(self.seed * 1_000_033 + it)
        perms = [torch.randperm(B, generator=g) for _ in range(o.epochs)]
        groups = [p[i : i + mb] for p in perms for i in range(0, B, mb)]
        first = groups[: math.ceil(B / mb)]
        old_lp = torch.zeros(r.response_mask.shape)
        old_v, ref_lp = torch.zeros_like(old_lp), torch.zeros_like(old_lp)
        for rows in first:
            sub = r.select(rows)
            lp, _, v = model.forward_rollout(sub, o.temperature)
            old_lp[rows], old_v[rows] = lp.float(), v.float()
            if self.reference is None:  # shared base: the reference is the base with the adapters disabled
                with disable_adapter(actor):
                    ref_lp[rows] = policy_logprobs(actor, sub, o.temperature).float()
            else:
                ref_lp[rows] = policy_logprobs(self.reference, sub, o.temperature).float()
        m = r.response_mask
        beta = self.kl.value
        rewards, kl = ppo_rewards(scores, old_lp, ref_lp, m, beta, o.kl_estimator, r.ended, o.missing_eos_penalty)
        if o.whiten_rewards:
            rewards = masked_whiten(rewards, m, shift_mean=False) * m
        adv, returns = gae(rewards, old_v, m, o.gamma, o.lam)
        adv = masked_whiten(adv, m) * m
        seq_kl = kl.sum(-1).mean().item()
        self.kl.update(seq_kl, B)
        self.stats = {"score": scores.mean().item(), "kl": seq_kl, "beta": beta,
                      "response_len": m.sum(-1).float().mean().item(), "ended": r.ended.float().mean().item()}
        self.history.append({"iteration": it + 1, **self.stats})
        full = {**_rollout_batch(r), "old_logprobs": old_lp, "old_values": old_v, "advantages": adv,
                "returns": returns}
        self.queue = []
        for k, rows in enumerate(groups):
            b = {key: (v[rows] if torch.is_tensor(v) else v) for key, v in full.items()}
            b["first"] = k == 0  # the policy has not moved yet: ratio exactly 1
            self.queue.append(b)

    def stop_early(self) -> None:
        """The policy moved too far from the rollout policy: drop the rest of this rollout's minibatches."""
        if self.queue:
            self.queue = []
            self.early_stops += 1

    # ---- BatchSource --------------------------------------------------------------------------------------
    def next_batch(self) -> dict[str, Any]:
        if not self.queue:
            self.make_rollout()
        b = self.queue.pop(0)
        if self.ptx is not None:
            b["ptx"] = self.ptx.next_batch()
        return b

    def at_boundary(self) -> bool:
        """A checkpoint may be taken: the current rollout is spent (the next batch starts a new one)."""
        return not self.queue

    def exhausted(self) -> bool:
        """All ``steps`` iterations done."""
        return self.iteration >= self.steps and not self.queue

    def skip(self, n: int) -> None:
        for _ in range(n):
            self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position of the *next* rollout (the rest of a partly used buffer is not kept)."""
        return {"iteration": self.iteration, "epoch": self.epoch, "cursor": self.cursor, "kl": self.kl.state_dict(),
                "early_stops": self.early_stops, "prompts": len(self.prompts),
                "ptx": None if self.ptx is None else self.ptx.state_dict()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        check_stream({"prompts": s.get("prompts")}, {"prompts": len(self.prompts)})
        self.iteration, self.epoch, self.cursor = s["iteration"], s["epoch"], s["cursor"]
        self.early_stops = s["early_stops"]
        self.kl.load_state_dict(s["kl"])
        if self.ptx is not None and s.get("ptx"):
            self.ptx.load_state_dict(s["ptx"])
        self.queue = []

    def fixed_batches(self, n: int, seed: int) -> list[dict[str, Any]]:
        return []


def make_loss_fn(source: PPOSource, opts: PPOOptions):
    """The Trainer's loss: clipped policy loss + vf_coef x clipped value loss - ent_coef x entropy (+ ptx)."""

    def loss_fn(model, batch):
        m_ = getattr(model, "module", model)
        r = _as_rollout(batch)
        m = r.response_mask
        lp, ent, v = m_.forward_rollout(r, opts.temperature)
        pl, pm = policy_loss(lp, batch["old_logprobs"], batch["advantages"], m, opts.clip)
        vl, vm = value_loss(v, batch["old_values"], batch["returns"], m, opts.vf_clip if opts.vf_clip >= 0 else None)
        entropy = masked_mean(ent, m)
        loss = pl + opts.vf_coef * vl - opts.ent_coef * entropy
        metrics = {"policy_loss": pl.item(), "value_loss": vl.item(), "entropy": entropy.item(), **pm, **vm}
        if "ptx" in batch:
            logits = m_.actor(batch["ptx"]["input_ids"])
            pt = cross_entropy(logits, batch["ptx"]["targets"])
            loss = ptx_loss(loss, pt, opts.ptx_coef)
            metrics["ptx_loss"] = pt.item()
        if batch.get("first"):
            metrics["first_ratio_max_dev"] = (lp - batch["old_logprobs"]).abs().max().item()
        if opts.early_stop_kl > 0 and pm["approx_kl"] > opts.early_stop_kl:
            source.stop_early()
        metrics.update(source.stats)
        metrics["early_stops"] = source.early_stops
        return loss, 1, metrics

    return loss_fn


# ---- the stage ------------------------------------------------------------------------------------------------


def _finite(scores: torch.Tensor, source: str, responses: list[str]) -> torch.Tensor:
    """``scores`` unchanged, or a one-line error naming the first response whose score is NaN or infinite (one such
    score makes the loss NaN, and the optimizer step then writes NaN into every weight)."""
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise LMForgeError(f"{source} gave {scores[i].item()} for response {i} ({responses[i][:60]!r}): "
                           "scores must be finite numbers")
    return scores


def _model_scorer(reward_model: ScalarHeadModel):
    def score(r: Rollout, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return _finite(rollout_scores(reward_model, r), "the reward model", responses)

    return score


def _fn_scorer(fn: RewardFn, spec: str):
    def score(r: Rollout, prompts: list[str], responses: list[str]) -> torch.Tensor:
        try:
            out = fn(prompts, responses)
        except Exception as e:  # noqa: BLE001 - the user's code: named as the flag that gave it ("ValueError: boom")
            raise LMForgeError(f"--reward {spec}: it raised {type(e).__name__}: {e}") from None
        try:
            n = len(out)
            values = [float(x) for x in out]
        except (TypeError, ValueError) as e:
            raise LMForgeError(f"--reward {spec}: must return a list of numbers, one per response; it returned "
                               f"{type(out).__name__} ({e})") from None
        if n != len(responses):
            raise LMForgeError(f"--reward {spec}: returned {n} scores for {len(responses)} responses")
        return _finite(torch.tensor(values), "the reward function", responses)

    return score


def evaluate_prompts(actor: nn.Module, prompts: list[list[int]], texts: list[str], scorer, decode, stop_ids,
                     opts: PPOOptions, pad_id: int, seed: int = 0) -> float:
    """Mean reward of sampled responses (fixed seeds) to held-out prompts."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(prompts), opts.rollout_batch):
            ps = prompts[i : i + opts.rollout_batch]
            r = sample_rollout(actor, ps, opts.max_new_tokens, opts.temperature, stop_ids, seed=seed + i, pad_id=pad_id)
            resp = [decode([t for t in ids if t not in stop_ids]) for ids in r.response_lists()]
            total += scorer(r, texts[i : i + len(ps)], resp).sum().item()
    return total / len(prompts)


def plot_ppo(metrics: Path, png: Path) -> Path | None:
    """Score and KL to the reference per step (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key in zip(axes, ("train_score", "train_kl")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), "-")
        ax.set_xlabel("step")
        ax.set_title(key.replace("train_", "mean ").replace("kl", "KL to reference"))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def run_ppo(cfg: PPOConfig, explicit_train: set[str] | None = None, resume: bool = False) -> dict[str, Any]:
    from lmforge.data.sft import default_template
    from lmforge.infer.chat import encode_chat, end_of_turn, get_template
    from lmforge.stages.sft import POLICY_LR_SCALE, suggested_lr

    explicit_train = explicit_train or set()
    o, t = cfg.ppo, cfg.train
    D.one_process("ppo")  # every process would run the whole loop and write the same files
    out = Path(cfg.out)
    device = D.pick_device(t.device)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    if bool(cfg.reward_model) == bool(cfg.reward):
        raise LMForgeError("pass exactly one of --reward-model DIR and --reward module:function")
    if not cfg.prompts:
        raise LMForgeError("no prompts: pass --prompts FILE")
    if not 0 < o.temperature < math.inf:
        raise LMForgeError("ppo.temperature must be > 0 (PPO samples; its log-probs are those of the sampler)")
    check_options(o)
    if cfg.ptx_data and o.ptx_coef == 0:  # (PPO-ptx was off without a word)
        raise LMForgeError("--ptx-data: PPO-ptx needs its weight too: set --ppo.ptx_coef (InstructGPT's gamma, "
                           "e.g. 1.0)")
    for flag, path in (("--prompts", cfg.prompts), ("--eval-prompts", cfg.eval_prompts),
                       ("--ptx-data", cfg.ptx_data)):
        if path and not Path(path).exists():  # (before the models load)
            raise LMForgeError(f"{flag} {path}: no such file")
    if cfg.steps < 1:  # (it said "train.max_iters=-12", a value the user never gave)
        raise LMForgeError(f"--steps {cfg.steps}: must be >= 1")
    if o.adaptive_kl:
        kl_horizon(o, cfg.steps)  # checked before anything loads
    cfg.model = default_model(cfg.model)
    actor, tok = load_model_and_tokenizer(cfg.model, cfg.tokenizer or None, "cpu")
    method = cfg.peft.get("method") if cfg.peft else None
    if method not in (None, "lora", "qlora"):
        raise LMForgeError(f"--peft {method}: PPO's shared base supports lora and qlora")
    template = get_template(cfg.template, tok) if cfg.template else default_template(tok)
    _, stop_ids = end_of_turn(template, tok)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)

    raw = read_prompts(cfg.prompts)
    room = actor.cfg.block_size - o.max_new_tokens
    if room < 1:  # (every prompt was "longer than -99488 tokens", then "no usable prompts")
        raise LMForgeError(f"ppo.max_new_tokens {o.max_new_tokens:,}: leaves no room for a prompt in the model's "
                           f"context of {actor.cfg.block_size:,} (at most {actor.cfg.block_size - 1:,})")

    def encode_all(items):
        ids, texts, dropped = [], [], 0
        for p in items:
            e = encode_chat(tok, template, p.messages)
            if len(e) > room:
                dropped += 1
                continue
            ids.append(e)
            texts.append(p.user_text)
        return ids, texts, dropped

    prompts, texts, dropped = encode_all(raw)
    if dropped:
        log(f"skipped {dropped} prompt(s) longer than {room} tokens (block_size - ppo.max_new_tokens)")
    if len(prompts) < o.rollout_batch:
        log(f"{len(prompts)} prompts for a rollout batch of {o.rollout_batch}: prompts repeat within a rollout")
    if not prompts:
        raise LMForgeError(f"--prompts {cfg.prompts}: no usable prompts")

    reward_model = None
    if cfg.reward_model:
        reward_model = disable_dropout(load_scalar_model(cfg.reward_model)).requires_grad_(False).to(device)
        if reward_model.cfg.vocab_size != actor.cfg.vocab_size:
            raise LMForgeError(f"{cfg.reward_model}: the reward model's vocabulary ({reward_model.cfg.vocab_size}) "
                               f"differs from the policy's ({actor.cfg.vocab_size}); it must use the same tokenizer")
        scorer = _model_scorer(reward_model)
    else:
        scorer = _fn_scorer(load_reward_fn(cfg.reward), cfg.reward)

    disable_dropout(actor)
    torch.manual_seed(t.seed)  # fresh heads and adapters: the same run from the same seed
    resolved_peft: dict[str, Any] = {}
    if method is not None:
        resolved_peft = apply_peft(actor, method, {k: v for k, v in cfg.peft.items() if k != "method"}, tok)
        reference, critic = None, None
    else:
        reference = copy.deepcopy(actor).requires_grad_(False).eval()
        init = o.critic_init if o.critic_init != "auto" else ("reward" if reward_model is not None else "policy")
        if init == "reward":
            if reward_model is None:
                raise LMForgeError("ppo.critic_init reward needs --reward-model")
            critic = copy.deepcopy(reward_model).requires_grad_(True)
        elif init == "policy":
            critic = ScalarHeadModel(copy.deepcopy(reference)).requires_grad_(True)
        else:
            raise LMForgeError(f"ppo.critic_init={o.critic_init!r}: allowed values are ['auto', 'reward', 'policy']")
        disable_dropout(critic)
    model = PPOModel(actor, critic)
    n_params = weight_count(actor)  # quantized weights count as the weights they stand for

    ptx = None
    if o.ptx_coef > 0:
        if not cfg.ptx_data:
            raise LMForgeError("ppo.ptx_coef > 0 needs --ptx-data FILE")
        ptx = _ptx_windows(cfg.ptx_data, tok, min(o.ptx_block, actor.cfg.block_size), o.ptx_batch, t.seed)

    source = PPOSource(model, prompts, texts, o, cfg.steps, scorer, tok.decode, list(stop_ids), pad, t.seed,
                       reference, ptx)
    per_iter = o.epochs * math.ceil(o.rollout_batch / o.minibatch)
    chosen = {"max_iters": cfg.steps * per_iter, "lr": suggested_lr(method, n_params) * POLICY_LR_SCALE,
              "warmup_iters": 0,
              "schedule": "constant", "weight_decay": 0.0, "eval_iters": 0, "eval_interval": 10**9,
              "save_interval": 1, "log_interval": 1, "spike_guard": False, "precision": "fp32", "batch_size":
              o.minibatch, "grad_accum": 1}
    apply_defaults(t, chosen, explicit_train)
    if t.grad_accum != 1:
        raise LMForgeError("train.grad_accum must be 1 for PPO (set ppo.minibatch instead)")
    log(f"ppo: {len(prompts)} prompts, {cfg.steps} iterations of {o.rollout_batch} rollouts x {o.epochs} epochs of "
        f"minibatches of {o.minibatch}; {'peft ' + method if method else 'full actor + separate critic'}; "
        f"lr {t.lr:g}; beta {o.kl_coef:g} ("
        f"{f'adaptive, target {o.kl_target:g}, horizon {kl_horizon(o, cfg.steps):g}' if o.adaptive_kl else 'fixed'})")

    eval_set = None
    if cfg.eval_prompts:
        e_ids, e_texts, _ = encode_all(read_prompts(cfg.eval_prompts, "--eval-prompts"))
        eval_set = (e_ids, e_texts)

    def held_out() -> float | None:
        if eval_set is None:
            return None
        return evaluate_prompts(model.actor, eval_set[0], eval_set[1], scorer, tok.decode, list(stop_ids), o, pad)

    summary_path = out / "ppo_summary.json"
    previous = _read_summary(summary_path) if resume else {}
    before = held_out() if not resume else previous.get("heldout_before")
    if before is not None and not resume:
        log(f"held-out mean reward before: {before:.4f}")
        out.mkdir(parents=True, exist_ok=True)  # kept for a resumed run: the model it started from is gone
        write_text_atomic(summary_path, json.dumps({"heldout_before": before}, indent=2) + "\n")
    base_ref = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    run_config = {**cfg.to_dict(), "resolved_peft": resolved_peft}
    trainer = Trainer(model, t, source, make_loss_fn(source, o), out, tokenizer=tok, run_config=run_config,
                      device=device, log=log, units="rollouts", stage="ppo",
                      same_on_resume=("model", "reward_model", "reward", "template", "ptx_data", "ppo"))
    result = trainer.fit(resume=resume)
    after = held_out()
    if after is not None:
        log(f"held-out mean reward after: {after:.4f}")
    _write_final(model, out, tok, method, resolved_peft, base_ref, template.source)
    plot_ppo(out / "metrics.jsonl", out / "ppo.png")
    summary = {"iterations": source.iteration, "early_stops": source.early_stops, "beta": source.kl.value,
               "heldout_before": before, "heldout_after": after, "last": source.stats or previous.get("last", {}),
               "step": result.get("step")}  # (a resumed run that had nothing left to do keeps the last figures)
    write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary


def _read_summary(path: Path) -> dict[str, Any]:
    """What a run's ppo_summary.json holds (empty when absent or unreadable)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _ptx_windows(path: str, tok, block: int, batch: int, seed: int) -> TokenWindows:
    """Pretraining windows for PPO-ptx from a text file or a prepared directory (its train split)."""
    import numpy as np

    p = Path(path)
    if p.is_dir():
        from lmforge.data.dataset import load_prepared

        _, tokens, _ = load_prepared(p)
    elif p.is_file():
        tokens = np.asarray(tok.encode(read_utf8(p, "--ptx-data file")), dtype=np.int64)
    else:
        raise LMForgeError(f"--ptx-data {path}: no such file or directory")
    if len(tokens) <= block:  # (it said "only 0 tokens: need at least block_size+1", naming no file)
        raise LMForgeError(f"--ptx-data {path}: {len(tokens):,} tokens, too few for one window of the context "
                           f"({block + 1:,} needed)")
    return TokenWindows(np.asarray(tokens), block, batch, "random", seed + 17)


def _write_final(model: PPOModel, out: Path, tok, method: str | None, resolved: dict[str, Any], base_ref: str,
                 template_src: str) -> None:
    """The policy as a loadable --model in ``out`` (full weights, or LoRA adapter files + the base reference) and
    the critic in ``out/critic`` (a value model; with a shared base, its head in ``out/critic_head.safetensors``)."""
    from safetensors.torch import save_file

    from lmforge.stages.sft import CHAT_TEMPLATE_FILE

    out.mkdir(parents=True, exist_ok=True)
    if method is None:
        tmp = out / ".final-policy"
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(model.actor, tmp, tok)
        for f in tmp.iterdir():
            f.replace(out / f.name)
        tmp.rmdir()
        save_scalar_model(model.critic, out / "critic", tok, kind="value")
    else:
        save_adapter(model.actor, out / ".adapter", base_ref, resolved, method)  # written whole into its folder
        for f in (out / ".adapter").iterdir():
            f.replace(out / f.name)
        (out / ".adapter").rmdir()
        tok.save(str(out))
        save_file({"weight": model.value_head.weight.detach().float().contiguous(),
                   "bias": model.value_head.bias.detach().float().contiguous()}, str(out / "critic_head.safetensors"))
    (out / CHAT_TEMPLATE_FILE).write_text(template_src)
