"""Build a stage pipeline from a config, stream documents through it, write JSONL and a JSON report atomically."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmforge.data.clean.base import Stage
from lmforge.data.clean.dedup import Decontaminate, ExactDedup, NearDedup, SentenceDedup
from lmforge.data.clean.lang import LanguageFilter
from lmforge.data.clean.markup import MarkupFilter
from lmforge.data.clean.perplexity import PerplexityFilter
from lmforge.data.clean.pii import PIIScrubber
from lmforge.data.clean.quality import QualityFilter
from lmforge.data.io import (
    BadRecords,
    Document,
    check_format_flags,
    check_input_file,
    check_workers,
    file_kind,
    input_bytes,
    iter_documents,
)
from lmforge.errors import LMForgeError
from lmforge.files import AtomicFile, check_output_file
from lmforge.yamlfile import read_yaml_file

STAGES: dict[str, type[Stage]] = {c.name: c for c in (
    LanguageFilter, MarkupFilter, QualityFilter, PerplexityFilter, SentenceDedup, ExactDedup, NearDedup,
    Decontaminate, PIIScrubber)}
# the default pipeline, in the order of the survey: language, markup, quality, de-duplication, privacy
DEFAULT_STAGES = ["lang", "markup", "quality", "sentence_dedup", "exact_dedup", "near_dedup", "pii"]
CONFIG_KEYS = {"stages": "list of stage names or {name: {option: value}}", "batch_size": "documents per batch"}
BATCH_SIZE = 256


def _where(src: str | None) -> str:
    return f"{src}: " if src else ""


def parse_stage_specs(cfg: Any, src: str | None = None) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """Validate a config mapping; return ([(stage name, options)], batch size). Unknown keys raise one-line errors."""
    w = _where(src)
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise LMForgeError(f"{w}expected a mapping with keys: {', '.join(CONFIG_KEYS)}")
    for k in cfg:
        if k not in CONFIG_KEYS:
            raise LMForgeError(f"{w}unknown key {k!r} (allowed: {', '.join(CONFIG_KEYS)})")
    batch = cfg.get("batch_size", BATCH_SIZE)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise LMForgeError(f"{w}batch_size: expected a positive integer, got {batch!r}")
    raw = cfg.get("stages", DEFAULT_STAGES)
    if not isinstance(raw, list):
        raise LMForgeError(f"{w}stages: expected a list of stage names or {{name: {{options}}}} mappings")
    specs = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            name, opts = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, opts = next(iter(item.items()))
            opts = {} if opts is None else opts
        else:
            raise LMForgeError(f"{w}stages[{i}]: expected a stage name or a one-key mapping {{name: {{options}}}}, "
                               f"got {item!r}")
        if name not in STAGES:
            raise LMForgeError(f"{w}stages[{i}]: unknown stage {name!r} (allowed: {', '.join(STAGES)})")
        if not isinstance(opts, dict):
            raise LMForgeError(f"{w}stages[{i}].{name}: expected a mapping of options, got {opts!r}")
        allowed = STAGES[name].options
        for k in opts:
            if k not in allowed:
                raise LMForgeError(f"{w}stages[{i}].{name}: unknown key {k!r} (allowed: {', '.join(allowed)})")
        specs.append((name, dict(opts)))
    return specs, batch


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML cleaning config; relative ``eval_files`` are resolved against the working directory, then
    against the config file's directory."""
    p = Path(path)
    if not p.is_file():
        raise LMForgeError(f"{p}: no such config file")
    cfg = read_yaml_file(p, "cleaning config")
    parse_stage_specs(cfg, str(p))
    for item in (cfg or {}).get("stages", []):
        if isinstance(item, dict) and "decontaminate" in item and isinstance(item["decontaminate"], dict):
            files = item["decontaminate"].get("eval_files")
            if isinstance(files, str):
                files = [files]
            if isinstance(files, list):
                item["decontaminate"]["eval_files"] = [
                    f if not isinstance(f, str) or Path(f).is_absolute() or Path(f).exists() else str(p.parent / f)
                    for f in files]
    return cfg or {}


def build_stages(cfg: dict[str, Any] | None = None, src: str | None = None, **callables: Any) -> list[Stage]:
    """Stages from a config mapping (see ``parse_stage_specs``); ``callables`` (e.g. ``score=fn``) are passed to
    the stages whose constructor takes them (the perplexity stage's scorer)."""
    specs, _ = parse_stage_specs(cfg, src)
    stages = []
    for name, opts in specs:
        cls = STAGES[name]
        if cls is PerplexityFilter and "score" in callables:
            stages.append(cls(score=callables["score"], **opts))
        else:
            try:
                stages.append(cls(**opts))
            except LMForgeError as e:
                raise LMForgeError(f"{_where(src)}{e}") from None
    return stages


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for d in docs:
        batch.append(d)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_stages(stages: list[Stage], docs: Iterable[Document], batch_size: int = BATCH_SIZE) -> Iterator[Document]:
    """Stream ``docs`` through ``stages`` in batches; yield the survivors in input order."""
    for batch in _batches(docs, batch_size):
        for st in stages:
            if not batch:
                break
            batch = st(batch)
        yield from batch
    for st in stages:
        st.close()


# ---- worker processes: the leading per-document stages run there, the rest in the main process ----------------

_WORKER: dict[str, Any] = {}
AUTO_PARALLEL_BYTES = 16 << 20  # workers=0 uses two processes from this much input on


def _worker_init(cfg: dict[str, Any]) -> None:
    _WORKER["stages"] = build_stages(cfg)


def _worker_run(batch: list[Document]) -> tuple[list[Document], list[Any]]:
    stages = _WORKER["stages"]
    for st in stages:
        st.reset()
    for st in stages:
        batch = st(batch)
    return batch, [st.state() for st in stages]


def run_stages_parallel(stages: list[Stage], specs: list[tuple[str, dict[str, Any]]], docs: Iterable[Document],
                        batch_size: int, workers: int) -> Iterator[Document]:
    """Like :func:`run_stages`, with the leading run of per-document stages in ``workers`` processes (their
    statistics are merged into ``stages``; their ``seconds`` add up over the processes)."""
    from multiprocessing import get_context

    lead = 0
    while lead < len(stages) and stages[lead].local:
        lead += 1
    if workers <= 1 or lead == 0:
        yield from run_stages(stages, docs, batch_size)
        return
    cfg = {"stages": [{name: opts} for name, opts in specs[:lead]]}
    pool = get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(cfg,))
    try:
        for batch, states in pool.imap(_worker_run, _batches(docs, batch_size)):
            for st, state in zip(stages[:lead], states):
                st.merge_state(state)
            for st in stages[lead:]:
                if not batch:
                    break
                batch = st(batch)
            yield from batch
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    for st in stages:
        st.close()


def clean(inputs: list[str], output: str | Path, report: str | Path | None = None,
          config: dict[str, Any] | str | Path | None = None, *, skip_bad: bool = False, field: str = "text",
          txt_split: str = "file", eval_files: list[str] | None = None, progress: bool = True,
          score: Any = None, workers: int = 0, overwrite: bool = True) -> dict[str, Any]:
    """Clean ``inputs`` into JSONL ``output`` (``{"text": ..., other input fields}`` per line); write the report
    (also returned) to ``report``. Both files are written to temporary files and renamed into place at the end;
    an existing ``output`` or ``report`` is refused unless ``overwrite``; both are checked before any work.

    ``workers``: processes for the leading per-document stages (0: two from 16 MB of input on, when there are
    two CPUs; a ``score`` callable keeps everything in this process)."""
    from tqdm import tqdm

    src = getattr(config, "source", None) or None  # a mapping read by load_config names its file
    if isinstance(config, (str, Path)):
        src = str(config)
        config = load_config(config)
    cfg = dict(config or {})
    if eval_files:  # decontaminate just before PII scrubbing (or last)
        stages_cfg = list(cfg.get("stages", DEFAULT_STAGES))
        last = stages_cfg[-1] if stages_cfg else None
        at = len(stages_cfg) - 1 if last == "pii" or isinstance(last, dict) and "pii" in last else len(stages_cfg)
        stages_cfg.insert(at, {"decontaminate": {"eval_files": list(eval_files)}})
        cfg["stages"] = stages_cfg
    specs, batch_size = parse_stage_specs(cfg, src)
    if not specs:
        raise LMForgeError(f"{_where(src)}stages: an empty list runs no stage (the documents would only be copied); "
                           "name the stages")
    out_path = Path(output)
    ins = {Path(p).resolve() for p in inputs}
    if out_path.resolve() in ins:
        raise LMForgeError(f"{out_path}: the output is also an input")
    if report is not None and (Path(report).resolve() in ins or Path(report).resolve() == out_path.resolve()):
        raise LMForgeError(f"{report}: the report must differ from the inputs and the output")
    # the other files read: the config and the evaluation sets (--overwrite replaced them when named as an output)
    read = ([Path(src)] if src else []) + [Path(f) for name, opts in specs if name == "decontaminate"
                                           for f in opts.get("eval_files") or [] if isinstance(f, (str, Path))]
    for flag, o in (("--output", out_path), ("--report", report)):
        hit = next((f for f in read if o is not None and Path(o).resolve() == f.resolve()), None)
        if hit is not None:
            raise LMForgeError(f"{flag} {o}: it would replace {hit}, which is being read; write elsewhere")
    for p in inputs:
        check_input_file(p)
    check_output_file(str(output), overwrite)
    if file_kind(out_path) != "jsonl" or out_path.suffix.lower() == ".gz":  # (files are read back by their names)
        as_ = "gzip" if out_path.suffix.lower() == ".gz" else {"text": "plain text"}.get(k := file_kind(out_path), k)
        raise LMForgeError(f"--output {out_path}: the cleaned documents are written as uncompressed JSONL, which "
                           f"data prepare and clean would read back as {as_} by this name; name it .jsonl")
    if report is not None:
        check_output_file(str(report), overwrite, flag="--report")
    stages = build_stages(cfg, src, **({"score": score} if score is not None else {}))
    total = input_bytes(inputs)
    check_workers(workers)
    check_format_flags(inputs, field, txt_split=None if txt_split == "file" else txt_split)
    if workers == 0:
        workers = min(2, os.cpu_count() or 1) if total >= AUTO_PARALLEL_BYTES else 1
    if score is not None:
        workers = 1
    bad = BadRecords(skip_bad)
    counts = {"documents_in": 0, "characters_in": 0, "bytes_in": 0, "documents_out": 0, "characters_out": 0}

    def read() -> Iterator[Document]:
        for d in iter_documents(inputs, field=field, txt_split=txt_split, bad=bad):
            counts["documents_in"] += 1
            counts["characters_in"] += len(d.text)
            counts["bytes_in"] += d.nbytes
            bar.update(d.nbytes)
            yield d

    t0 = time.perf_counter()
    out = AtomicFile(out_path)
    try:
        rep_file = AtomicFile(report) if report is not None else None
    except BaseException:
        out.discard()
        raise
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="clean", file=sys.stderr, disable=not progress,
               mininterval=0.2 if sys.stderr.isatty() else 10.0, delay=1.0)  # (a bad first record: one line)
    try:
        write = out.f.write
        for d in run_stages_parallel(stages, specs, read(), batch_size, workers):
            rec = {"text": d.text}
            if d.meta:
                rec.update(d.meta)
            line = json.dumps(rec, ensure_ascii=False)
            try:
                write(line + "\n")
            except UnicodeEncodeError:  # a lone surrogate in another field: kept as the \uXXXX escape it was read as
                write(json.dumps(rec) + "\n")
            counts["documents_out"] += 1
            counts["characters_out"] += len(d.text)
        bar.close()
        if bad.count and not counts["documents_in"]:  # (a wrong --field: every record skipped, nothing to clean)
            raise LMForgeError(f"{inputs[0]}: no document read: all {bad.count} records were skipped as bad (first: "
                               f"{bad.examples[0]})")
        seconds = time.perf_counter() - t0
        rep = {
            "inputs": [str(p) for p in inputs], "output": str(out_path), "config": src,
            **counts, "documents_removed": counts["documents_in"] - counts["documents_out"],
            "seconds": round(seconds, 3), "workers": workers,
            "MB_per_s": round(counts["bytes_in"] / 1e6 / seconds, 3) if seconds > 0 else None,
            "bad_records": bad.as_dict(),
            "stages": [s.report() for s in stages],
        }
        if rep_file is not None:
            text = json.dumps(rep, ensure_ascii=False, indent=2)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a file name that is not UTF-8 (GBK): written as \uXXXX escapes
                text = json.dumps(rep, indent=2)
            rep_file.f.write(text + "\n")
        out.commit()
        if rep_file is not None:
            rep_file.commit()
        return rep
    except BaseException:
        bar.close()
        out.discard()
        if rep_file is not None:
            rep_file.discard()
        raise
