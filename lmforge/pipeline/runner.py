"""Run a pipeline: each stage is its lmforge command run in this process, its output under the run directory, its
console output in ``logs/NAME.log``; a stage whose output is complete for the same config and inputs is skipped, an
interrupted training stage resumes from its last checkpoint, and every policy is measured after the stage that made
it. ``report.json`` / ``report.html`` hold the figures; ``final`` is the last policy.

Under torchrun every process runs the training stages (DDP/FSDP, as their commands do); the other stages, the
measurements and the report run on the first process while the others wait for its stage marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.cli import error_line, run_command
from lmforge.errors import LMForgeError
from lmforge.files import DirLock
from lmforge.manifest import verify_manifest
from lmforge.model.weights import replace_dir
from lmforge.pipeline.measure import check_measure, kl_from, measure_policy
from lmforge.pipeline.report import write_report
from lmforge.pipeline.spec import (
    Pipeline,
    Stage,
    check_flags,
    measure_hash,
    resolve_value,
    stage_argv,
    stage_hash,
)
from lmforge.train.distributed import KEEP_GROUP
from lmforge.train.loop import write_json

STATE = ".pipeline"  # DIR/.pipeline/NAME.json: each stage's marker (hash, status, figures)


@dataclass
class StageResult:
    name: str
    kind: str
    status: str  # done | cached | failed | planned | not run
    argv: list[str] = field(default_factory=list)
    hash: str = ""
    wall_s: float = 0.0
    product: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    measure_s: float = 0.0  # time spent measuring the product (not in wall_s)
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def marker_path(out: Path, name: str) -> Path:
    (out / STATE).mkdir(parents=True, exist_ok=True)
    return out / STATE / f"{name}.json"


def read_marker(out: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads(marker_path(out, name).read_text())
    except (OSError, ValueError):
        return None


def marker_product(out: Path, name: str, marker: dict[str, Any] | None) -> Path:
    """The product a stage's marker records, in this run directory: markers hold it relative to the directory, so a
    run moved, copied or named from another working directory uses its own outputs. (Older markers held the path as
    the run named it, e.g. ``runs/pipeline/sft``: its part from the stage's directory on is taken.)"""
    rel = Path((marker or {}).get("product") or name)
    if rel.is_absolute() or rel.parts[0] != name:
        parts = rel.parts
        rel = Path(*parts[len(parts) - 1 - parts[::-1].index(name):]) if name in parts else Path(name)
    return out / rel


def product_path(stage: Stage, sdir: Path) -> Path:
    """Where a stage's product is: pretraining's best checkpoint (else its newest), a file, or the directory."""
    if stage.kind == "pretrain":  # `best` names the best checkpoint
        best = sdir / "best"
        if best.is_file() and (sdir / best.read_text().strip()).is_dir():
            return sdir / best.read_text().strip()
        ckpts = sorted(sdir.glob("ckpt-*[0-9]"))
        return ckpts[-1] if ckpts else best
    return sdir / stage.spec.product if stage.spec.product else sdir


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(ln))
        except ValueError:
            continue
    return out


def stage_metrics(stage: Stage, sdir: Path) -> dict[str, Any]:
    """The figures a stage's own output holds (its metrics.jsonl, clean report, prepared index, eval results)."""
    m: dict[str, Any] = {}
    if stage.kind == "tokenizer":
        cfg = sdir / "tokenizer_config.json"
        if cfg.is_file():
            m["vocab_size"] = json.loads(cfg.read_text()).get("vocab_size")
    elif stage.kind == "clean":
        rep = sdir / "report.json"
        if rep.is_file():
            r = json.loads(rep.read_text())
            m.update({k: r[k] for k in ("documents_in", "documents_out", "characters_in", "characters_out")
                      if k in r})
            m["removed_by"] = {x["stage"]: x["documents_removed"] for x in r.get("stages", [])
                               if x.get("documents_removed")}
    elif stage.kind == "prepare":
        idx = sdir / "index.json"
        if idx.is_file():
            for split, s in json.loads(idx.read_text()).get("splits", {}).items():
                m[f"{split}_tokens"] = int(s.get("tokens", 0))
    elif stage.kind == "eval":
        res = sdir / "results.json"
        if res.is_file():
            r = json.loads(res.read_text())
            m.update({k: v for k, v in (r.get("metrics") or {}).items() if isinstance(v, (int, float))})
    elif stage.kind == "quantize":
        size = sum(p.stat().st_size for p in sdir.glob("*.safetensors"))
        m["weights_mb"] = round(size / 2**20, 2)
    rows = _read_jsonl(sdir / "metrics.jsonl")
    if rows:
        vals = [r for r in rows if any(k.startswith("val_") for k in r)]
        if vals:
            m["first_eval"] = {k: v for k, v in vals[0].items() if k.startswith("val_") or k == "step"}
            m["last_eval"] = {k: v for k, v in vals[-1].items() if k.startswith("val_") or k == "step"}
        last = rows[-1]
        m["last"] = {k: v for k, v in last.items() if isinstance(v, (int, float))}
    return m


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def stage_checks(stage: Stage, r: StageResult, p: Pipeline) -> list[dict[str, Any]]:
    """Whether the stage had the effect it is there for (each a {what, ok, detail})."""
    checks: list[dict[str, Any]] = []
    b, a, m = r.before, r.after, r.metrics

    def add(what: str, ok: bool, detail: str) -> None:
        checks.append({"what": what, "ok": bool(ok), "detail": detail})

    if stage.kind == "pretrain" and "first_eval" in m and "val_loss" in m["first_eval"]:
        v0, v1 = m["first_eval"]["val_loss"], m["last_eval"]["val_loss"]
        add("pretraining lowers validation loss", v1 < v0, f"val_loss {v0:.3f} (step {m['first_eval'].get('step')})"
            f" -> {v1:.3f} (step {m['last_eval'].get('step')})")
    if stage.kind == "sft" and "follow_rate" in a and "follow_rate" in b:
        add("SFT raises the held-out instruction-following rate", a["follow_rate"] > b["follow_rate"],
            f"follow rate {b['follow_rate']:.3f} -> {a['follow_rate']:.3f}")
    if stage.kind in ("dpo", "ppo") and "preference" in a and "preference" in b:
        add("alignment raises the held-out preference score", a["preference"] > b["preference"],
            f"preference {b['preference']:.3f} -> {a['preference']:.3f}")
    if stage.kind == "dpo" and "last_eval" in m and "val_reward_accuracy" in m["last_eval"]:
        acc = m["last_eval"]["val_reward_accuracy"]
        add("DPO prefers the better response of held-out pairs", acc > 0.5, f"held-out pair accuracy {acc:.3f}")
    if stage.kind in ("dpo", "ppo") and "kl" in a:
        add(f"at bounded KL (<= {p.measure.kl_max:g} nats)", a["kl"] <= p.measure.kl_max,
            f"KL from its start {a['kl']:.3f} nats per response")
    if stage.kind == "reward" and "last_eval" in m and "val_accuracy" in m["last_eval"]:
        acc = m["last_eval"]["val_accuracy"]
        add("reward model ranks held-out pairs better than chance", acc > 0.5, f"held-out pair accuracy {acc:.3f}")
    if stage.kind == "quantize" and a.get("ppl") and b.get("ppl"):
        rise = a["ppl"] / b["ppl"] - 1
        add(f"quantization keeps perplexity within {p.measure.ppl_tolerance:.0%}", rise <= p.measure.ppl_tolerance,
            f"perplexity {b['ppl']:.3f} -> {a['ppl']:.3f} ({rise:+.2%})")
    return checks


class _Ticker:
    """The one progress line of a running stage on a terminal: its number, name and elapsed time."""

    def __init__(self, label: str, log: Path, enabled: bool) -> None:
        self.label, self.log, self.enabled = label, log, enabled
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            sys.__stdout__.write(f"\r{self.label} {_clock(time.perf_counter() - self.t0)}  (log: {self.log})\033[K")
            sys.__stdout__.flush()

    def __enter__(self) -> _Ticker:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()
            sys.__stdout__.write("\r\033[K")
            sys.__stdout__.flush()


def _clock(s: float) -> str:
    return f"{int(s // 60)}m{s % 60:04.1f}s" if s >= 60 else f"{s:.1f}s"


def run_stage_command(argv: list[str], log: Path) -> None:
    """``lmforge ARGV`` in this process with its console output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"$ lmforge {' '.join(argv)}", flush=True)
        try:
            run_command(argv)
        except SystemExit as e:  # argparse refused the flags
            if e.code not in (0, None):
                raise LMForgeError(f"lmforge {' '.join(argv[:2])}: bad flags (see {log})") from None


def _summary(r: StageResult) -> str:
    """The figures of a stage's progress line."""
    parts = [c["detail"] for c in r.checks]
    m = r.metrics
    if not parts:
        if "documents_out" in m:
            parts.append(f"kept {m['documents_out']:,} of {m.get('documents_in', 0):,} documents")
        elif "train_tokens" in m:
            parts.append(f"{m['train_tokens']:,} train / {m.get('val_tokens', 0):,} val tokens")
        elif "vocab_size" in m:
            parts.append(f"{m['vocab_size']:,} tokens")
        elif r.kind == "eval":
            parts.append(" ".join(f"{k}={_fmt(v)}" for k, v in m.items() if not isinstance(v, dict))[:80])
    return "; ".join(parts)


def run_pipeline(p: Pipeline, out: Path, from_stage: str | None = None, only: str | None = None,
                 dry_run: bool = False, echo: Callable[[str], None] = print, device: str = "auto") -> list[StageResult]:
    """Run (or plan, with ``dry_run``) every stage; returns their results (a failed stage raises after its result
    is recorded in ``report.json``)."""
    for name in (from_stage, only):
        if name is not None:
            p.stage(name)
    check_flags(p)
    rank, world = _rank()
    main = rank == 0
    if world > 1:
        os.environ[KEEP_GROUP] = "1"
    try:
        with DirLock(out) if main and not dry_run else contextlib.nullcontext():  # one pipeline per --out at a time
            return _run(p, out, from_stage, only, dry_run, echo, device, main)
    finally:
        if world > 1:
            os.environ.pop(KEEP_GROUP, None)
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def _run(p: Pipeline, out: Path, from_stage: str | None, only: str | None, dry_run: bool,
         echo: Callable[[str], None], device: str, main: bool) -> list[StageResult]:
    if any(st.spec.policy and st.measure for st in p.stages):
        check_measure(p.measure)  # (bad values passed with every stage cached, or failed after a stage trained)
    mh = measure_hash(p.measure)
    out.mkdir(parents=True, exist_ok=True)
    products: dict[str, Path] = {}
    hashes: dict[str, str] = {}
    results: list[StageResult] = []
    measured: dict[str, dict[str, Any]] = {}  # policy path -> its measurements
    reward: Path | None = None  # the newest reward model: it also scores the alignment stages' responses
    force = False
    tty = main and sys.__stdout__ is not None and sys.__stdout__.isatty() and not dry_run
    n = len(p.stages)
    for i, st in enumerate(p.stages, 1):
        label = f"[{i}/{n}] {st.name:<16s}"
        h = stage_hash(st, hashes, p.base)
        hashes[st.name] = h
        force = force or st.name == from_stage
        sdir = out / st.name
        marker = read_marker(out, st.name)
        done = marker_product(out, st.name, marker)
        complete = bool(marker and marker.get("hash") == h and marker.get("status") == "complete"
                        and done.exists())  # a deleted output is made again
        rerun = force or only == st.name
        damage = verify_manifest(done) if complete and done.is_dir() else None
        if damage and not rerun:  # (it was reused as "cached", and the run ended pointing at a damaged model)
            complete = False
            if main:
                echo(f"{label} output damaged ({damage}): running it again")
        if complete and not rerun:
            products[st.name] = done
            reward = products[st.name] if st.kind == "reward" else reward
            res = StageResult(**{**marker["result"], "status": "cached", "product": str(done)})
            if main and not dry_run and st.spec.policy and st.measure and marker.get("measure") != mh:
                # measured with other settings (the report kept the old figures): measured again, not retrained
                t1 = time.perf_counter()
                _measure(st, res, done, products, measured, reward, p, device)
                res.measure_s = time.perf_counter() - t1
                write_json(marker_path(out, st.name), {**marker, "measure": mh, "result": res.to_dict()})
            results.append(res)
            measured[str(products[st.name])] = res.after
            if main:
                echo(f"{label} cached        {_summary(res)}")
            continue
        if only is not None and only != st.name:
            results.append(StageResult(st.name, st.kind, "not run", hash=h))
            if main:
                echo(f"{label} not run (--only {only})")
            continue
        argv = stage_argv(st, products, p.base, sdir)
        resuming = bool(st.spec.trains and marker and marker.get("hash") == h and marker.get("status") == "running"
                        and not rerun and sdir.exists())
        if resuming:
            argv.append("--resume")
        if dry_run:
            products[st.name] = product_path(st, sdir)
            results.append(StageResult(st.name, st.kind, "planned", argv, h))
            echo(f"{label} {'resume' if resuming else 'run':6s} lmforge {' '.join(argv)}")
            continue
        res = StageResult(st.name, st.kind, "failed", argv, h, config={".".join(k): resolve_value(v, products, p.base)
                                                                       for k, v in st.args.items()})
        log = out / "logs" / f"{st.name}.log"
        t0 = time.perf_counter()
        try:
            if main:
                if sdir.exists() and not resuming:
                    shutil.rmtree(sdir)
                if log.exists() and not resuming:
                    log.unlink()
                write_json(marker_path(out, st.name), {"hash": h, "status": "running"})
                if st.spec.output:
                    sdir.mkdir(parents=True, exist_ok=True)
            if (st.spec.trains and st.spec.parallel) or main:  # data stages and PPO: the first process only
                with _Ticker(label, log, tty), _one_process(not (st.spec.trains and st.spec.parallel)):
                    if main:
                        run_stage_command(argv, log)
                    else:
                        run_command(argv)
            if not main:
                _wait_for(out, st.name, h)
            res.wall_s = time.perf_counter() - t0
            product = product_path(st, sdir)
            if not product.exists():
                raise LMForgeError(f"stage {st.name}: finished without its output {product} (see {log})")
            res.product = str(product)
            products[st.name] = product
            reward = product if st.kind == "reward" else reward
            t1 = time.perf_counter()
            if main:
                res.metrics = stage_metrics(st, sdir)
                res.plots = [str(x) for x in sorted(sdir.glob("*.png"))]
                if st.spec.policy and st.measure:
                    _measure(st, res, product, products, measured, reward, p, device)
                res.checks = stage_checks(st, res, p)
                res.measure_s = time.perf_counter() - t1
                res.status = "done"
                write_json(marker_path(out, st.name), {"hash": h, "status": "complete",
                                                       "product": product.relative_to(out).as_posix(),
                                                       "measure": mh, "result": res.to_dict()})
            else:
                res = StageResult(**{**read_marker(out, st.name)["result"], "status": "done"})
        except BaseException as e:
            res.wall_s = time.perf_counter() - t0
            res.error = error_line(e) if not isinstance(e, KeyboardInterrupt) else "interrupted"
            results.append(res)
            if main:
                echo(f"{label} FAILED after {_clock(res.wall_s)}: {res.error} (log: {log})")
                write_json(marker_path(out, st.name), {"hash": h, "status": "running", "failed": res.error})
                write_report(p, out, results, None)
            raise
        results.append(res)
        if main:
            echo(f"{label} done {_clock(res.wall_s):>9s}  {_summary(res)}")
    if not dry_run and main:
        policies = [r for r, st in zip(results, p.stages) if st.spec.policy and r.product]
        final = out / "final"
        if policies and only is None:
            copy_model(Path(policies[-1].product), final)
        write_report(p, out, results, final if final.is_dir() else None)
    return results


def _measure(st: Stage, res: StageResult, product: Path, products: dict[str, Path], measured: dict[str, dict],
             reward: Path | None, p: Pipeline, device: str) -> None:
    """The policy ``product`` measured after stage ``st`` (``res.after``), and its start before it (``res.before``,
    measured once per model; with the newest reward model's score for DPO and PPO)."""
    start = st.args.get(("model",))
    start_path = str(resolve_value(start, products, p.base)) if start is not None else None
    rm = str(reward) if reward and st.kind in ("dpo", "ppo") else None
    if start_path and st.kind != "pretrain" and (
            start_path not in measured or (rm and "rm_score" not in measured[start_path])):
        measured[start_path] = measure_policy(start_path, p.measure, device, rm)
    res.before = measured.get(start_path, {}) if start_path else {}
    res.after = measure_policy(product, p.measure, device, rm)
    if st.kind in ("dpo", "ppo") and start_path:
        res.after["kl"] = kl_from(product, start_path, p.measure, device)
    measured[str(product)] = res.after
    res.checks = stage_checks(st, res, p)


@contextlib.contextmanager
def _one_process(alone: bool):
    """With ``alone``: a stage the first process runs by itself sees a launch of one process (WORLD_SIZE=1)."""
    saved = os.environ.get("WORLD_SIZE")
    if alone and saved is not None:
        os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if alone and saved is not None:
            os.environ["WORLD_SIZE"] = saved


def _wait_for(out: Path, name: str, h: str, poll: float = 0.5) -> None:
    """Other processes of a torchrun launch: wait until the first process has finished (or failed) a stage."""
    while True:
        m = read_marker(out, name)
        if m and m.get("hash") == h and m.get("status") == "complete":
            return
        if m and m.get("failed"):
            raise LMForgeError(f"stage {name} failed on the first process")
        time.sleep(poll)


def copy_model(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of the model directory ``src`` (hard links where the filesystem allows)."""
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link)
    replace_dir(tmp, dst)
