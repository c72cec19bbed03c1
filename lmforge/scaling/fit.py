"""Fitting L(N, D) = E + A / N^alpha + B / D^beta to runs, as Hoffmann et al. 2022 (appendix D.2) do: minimise the
Huber loss (delta = 1e-3) of log L_pred - log L over the runs, with L_pred = LSE(a - alpha log N, b - beta log D, e)
(A = e^a, B = e^b, E = e^e), by L-BFGS from a grid of starting points, keeping the best end point."""

from __future__ import annotations

import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import LMForgeError
from lmforge.files import read_json_lines
from lmforge.scaling.laws import ChinchillaLaw

# Hoffmann et al. 2022, appendix D.2: the initialisation grid
GRID = {"alpha": [0.0, 0.5, 1.0, 1.5, 2.0], "beta": [0.0, 0.5, 1.0, 1.5, 2.0], "e": [-1.0, -0.5, 0.0, 0.5, 1.0],
        "a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0], "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]}


# (log A, log B, E's log, alpha, beta) within these: published fits have A, B of 10^2-10^4 and exponents of 0.05-1
BOUNDS = [(-30.0, 60.0), (-30.0, 60.0), (-10.0, 10.0), (0.0, 4.0), (0.0, 4.0)]


@dataclass
class Run:
    params: float
    tokens: float
    loss: float
    name: str = ""


def _objective(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray, delta: float):
    """Sum of Huber losses of the log-loss residuals, and its gradient with respect to (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logn, b - beta * logd, np.full_like(logn, e)])  # (3, n)
    m = terms.max(0)
    w = np.exp(terms - m)
    s = w.sum(0)
    pred = m + np.log(s)
    r = pred - logl
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.where(small, r, delta * np.sign(r))  # d huber / d r
    p = w / s  # d pred / d terms (softmax)
    grad = np.array([(dr * p[0]).sum(), (dr * p[1]).sum(), (dr * p[2]).sum(),
                     (dr * p[0] * -logn).sum(), (dr * p[1] * -logd).sum()])
    return loss, grad


def fit_law(runs: list[Run], delta: float = 1e-3, top: int = 32,
            grid: dict | None = None) -> tuple[ChinchillaLaw, float]:
    """Best (law, objective) over L-BFGS runs started from the ``top`` best points of the initialisation grid."""
    from scipy.optimize import minimize

    if not (math.isfinite(delta) and delta > 0):
        raise LMForgeError(f"--delta {delta}: the Huber delta must be a finite number > 0")
    points = {(r.params, r.tokens) for r in runs}
    if len(points) < 5:  # (one run given five times is one point: the fit would mean nothing)
        raise LMForgeError(f"fitting 5 parameters needs at least 5 runs of distinct (parameters, tokens), got "
                           f"{len(points)}" + (f" among {len(runs)} runs" if len(points) < len(runs) else ""))
    logn = np.log([r.params for r in runs])
    logd = np.log([r.tokens for r in runs])
    logl = np.log([r.loss for r in runs])
    g = grid or GRID
    starts = np.array([[a, b, e, al, be] for al, be, e, a, b in
                       itertools.product(g["alpha"], g["beta"], g["e"], g["a"], g["b"])])
    values = np.array([_objective(s, logn, logd, logl, delta)[0] for s in starts])
    best, best_val = None, math.inf
    for i in np.argsort(values)[:top]:
        res = minimize(_objective, starts[i], args=(logn, logd, logl, delta), jac=True, method="L-BFGS-B",
                       bounds=BOUNDS, options={"maxiter": 2000, "gtol": 1e-12, "ftol": 1e-15})
        if res.fun < best_val:
            best, best_val = res.x, float(res.fun)
    a, b, e, alpha, beta = best
    edge = [name for name, v, (lo, hi) in zip(("a", "b", "e", "alpha", "beta"), best, BOUNDS)
            if min(v - lo, hi - v) < 1e-6 * (hi - lo)]
    if edge:  # (unbounded, such runs gave B = 5e172, beta = 56, then an overflow)
        print(f"warning: the fit ran to the edge of its range ({', '.join(edge)}): these runs do not pin the law "
              "down (train more sizes and token counts, over a wider range)", file=sys.stderr)
    return ChinchillaLaw(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta),
                         f"fit to {len(runs)} runs (Huber delta {delta})"), best_val


def non_embedding_params(cfg) -> int:
    """Parameters outside the token and position embeddings (Kaplan et al.'s N; a tied output layer is kept out)."""
    from lmforge.presets import count_params

    emb = cfg.vocab_size * cfg.n_embd
    if cfg.position == "learned" or (cfg.position == "glm2d" and cfg.glm2d == "learned"):
        emb += cfg.block_size * cfg.n_embd * (2 if cfg.position == "glm2d" else 1)
    return count_params(cfg) - emb  # an untied output layer is a matmul like any other: counted


def read_run(path: str | Path) -> Run:
    """(N = non-embedding parameters, D = tokens trained = steps x batch x grad_accum x block, final val loss) of an
    lmforge run directory (its newest checkpoint's config.json and trainer_state.json, and metrics.jsonl)."""
    from lmforge.config import ModelConfig

    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise LMForgeError(f"{path}: no metrics.jsonl (not an lmforge run directory)")
    ckpts = sorted(p for p in path.glob("ckpt-*") if (p / "config.json").is_file())
    if not ckpts:
        raise LMForgeError(f"{path}: no checkpoint with a config.json")
    cfg = ModelConfig.load(ckpts[-1] / "config.json")
    try:
        state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
        rc = state["run_config"]
        if "block_size" not in (rc.get("data") or {}):  # (said "cannot read the trainer state: 'block_size'")
            stage = "a fine-tuning run (sft, reward, dpo or ppo)"
            raise LMForgeError(f"{path}: {stage}; scaling fit reads pretraining runs (lmforge pretrain, scaling sweep)")
        tokens_per_step = rc["train"]["batch_size"] * rc["train"].get("grad_accum", 1) * rc["data"]["block_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LMForgeError(f"{ckpts[-1]}: cannot read the trainer state: {e}") from None
    last = None
    for n, row in read_json_lines(metrics):  # the last row with a validation loss
        if row.get("val_loss") is None:
            continue
        step, loss = row.get("step"), row["val_loss"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise LMForgeError(f"{metrics}:{n}: step {step!r}: expected the step (an integer >= 0)")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss) or loss <= 0:
            raise LMForgeError(f"{metrics}:{n}: val_loss {loss!r}: expected a positive finite number (a diverged "
                               "run cannot be fitted: leave it out)")
        last = (n, step, float(loss))
    if last is None:
        raise LMForgeError(f"{metrics}: no val_loss recorded")
    if last[1] == 0:
        raise LMForgeError(f"{metrics}:{last[0]}: its last val_loss is at step 0 (nothing trained yet)")
    return Run(float(non_embedding_params(cfg)), float(last[1] * tokens_per_step), last[2], path.name)
