"""Reward model training (``lmforge reward``) and scoring (``lmforge reward score``) on the one Trainer.

A reward model is the decoder + a scalar head (``lmforge.model.heads.ScalarHeadModel``) trained with the
Bradley-Terry loss on every pair of each prompt's ranked responses, all of a prompt's responses in one batch
(InstructGPT); each prompt counts once however many responses it has. The best checkpoint by held-out pairwise
accuracy is kept; then the reward is normalised to mean 0 / std 1 over the training prompts' responses.

Output: the run directory is a reward-model directory (``save_scalar_model``: an lmforge checkpoint of the decoder +
``value_head.safetensors``/``value_head.json``), loadable as a reward model and as a ``--model`` (the LM part).
With ``--peft lora``/``qlora`` the checkpoints hold the adapter and head weights only; the final model has the
adapter merged into the decoder (a quantized base is dequantized), so it loads without the base.

The group batches (``GroupBatches``) and the data preparation here serve DPO too.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmforge.data.preference import PreferenceRecord, collate_groups, encode_response, read_preference_file, shared_len
from lmforge.errors import LMForgeError
from lmforge.files import public_modes, write_text_atomic
from lmforge.loading import start_fine_tuning
from lmforge.losses import ranked_pairs, ranked_reward_loss
from lmforge.model.decoder import supports_branches
from lmforge.model.heads import ScalarHeadModel, load_scalar_model, read_head_config, save_scalar_model
from lmforge.quant import weight_count
from lmforge.train import distributed as D
from lmforge.train.batches import check_batch_fits, check_stream, length_grouped
from lmforge.train.config import TrainConfig, _fill, apply_defaults, check_epochs_max_len, plan_steps, stage_defaults
from lmforge.train.loop import Trainer, autocast, to_device, train_precision

CHAT_TEMPLATE_FILE = "chat_template.jinja"
Group = list[dict[str, Any]]


@dataclass
class PrefData:
    path: str = ""  # preference file (JSONL/JSON): chosen/rejected pairs, hh-rlhf transcripts or ranked lists
    val_path: str = ""  # held-out file; default: data.val_fraction of the records
    val_fraction: float = 0.1
    max_len: int = 512  # tokens per prompt + response (prompt cut from the left, then the response)
    template: str = ""  # chat template (name or Jinja); empty: the model's own, else plain text
    limit: int = 0  # use only the first N records of the file (0 = all)
    group_by_length: bool = True  # batches of similar lengths (less padding); the order stays seeded and resumable
    share_prompt: bool = True  # a prompt's responses share one pass over it (exact; 32 % fewer tokens on hh-rlhf)


@dataclass
class RewardConfig:
    model: str = ""
    tokenizer: str = ""
    data: PrefData = field(default_factory=PrefData)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: dict[str, Any] = field(default_factory=dict)
    margin: float = 0.0  # loss -log sigmoid(r_w - r_l - margin)
    epochs: float = 1.0  # InstructGPT: one epoch (the reward model overfits after one); 0: the probe is the model
    head_init: str = "normal"  # normal: N(0, 1/sqrt(d+1)); probe: fit it to the frozen features first (LP-FT)
    out: str = "runs/reward"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_reward_config(d: dict[str, Any], where: str) -> RewardConfig:
    return _fill(RewardConfig, d, where)


# ---- batches ----------------------------------------------------------------------------------------------------


def group_len(g: Group, shared: bool = False) -> int:
    """A group's padded width in a batch: its longest response, or with ``shared`` its row of ``shared_rows``
    (the prompt once, then every response's remainder)."""
    if shared:
        return shared_len([ex["input_ids"] for ex in g])
    return max(len(ex["input_ids"]) for ex in g)


def longest_first(groups: Sequence[Group], shared: bool = False) -> list[int]:
    """Indices of ``groups``, longest first (batches in this order carry little padding)."""
    return sorted(range(len(groups)), key=lambda i: -group_len(groups[i], shared))


class GroupBatches:
    """A ``BatchSource`` over groups (one prompt's encoded responses, best first): ``batch_size`` groups per batch,
    collated by ``collate_groups`` (plus a float tensor for every extra numeric field of the examples, e.g. the
    DPO reference log-probs ``ref``). Shuffled per epoch (seeded), resumable, rank-aware like ``ExampleBatches``.

    ``by_length``: batches of groups of similar length (``train.batches.length_grouped``); held-out batches sorted by
    length. On hh-rlhf at 8 prompts per batch this halves the padded tokens (2.33x the real ones -> 1.11x).
    ``share_prefix``: batches also carry ``rows``, each group's prompt once (``data.preference.shared_rows``)."""

    def __init__(self, groups: Sequence[Group], batch_size: int, pad_id: int = 0, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world: int = 1, by_length: bool = False,
                 share_prefix: bool = False) -> None:
        if not groups:
            raise LMForgeError("no examples to train on")
        self.groups, self.batch_size, self.pad_id = list(groups), batch_size, pad_id
        self.shuffle, self.seed, self.rank, self.world = shuffle, seed, rank, world
        self.by_length, self.share_prefix = by_length, share_prefix
        self._len = [group_len(g, share_prefix) for g in self.groups]
        self.epoch, self.cursor, self.batches = 0, 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return sorted(range(len(self.groups)), key=lambda i: -self._len[i]) if self.by_length else \
                list(range(len(self.groups)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.groups), generator=g).tolist()
        return length_grouped(order, self._len, self.batch_size * self.world, g) if self.by_length else order

    def _take(self) -> int:
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        i = self._order[self.cursor]
        self.cursor += 1
        return i

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-len(self.groups) // (self.batch_size * self.world)))

    def upcoming(self, batches: int) -> set[int]:
        """The groups the next ``batches`` batches take (every rank's), the stream left where it is."""
        epoch, cursor, order, seen = self.epoch, self.cursor, self._order, set()
        for _ in range(batches * self.batch_size * self.world):
            if len(seen) == len(self.groups):
                break
            if cursor >= len(order):
                epoch, cursor = epoch + 1, 0
                order = self._permutation(epoch)
            seen.add(order[cursor])
            cursor += 1
        return seen

    def collate(self, idx: list[int]) -> dict[str, Any]:
        groups = [self.groups[i] for i in idx]
        batch = collate_groups(groups, self.pad_id, self.share_prefix)
        extra = [k for k in groups[0][0] if k not in ("input_ids", "labels")]
        for k in extra:
            batch[k] = torch.tensor([float(ex[k]) for g in groups for ex in g], dtype=torch.float32)
        return batch

    def next_batch(self) -> dict[str, Any]:
        idx = [self._take() for _ in range(self.batch_size * self.world)]
        self.batches += 1
        return self.collate(idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def skip(self, n: int) -> None:
        for _ in range(n * self.batch_size * self.world):
            self._take()
        self.batches += n

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "batches": self.batches, "seed": self.seed,
                "groups": len(self.groups), "batch_size": self.batch_size, "world": self.world}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        check_stream(s, {"world": self.world, "groups": len(self.groups), "batch_size": self.batch_size})
        self.seed, self.epoch, self.cursor, self.batches = s["seed"], s["epoch"], s["cursor"], s["batches"]
        self._order = self._permutation(self.epoch)

    def fixed_batches(self, n: int, seed: int) -> list[dict[str, Any]]:
        """Every group once (the first ``n`` batches' groups, or all if ``n <= 0``), in order or by length."""
        g = self.batch_size * self.world
        total = len(self.groups) if n <= 0 else min(len(self.groups), n * g)
        order = list(range(total))
        if self.by_length:  # the same groups, fewer padded tokens
            order.sort(key=lambda i: -self._len[i])
        out = []
        for start in range(0, total, g):
            mine = order[start : start + g][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if mine:
                out.append(self.collate(mine))
            if 0 < n <= len(out):
                break
        return out


# ---- data ---------------------------------------------------------------------------------------------------------


def read_split(data: PrefData, seed: int) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(train, held-out) records: ``val_path``, else a seeded ``val_fraction`` of the file."""
    if not data.path:
        raise LMForgeError("no training data: pass --data FILE")
    recs = read_preference_file(data.path)
    if data.limit > 0:
        recs = recs[: data.limit]
    if data.val_path:
        return recs, read_preference_file(data.val_path)
    if not 0 <= data.val_fraction < 1:
        raise LMForgeError(f"data.val_fraction={data.val_fraction}: must be in [0, 1)")
    if data.val_fraction == 0 or len(recs) < 2:
        return recs, []
    idx = list(range(len(recs)))
    random.Random(seed).shuffle(idx)
    held = set(idx[: max(1, round(data.val_fraction * len(recs)))])
    return [r for i, r in enumerate(recs) if i not in held], [r for i, r in enumerate(recs) if i in held]


def pick_template(tok, name: str):
    """The chat template to render prompts with, or None for plain text (a model without one)."""
    from lmforge.infer.chat import get_template

    if name:
        t = get_template(name, tok)
        tok.chat_template = t.source
        return t
    return get_template(None, tok) if getattr(tok, "chat_template", None) else None


def encode_group(tok, rec: PreferenceRecord, template, max_len: int, order: Sequence[int] | None = None) -> Group:
    """The record's responses (best first, or ``order``) encoded with prompt tokens masked out of ``labels``."""
    order = range(len(rec.responses)) if order is None else order
    return [encode_response(tok, rec, i, template, plain=template is None, max_len=max_len) for i in order]


def check_distinct(groups: Sequence[Group], max_len: int, what: str, log, held_out: bool = False) -> None:
    """Say how many groups hold responses that are identical once encoded (the same answer twice, or answers that
    differ only past ``max_len``): they carry no preference (their loss stays ln 2); refuse when every training one
    does. ``held_out``: the validation groups, whose ties count as wrong in the accuracy (only said)."""
    same = sum(1 for g in groups if len({tuple(r["input_ids"]) for r in g}) < len(g))
    if same and held_out:
        log(f"warning: {same:,} of {len(groups):,} held-out {what} have identical responses once encoded (max_len "
            f"{max_len}): a tie counts as wrong in the validation accuracy")
        return
    if same and same == len(groups):
        raise LMForgeError(f"every one of the {len(groups):,} training {what} has identical responses once encoded "
                           f"(max_len {max_len}): nothing to learn; raise --data.max_len or check the data")
    if same:
        log(f"warning: {same:,} of {len(groups):,} training {what} have identical responses once encoded (max_len "
            f"{max_len}): they carry no preference")


def pad_id_of(tok) -> int:
    return tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)


# ---- training -----------------------------------------------------------------------------------------------------


def reward_loss_fn(margin: float):
    """loss_fn for the Trainer: the ranked reward loss summed over prompts (count = prompts), metrics summed."""

    def loss_fn(model, batch):
        scores = model(batch["input_ids"], batch["attention_mask"], rows=batch.get("rows"))
        loss, metrics = ranked_reward_loss(scores, batch["group_sizes"], margin or None, reduction="sum")
        return loss, len(batch["group_sizes"]), metrics

    return loss_fn


@torch.no_grad()
def per_response(model: ScalarHeadModel, groups: Sequence[Group], pad_id: int, fn, batch_size: int = 8,
                 amp: torch.dtype | None = None, desc: str = "") -> list[torch.Tensor]:
    """``fn(model, batch)`` -> one row per response, run over every group (eval mode, no grad) in batches by
    length (less padding); one tensor (responses of the group, ...) per group, in the groups' order. ``amp``:
    autocast dtype (the trainer's precision); ``desc``: a progress bar with this label."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    share = supports_branches(model.cfg)
    order = longest_first(groups, share)
    out: list[torch.Tensor] = [torch.empty(0)] * len(groups)
    bar = tqdm(total=len(order), desc=desc, disable=not desc, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 10.0)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        b = to_device(collate_groups([groups[i] for i in idx], pad_id, share), dev)
        with autocast(dev, amp):
            y = fn(model, b).float().cpu()
        bar.update(len(idx))
        at = 0
        for i in idx:
            out[i] = y[at : at + len(groups[i])]
            at += len(groups[i])
    bar.close()
    model.train(was)
    return out


def score_groups(model: ScalarHeadModel, groups: Sequence[Group], pad_id: int, batch_size: int = 8,
                 normalized: bool = True, amp: torch.dtype | None = None, desc: str = "") -> list[list[float]]:
    """Scores of every response of every group, in the groups' order (``per_response``)."""
    def fn(m, b):
        return m.score(b["input_ids"], b["attention_mask"], normalized=normalized, rows=b.get("rows"))

    return [y.tolist() for y in per_response(model, groups, pad_id, fn, batch_size, amp, desc)]


# ---- the head fitted to frozen features (linear probe, then fine-tuning) ------------------------------------------

PROBED_LR_SCALE = 0.1  # fine-tuning after a fitted head: this times the usual rate
PROBE_L2 = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01)  # L2 strengths tried on standardised features, picked by CV loss


def fit_pairwise_head(diffs: torch.Tensor, weights: torch.Tensor, l2: float) -> torch.Tensor:
    """The linear head w minimising the Bradley-Terry loss of frozen features, i.e. logistic regression without
    intercept on (better - worse) feature differences ``diffs`` (P, d), pair weights ``weights`` (P,):
    sum_p weight_p * softplus(-diff_p . w) / sum(weights) + l2/2 |w / s|^2 with the features standardised by their
    root mean square s (the penalty is the same for every feature's scale). L-BFGS in float64; returns w (d,)."""
    x = diffs.double()
    s = x.pow(2).mean(0).sqrt().clamp_min(1e-12)
    xs, wn = x / s, weights.double() / weights.double().sum()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (wn * torch.nn.functional.softplus(-(xs @ w))).sum() + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (w.detach() / s).float()


def pair_differences(feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per ranked pair of every group (rows best first): (better - worse features, weight 1/pairs of its prompt,
    group index)."""
    d, w, gi = [], [], []
    for g, f in enumerate(feats):
        pairs = ranked_pairs(len(f))
        for i, j in pairs:
            d.append(f[i] - f[j])
            w.append(1.0 / len(pairs))
            gi.append(g)
    if not d:
        raise LMForgeError("no ranked pairs to fit the reward head to: every prompt needs two or more responses")
    return torch.stack(d), torch.tensor(w), torch.tensor(gi)


def select_probe(diffs: torch.Tensor, weights: torch.Tensor, group: torch.Tensor, folds: int = 5, seed: int = 0,
                 grid: Sequence[float] = PROBE_L2) -> dict[str, Any]:
    """K-fold cross-validation (folds by prompt) of ``fit_pairwise_head`` over ``grid``; the L2 with the lowest
    held-out loss is refitted on every pair. Returns {weight, l2, folds, cv_loss, cv_accuracy}."""
    n = int(group.max()) + 1
    k = max(2, min(folds, n))
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] = torch.arange(n) % k
    fold = fold_of[group]
    best: dict[str, Any] | None = None
    for l2 in grid:
        loss = acc = 0.0
        for f in range(k):
            tr, te = fold != f, fold == f
            w = fit_pairwise_head(diffs[tr], weights[tr], l2)
            m, wt = diffs[te] @ w, weights[te] / weights[te].sum()
            loss += float((wt * torch.nn.functional.softplus(-m)).sum()) / k
            acc += float((wt * (m > 0).float()).sum()) / k
        if best is None or loss < best["cv_loss"]:
            best = {"l2": l2, "folds": k, "cv_loss": loss, "cv_accuracy": acc}
    assert best is not None
    best["weight"] = fit_pairwise_head(diffs, weights, best["l2"])
    return best


def probe_head(model: ScalarHeadModel, groups: Sequence[Group], pad_id: int, batch_size: int = 8,
               amp: torch.dtype | None = None, seed: int = 0, dist: D.Dist | None = None) -> dict[str, Any]:
    """Fit the head to the frozen model's features at the training responses' last tokens (a linear probe, the
    first half of LP-FT: Kumar et al. 2022, fine-tuning from a fitted head distorts the features less than from a
    random one). One pass over the data without gradients, then ``select_probe``; sets the head (bias 0). Under
    data parallelism (``dist``) each process computes the features of its share of the groups and all fit the
    same head from all of them."""
    d = dist or D.Dist()
    feats = D.map_shards(lambda part: per_response(
        model, part, pad_id, lambda m, b: m.last_hidden(b["input_ids"], b["attention_mask"], b.get("rows")),
        batch_size, amp, desc="fit head" if d.main else ""), list(groups), d)
    diffs, weights, group = pair_differences(feats)
    fit = select_probe(diffs, weights, group, seed=seed)
    with torch.no_grad():
        model.head.weight.copy_(fit.pop("weight")[None].to(model.head.weight))
        model.head.bias.zero_()
    return fit


def run_reward(cfg: RewardConfig, explicit_train: set[str] | None = None, resume: bool = False) -> dict[str, Any]:
    """Train a reward model on ``cfg.data``; the run directory becomes the reward model."""
    from lmforge.peft import apply_peft
    from lmforge.stages.sft import suggested_lr
    from lmforge.train.state import load_training_checkpoint

    explicit_train = explicit_train or set()
    if cfg.head_init not in ("probe", "normal"):  # before the model loads
        raise LMForgeError(f"head_init={cfg.head_init!r}: allowed values are ['probe', 'normal']")
    if not math.isfinite(cfg.margin):
        raise LMForgeError(f"--margin {cfg.margin}: must be a finite number")
    check_epochs_max_len(cfg.epochs, cfg.data.max_len, zero_epochs=True)
    probe_only = cfg.epochs == 0  # the linear probe is the reward model: nothing is fine-tuned
    if probe_only and (cfg.head_init != "probe" or cfg.peft.get("method")):
        raise LMForgeError("--epochs 0 fine-tunes nothing: it makes the head fitted to the frozen model's features "
                           "the reward model, so it needs --head-init probe and no --peft")
    out = Path(cfg.out)
    device, dist, decoder, tok = start_fine_tuning(cfg, "reward")
    log = dist.log
    template = pick_template(tok, cfg.data.template)
    max_len = min(cfg.data.max_len, decoder.cfg.block_size) if cfg.data.max_len > 0 else decoder.cfg.block_size
    train_recs, val_recs = read_split(cfg.data, cfg.train.seed)
    train_g = [encode_group(tok, r, template, max_len) for r in train_recs]
    val_g = [encode_group(tok, r, template, max_len) for r in val_recs]
    check_batch_fits(cfg.train.batch_size, D.launched_world(), len(train_g), "prompts")
    check_distinct(train_g, max_len, "prompts", log)
    check_distinct(val_g, max_len, "prompts", log, held_out=True)

    method = cfg.peft.get("method") if cfg.peft else None
    resolved: dict[str, Any] = {}
    if method is not None:
        if method not in ("lora", "qlora"):
            raise LMForgeError(f"--peft {method}: a reward model trains with lora or qlora (the adapter is merged "
                               "into the saved reward model)")
        resolved = apply_peft(decoder, method, {k: v for k, v in cfg.peft.items() if k != "method"}, tok)
    model = ScalarHeadModel(decoder)  # the head is always trained
    model.head.requires_grad_(True)
    n_params = weight_count(model)  # quantized weights count as the weights they stand for
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    t = cfg.train
    pad = pad_id_of(tok)
    share = cfg.data.share_prompt and supports_branches(decoder.cfg)
    train = GroupBatches(train_g, t.batch_size, pad, seed=t.seed, rank=dist.rank, world=dist.world,
                         by_length=cfg.data.group_by_length, share_prefix=share)
    val = GroupBatches(val_g, t.batch_size, pad, shuffle=False, rank=dist.rank, world=dist.world,
                       by_length=cfg.data.group_by_length, share_prefix=share) if val_g else None
    steps = max(1, math.ceil(cfg.epochs * train.steps_per_epoch / t.grad_accum))
    # after a fitted head the features need only small changes (LP-FT): a tenth of the rate; on hh-rlhf the full
    # rate took SmolLM2's held-out accuracy from the probe's 0.607 down to 0.573 within 66 steps
    lr = suggested_lr(method, n_params) * (PROBED_LR_SCALE if cfg.head_init == "probe" else 1.0)
    chosen = {**stage_defaults(steps, lr, val is not None, warmup_div=20, t=t,
                              explicit=explicit_train),
              "best_metric": "val_accuracy", "best_mode": "max"}
    apply_defaults(t, chosen, explicit_train)
    if t.max_iters == 0 and not probe_only:  # (it saved the untrained head as the reward model)
        raise LMForgeError("--max-iters 0 fine-tunes nothing and would save an untrained head; for the head fitted "
                           "to the frozen features alone, use --epochs 0 --head-init probe")
    if val is None:
        t.eval_iters = 0
        if "best_metric" not in explicit_train:
            t.best_metric, t.best_mode = "val_loss", "min"
    pairs = sum(len(ranked_pairs(len(g))) for g in train_g)
    plan = "no fine-tuning (--epochs 0: the fitted head is the model)" if probe_only else \
        f"{plan_steps(cfg.epochs, steps, t.max_iters)} of {t.batch_size} prompts"
    log(f"reward: {len(train_g)} train prompts ({pairs} pairs) / {len(val_g)} held-out; {plan}; max_len {max_len}"
        f"{', responses share one pass over the prompt' if share else ''}; "
        f"{'template ' + template.name if template else 'plain text'}; "
        + (f"the head's {model.head.weight.numel() + 1:,} parameters fitted, {n_params:,} frozen" if probe_only else
           f"{'peft ' + method + ' ' + json.dumps(resolved) if method else 'full fine-tuning'}; trainable "
           f"{trainable:,} of {n_params:,} parameters; lr {t.lr:g}, margin {cfg.margin:g}, best by {t.best_metric}"))

    run_config = {**cfg.to_dict(), "resolved_peft": resolved, "train_prompts": len(train_g),
                  "val_prompts": len(val_g)}
    if cfg.head_init == "probe" and (probe_only or not resume):  # a resumed run has its head in the checkpoint
        model.to(device)
        fit = probe_head(model, train_g, pad, t.batch_size, train_precision(t, device, model, dist), t.seed,
                         dist)
        run_config["head_probe"] = fit
        log(f"head fitted to the frozen features of the training pairs (linear probe): L2 {fit['l2']:g} by "
            f"{fit['folds']}-fold cross-validation, held-out-fold accuracy {fit['cv_accuracy']:.3f}, "
            f"loss {fit['cv_loss']:.4f}")
    trainer = None if probe_only else Trainer(
        model, t, train, reward_loss_fn(cfg.margin), out, val_data=val, tokenizer=tok, run_config=run_config,
        device=device, dist=dist, log=log, units="prompts",
        stage="reward", same_on_resume=("model", "margin", "head_init", "data.template"),
        start_is_candidate=cfg.head_init == "probe")  # the fitted head alone may be the best
    try:
        if trainer is None:
            result: dict[str, Any] = {"step": 0}
            raw = model.to(device)
            if dist.main:
                out.mkdir(parents=True, exist_ok=True)
        else:
            result = trainer.fit(resume=resume)
            raw = trainer.raw_model
            best = out / "best"
            if dist.main and best.is_file() and (out / best.read_text().strip()).is_dir():  # the best checkpoint
                s = load_training_checkpoint(out / best.read_text().strip())
                raw.load_state_dict(s["train_model"] if s["train_model"] is not None else s["model"], strict=False)
                log(f"final model from {best.read_text().strip()} ({t.best_metric} {trainer.best_val:.4f})")
        D.broadcast_module(raw, dist)  # the first process's weights to every process: each scores a share
        if method is not None:
            from lmforge.peft.lora import unwrap

            unwrap(raw.decoder)  # adapter merged: the saved reward model needs no base
        # scored where it trained, in its precision (fp32 on the CPU: 15+ min for hh-rlhf's pairs on SmolLM2)
        amp = train_precision(t, next(raw.parameters()).device, raw, dist)

        def scores(groups: list[Group], desc: str, normalized: bool) -> list[list[float]]:
            return D.map_shards(lambda part: score_groups(raw, part, pad, t.batch_size, normalized=normalized,
                                                          amp=amp, desc=desc if dist.main else ""), groups, dist)

        raw_scores = [x for g in scores(train_g, "normalise", False) for x in g]
        if not raw.normalize(torch.tensor(raw_scores)):
            log(f"the {len(raw_scores)} training responses all score {raw_scores[0]:.4g}: the reward is centred, "
                "not scaled")
        extra = {"template": template.source if template else None, "margin": cfg.margin, "max_len": max_len,
                 "base_model": cfg.model, "peft": resolved or None,
                 "normalized_over": f"{len(raw_scores)} responses of {len(train_g)} training prompts"}
        if "head_probe" in run_config:
            extra["head_probe"] = run_config["head_probe"]
        if val_g:
            extra["val_accuracy"] = pair_accuracy(scores(val_g, "held-out", True))
            result["val_accuracy_final"] = extra["val_accuracy"]
            if probe_only:
                result["val_accuracy"] = extra["val_accuracy"]
        if dist.main:
            write_reward_dir(raw.to("cpu"), out, tok, template, extra)
            log(f"reward normalised: gain {raw.norm_gain.item():.4g}, bias {raw.norm_bias.item():.4g}")
        D.barrier(dist)
    finally:
        D.cleanup(dist)
    return {**result, "trainable_params": trainable, "total_params": n_params, "train_prompts": len(train_g),
            "val_prompts": len(val_g)}


def pair_accuracy(scores: Sequence[Sequence[float]]) -> float:
    """Fraction of ranked pairs (better, worse) whose better response scores higher."""
    hits = [s[i] > s[j] for s in scores for i, j in ranked_pairs(len(s))]
    return sum(hits) / max(1, len(hits))


def write_reward_dir(model: ScalarHeadModel, out: Path, tok, template, extra: dict) -> None:
    """The reward model's files into ``out`` (beside the run's metrics and checkpoints)."""
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        save_scalar_model(model, tmp / "m", tok, kind="reward", extra=extra)
        if template is not None:
            (tmp / "m" / CHAT_TEMPLATE_FILE).write_text(template.source)
        public_modes(tmp / "m")
        for f in (tmp / "m").iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- scoring ------------------------------------------------------------------------------------------------------


def load_reward_model(path: str | Path, device: str = "cpu") -> tuple[ScalarHeadModel, Any, Any]:
    """(reward model in eval mode, its tokenizer, its chat template or None for plain text) of a reward dir."""
    from lmforge.commands.args import find_tokenizer_path
    from lmforge.infer.chat import get_template
    from lmforge.tokenizer import load_tokenizer

    path = Path(path)
    model = load_scalar_model(path)
    tok_path = find_tokenizer_path(path, model.cfg.vocab_size)
    if tok_path is None:
        raise LMForgeError(f"{path}: no tokenizer beside the reward model")
    tok = load_tokenizer(str(tok_path))
    source = read_head_config(path).get("template")
    template = None
    if source:
        tok.chat_template = source
        template = get_template(source, tok)
    return model.to(D.pick_device(device)), tok, template


def scoring_len(path: str | Path, model: ScalarHeadModel, max_len: int = 0) -> int:
    """The tokens a (prompt, response) is cut to for a reward model's score: ``max_len``, else the length it was
    trained with (its head config), within its context."""
    max_len = max_len or int(read_head_config(path).get("max_len") or 0)
    return min(max_len, model.cfg.block_size) if max_len > 0 else model.cfg.block_size


def score_file(model_dir: str, data: str, output: str | None, max_len: int = 0, batch_size: int = 8
               ) -> float:
    """Score every ranked pair of ``data`` with the reward model; JSONL per pair to ``output`` (or stdout); returns
    the pairwise accuracy."""
    model, tok, template = load_reward_model(model_dir, "auto")
    ml = scoring_len(model_dir, model, max_len)
    recs = read_preference_file(data)
    groups = [encode_group(tok, r, template, ml) for r in recs]
    scores = score_groups(model, groups, pad_id_of(tok), batch_size)
    lines = []
    for rec, s in zip(recs, scores):
        for i, j in ranked_pairs(len(s)):
            row = {"source": rec.source, "better": i, "worse": j, "chosen_score": s[i], "rejected_score": s[j],
                   "margin": s[i] - s[j], "correct": s[i] > s[j]}
            lines.append(json.dumps(row))
    text = "\n".join(lines) + "\n"
    if output:
        write_text_atomic(output, text)
    else:
        sys.stdout.write(text)
    return pair_accuracy(scores)
