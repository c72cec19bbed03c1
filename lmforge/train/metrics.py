"""Run metrics: JSONL lines (step, train_loss, val_loss, lr, grad_norm, tokens/s, MFU), optional TensorBoard and
W&B, and the loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.files import write_text_atomic
from lmforge.quant.quantize import weight_count


def model_flops_per_token(model: nn.Module) -> float:
    """Training FLOPs per token: 6N for the weights plus 12*L*H*Q*T for attention scores (PaLM, appendix B)."""
    cfg = model.cfg
    n = weight_count(model) - cfg.vocab_size * cfg.n_embd  # (a quantized embedding has no .weight: sft crashed)
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * cfg.block_size


class MetricsWriter:
    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = False, wandb: bool = False,
                 run_config: dict[str, Any] | None = None, truncate_after: int | None = None) -> None:
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = self.wb = None
        if not enabled:
            return
        if truncate_after is not None and self.path.exists():  # a resumed run rewrites what came after its step
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and
                    json.loads(ln).get("step", 0) <= truncate_after]  # (-1: a run started again keeps nothing)
            write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))
        self.f = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if wandb:
            import wandb as wb

            self.wb = wb.init(config=run_config or {}, dir=str(out))

    def write(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        self.f.write(json.dumps(clean) + "\n")
        self.f.flush()
        nums = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, rec["step"])
        if self.wb is not None:
            self.wb.log(nums, step=rec["step"])

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def plot_losses(metrics: Path, png: Path) -> Path | None:
    """Train and validation loss against step; needs matplotlib (skipped with a note otherwise)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    ax.set_title(os.fsencode(metrics.parent.name).decode("utf-8", "replace"))  # (a name that is not UTF-8: U+FFFD)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
