"""`lmforge scaling sweep`: train a grid of small models on a built-in corpus with lmforge's pretraining stage, fit
L(N, D) on all runs but the one of largest compute, and compare the fit's prediction with that run's loss."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.scaling.fit import Run, fit_law, read_run
from lmforge.scaling.laws import ChinchillaLaw


@dataclass
class SweepConfig:
    out: str = "runs/scaling-sweep"
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(1, 32), (2, 48), (3, 64), (4, 96)])  # layers, width
    iters: list[int] = field(default_factory=lambda: [150, 300, 600])
    batch_size: int = 16
    block_size: int = 64
    n_head: int = 4
    lr: float = 1e-3
    eval_iters: int = 20
    data: str = "builtin:tinyshakespeare"
    seed: int = 1337
    device: str = "auto"
    overwrite: bool = False  # train again runs of other settings; write into an --out holding other files


def run_config(cfg: SweepConfig, layers: int, width: int, iters: int):
    """The pretraining RunConfig of one grid point: a GPT-2-style character model, cosine schedule over the run."""
    from lmforge.train.config import DataConfig, RunConfig, TrainConfig

    if width % cfg.n_head:
        raise LMForgeError(f"width {width} is not a multiple of {cfg.n_head} heads")
    model = {"family": "gpt2", "n_layer": layers, "n_head": cfg.n_head, "n_embd": width, "block_size": cfg.block_size,
             "mlp": "gelu", "norm": "layernorm", "position": "learned", "tie_embeddings": True, "dropout": 0.0}
    train = TrainConfig(max_iters=iters, batch_size=cfg.batch_size, lr=cfg.lr, warmup_iters=max(1, iters // 10),
                        eval_interval=iters, eval_iters=cfg.eval_iters, log_interval=max(1, iters // 10),
                        save_interval=10**9, keep_last=1, seed=cfg.seed, device=cfg.device, ema_decay=0.0)
    data = DataConfig(path=cfg.data, tokenizer="char", block_size=cfg.block_size, val_fraction=0.1)
    return RunConfig(model=model, data=data, train=train, out=str(Path(cfg.out) / f"L{layers}-d{width}-i{iters}"))


def sweep(cfg: SweepConfig, quiet: bool = False) -> dict:
    """Train (or reuse finished) grid runs, fit on all but the largest-compute run, predict it."""
    from lmforge.stages.pretrain import run_pretrain

    for what, values in (("--sizes", cfg.sizes), ("--iters", cfg.iters)):
        if len(set(values)) != len(values):
            twice = values[next(i for i, v in enumerate(values) if v in values[:i])]
            shown = f"{twice[0]}x{twice[1]}" if isinstance(twice, tuple) else twice
            raise LMForgeError(f"{what}: {shown} is given twice (a run counted twice makes the fit look better than "
                               "it is)")
    for flag, bad in (("--iters", [v for v in cfg.iters if v < 1]),  # (they were named as train.* fields)
                      ("--sizes", [f"{a}x{b}" for a, b in cfg.sizes if a < 1 or b < 1]),
                      ("--batch-size", [cfg.batch_size] if cfg.batch_size < 1 else []),
                      ("--block-size", [cfg.block_size] if cfg.block_size < 1 else []),
                      ("--eval-iters", [cfg.eval_iters] if cfg.eval_iters < 1 else [])):
        if bad:
            raise LMForgeError(f"{flag} {bad[0]}: must be >= 1")
    if len(cfg.sizes) * len(cfg.iters) < 6:
        raise LMForgeError("a sweep needs at least 6 runs (5 to fit the 5 parameters, 1 to predict)")
    grid = [run_config(cfg, layers, width, iters) for layers, width in cfg.sizes for iters in cfg.iters]
    if not cfg.overwrite:
        _check_out(Path(cfg.out), grid)
    runs: list[Run] = []
    for rc in grid:
        out = Path(rc.out)
        done = out / "sweep_done"
        settings = _settings(rc)
        if done.exists() and done.read_text().strip() != settings:  # batch, block, data, ... changed
            if not quiet:
                print(f"{out.name}: trained with other settings: training it again (--overwrite)",
                      file=sys.stderr)
            shutil.rmtree(out)
        if not done.exists():
            run_pretrain(rc)
            done.write_text(settings + "\n")
        runs.append(read_run(out))
    runs.sort(key=lambda r: r.params * r.tokens)
    held, fit_runs = runs[-1], runs[:-1]
    law, obj = fit_law(fit_runs)
    pred = law.loss(held.params, held.tokens)
    result = {
        "runs": [{"name": r.name, "params": r.params, "tokens": r.tokens, "compute": 6 * r.params * r.tokens,
                  "loss": r.loss, "fit_loss": law.loss(r.params, r.tokens)} for r in runs],
        "law": law.to_dict(), "objective": obj,
        "held_out": {"name": held.name, "params": held.params, "tokens": held.tokens,
                     "compute": 6 * held.params * held.tokens, "measured": held.loss, "predicted": pred,
                     "rel_error": abs(pred - held.loss) / held.loss},
        "compute_decades": _decades([6 * r.params * r.tokens for r in runs]),
    }
    out = Path(cfg.out)
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    result["plot"] = str(plot(result, law, out / "scaling.png"))
    return result


def _settings(rc) -> str:
    return json.dumps(dataclasses.asdict(rc), sort_keys=True, default=str)


def _check_out(out: Path, grid: list) -> None:
    """Refuse (before any training) an --out whose finished runs were trained with other settings, or that holds
    files a sweep does not write: replacing them takes --overwrite (it used to, with a note)."""
    if not out.is_dir():
        return
    names = {Path(rc.out).name for rc in grid}
    other = [rc for rc in grid if (Path(rc.out) / "sweep_done").is_file()
             and (Path(rc.out) / "sweep_done").read_text().strip() != _settings(rc)]
    if other:
        raise LMForgeError(f"--out {out}: {Path(other[0].out).name} (and {len(other) - 1} more) was trained with other "
                           "settings (batch size, block size, ...): pass --overwrite to train them again, or choose "
                           "another --out")
    ours = names | {"sweep.json", "scaling.png"}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours  # (another grid's finished runs: kept)
                     and not (p.is_dir() and (p / "sweep_done").is_file()))
    if foreign:
        raise LMForgeError(f"--out {out}: holds files a sweep does not write ({', '.join(foreign[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}): pass --overwrite to write into it anyway, or "
                           "choose another --out")


def _decades(cs: list[float]) -> float:
    import math

    return math.log10(max(cs) / min(cs))


def plot(result: dict, law: ChinchillaLaw, png: Path) -> Path:
    """Loss against compute for every run, the fitted compute-optimal frontier, and the held-out prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    sizes = sorted({r["params"] for r in runs})
    for n in sizes:
        pts = sorted((r["compute"], r["loss"]) for r in runs if r["params"] == n)
        ax.plot(*zip(*pts), "o-", label=f"N = {n:,.0f}", markersize=4)
    cs = np.geomspace(min(r["compute"] for r in runs) / 2, max(r["compute"] for r in runs) * 2, 100)
    ax.plot(cs, [law.loss(*law.optimal(c)) for c in cs], "k--", label="fitted frontier L_opt(C)")
    h = result["held_out"]
    ax.plot([h["compute"]], [h["predicted"]], "r*", markersize=12, label=f"predicted (held out): {h['predicted']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6ND (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"held-out run: measured {h['measured']:.3f}, predicted {h['predicted']:.3f} "
                 f"({100 * h['rel_error']:.1f} %)")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
