"""The one training loop shared by every stage (pretrain, sft, reward, ppo, dpo).

A stage supplies the model, batch sources (``lmforge.train.batches.BatchSource``) and a loss function
``loss_fn(model, batch) -> (loss_sum, n)`` or ``(loss_sum, n, metrics)``: ``loss_sum`` is the loss *summed* over
the batch's ``n`` units (target tokens, pairs, ...) and ``metrics`` maps names to sums over the same units. The
Trainer normalises by the number of units over the whole optimizer step (every micro-batch of the accumulation and
every rank), so micro-batches with different token counts give the gradient of one big batch. It does the rest:
AdamW + schedule, accumulation, clipping, precision, checkpointing and exact resume, loss-spike rollback,
evaluation and best-checkpoint selection on any logged metric, metrics (JSONL, TensorBoard/W&B), progress bar,
loss curve PNG, and DDP/FSDP. A model with frozen parameters (PEFT) is checkpointed as its trainable weights only;
a stage's ``export_fn`` writes the loadable model files (adapter files and a reference to the base) beside them.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.eval import run_task
from lmforge.files import DirLock, read_cache, write_cache
from lmforge.matmul import linear
from lmforge.train import distributed as D
from lmforge.train.batches import StreamMismatch
from lmforge.train.config import CHOICES, TrainConfig
from lmforge.train.metrics import MetricsWriter, model_flops_per_token, plot_losses
from lmforge.train.optim import lr_at, make_optimizer
from lmforge.train.state import (
    EMA_WEIGHTS,
    TRAIN_WEIGHTS,
    NoUsableCheckpoint,
    checkpoint_step,
    clean_partial_saves,
    list_checkpoints,
    load_training_checkpoint,
    move_aside,
    prune,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)

LossFn = Callable[[nn.Module, dict[str, Any]], tuple]
ExportFn = Callable[[nn.Module, Path], None]


def _unpack(out: tuple) -> tuple[torch.Tensor, float, dict[str, float]]:
    """(loss_sum, n) or (loss_sum, n, metrics) -> (loss_sum, n, {name: sum})."""
    loss, n = out[0], float(out[1])
    metrics = out[2] if len(out) > 2 else {}
    return loss, n, {k: float(v) for k, v in metrics.items()}


def pick_precision(name: str, device: torch.device, model: nn.Module | None = None,
                   tokens: int = 2048) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32. ``auto``: bf16 on CUDA (fp16 if bf16 is unsupported); on a CPU with
    bf16 instructions, bf16 only if it is measured faster for this model's layer shapes (``bf16_is_faster``: cast
    overhead makes narrow layers slower in bf16 even where wide ones gain); fp32 elsewhere."""
    if name == "fp32":
        return None
    if name in ("bf16", "fp16"):
        return torch.bfloat16 if name == "bf16" else torch.float16
    if name != "auto":
        raise LMForgeError(f"train.precision={name!r}: allowed values are {list(CHOICES['precision'])}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu" or model is None or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return torch.bfloat16 if bf16_is_faster(model, tokens) else None


def train_precision(cfg: TrainConfig, device: torch.device, model: nn.Module,
                    dist: D.Dist | None = None) -> torch.dtype | None:
    """The autocast dtype the Trainer uses for ``model`` (stages that run the model before training, e.g. DPO's
    reference pass, use the same so that the policy starts exactly at the reference). With ``dist`` (torchrun) every
    process takes the first one's choice: ``auto`` on a CPU times kernels in each process, and processes that measured
    differently (one of them loaded) would compute in different precisions."""
    tokens = cfg.batch_size * getattr(getattr(model, "cfg", None), "block_size", 256)
    dtype = pick_precision(cfg.precision, device, model, min(tokens, 4096))
    if dist is not None and dist.enabled and cfg.precision == "auto" and device.type == "cpu":
        first = D.sum_all([float(dtype is not None) if dist.main else 0.0], dist)[0]
        dtype = torch.bfloat16 if first > 0.5 else None
    return dtype


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or nothing for None (fp32)."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


_BF16_FASTER: dict[tuple, bool] = {}


def bf16_is_faster(model: nn.Module, tokens: int) -> bool:
    """Time forward + backward of each distinct linear shape of ``model`` (weighted by how often it occurs) on
    ``tokens`` rows in fp32 and under bf16 autocast; cached per (shapes, tokens)."""
    shapes: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            shapes[tuple(m.weight.shape)] = shapes.get(tuple(m.weight.shape), 0) + 1
    key = (tuple(sorted(shapes.items())), tokens)
    # decided once per machine, library version, thread count and shapes, and remembered on disk: a decision timed
    # anew by every run made runs of one seed differ, and a resumed run could switch precision under load
    disk = f"{_cpu_name()}|torch {torch.__version__}|{torch.get_num_threads()} threads|{key}"
    cache = read_cache(PRECISION_CACHE) if key not in _BF16_FASTER else {}
    if isinstance(cache.get(disk), bool):
        _BF16_FASTER[key] = cache[disk]
    if key not in _BF16_FASTER:
        g = torch.Generator().manual_seed(0)  # never the global RNG (exact resume)
        total = {None: 0.0, torch.bfloat16: 0.0}
        for (out_f, in_f), count in shapes.items():
            w = torch.randn(out_f, in_f, generator=g, requires_grad=True)
            x = torch.randn(tokens, in_f, generator=g, requires_grad=True)
            best = dict.fromkeys(total, math.inf)
            for _ in range(3):  # the two in turn, so that a burst of load elsewhere slows both alike
                for dtype in total:
                    t0 = time.perf_counter()
                    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                        y = linear(x, w)  # float32: the library the model's layers use (lmforge.matmul)
                    y.float().sum().backward()
                    best[dtype] = min(best[dtype], time.perf_counter() - t0)
            for dtype in total:
                total[dtype] += best[dtype] * count
        _BF16_FASTER[key] = total[torch.bfloat16] < 0.9 * total[None]  # a clear win only
        write_cache(PRECISION_CACHE, {**dict(list(cache.items())[-255:]), disk: _BF16_FASTER[key]})
    return _BF16_FASTER[key]


PRECISION_CACHE = "precision.json"
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _flat(d: Any, prefix: str) -> dict[str, Any]:
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}
    return {prefix: d}


def same_setting(a: Any, b: Any) -> bool:
    """Equal settings; paths that name the same existing file alike (a run resumed from another directory)."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return False


def run_differences(saved: dict[str, Any], mine: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """``key saved (this run: mine)`` for each setting of ``keys`` (sections compared key by key) that differs; keys
    a checkpoint of an earlier lmforge did not record are not compared."""
    out = []
    for key in keys:
        head, _, sub = key.partition(".")  # "data.template": one key of a section
        if head not in saved or (sub and sub not in (saved[head] or {})):
            continue
        old = _flat(saved[head][sub] if sub else saved[head], key)
        new = _flat((mine.get(head) or {}).get(sub) if sub else mine.get(head), key)
        for k in sorted(set(old) | set(new)):
            if not same_setting(old.get(k), new.get(k)):  # (the adapters' settings as resolved, named as given)
                name = "peft." + k.removeprefix("resolved_peft.") if k.startswith("resolved_peft.") else k
                out.append(f"{name} {_show(old.get(k))} (this run: {_show(new.get(k))})")
    return out


def _show(v: Any) -> str:
    return "none" if v in (None, "", {}) else str(v)


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, train_data, loss_fn: LossFn, out_dir: str | Path,
                 val_data=None, tokenizer=None, run_config: dict[str, Any] | None = None,
                 sample_fn: Callable[[nn.Module], str] | None = None, device: torch.device | None = None,
                 dist: D.Dist | None = None, log=None, export_fn: ExportFn | None = None,
                 units: str = "tokens", start_is_candidate: bool = False, same_on_resume: tuple[str, ...] = (),
                 stage: str | None = None) -> None:
        """``start_is_candidate``: the starting weights can be the best (e.g. a reward head fitted before training):
        when the evaluation at step 0 is the best so far, they are checkpointed and marked best like any later step's
        (otherwise only steps after 0 count). ``same_on_resume``: keys of ``run_config`` (a section: all its keys)
        that define the run: a checkpoint trained with other values is not resumed from (the objective, the model;
        the adapters, always compared as resolved: a forgotten flag switched them mid-run without a word).
        ``stage``: what trains (sft, dpo, ...), kept in ``run_config``: a run of another stage in the same directory
        is not resumed from."""
        self.cfg = cfg
        self.same_on_resume = (*same_on_resume, "peft.method", "resolved_peft")  # (a stage's adapters as resolved)
        self.start_is_candidate = start_is_candidate
        self.device = device or torch.device("cpu")
        self.dist = dist or D.Dist()
        self.out = Path(out_dir)
        self.train_data, self.val_data = train_data, val_data
        self.loss_fn, self.sample_fn, self.export_fn = loss_fn, sample_fn, export_fn
        self.count_tokens = units == "tokens"  # the loss's units are tokens: throughput and MFU are meaningful
        self.units = units
        self.last_eval: dict[str, float] = {}
        self.tokenizer = tokenizer
        self.run_config = {**(run_config or {}), **({"stage": stage} if stage else {})}
        self.log = log or (lambda msg: print(msg, file=sys.stderr) if self.dist.main else None)
        self.raw_model = model.to(self.device)
        if cfg.gradient_checkpointing:  # every decoder inside (a reward model's, PPO's actor and critic too)
            for m in self.raw_model.modules():
                if hasattr(m, "gradient_checkpointing"):
                    m.gradient_checkpointing = True
        if cfg.eval_tasks and self.dist.enabled and cfg.distributed == "fsdp":  # (they were skipped silently)
            raise LMForgeError("train.eval_tasks: not run under train.distributed=fsdp (no process holds the whole "
                               "model); use ddp, or run lmforge eval on the checkpoints")
        self.model = D.wrap(self.raw_model, self.dist, cfg.distributed, self.device)
        if cfg.compile:
            self.model = torch.compile(self.model)
        # a model with frozen parameters (PEFT) trains and checkpoints only the trainable ones
        self.trainable = {k: p for k, p in self.raw_model.named_parameters() if p.requires_grad}
        self.partial = len(self.trainable) < len(dict(self.raw_model.named_parameters()))
        if not self.trainable:
            raise LMForgeError("the model has no trainable parameters")
        cfg.check()  # (a stage may have set some of them after the config was read)
        self.optimizer = make_optimizer(self.raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps,
                                        cfg.decay_embeddings, self.device.type)
        self.set_precision(train_precision(cfg, self.device, self.raw_model, self.dist))
        self.step = 0
        self.best_val = math.inf if cfg.best_mode == "min" else -math.inf  # best value of train.best_metric
        self.recent: deque[float] = deque(maxlen=cfg.spike_window)
        self.rollbacks = 0
        self.last_ckpt: Path | None = None
        self.interrupted = False  # a Ctrl-C noted under torchrun, acted on by every process at once
        self.rolled_back_step: int | None = None  # the step the last rollback went back to (evaluated already)
        self.ema: dict[str, torch.Tensor] | None = None
        if cfg.ema_decay:
            if not 0.0 < cfg.ema_decay < 1.0:
                raise LMForgeError(f"train.ema_decay={cfg.ema_decay}: must be in (0, 1), or 0 for off")
            # under FSDP the parameters are sharded DTensors and so is their average (each rank keeps its shard)
            self.ema = {k: p.detach().clone() for k, p in self.trainable.items()}

    # ---- state --------------------------------------------------------------------------------
    def set_precision(self, dtype: torch.dtype | None) -> None:
        self.amp_dtype = dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "best_val": self.best_val, "recent": list(self.recent),
                "rollbacks": self.rollbacks, "train_data": self.train_data.state_dict(),
                "run_config": self.run_config, "precision": PRECISION_NAMES[self.amp_dtype]}

    def save(self) -> Path | None:
        msd, osd = D.full_state(self.model, self.optimizer, self.dist)
        ema = None if self.ema is None else {k: D.full_tensor(e).cpu() for k, e in self.ema.items()}  # every rank
        rngs = D.gather_objects(rng_state(), self.dist)  # every rank's generators: its dropout masks are its own
        path = None
        if self.dist.main:
            msd = {k: v for k, v in msd.items() if not (self.raw_model.cfg.tie_embeddings and _is_lm_head(k))}
            msd = _drop_tied_heads(msd)
            if self.partial:
                msd = {k: v for k, v in msd.items() if k in self.trainable}
            train_sd = None
            if self.ema is not None:  # the model file is the average; the raw weights are kept to resume from
                train_sd, msd = msd, {k: ema.get(k, v) for k, v in msd.items()}
            export = None
            if self.export_fn is not None:
                def export(d: Path) -> None:
                    with self.averaged_weights():
                        self.export_fn(self.raw_model, d)
            name = None
            if self.partial:  # only trainable weights: the raw ones to resume from (and their average, if any)
                name = TRAIN_WEIGHTS if train_sd is None else EMA_WEIGHTS
            path = save_training_checkpoint(self.out, self.step, msd, self.raw_model.cfg, osd, self.trainer_state(),
                                            self.tokenizer, train_sd, export=export, weights_name=name,
                                            rng={**rngs[0], "ranks": rngs[1:]} if len(rngs) > 1 else rngs[0])
            protect = {path.name}
            best = self.out / "best"
            if best.exists():
                protect.add(best.read_text().strip())
            prune(self.out, self.cfg.keep_last, protect)
        D.barrier(self.dist)
        self.last_ckpt = self.out / f"ckpt-{self.step:07d}"
        return path

    def restore(self, ckpt: Path) -> None:
        s = load_training_checkpoint(ckpt)
        t = s["trainer"]
        theirs, mine = (t.get("run_config") or {}).get("stage"), self.run_config.get("stage")
        if theirs and mine and theirs != mine:  # (its optimizer, data stream and best score are another objective's)
            raise StreamMismatch(f"it is a checkpoint of lmforge {theirs}, this is lmforge {mine}: give another --out, "
                                 "or --overwrite to start again")
        changed = run_differences(t.get("run_config") or {}, self.run_config, self.same_on_resume)
        if changed:
            raise StreamMismatch(f"it was trained with {'; '.join(changed)}: resume with the same settings, or pass "
                                 "--overwrite to start again")
        self.train_data.load_state_dict(t["train_data"])  # first: a stream of another shape loads nothing else
        msd = s["train_model"] if s["train_model"] is not None else s["model"]
        if self.raw_model.cfg.tie_embeddings and "wte.weight" in msd:
            msd["lm_head.weight"] = msd["wte.weight"]
        if self.ema is not None:  # a checkpoint written without EMA starts the average at its weights
            avg = dict(msd)
            if s["train_model"] is not None:
                avg.update(s["model"])
                if self.raw_model.cfg.tie_embeddings and "wte.weight" in s["model"]:  # one tensor, two names
                    avg["lm_head.weight"] = avg["wte.weight"]
            # load the average through the model (so it is sharded like the parameters), keep it, then the raw ones
            self._load_state(avg, s["optimizer"])
            params = dict(self.raw_model.named_parameters())
            with torch.no_grad():
                for k, e in self.ema.items():
                    e.copy_(params[k].detach())
        self._load_state(msd, s["optimizer"])
        rng, ranks = s["rng"], s["rng"].get("ranks") or []
        # each rank's own generators (a checkpoint written before they were kept gives every rank rank 0's)
        set_rng_state(ranks[self.dist.rank - 1] if 0 < self.dist.rank <= len(ranks) else rng)
        self.step, self.best_val, self.rollbacks = t["step"], t["best_val"], t["rollbacks"]
        self.recent = deque(t["recent"], maxlen=self.cfg.spike_window)
        self.last_ckpt = ckpt
        saved = {v: k for k, v in PRECISION_NAMES.items()}.get(t.get("precision"), self.amp_dtype)
        if self.cfg.precision == "auto" and saved != self.amp_dtype:  # the run goes on as it began (exact resume)
            self.log(f"{ckpt.name} was trained in {PRECISION_NAMES[saved]}: continuing in it (train.precision auto)")
            self.set_precision(saved)

    def _load_state(self, msd: dict[str, torch.Tensor], osd: dict[str, Any]) -> None:
        try:
            D.load_full_state(self.model, self.optimizer, msd, osd, self.dist)
        except ValueError as e:  # (torch: "loaded state dict contains a parameter group that doesn't match ...")
            raise StreamMismatch(f"its optimizer state holds other parameters than this run trains (another stage's, "
                                 f"model's or adapter's run?): {e}") from None

    def resume(self) -> bool:
        """Continue from the newest checkpoint that verifies and loads; damaged newer ones are moved aside (never
        deleted). Checkpoints present but none usable: refuse (NoUsableCheckpoint) and change nothing."""
        if self.dist.main:
            clean_partial_saves(self.out, warn=self.log)
        damaged: list[tuple[Path, str]] = []
        for ckpt in reversed(list_checkpoints(self.out)):
            try:
                self.restore(ckpt)
            except StreamMismatch as e:  # not damage: nothing is moved aside, nothing older is tried
                raise LMForgeError(f"{ckpt}: cannot resume from it: {e}") from None
            except LMForgeError as e:  # a failed checksum, or a file refused by weights_only
                damaged.append((ckpt, str(e).removeprefix(f"{ckpt}: ")))
                self.log(f"skipping {e}")
                continue
            for bad, _ in damaged if self.dist.main else []:
                self.log(f"moved damaged {bad} to {move_aside(bad)}")
            self.log(f"resumed from {ckpt} at step {self.step}")
            return True
        if damaged:
            raise NoUsableCheckpoint(self.out, damaged)
        self.log(f"no complete checkpoint in {self.out}: starting from scratch")
        return False

    def _defer_interrupt(self) -> Any:
        """Under torchrun a Ctrl-C reaches each process at another point of its step: one that stopped at once to
        save met the other inside a collective of the step, and both waited for ever. The first Ctrl-C is noted
        instead, and every process stops at the next step's reduction; a second one stops at once. Returns the
        previous handler (None where signals cannot be handled: not the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def note(signum, frame) -> None:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            self.log("interrupted: stopping every process at the end of this step (Ctrl-C again: at once)")

        return signal.signal(signal.SIGINT, note)

    # ---- one optimizer step -------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _micro(self, batch: dict[str, Any], model: nn.Module | None = None) -> tuple[torch.Tensor, float,
                                                                                  dict[str, float]]:
        batch = to_device(batch, self.device)
        with self._autocast():
            return _unpack(self.loss_fn(self.model if model is None else model, batch))

    def train_step(self) -> tuple[float, float, int, dict[str, float]]:
        """Forward/backward over grad_accum micro-batches, normalise by the step's units (all micro-batches and
        ranks), clip; returns (loss, grad norm, units, metrics). No update."""
        cfg = self.cfg
        total, units, sums = 0.0, 0.0, {}
        for i in range(cfg.grad_accum):
            batch = self.train_data.next_batch()
            sync = i == cfg.grad_accum - 1
            ctx = self.model.no_sync() if (not sync and hasattr(self.model, "no_sync")) else contextlib.nullcontext()
            with ctx:
                loss, n, metrics = self._micro(batch)
                self.scaler.scale(loss).backward()
            total += loss.item()
            units += n
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        keys = sorted(sums)
        total, units, stop, *vals = D.sum_all([total, units, float(self.interrupted), *(sums[k] for k in keys)],
                                              self.dist)
        if stop:  # one process was interrupted: all stop here together (the step is rewound, not taken)
            raise KeyboardInterrupt
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.trainable.values() if p.grad is not None]
        if units > 0 and grads:  # gradients are of the sum (averaged over ranks by DDP/FSDP): make them the mean
            torch._foreach_mul_(grads, self.dist.world / units)
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else torch.zeros(())
        denom = max(units, 1.0)
        return total / denom if units else math.nan, float(norm), int(units), {k: v / denom for k, v in
                                                                               zip(keys, vals)}

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if len(self.recent) < self.recent.maxlen:
            return False
        mean = sum(self.recent) / len(self.recent)
        std = (sum((x - mean) ** 2 for x in self.recent) / len(self.recent)) ** 0.5
        return loss > mean + max(self.cfg.spike_factor * std, self.cfg.spike_min_jump * abs(mean))

    def _last_ckpt_note(self) -> str:
        return f"; the last checkpoint is {self.last_ckpt}" if self.last_ckpt is not None else ""

    def weights_finite(self) -> bool:
        """Whether every trainable weight is finite, on every rank (all ranks get the same answer)."""
        with torch.no_grad():
            bad = sum(int(not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()))
                      for p in self.trainable.values())
        return D.sum_all([float(bad)], self.dist)[0] == 0

    def rollback(self, loss: float, what: str | None = None) -> None:
        """PaLM's remedy: restart from the last good checkpoint and skip the batches that led to the spike.
        ``what`` says what went wrong (default: a loss spike at this step). A spike that comes back before the next
        checkpoint, new data and all, came from the weights restored: the next rollback goes one checkpoint further
        back (where there is one; PaLM restarted about 100 steps before the spike)."""
        what = what or f"loss spike at step {self.step} (loss {loss:.4g})"
        self.rollbacks += 1
        if self.rollbacks > self.cfg.max_rollbacks:
            raise LMForgeError(f"{what} after {self.cfg.max_rollbacks} rollbacks: giving up; lower train.lr or "
                               "raise train.max_rollbacks")
        position = self.train_data.state_dict()
        spike_step = self.step
        self.optimizer.zero_grad(set_to_none=True)
        further = ""
        if self.last_ckpt is not None and self.last_ckpt.exists():
            target = self.last_ckpt
            if checkpoint_step(target) == self.rolled_back_step:  # no checkpoint since the last rollback
                older = [c for c in list_checkpoints(self.out) if checkpoint_step(c) < checkpoint_step(target)]
                if older:
                    further = f" (it came back after the rollback to {target.name}: one checkpoint further back)"
                    target = older[-1]
            rollbacks = self.rollbacks
            self.restore(target)
            self.rollbacks = rollbacks
        self.rolled_back_step = self.step
        self.train_data.load_state_dict(position)  # resume the data *after* the offending batches...
        self.train_data.skip(self.cfg.spike_skip * self.cfg.grad_accum)  # ...and skip some more
        self.log(f"{what}: rolled back to step {self.step}{further}, skipping {self.cfg.spike_skip} batch(es) past "
                 "the spike")
        self.metrics.write({"step": spike_step, "event": "rollback", "loss": loss, "to_step": self.step})

    # ---- weight averaging ---------------------------------------------------------------------
    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights, after every optimizer step."""
        if self.ema is None:
            return
        params = dict(self.raw_model.named_parameters())
        keys = list(self.ema)
        torch._foreach_lerp_([self.ema[k] for k in keys], [params[k].detach() for k in keys], 1.0 - self.cfg.ema_decay)

    @contextlib.contextmanager
    def averaged_weights(self):
        """Inside: the model holds the moving-average weights (no-op without EMA); the raw ones come back after."""
        if self.ema is None:
            yield
            return
        params = dict(self.raw_model.named_parameters())
        raw = {k: params[k].detach().clone() for k in self.ema}
        self._overwrite(params, self.ema)
        try:
            yield
        finally:
            self._overwrite(params, raw)

    @torch.no_grad()
    def _overwrite(self, params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            params[k].copy_(v)
        if self.dist.enabled and self.cfg.distributed == "fsdp":
            D.reshard(self.raw_model)  # FSDP's gathered copies still hold the old values

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """``val_loss`` and ``val_<metric>`` over the validation batches, weighted by their units."""
        if self.val_data is None or self.cfg.eval_iters <= 0:
            return None
        self.model.eval()
        total, units, sums = 0.0, 0.0, {}
        # ranks may hold different numbers of held-out batches (a short last global batch of fine-tuning data).
        # DDP's forward is a collective (it broadcasts buffers): evaluation runs the module it wraps. (FSDP, whose
        # forward gathers shards, trains only pretraining, whose every rank draws the same number of windows.)
        model = self.raw_model if self.dist.enabled and self.cfg.distributed != "fsdp" else self.model
        with self.averaged_weights():
            for b in self.val_data.fixed_batches(self.cfg.eval_iters, seed=1234):
                loss, n, metrics = self._micro(b, model)
                total, units = total + loss.item(), units + n
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
        self.model.train()
        sums = D.sum_dict({**sums, " total": total, " units": units}, self.dist)  # names no metric can have
        total, units = sums.pop(" total"), sums.pop(" units")
        denom = max(units, 1.0)
        return {"val_loss": total / denom, **{f"val_{k}": v / denom for k, v in sorted(sums.items())}}

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``max_iters`` (from the newest usable checkpoint with ``resume``), holding the run directory's
        lock (the first process) so that no second run writes into it meanwhile."""
        with DirLock(self.out) if self.dist.main else contextlib.nullcontext():
            return self._fit(resume)

    def _fit(self, resume: bool) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + self.dist.rank)
        resumed = self.resume() if resume else False
        start = self.step
        if cfg.precision == "auto" and self.device.type == "cpu":
            self.log(f"train.precision auto: {PRECISION_NAMES[self.amp_dtype]}"
                     + (" (bf16 products measured faster for these layers on this machine)" if self.amp_dtype else ""))
        self.metrics = MetricsWriter(self.out, enabled=self.dist.main, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                     run_config=self.run_config, truncate_after=self.step if resumed else -1)
        flops_tok = model_flops_per_token(self.raw_model) if self.count_tokens else 0.0
        peak = _peak_flops(self.device, self.amp_dtype) * self.dist.world
        total = cfg.decay_iters or cfg.max_iters
        self.model.train()
        bar = tqdm(total=cfg.max_iters, initial=self.step, disable=not self.dist.main, file=sys.stderr,
                   dynamic_ncols=True, desc="train", mininterval=0.1 if sys.stderr.isatty() else 10.0)
        last = {"step": self.step}
        t0 = time.perf_counter()
        self.interrupted = False
        previous = self._defer_interrupt() if self.dist.enabled else None
        try:
            # optional batch-source hooks (PPO): ``exhausted()`` ends training early; ``at_boundary()`` false
            # defers a due checkpoint to the next step where the source's state can be saved (a rollout boundary)
            exhausted = getattr(self.train_data, "exhausted", lambda: False)
            at_boundary = getattr(self.train_data, "at_boundary", lambda: True)
            save_due = False
            # writes a line when it runs
            evaluates = (self.val_data is not None and cfg.eval_iters > 0) or bool(cfg.eval_tasks)
            while self.step < cfg.max_iters and not exhausted():
                # (not again at the step a rollback went back to: the weights are those it evaluated)
                if (self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters) and \
                        self.step != self.rolled_back_step:
                    self._eval_and_log(last)
                    t0 = time.perf_counter()  # a step's time and tokens/s leave evaluation out
                lr = lr_at(self.step, cfg.lr, cfg.schedule, cfg.warmup_iters, total, cfg.min_lr_ratio)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                at_start = (self.train_data.state_dict(), rng_state())  # an interrupt mid-step rewinds to here
                loss, norm, tokens, metrics = self.train_step()
                # a finite loss can come with infinite gradients, which the update would write into the weights
                # (fp16's scaler skips such steps itself)
                bad_grads = not math.isfinite(norm) and not self.scaler.is_enabled()
                if cfg.spike_guard and (self.is_spike(loss) or bad_grads):
                    self.rollback(loss, f"gradient norm {norm} at step {self.step}" if bad_grads else None)
                    bar.n = self.step
                    bar.refresh()
                    continue
                if (not math.isfinite(loss) or bad_grads) and not self.scaler.is_enabled():
                    what = f"loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
                    raise LMForgeError(f"{what} at step {self.step}: stopped before the update, which would "
                                       f"write NaN into the weights{self._last_ckpt_note()}")
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self._update_ema()
                self.recent.append(loss)
                self.step += 1
                dt = time.perf_counter() - t0
                t0 = time.perf_counter()
                tps = tokens / dt
                last = {"step": self.step, "train_loss": loss, **{f"train_{k}": v for k, v in metrics.items()},
                        "lr": lr, "grad_norm": norm, f"{self.units}_per_s": tps, "step_s": dt,
                        "mfu": tps * flops_tok / peak if peak and self.count_tokens else None}
                eval_next = evaluates and (self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters)
                if self.step % cfg.log_interval == 0 and not eval_next:  # else the evaluation's line holds it
                    self.metrics.write(last)
                bar.update(1)
                rate = {"tok_s": f"{tps:,.0f}"} if self.count_tokens else {f"{self.units}_s": f"{tps:,.2f}"}
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **rate, refresh=False)
                save_due = save_due or self.step % cfg.save_interval == 0
                save_now = save_due and self.step < cfg.max_iters and not exhausted() and at_boundary()
                if (save_now or self.step >= cfg.max_iters or exhausted()) and not self.weights_finite():
                    # finite losses, yet the update overflowed (a learning rate far too high): no checkpoint, no
                    # final model of such weights; the last checkpoint was written before
                    what = f"weights hold NaN or infinite values after step {self.step} (is train.lr too high?)"
                    if not cfg.spike_guard or self.last_ckpt is None or not self.last_ckpt.exists():
                        raise LMForgeError(f"{what}: not saved{self._last_ckpt_note()}")
                    self.rollback(math.nan, what)
                    bar.n = self.step
                    bar.refresh()
                    continue
                if save_now:
                    self.save()
                    save_due = False
                    t0 = time.perf_counter()  # and checkpoint writing
            # (a resumed run that had nothing left to do: its last evaluation is in metrics.jsonl already)
            self._eval_and_log(last, final=True, record=not (resumed and self.step == start))
            self.save()
        except KeyboardInterrupt:
            self.log(f"interrupted at step {self.step}: writing a final checkpoint")
            if "at_start" in locals():
                self.train_data.load_state_dict(at_start[0])
                set_rng_state(at_start[1])
            self.optimizer.zero_grad(set_to_none=True)
            self.save()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            bar.close()
            self.metrics.close()
        if self.dist.main:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        return {**last, **self.last_eval, "best_val": self.best_val}

    def run_eval_tasks(self) -> dict[str, float]:
        """``train.eval_tasks`` on the (averaged) model: {name_metric: value}. Rank 0 runs them on its full copy of the
        weights (under FSDP no rank holds one: refused when the Trainer is made)."""
        out: dict[str, float] = {}
        if not self.cfg.eval_tasks:
            return out
        if self.dist.main:
            with self.averaged_weights():
                for spec in self.cfg.eval_tasks:
                    spec = dict(spec)
                    name = str(spec.pop("name", spec.get("task", "task")))
                    try:
                        result = run_task(self.raw_model, self.tokenizer, spec)
                    except LMForgeError as e:  # (it named neither the setting nor the task)
                        raise LMForgeError(f"train.eval_tasks {name}: {e}") from None
                    for k, v in result.items():
                        out[f"{name}_{k}"] = v
        if self.dist.enabled:  # every rank logs and compares the same numbers
            obj = [out]
            torch.distributed.broadcast_object_list(obj, src=0)
            out = obj[0]
        return out

    def _eval_and_log(self, last: dict[str, Any], final: bool = False, record: bool = True) -> None:
        ev = self.evaluate()
        tasks = self.run_eval_tasks()
        if tasks:
            ev = {**(ev or {}), **tasks}
        if ev is not None:
            self.last_eval = ev
            rec = {"step": self.step, **ev}
            if "train_loss" in last and last["step"] == self.step:
                rec = {**last, **ev}
            if record:
                self.metrics.write(rec)
            shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in ev.items())
            self.log(f"step {self.step}: {shown}" + (f", train loss {last['train_loss']:.4f}"
                                                     if "train_loss" in rec else ""))
            key = self.cfg.best_metric
            if key not in ev and not (key == "val_loss" and self.val_data is None):
                raise LMForgeError(f"train.best_metric={key!r}: not among the evaluation metrics {sorted(ev)}")
            value = ev.get(key, math.nan)
            better = value < self.best_val if self.cfg.best_mode == "min" else value > self.best_val
            # (the starting weights count only when they can be the result: best_val named an untrained head's)
            if better and math.isfinite(value) and (self.step > 0 or self.start_is_candidate):
                self.best_val = value
                if self.step == 0:
                    self.save()  # every rank takes part; the best file below points to it
                if self.dist.main:
                    (self.out / "best").write_text(f"ckpt-{self.step:07d}\n")
        every = self.cfg.sample_every * self.cfg.eval_interval
        if self.sample_fn is not None and (final or self.step == 0 or (every and self.step % every == 0)):
            if self.dist.enabled and self.cfg.distributed == "fsdp":  # no rank holds the whole model: none samples
                if self.step == 0:
                    self.log("samples are not generated under FSDP (every rank holds a shard of the weights)")
            elif self.dist.main:
                with self.averaged_weights():
                    self.log(f"sample at step {self.step}: {self.sample_fn(self.raw_model)!r}")


def _is_lm_head(key: str) -> bool:
    """The tied output weight, also inside a wrapper (``decoder.lm_head.weight`` of a reward model)."""
    return key == "lm_head.weight" or key.endswith(".lm_head.weight")


def _drop_tied_heads(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Leave out ``*lm_head.weight`` entries that share storage with another entry (tied embeddings of a model
    nested in a container, e.g. PPO's actor and critic): safetensors refuses shared tensors and loading the
    embedding restores the tied head."""
    ptrs: dict[int, int] = {}
    for v in sd.values():
        ptrs[v.data_ptr()] = ptrs.get(v.data_ptr(), 0) + 1
    return {k: v for k, v in sd.items() if not (k.endswith("lm_head.weight") and ptrs[v.data_ptr()] > 1)}


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch moved to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


_PEAK: dict[str, float] = {}


def _peak_flops(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """Measured matmul peak of this device (FLOP/s) in the training's precision (fp32 for None, else autocast to
    ``dtype``) through the products the model uses (``lmforge.matmul``), for MFU. (An fp32 peak of torch's own
    product put a bf16 run's MFU above 1.)"""
    key = f"{device}|{dtype}"
    if key not in _PEAK:
        n = 1024
        g = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG (exact resume)
        a, b = (torch.randn(n, n, device=device, generator=g) for _ in range(2))
        with autocast(device, dtype):
            for _ in range(2):
                linear(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, reps = time.perf_counter(), 0
            while time.perf_counter() - t < 0.3:
                linear(a, b)
                reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
        _PEAK[key] = 2 * n**3 * reps / (time.perf_counter() - t)
    return _PEAK[key]


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
