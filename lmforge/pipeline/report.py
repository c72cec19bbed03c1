"""The pipeline's report: ``report.json`` (every figure) and ``report.html`` (one self-contained page: per stage its
config, wall time, loss curves, metrics, checks and the same held-out prompts answered before and after; then the
final table), plus the table printed on the terminal."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from lmforge.pipeline.spec import Pipeline

COLUMNS = ["stage", "status", "wall_s", "ppl", "follow_rate", "preference", "rm_score", "kl", "checks"]


def table_rows(results: list[Any]) -> list[dict[str, Any]]:
    """One row per stage: name, status, wall time and the headline figures after it."""
    rows = []
    for r in results:
        a = r.after
        rows.append({"stage": r.name, "status": r.status, "wall_s": round(r.wall_s, 1),
                     "ppl": a.get("ppl"), "follow_rate": a.get("follow_rate"), "preference": a.get("preference"),
                     "kl": a.get("kl"), "rm_score": a.get("rm_score"),
                     "checks": "".join("✓" if c["ok"] else "✗" for c in r.checks)})
    return rows


def _cell(v: Any, col: str = "") -> str:
    if v is None:
        return "-"
    if col == "wall_s":
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def format_table(results: list[Any]) -> str:
    cols = COLUMNS
    rows = [[_cell(r[c], c) for c in cols] for r in table_rows(results)]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def write_report(p: Pipeline, out: Path, results: list[Any], final: Path | None) -> dict[str, Any]:
    data = {
        "pipeline": p.source, "out": str(out), "base": p.base, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "final": str(final) if final else None,
        "total_wall_s": round(sum(r.wall_s + r.measure_s for r in results if r.status == "done"), 1),
        "stages": [r.to_dict() for r in results], "table": table_rows(results),
        "measure": dict(p.measure.__dict__),
    }
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    (out / "report.html").write_text(render_html(data, results), encoding="utf-8")
    return data


def _png(path: str) -> str:
    try:
        b64 = base64.b64encode(Path(path).read_bytes()).decode()
    except OSError:
        return ""
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{b64}">'


def _kv(d: dict[str, Any]) -> str:
    if not d:
        return "<p>-</p>"
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_flat(v))}</td></tr>" for k, v in d.items()
                   if k != "samples")
    return f"<table class=kv>{rows}</table>"


def _flat(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_cell(x)}" for k, x in v.items())
    return _cell(v)


def _samples(before: dict[str, Any], after: dict[str, Any]) -> str:
    sa = after.get("samples") or []
    if not sa:
        return ""
    sb = {s["prompt"]: s["response"] for s in before.get("samples") or []}
    rows = "".join(f"<tr><td>{html.escape(s['prompt'])}</td><td>{html.escape(sb.get(s['prompt'], '-'))}</td>"
                   f"<td>{html.escape(s['response'])}</td></tr>" for s in sa)
    return f"<table class=samples><tr><th>held-out prompt</th><th>before</th><th>after</th></tr>{rows}</table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}.ok{color:#080}.bad{color:#b00}img{max-width:480px;margin:4px}
pre{background:#f8f8f8;padding:6px;overflow-x:auto;white-space:pre-wrap}.samples td{max-width:360px}"""


def render_html(data: dict[str, Any], results: list[Any]) -> str:
    h = html.escape
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>lmforge pipeline report</title>"
             f"<style>{CSS}</style></head><body><h1>lmforge pipeline</h1>",
             f"<p>{h(data['pipeline'])} &rarr; <code>{h(data['out'])}</code>, written {h(data['written'])}; "
             f"total {data['total_wall_s']:.1f} s.</p>"]
    if data["final"]:
        parts.append(f"<p>Final model: <code>{h(data['final'])}</code> &mdash; "
                     f"<code>lmforge chat --model {h(data['final'])}</code></p>")
    cols = COLUMNS
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{h(_cell(r[c], c))}</td>" for c in cols) + "</tr>" for r in data["table"])
    parts.append(f"<h2>Summary</h2><table><tr>{head}</tr>{body}</table>")
    for r in results:
        parts.append(f"<h2 id='{h(r.name)}'>{h(r.name)} <small>({h(r.kind)}, {h(r.status)}, "
                     f"{r.wall_s:.1f} s + {r.measure_s:.1f} s measuring)</small></h2>")
        if r.error:
            parts.append(f"<p class=bad>{h(r.error)}</p>")
        if r.argv:
            parts.append(f"<pre>lmforge {h(' '.join(r.argv))}</pre>")
        for c in r.checks:
            cls, mark = ("ok", "✓") if c["ok"] else ("bad", "✗")
            parts.append(f"<p class={cls}>{mark} {h(c['what'])}: {h(c['detail'])}</p>")
        if r.metrics:
            parts.append("<h3>metrics</h3>" + _kv(r.metrics))
        if r.after:
            parts.append("<h3>measured after</h3>" + _kv(r.after))
            if r.before:
                parts.append("<h3>measured before</h3>" + _kv(r.before))
            parts.append(_samples(r.before, r.after))
        parts.append("".join(_png(x) for x in r.plots))
        if r.config:
            parts.append("<details><summary>config</summary>" + _kv(r.config) + "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)
