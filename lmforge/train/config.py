"""Training run configuration: YAML files, named recipes and ``--section.key value`` overrides."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError
from lmforge.yamlfile import (
    YamlMap,
    key_at,
    merge,  # noqa: F401  (re-exported: the commands merge flags into configs)
    parse_value,
    read_yaml_file,
)


@dataclass
class TrainConfig:
    max_iters: int = 1000
    batch_size: int = 8  # sequences per micro-batch (per process)
    grad_accum: int = 1
    lr: float = 3e-4
    schedule: str = "cosine"  # cosine | constant | linear | wsd
    warmup_iters: int = 100
    decay_iters: int | None = None  # None: max_iters
    min_lr_ratio: float = 0.1  # cosine floor: 10 % of peak (LLaMA)
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    ema_decay: float = 0.0  # >0: evaluate, sample and save an exponential moving average of the weights (0 = off)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    compile: bool = False
    seed: int = 1337
    device: str = "auto"
    distributed: str = "auto"  # auto (DDP under torchrun) | ddp | fsdp | none
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    save_interval: int = 500
    keep_last: int = 2
    spike_guard: bool = True  # roll back to the last good checkpoint on a loss spike (PaLM)
    spike_factor: float = 3.0  # spike: loss > running mean + factor * running std (or non-finite)
    spike_min_jump: float = 0.25  # ...and by at least this fraction of the mean (small-batch noise is no spike)
    spike_window: int = 50
    spike_skip: int = 1  # batches to skip after a rollback (the offending ones and beyond)
    max_rollbacks: int = 5
    tensorboard: bool = False
    wandb: bool = False
    sample_every: int = 0  # a sample at every N-th evaluation too (always one at the start and at the end)
    best_metric: str = "val_loss"  # evaluation metric that picks the `best` checkpoint (val_loss, val_accuracy, ...)
    best_mode: str = "min"  # min | max
    # benchmark tasks run at every evaluation, logged as <name>_<metric> (e.g. mmlu_acc); each is `lmforge eval`'s
    # options: [{task: mmlu, data: path/, shots: 0, limit: 100, name: mmlu}] (name defaults to the task)
    eval_tasks: list[dict[str, Any]] = field(default_factory=list)

    def check(self, source: str = "") -> None:
        """A one-line error naming the first setting out of range (before anything loads; ``source``: the config
        file or recipe the settings came from, with any command-line overrides)."""
        def bad(name: str, why: str) -> None:
            where = f" ({source})" if source and source != "command line" else ""
            raise LMForgeError(f"train.{name}={getattr(self, name)!r}: {why}{where}")

        for name in ("batch_size", "grad_accum", "eval_interval", "log_interval", "save_interval", "keep_last",
                     "spike_window"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("max_iters", "warmup_iters", "eval_iters", "spike_skip", "max_rollbacks", "sample_every"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.decay_iters is not None and self.decay_iters < 1:
            bad("decay_iters", "must be >= 1 (or null: max_iters)")
        for name in ("lr", "weight_decay", "grad_clip", "spike_min_jump"):
            if not 0 <= getattr(self, name) < math.inf:  # (NaN fails too)
                bad(name, "must be a finite number >= 0")
        for name in ("eps", "spike_factor"):
            if not 0 < getattr(self, name) < math.inf:
                bad(name, "must be a finite number > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        for name in ("beta1", "beta2", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "must be in [0, 1)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                bad(name, f"allowed values are {list(allowed)}")


OBJECTIVES = ("causal", "prefix", "glm")  # data.objective
CHOICES = {"precision": ("auto", "fp32", "bf16", "fp16"), "schedule": ("cosine", "constant", "wsd", "linear"),
           "distributed": ("auto", "ddp", "fsdp", "none"), "best_mode": ("min", "max")}


@dataclass
class DataConfig:
    path: str = ""  # a prepared shard directory (lmforge data prepare) or a text file
    tokenizer: str = ""  # for text files: a tokenizer path or "char"
    block_size: int = 256
    val_fraction: float = 0.1
    objective: str = "causal"  # causal | prefix | glm
    isolate_documents: bool = False  # packed documents (split at EOS) do not attend to each other

    def check(self, source: str = "") -> None:
        """One line naming the first setting out of range, before anything loads."""
        where = f" ({source})" if source and source != "command line" else ""
        if self.block_size < 1:
            raise LMForgeError(f"data.block_size={self.block_size}: must be >= 1{where}")
        if not 0 <= self.val_fraction < 1:
            raise LMForgeError(f"data.val_fraction={self.val_fraction}: must be in [0, 1){where}")
        if self.objective not in OBJECTIVES:
            raise LMForgeError(f"data.objective={self.objective!r}: allowed values are {list(OBJECTIVES)}{where}")


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny-llama"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/pretrain"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stage_defaults(steps: int, lr: float, has_val: bool, warmup_div: int = 10, t: TrainConfig | None = None,
                   explicit: set[str] | None = None) -> dict[str, Any]:
    """The train settings a fine-tuning stage (sft, dpo, reward) chooses for ``steps`` optimizer steps (those of
    its epochs; a ``max_iters`` the user set in ``t``/``explicit`` instead): warm-up a ``1/warmup_div`` of them,
    five evaluations over the whole held-out set (none without one), cosine to 0. A loss spike must double the
    running mean: a batch of 8 preference pairs ran to 1.2 against a mean of 0.65 by chance, and the guard rolled a
    reward model back 5 steps and skipped a batch."""
    if t is not None and "max_iters" in (explicit or set()):
        steps = max(1, t.max_iters)
    return {"max_iters": steps, "lr": lr, "warmup_iters": max(1, steps // warmup_div),
            "eval_interval": max(1, steps // 5), "save_interval": max(1, steps // 5), "weight_decay": 0.0,
            "eval_iters": 10_000 if has_val else 0, "log_interval": max(1, min(10, steps // 20)), "min_lr_ratio": 0.0,
            "spike_min_jump": 1.0}


def check_epochs_max_len(epochs: float, max_len: int, zero_epochs: bool = False) -> None:
    """One line for ``--epochs`` that is not a positive finite number (``zero_epochs``: 0 allowed), and for a
    negative ``data.max_len`` (0: the model's context). -1 epochs trained one step; NaN gave a bare ValueError."""
    if not (math.isfinite(epochs) and (epochs >= 0 if zero_epochs else epochs > 0)):
        raise LMForgeError(f"--epochs {epochs}: must be {'>= 0' if zero_epochs else 'a positive number'}")
    if max_len < 0:
        raise LMForgeError(f"data.max_len {max_len}: must be >= 0 (0: the model's context)")


def plan_steps(epochs: float, epoch_steps: int, max_iters: int) -> str:
    """How a stage's run length was chosen, for its log line."""
    if max_iters == epoch_steps:
        return f"{epochs:g} epochs = {max_iters} steps"
    return f"{max_iters} steps (max_iters; {epochs:g} epochs would be {epoch_steps})"


def apply_defaults(t: TrainConfig, chosen: dict[str, Any], explicit: set[str]) -> None:
    """Set each chosen train setting the user did not set (``explicit``: the keys given in a config or flag)."""
    for k, v in chosen.items():
        if k not in explicit:
            setattr(t, k, v)


def _number(text: str, typ: type) -> Any:
    """``text`` as an int or float where it reads as one, else as it is (then refused naming it)."""
    try:
        return typ(text)
    except ValueError:
        return text


def coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is Any or value is None and (type(None) in args):
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where)
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise LMForgeError(f"{where}: expected a mapping, got {value!r}")
        return value
    if origin is list or typ is list:
        numbers = bool(args) and args[0] in (int, float)
        if numbers and isinstance(value, str):  # a flag's text: --data.weights 1,2
            value = [_number(v.strip(), args[0]) for v in value.split(",")]
        elif numbers and isinstance(value, (int, float)) and not isinstance(value, bool):  # one number: --x.y 2
            value = [value]
        if not isinstance(value, list):
            hint = f" (a list is written [{value}])" if isinstance(value, str) and "," in value else ""
            raise LMForgeError(f"{where}: expected a list, got {value!r}{hint}")
        return [coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool) and not (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
        raise LMForgeError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def _fill(cls: type, d: dict[str, Any], where: str, key: str = "") -> Any:
    """``cls`` built from mapping ``d``; errors name ``where`` (the config's source), the file line where the YAML
    holds one, and the key (``train.lr``)."""
    if not isinstance(d, dict):
        raise LMForgeError(f"{where}: {key + ': ' if key else ''}expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for k, v in d.items():
        sub = f"{key}.{k}" if key else str(k)
        at = key_at(d, k) or where
        if k not in names:
            raise LMForgeError(f"{at}: {key + ': ' if key else ''}unknown key {k!r}; allowed: {names}")
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = _fill(t, v, where, sub)
        else:
            kwargs[k] = coerce(v, t, f"{at}: {sub}")
    obj = cls(**kwargs)
    if isinstance(obj, (TrainConfig, DataConfig)):
        obj.check(where)
    return obj


def parse_overrides(items: list[str], cls: type | None = None) -> dict[str, Any]:
    """['--train.lr', '3e-4', '--out', 'x'] -> {'train': {'lr': 3e-4}, 'out': 'x'}; values parsed as YAML. With
    ``cls`` (the command's config) every one is checked against it here, so that an unknown or ill-typed setting is
    blamed on its flag, not on the config file it is merged into."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(items):
        key = items[i]
        if not key.startswith("--"):
            raise LMForgeError(f"unexpected argument {key!r}: overrides look like --section.key value")
        key = key[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise LMForgeError(f"--{key} needs a value")
            raw = items[i + 1]
            i += 2
        value = parse_value(raw, f"--{key}") if raw != "" else ""
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in "eE.") and value[0] in "0123456789.-" else value
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for j, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LMForgeError(f"--{key}: --{'.'.join(parts[: j + 1])} was given a value, not settings")
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise LMForgeError(f"--{key}: a section of settings; give --{key}.NAME VALUE")
        node[parts[-1]] = value
    if cls is not None:
        check_overrides(out, cls)
    return out


def check_overrides(over: dict[str, Any], cls: type, prefix: str = "") -> None:
    """Raise naming the flag (``--train.lrr``) when a setting of ``over`` is not one of ``cls`` or not of its type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for k, v in over.items():
        flag = f"--{prefix}{k}"
        if k not in names:
            if prefix:
                raise LMForgeError(f"{flag}: unknown setting; {prefix[:-1]} has: {', '.join(names)}")
            sections = [n for n in names if dataclasses.is_dataclass(hints[n]) or typing.get_origin(hints[n]) is dict]
            if isinstance(v, dict) and v:
                raise LMForgeError(f"{flag}.{next(iter(v))}: unknown section {k!r}; sections: {', '.join(sections)}")
            raise LMForgeError(f"{flag.replace('_', '-')}: unknown flag; a setting is --SECTION.KEY VALUE with "
                               f"SECTION one of {', '.join(sections)}")
        t = hints[k]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise LMForgeError(f"{flag}: a section of settings; give {flag}.NAME VALUE")
            check_overrides(v, t, f"{flag[2:]}.")
        else:
            coerce(v, t, flag)


def load_run_config(d: dict[str, Any], where: str = "config") -> RunConfig:
    return _fill(RunConfig, d, where)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A run config file: a mapping of sections whose keys remember their lines (for errors naming them)."""
    d = read_yaml_file(path, "run config")
    if d is None:
        return YamlMap(source=str(path))
    if not isinstance(d, dict):
        raise LMForgeError(f"{path}: a run config must be a mapping of sections, got {type(d).__name__}")
    return d
