"""Supervised fine-tuning (instruction tuning): chat/instruction data, loss on assistant tokens, full or PEFT, on the
one Trainer. The run directory is itself a loadable ``--model`` when training ends."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.checkpoint import save_checkpoint
from lmforge.data.preference import encode_response
from lmforge.errors import LMForgeError
from lmforge.files import public_modes
from lmforge.loading import start_fine_tuning
from lmforge.losses import IGNORE, lm_loss
from lmforge.peft import apply_peft, get_method, save_adapter
from lmforge.peft.base import get_adapter_params
from lmforge.quant import weight_count
from lmforge.train import distributed as D
from lmforge.train.batches import ExampleBatches, check_batch_fits
from lmforge.train.config import TrainConfig, _fill, apply_defaults, check_epochs_max_len, plan_steps, stage_defaults
from lmforge.train.loop import Trainer

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def drop_unscored(examples: list[dict[str, Any]], max_len: int, block: int, what: str, log) -> list[dict[str, Any]]:
    """Examples whose scored tokens all fall past ``max_len`` teach nothing (and a batch of them has no loss):
    dropped with a count; one line naming the context if none is left."""
    keep = [e for e in examples if any(t != IGNORE for t in e["labels"][1 : max_len + 1])]
    if examples and not keep:
        raise LMForgeError(f"every {what} example's response starts after token {max_len}: the template and prompts "
                           f"fill the model's context ({block}); use a model with a longer context, a shorter "
                           "template (--template) or shorter prompts")
    if len(keep) < len(examples):
        log(f"dropped {len(examples) - len(keep)} {what} example(s) whose response starts after token {max_len}")
    return keep


@dataclass
class SFTData:
    path: str = ""  # one file or several, comma-separated (JSON/JSONL: Alpaca, ShareGPT, OpenAI messages, seeds,
    #                 preference pairs: their prompt and chosen reply)
    format: str = "auto"  # auto | alpaca | sharegpt | openai | self-instruct | preference
    weights: list[float] | None = None  # per dataset: 2.0 repeats it, 0.5 keeps half
    cap: int = 0  # examples-proportional mixing: at most this many examples per dataset (0 = all)
    val_path: str = ""  # held-out data; default: data.val_fraction of the training data
    val_fraction: float = 0.1
    max_len: int = 1024  # tokens per example (longer ones are truncated); at most the model's block_size
    packing: bool = False  # several examples per row, attention kept inside each
    group_by_length: bool = True  # unpacked: batches of similar lengths (less padding); seeded and resumable
    train_on_prompt: bool = False  # score prompt tokens too
    template: str = ""  # chat template name or Jinja; empty: the model's own, else alpaca
    skip_bad: bool = False
    vars: dict[str, str] = field(default_factory=dict)  # fill {{name}} placeholders, e.g. {name: Forge}


@dataclass
class SFTConfig:
    model: str = ""  # any --model path: lmforge/HF dir, llama2.c .bin, GGUF, quantized dir
    tokenizer: str = ""
    data: SFTData = field(default_factory=SFTData)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: dict[str, Any] = field(default_factory=dict)  # {"method": "lora", "r": 8, ...}
    epochs: float = 3.0
    out: str = "runs/sft"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Stages that move a policy by preference (DPO, PPO) train at a tenth of the SFT rate, as their reference recipes do:
# TRL's DPO 1e-6 full at 1B (this rule's 1e-5 / 10) and LoRA 5e-6..5e-5 (here 3.6e-5 at 1B); OpenRLHF's actor 5e-7
# against its SFT 5e-6; LLaMA-Factory's DPO LoRA 5e-6 against its SFT LoRA 1e-4. At the SFT rate, SmolLM2's LoRA
# (9.7e-4) ran PPO 15.5 nats from its reference in 30 iterations and DPO's held-out loss rose from its first step.
POLICY_LR_SCALE = 0.1


def suggested_lr(method: str | None, n_params: int) -> float:
    """Default peak learning rate: the rate the method's reference recipes use (full fine-tuning 1e-5, LLaMA-Factory's
    example configs; a PEFT method's ``SUGGESTED_LR``) at the model size they were set for (1B, or the method's
    ``SUGGESTED_LR_PARAMS``), scaled by sqrt(that size / n_params), at most 30x: small models need larger steps."""
    base, ref = 1e-5, 1e9
    if method is not None:
        m = get_method(method)
        base, ref = getattr(m, "SUGGESTED_LR", 1e-4), getattr(m, "SUGGESTED_LR_PARAMS", 1e9)
    return base * min(30.0, max(1.0, (ref / max(n_params, 1)) ** 0.5))


def load_sft_config(d: dict[str, Any], where: str) -> SFTConfig:
    return _fill(SFTConfig, d, where)


def build_examples(cfg: SFTConfig, tok, template, log) -> tuple[list[dict], list[dict], dict[str, Any]]:
    from lmforge.data.sft import BadCounts, mix, read_conversations, split_heldout, tokenize_conversation

    paths = [p.strip() for p in cfg.data.path.split(",") if p.strip()]
    if not paths:
        raise LMForgeError("no training data: pass --data FILE[,FILE...]")
    bad = BadCounts()
    sets = [read_conversations(p, cfg.data.format, cfg.data.skip_bad, bad, cfg.data.vars) for p in paths]
    convs = mix(sets, cfg.data.weights, cfg.data.cap, cfg.train.seed)
    if cfg.data.val_path:
        val = read_conversations(cfg.data.val_path, cfg.data.format, cfg.data.skip_bad, bad, cfg.data.vars)
        train = convs
    else:
        train, val = split_heldout(convs, cfg.data.val_fraction, cfg.train.seed)
    for path, n in bad.counts.items():
        log(f"skipped {n} bad record(s) in {path} (first: {bad.first[path]})")

    # preference records written as plain text (hh-rlhf transcripts, TRL's flat strings), for a model without a
    # chat template and no --template: prompt and chosen reply joined as plain text, exactly as DPO and the reward
    # model encode them, so that SFT on the chosen answers trains the format DPO then starts from
    plain = not cfg.data.template and not getattr(tok, "chat_template", None)

    def as_plain(c) -> bool:
        return plain and c.pref is not None and c.pref.prompt_text is not None

    def plain_example(c) -> dict[str, list[int]]:
        e = encode_response(tok, c.pref, 0, plain=True)
        if cfg.data.train_on_prompt:  # the prompt scored too, BOS aside (nothing predicts it)
            bos = 1 if tok.bos_id is not None and e["input_ids"][:1] == [tok.bos_id] else 0
            e["labels"] = [IGNORE] * bos + e["input_ids"][bos:]
        return e

    def tok_all(cs):
        return [plain_example(c) if as_plain(c) else
                tokenize_conversation(tok, template, c.messages, cfg.data.train_on_prompt) for c in cs]

    n_plain = sum(map(as_plain, (*train, *val)))
    if n_plain:
        log(f"{n_plain} preference records as plain text: prompt + chosen reply, as dpo and reward encode them for "
            "a model without a chat template")
    report = {"datasets": {p: len(s) for p, s in zip(paths, sets)}, "train_examples": len(train),
              "val_examples": len(val), "bad_records": bad.counts}
    return tok_all(train), tok_all(val), report


def sft_loss(model, batch):
    return lm_loss(model, batch)


def run_sft(cfg: SFTConfig, explicit_train: set[str] | None = None, resume: bool = False) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data``; ``explicit_train``: train keys the user set (others get SFT
    defaults derived from the data and method)."""
    from lmforge.data.sft import default_template
    from lmforge.infer.chat import get_template

    explicit_train = explicit_train or set()
    check_epochs_max_len(cfg.epochs, cfg.data.max_len)
    out = Path(cfg.out)
    device, dist, model, tok = start_fine_tuning(cfg, "sft")
    log = dist.log
    template = get_template(cfg.data.template, tok) if cfg.data.template else default_template(tok)
    method = cfg.peft.get("method") if cfg.peft else None
    if cfg.data.packing and method in ("prefix", "prompt", "ptuning"):
        raise LMForgeError(f"--packing cannot be combined with --peft {method}: its virtual tokens would be shared "
                           "by every example packed into a row")
    if method is None:
        check_full_finetune(model, cfg.model)
    resolved_peft: dict[str, Any] = {}
    if method is not None:
        resolved_peft = apply_peft(model, method, {k: v for k, v in cfg.peft.items() if k != "method"}, tok)
    block = model.cfg.block_size - model.num_virtual_tokens  # prefix/prompt tuning's virtual tokens take positions
    max_len = min(cfg.data.max_len, block - 1) if cfg.data.max_len > 0 else block - 1
    train_ex, val_ex, report = build_examples(cfg, tok, template, log)
    train_ex = drop_unscored(train_ex, max_len, block, "training", log)
    val_ex = drop_unscored(val_ex, max_len, block, "held-out", log) if val_ex else val_ex
    n_params = weight_count(model)  # quantized weights count as the weights they stand for
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    t = cfg.train
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
    truncated = []
    check_batch_fits(t.batch_size, dist.world, len(train_ex), "examples")
    train = ExampleBatches(train_ex, t.batch_size, max_len, pad, cfg.data.packing, seed=t.seed, rank=dist.rank,
                           world=dist.world, on_truncate=truncated.append, by_length=cfg.data.group_by_length)
    val = ExampleBatches(val_ex, t.batch_size, max_len, pad, cfg.data.packing, shuffle=False, rank=dist.rank,
                         world=dist.world, by_length=cfg.data.group_by_length) if val_ex else None
    steps = max(1, math.ceil(cfg.epochs * train.steps_per_epoch / t.grad_accum))
    apply_defaults(t, stage_defaults(steps, suggested_lr(method, n_params), val is not None, t=t,
                                    explicit=explicit_train), explicit_train)
    if val is None:
        t.eval_iters = 0
    shown = {k: getattr(t, k) for k in ("max_iters", "lr", "batch_size", "grad_accum", "warmup_iters",
                                        "eval_interval", "schedule")}
    log(f"sft: {report['train_examples']} train / {report['val_examples']} held-out conversations; "
        f"{plan_steps(cfg.epochs, steps, t.max_iters)}; max_len {max_len}; template {template.name}; "
        f"{'peft ' + method + ' ' + json.dumps(resolved_peft) if method else 'full fine-tuning'}; "
        f"trainable {trainable:,} of {n_params:,} parameters; " + ", ".join(f"{k} {v:g}" if isinstance(v, float)
                                                                             else f"{k} {v}" for k, v in
                                                                             shown.items()))
    if truncated:
        log(f"truncated {truncated[0]} example(s) to max_len {max_len}")

    tok.chat_template = template.source
    base_ref = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model

    def export(m, d: Path) -> None:
        if method is not None:  # adapter files (written whole into a folder of their own) and the tokenizer
            save_adapter(m, d / ".adapter", base_ref, resolved_peft, method)
            for f in (d / ".adapter").iterdir():
                f.replace(d / f.name)
            (d / ".adapter").rmdir()
            tok.save(str(d))
        (d / CHAT_TEMPLATE_FILE).write_text(template.source)

    run_config = {**cfg.to_dict(), "resolved_peft": resolved_peft, "data_report": report}
    trainer = Trainer(model, t, train, sft_loss, out, val_data=val, tokenizer=tok, run_config=run_config,
                      device=device, dist=dist, log=log, export_fn=export,
                      stage="sft", same_on_resume=("model", "data.template"))
    try:
        result = trainer.fit(resume=resume)
        if dist.main:  # the run directory itself becomes the final model
            with trainer.averaged_weights():
                write_final(trainer.raw_model, out, tok, export, method is not None)
        D.barrier(dist)
    finally:
        D.cleanup(dist)
    return {**result, "trainable_params": trainable, "total_params": n_params, **report}


def write_final(model, out: Path, tok, export, partial: bool) -> None:
    """Model files of the finished run in ``out`` (beside metrics and checkpoints)."""
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        if not partial:
            save_checkpoint(model, tmp / "m", tok)
        else:
            (tmp / "m").mkdir()
        export(model, tmp / "m")
        public_modes(tmp / "m")
        for f in (tmp / "m").iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_quantized(model) -> bool:
    return any(type(m).__name__ in ("QuantLinear", "QuantEmbedding") for m in model.modules())


def check_full_finetune(model, path: str) -> None:
    """Refuse full fine-tuning of a quantized model or of an adapter directory (its base frozen: "no trainable
    parameters")."""
    if is_quantized(model):
        raise LMForgeError(f"{path}: a quantized model cannot be fully fine-tuned; use --peft qlora (or lora)")
    if get_adapter_params(model):
        raise LMForgeError(f"{path}: an adapter directory; fully fine-tuning needs a plain model: add --peft METHOD "
                           "(new adapters start from it), or make one with lmforge peft merge first")
