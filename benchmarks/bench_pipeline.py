"""Wall time of each stage of a pipeline run by `lmforge pipeline` against the same stages run as separate
`lmforge ...` commands (the argv the pipeline recorded, each its own process, outputs in another directory), on
this machine, in one run. The pipeline's own extra work, measuring every model after the stage that made it, is
shown on its own line.

    python benchmarks/bench_pipeline.py                      # the built-in default (about 12 minutes in all)
    python benchmarks/bench_pipeline.py tests/data/pipeline_small.yaml
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", help="pipeline YAML (default: the built-in default)")
    ap.add_argument("--keep", help="keep both run directories under this directory")
    a = ap.parse_args()
    root = Path(a.keep or tempfile.mkdtemp(prefix="bench-pipeline-"))
    pipe, sep = root / "pipeline", root / "separate"
    for d in (pipe, sep):
        shutil.rmtree(d, ignore_errors=True)
    cmd = [sys.executable, "-m", "lmforge", "pipeline", *([a.config] if a.config else []), "--out", str(pipe)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    whole = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(r.stdout[-2000:] + r.stderr[-2000:])
    rep = json.loads((pipe / "report.json").read_text())
    rows = []
    for st in rep["stages"]:
        argv = [x.replace(str(pipe), str(sep)) for x in st["argv"]]
        out_flag = next(i for i, x in enumerate(argv) if x in ("--out", "--output"))
        Path(argv[out_flag + 1]).parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        s = subprocess.run([sys.executable, "-m", "lmforge", *argv], capture_output=True, text=True)
        took = time.perf_counter() - t
        if s.returncode != 0:
            sys.exit(f"{st['name']}: {s.stderr[-2000:]}")
        rows.append((st["name"], st["wall_s"], took, st["measure_s"]))
    print(f"{'stage':12s} {'pipeline s':>11s} {'separate s':>11s} {'ratio':>7s}")
    for name, p, s, _ in rows:
        print(f"{name:12s} {p:11.1f} {s:11.1f} {p / s:7.3f}")
    tp, ts, tm = sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"{'stages':12s} {tp:11.1f} {ts:11.1f} {tp / ts:7.3f}")
    print(f"measuring every model (pipeline only): {tm:.1f} s; whole `lmforge pipeline` command {whole:.1f} s "
          f"= {whole / ts:.3f} x the separate commands")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
