"""Direct preference optimisation (``lmforge dpo``) on the one Trainer.

Data: the reward model's formats (ranked lists become all their pairs) plus TRL's flat {prompt, chosen, rejected}
strings; a model without a chat template is trained on prompt + response joined as plain text. Every log-prob sum
covers response tokens only (``encode_response`` masks the prompt).

The reference: under full fine-tuning the reference log-probs of the pairs the run will use (its first ``max_iters``
steps' training pairs, the held-out pairs its evaluations score) are computed once, before training, and stored in
``<out>/reference_logprobs.safetensors`` (a resumed run reads them back, computing from the starting model only the
pairs a longer run adds; a pair not planned for, such as those a loss spike's skip reaches, is scored by a second copy
of the starting model loaded when first needed); under PEFT the reference is the same model with its adapters
disabled, computed in each step.

The run directory becomes the final model, as for SFT: a full checkpoint, or the adapter (with its base recorded).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from lmforge.errors import LMForgeError
from lmforge.loading import load_model_and_tokenizer, start_fine_tuning
from lmforge.losses import DPO_LOSS_TYPES, dpo_loss, ranked_pairs, sequence_logprobs, token_logprobs
from lmforge.model.decoder import supports_branches
from lmforge.peft.base import disable_adapter
from lmforge.quant import weight_count
from lmforge.stages.reward import (
    CHAT_TEMPLATE_FILE,
    GroupBatches,
    PrefData,
    check_distinct,
    encode_group,
    longest_first,
    pad_id_of,
    pick_template,
    read_split,
)
from lmforge.train import distributed as D
from lmforge.train.batches import check_batch_fits
from lmforge.train.config import TrainConfig, _fill, apply_defaults, check_epochs_max_len, plan_steps, stage_defaults
from lmforge.train.loop import Trainer, autocast, to_device, train_precision

REFERENCE_FILE = "reference_logprobs.safetensors"


@dataclass
class DPOConfig:
    model: str = ""
    tokenizer: str = ""
    data: PrefData = field(default_factory=PrefData)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: dict[str, Any] = field(default_factory=dict)
    loss: str = "sigmoid"  # sigmoid | ipo | hinge
    beta: float = 0.1
    label_smoothing: float = 0.0
    epochs: float = 1.0
    out: str = "runs/dpo"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_dpo_config(d: dict[str, Any], where: str) -> DPOConfig:
    return _fill(DPOConfig, d, where)


def pair_groups(tok, recs, template, max_len: int) -> list[list[dict[str, Any]]]:
    """One (better, worse) group of two encoded responses per pair of every record."""
    return [encode_group(tok, r, template, max_len, (i, j)) for r in recs for i, j in ranked_pairs(len(r.responses))]


def response_logprobs(model, batch: dict[str, Any]) -> torch.Tensor:
    """Summed log-probs of the response tokens of every row (prompt and padding excluded). The output layer runs on
    the response positions only (not where FSDP shards it: there the wrapped forward gathers it). With
    ``batch["rows"]`` (``shared_rows``) a pair's prompt runs once for both responses."""
    ids, mask, rows = batch["input_ids"], batch["loss_mask"], batch.get("rows")

    def at_positions(sel, **kw) -> torch.Tensor:  # the output at positions ``sel`` of the per-response layout
        if rows is None:
            return model(ids, **kw)[sel]
        flat = model(rows["input_ids"], position_ids=rows["position_ids"], branch_ids=rows["branch_ids"], **kw)
        return flat.flatten(0, 1)[rows["index"][sel]]

    head = getattr(getattr(model, "module", model), "lm_head", None)
    if head is None or hasattr(getattr(head, "weight", None), "full_tensor"):
        return sequence_logprobs(at_positions((slice(None), slice(None))), ids, mask)
    at = mask[:, 1:].bool().nonzero(as_tuple=True)  # predecessors of the response tokens
    h = at_positions(at, head=False)
    lp = token_logprobs(head(h), ids[:, 1:][at])
    return torch.zeros(ids.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, at[0], lp)


def dpo_loss_fn(loss_type: str, beta: float, label_smoothing: float, peft: bool, late=None):
    """loss_fn for the Trainer: rows 0, 2, ... chosen, 1, 3, ... rejected; the reference from ``batch["ref"]``
    (stored; NaN where not computed ahead: then ``late(batch)``) or, under PEFT, from the model with its adapters
    disabled. Count = pairs."""

    def loss_fn(model, batch):
        lp = response_logprobs(model, batch)
        if peft:
            with torch.no_grad(), disable_adapter(model):
                ref = response_logprobs(model, batch)
        else:
            ref = batch["ref"]
            if late is not None and bool(torch.isnan(ref).any()):
                ref = late(batch).to(ref)
        lengths = batch["loss_mask"][:, 1:].sum(-1)
        loss, metrics = dpo_loss(lp[0::2], lp[1::2], ref[0::2], ref[1::2], beta, loss_type, label_smoothing,
                                 lengths[0::2], lengths[1::2], reduction="sum")
        return loss, lp.shape[0] // 2, metrics

    return loss_fn


@torch.no_grad()
def reference_logprobs(model, groups, pad_id: int, batch_size: int, amp: torch.dtype | None = None,
                       share_prefix: bool = False) -> torch.Tensor:
    """(pairs, 2) summed response log-probs of the model as it is (eval mode), under the trainer's precision."""
    was = model.training
    model.eval()
    order = longest_first(groups, share_prefix)
    src = GroupBatches([groups[i] for i in order], batch_size, pad_id, shuffle=False,  # by length: less padding
                       share_prefix=share_prefix)
    device = next(model.parameters()).device
    with autocast(device, amp):
        out = [response_logprobs(model, to_device(b, device)).view(-1, 2) for b in src.fixed_batches(0, 0)]
    model.train(was)
    res = torch.empty(len(groups), 2)
    res[torch.tensor(order)] = torch.cat(out).float().cpu()
    return res


class LateReference:
    """The reference log-probs of a batch whose pairs were not computed before training (a loss spike's skip reaches
    past the planned steps): a second copy of the starting model, loaded when first needed."""

    def __init__(self, path: str, tokenizer: str, device: torch.device, log) -> None:
        self.path, self.tokenizer, self.device, self.log = path, tokenizer, device, log
        self.model = None

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.model is None:
            self.log(f"dpo: reference log-probs of pairs not computed ahead: from a second copy of {self.path}")
            self.model = load_model_and_tokenizer(self.path, self.tokenizer or None, "cpu")[0]
            self.model.requires_grad_(False).eval().to(self.device)
        return response_logprobs(self.model, batch)


def _attach(groups, ref: torch.Tensor) -> None:
    for g, r in zip(groups, ref.tolist()):
        g[0]["ref"], g[1]["ref"] = r[0], r[1]


def reference_key(model: torch.nn.Module, splits: list[list]) -> str:
    """What stored reference log-probs belong to: the reference model's weights (a float64 sum per tensor) and every
    pair's tokens and scored positions in each split (the data, template, tokenizer and length limit)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + struct.pack("<d", t.detach().float().sum(dtype=torch.float64).item()))
    for groups in splits:
        h.update(b"#split")
        for r in (r for g in groups for r in g):
            h.update(np.asarray(r["input_ids"], np.int64).tobytes() + b"|")
            h.update(np.asarray(r["labels"], np.int64).tobytes() + b"|")
    return h.hexdigest()


def _stored_reference(path: Path, key: str, counts: tuple[int, int], resume: bool) -> dict[str, torch.Tensor] | None:
    """The reference log-probs stored with the run when they belong to this model and these pairs (``key``), else
    None (they are computed again); a resumed run refuses others (its policy was trained against them)."""
    from safetensors import safe_open

    if not path.is_file():
        if resume and (path.parent / "adapter_config.json").is_file():  # (it said the reference was missing)
            raise LMForgeError(f"{path.parent}: a --peft run (adapter_config.json): resume it with the same --peft")
        if resume:
            raise LMForgeError(f"{path} is missing: cannot resume full-model DPO without the reference")
        return None
    with safe_open(str(path), "pt") as f:
        stored = (f.metadata() or {}).get("key")
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if stored == key or (stored is None and resume and (sd["train"].shape[0], sd["val"].shape[0]) == counts):
        return sd  # (a file of an earlier lmforge has no key: its pair counts are checked)
    if resume:
        raise LMForgeError(f"{path}: stored for another reference model, template or data than this run's: resume "
                           "with the --model, --template, --data and --data.max_len the run started with")
    return None


def _reference(model, out: Path, groups: dict[str, list], need: dict[str, set[int]], resume: bool,
               device: torch.device, dist, log, precision, score) -> None:
    """Attach the reference log-probs of every pair (NaN where not needed): read from the run's file, the needed ones
    it lacks computed by ``score(groups, precision())`` with the starting model and the file written again."""
    path = out / REFERENCE_FILE
    out.mkdir(parents=True, exist_ok=True)
    key = reference_key(model, [groups["train"], groups["val"]])
    sd = _stored_reference(path, key, (len(groups["train"]), len(groups["val"])), resume)
    if sd is None:
        sd = {k: torch.full((len(g), 2), math.nan) for k, g in groups.items()}
    absent = {k: torch.isnan(sd[k][:, 0]).tolist() for k in groups}
    missing = {k: sorted(i for i in need[k] if absent[k][i]) for k in groups}
    n = sum(map(len, missing.values()))
    if n:
        model.to(device)
        amp = precision()  # (every process: under torchrun the first one's choice is shared)
        for k, idx in missing.items():  # each process computes its share (torchrun), all get all
            rows = D.map_shards(lambda part: list(score(part, amp)), [groups[k][i] for i in idx], dist)
            if rows:
                sd[k][torch.tensor(idx)] = torch.stack(rows).float()
        model.to("cpu")
        if dist.main:
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"key": key})
            tmp.replace(path)  # whole or absent: a resumed run reads it back
        total = sum(len(g) for g in groups.values())
        log(f"reference log-probs of {n} pairs computed (those this run uses, of {total}) and stored in {path}")
    else:
        log(f"reference log-probs read from {path}")
    _attach(groups["train"], sd["train"])
    _attach(groups["val"], sd["val"])


def run_dpo(cfg: DPOConfig, explicit_train: set[str] | None = None, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg.model`` with DPO on ``cfg.data``; the run directory becomes the model."""
    from lmforge.peft import apply_peft, save_adapter
    from lmforge.stages.sft import POLICY_LR_SCALE, check_full_finetune, suggested_lr, write_final

    if cfg.loss not in DPO_LOSS_TYPES:
        raise LMForgeError(f"--loss {cfg.loss}: allowed values are {', '.join(DPO_LOSS_TYPES)}")
    if not 0 < cfg.beta < math.inf:  # (NaN fails too)
        raise LMForgeError(f"--beta {cfg.beta}: must be a positive number")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise LMForgeError(f"--label-smoothing {cfg.label_smoothing}: must be in [0, 0.5)")
    if cfg.label_smoothing and cfg.loss != "sigmoid":  # (accepted, and ignored)
        raise LMForgeError(f"--label-smoothing {cfg.label_smoothing:g}: conservative DPO's smoothing is of the sigmoid "
                           f"loss; --loss {cfg.loss} has none")
    explicit_train = explicit_train or set()
    check_epochs_max_len(cfg.epochs, cfg.data.max_len)
    out = Path(cfg.out)
    device, dist, model, tok = start_fine_tuning(cfg, "dpo")
    log = dist.log
    template = pick_template(tok, cfg.data.template)
    max_len = min(cfg.data.max_len, model.cfg.block_size) if cfg.data.max_len > 0 else model.cfg.block_size
    train_recs, val_recs = read_split(cfg.data, cfg.train.seed)
    train_g, val_g = pair_groups(tok, train_recs, template, max_len), pair_groups(tok, val_recs, template, max_len)
    if not train_g:
        raise LMForgeError(f"{cfg.data.path}: no training pairs")
    check_batch_fits(cfg.train.batch_size, D.launched_world(), len(train_g), "pairs")
    check_distinct(train_g, max_len, "pairs", log)
    check_distinct(val_g, max_len, "pairs", log, held_out=True)
    method = cfg.peft.get("method") if cfg.peft else None
    if method is None:
        check_full_finetune(model, cfg.model)
    t = cfg.train
    pad = pad_id_of(tok)
    share = cfg.data.share_prompt and supports_branches(model.cfg)

    resolved: dict[str, Any] = {}
    if method is not None:
        resolved = apply_peft(model, method, {k: v for k, v in cfg.peft.items() if k != "method"}, tok)
    n_params = weight_count(model)  # quantized weights count as the weights they stand for
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    train = GroupBatches(train_g, t.batch_size, pad, seed=t.seed, rank=dist.rank, world=dist.world,
                         by_length=cfg.data.group_by_length, share_prefix=share)
    val = GroupBatches(val_g, t.batch_size, pad, shuffle=False, rank=dist.rank, world=dist.world,
                       by_length=cfg.data.group_by_length, share_prefix=share) if val_g else None
    steps = max(1, math.ceil(cfg.epochs * train.steps_per_epoch / t.grad_accum))
    apply_defaults(t, stage_defaults(steps, suggested_lr(method, n_params) * POLICY_LR_SCALE, val is not None, t=t,
                                    explicit=explicit_train), explicit_train)
    if val is None:
        t.eval_iters = 0
    if method is None:  # the reference log-probs of the pairs the run will use, stored with the run
        need = {"train": train.upcoming(t.max_iters * t.grad_accum),
                "val": set(range(min(len(val_g), t.eval_iters * val.batch_size * val.world))) if val else set()}
        _reference(model, out, {"train": train_g, "val": val_g}, need, resume, device, dist, log,
                   lambda: train_precision(t, device, model, dist),
                   lambda gs, amp: reference_logprobs(model, gs, pad, t.batch_size, amp, share))
    ref_note = (f"peft {method} {json.dumps(resolved)}, reference = adapters disabled" if method
                else "full fine-tuning, stored reference")
    log(f"dpo: {len(train_g)} train / {len(val_g)} held-out pairs; loss {cfg.loss}, beta {cfg.beta:g}, label "
        f"smoothing {cfg.label_smoothing:g}; {plan_steps(cfg.epochs, steps, t.max_iters)} of {t.batch_size} pairs; "
        f"max_len {max_len}{', both responses share one pass over the prompt' if share else ''}; "
        f"{'template ' + template.name if template else 'plain text'}; "
        f"{ref_note}; "
        f"trainable {trainable:,} of {n_params:,} parameters; lr {t.lr:g}")

    base_ref = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model

    def export(m, d: Path) -> None:
        if method is not None:
            save_adapter(m, d / ".adapter", base_ref, resolved, method)
            for f in (d / ".adapter").iterdir():
                f.replace(d / f.name)
            (d / ".adapter").rmdir()
            tok.save(str(d))
        if template is not None:
            (d / CHAT_TEMPLATE_FILE).write_text(template.source)

    run_config = {**cfg.to_dict(), "resolved_peft": resolved, "train_pairs": len(train_g), "val_pairs": len(val_g)}
    late = None if method else LateReference(cfg.model, cfg.tokenizer, device, log)
    trainer = Trainer(model, t, train, dpo_loss_fn(cfg.loss, cfg.beta, cfg.label_smoothing, method is not None, late),
                      out, val_data=val, tokenizer=tok, run_config=run_config, device=device, dist=dist, log=log,
                      export_fn=export, units="pairs",
                      stage="dpo", same_on_resume=("model", "loss", "beta", "label_smoothing", "data.template"))
    try:
        result = trainer.fit(resume=resume)
        if dist.main:
            with trainer.averaged_weights():
                write_final(trainer.raw_model, out, tok, export, method is not None)
        D.barrier(dist)
    finally:
        D.cleanup(dist)
    return {**result, "trainable_params": trainable, "total_params": n_params, "train_pairs": len(train_g),
            "val_pairs": len(val_g)}
