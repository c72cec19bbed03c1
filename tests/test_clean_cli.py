"""`python -m lmforge data clean` end to end in a subprocess: outputs, report, bad input, atomic writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
C4 = SHARED / "data" / "corpora" / "en" / "c4_demo.jsonl"
HLM = SHARED / "data" / "corpora" / "hongloumeng.txt"


def clean(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "lmforge", "data", "clean", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=e, timeout=300)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("clean:")]
    assert len(lines) == 1 and lines[0].startswith("lmforge data: error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not C4.exists() or not HLM.exists():
        pytest.skip("../shared/data/corpora not found")
    d = tmp_path_factory.mktemp("corpus")
    all_rows = [json.loads(x) for x in C4.read_text(encoding="utf-8").splitlines()]
    rows = all_rows[:120]  # lines 65 and 97 hold the only genuine e-mail addresses among them
    planted = [
        {"text": rows[7]["text"], "id": "exact-copy"},
        {"text": rows[9]["text"].replace(" the ", " teh ", 1), "id": "near-copy"},
        {"text": all_rows[151]["text"] + "\nWrite to me at jane.roe@example.org or call +1 (415) 555-0132.",
         "id": "pii"},
        {"text": "<p>" + all_rows[154]["text"] + "</p>\nThis site uses cookies.", "id": "html"},
    ]
    jl = d / "web.jsonl"
    jl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + planted), encoding="utf-8")
    zh = d / "hlm.txt"
    text = HLM.read_text(encoding="utf-8")[:60000]
    zh.write_text(text[:text.rindex("。") + 1] + "请致电13812345678或发邮件到 wang@example.cn。"
                  "身份证号11010519491231002X。\n", encoding="utf-8")
    return d, jl, zh, rows


def test_clean_cli_end_to_end(corpus, tmp_path):
    pytest.importorskip("py3langid")
    d, jl, zh, rows = corpus
    out, rep = tmp_path / "out.jsonl", tmp_path / "report.json"
    r = clean(jl, zh, "--txt-split", "paragraph", "--output", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    assert f"{out}: kept" in r.stdout and "near_dedup" in r.stdout
    kept = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    report = json.loads(rep.read_text(encoding="utf-8"))
    assert report["documents_out"] == len(kept) and report["documents_in"] > 120
    ids = [k.get("id") for k in kept]
    assert "exact-copy" not in ids and "near-copy" not in ids
    assert "pii" in ids and "html" in ids  # scrubbed, not dropped
    pii_doc = kept[ids.index("pii")]["text"]
    assert pii_doc.endswith("Write to me at <EMAIL> or call <PHONE>.")
    assert "<p>" not in kept[ids.index("html")]["text"] and "cookies" not in kept[ids.index("html")]["text"]
    zh_out = "\n".join(k["text"] for k in kept if "id" not in k)
    assert "请致电<PHONE>或发邮件到 <EMAIL>。身份证号<ID_CARD>。" in zh_out
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["lang", "markup", "quality", "sentence_dedup", "exact_dedup", "near_dedup", "pii"]
    for s in report["stages"]:
        assert s["documents_in"] - s["documents_out"] == sum(v["documents"] for v in s["removed"].values())
    for a, b in zip(report["stages"], report["stages"][1:]):
        assert a["documents_out"] == b["documents_in"]
    ex = stages["exact_dedup"]["duplicate_clusters"]["largest"]
    assert ex[0]["kept"] == f"{jl}:8" and ex[0]["removed"][0]["doc"] == f"{jl}:121"
    near = stages["near_dedup"]["duplicate_clusters"]["largest"]
    assert {"kept": f"{jl}:10", "doc": f"{jl}:122"} in [{"kept": c["kept"], "doc": x["doc"]} for c in near
                                                        for x in c["removed"]]
    repl = stages["pii"]["replacements"]
    assert repl["EMAIL"] >= 2 and repl["PHONE"] >= 2 and repl["ID_CARD"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_clean_cli_config_stages_and_eval(corpus, tmp_path):
    d, jl, zh, rows = corpus
    ev = tmp_path / "eval.txt"
    ev.write_text(" ".join(rows[30]["text"].split()[:30]) + "\n", encoding="utf-8")
    cfg = tmp_path / "clean.yaml"
    cfg.write_text("stages:\n  - exact_dedup\n  - near_dedup: {threshold: 0.9, num_perm: 64}\n"
                   "  - decontaminate: {eval_files: [eval.txt], ngram: 13}\n  - pii: {types: [email]}\n")
    out, rep = tmp_path / "o.jsonl", tmp_path / "r.json"
    r = clean(jl, "--config", cfg, "--output", out, "--report", rep, "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    report = json.loads(rep.read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["exact_dedup", "near_dedup", "decontaminate", "pii"]
    assert stages["decontaminate"]["removed"]["eval_overlap"]["examples"] == [f"{jl}:31"]
    assert stages["pii"]["replacements"] == {"EMAIL": 3}  # 2 genuine (hand-labelled) in the first 120 rows + 1
    assert stages["near_dedup"]["config"]["num_perm"] == 64
    r = clean(jl, "--stages", "pii", "--eval", ev, "--output", out, "--report", rep, "--quiet", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert [s["stage"] for s in json.loads(rep.read_text())["stages"]] == ["decontaminate", "pii"]


@pytest.mark.parametrize("yaml_text, msg", [
    ("stages: [lang, dedup]\n", "stages[1]: unknown stage 'dedup' (allowed: lang, markup, quality"),
    ("stages:\n  - quality: {min_word: 3}\n", "stages[0].quality: unknown key 'min_word' (allowed: min_words,"),
    ("stage: [pii]\n", "unknown key 'stage' (allowed: stages, batch_size)"),
    ("stages:\n  - quality: {min_words: abc}\n", "stage quality: min_words: expected int, got 'abc'"),
    ("stages: [pii\n", ":2: invalid YAML"),
    ("stages: [pii]\nstages: [lang]\n", ":2: duplicate key 'stages' (also on line 1)"),
])
def test_clean_cli_config_errors(corpus, tmp_path, yaml_text, msg):
    _, jl, _, _ = corpus
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    line = one_line_error(clean(jl, "--config", cfg, "--output", tmp_path / "o.jsonl", "--report",
                                tmp_path / "r.json"))
    assert f"{cfg}:" in line and msg in line
    assert not (tmp_path / "o.jsonl").exists()


def test_clean_cli_bad_input(tmp_path):
    good = {"text": "The quick brown fox jumps over the lazy dog. " * 20}
    p = tmp_path / "in.jsonl"
    p.write_bytes(json.dumps(good).encode() + b"\n" + b'{"text": "unterminated\n' + json.dumps(good).encode()
                  + b"\n" + b'{"text": ""}\n' + b'{"txt": "x"}\n')
    out, rep = tmp_path / "o.jsonl", tmp_path / "r.json"
    out.write_text("previous output\n")
    line = one_line_error(clean(p, "--stages", "pii", "--output", out, "--report", rep, "--overwrite"))
    assert f"{p}:2: malformed JSON" in line and "--skip-bad" in line
    assert out.read_text() == "previous output\n" and not rep.exists()  # untouched, nothing half-written
    assert not list(tmp_path.glob(".*.tmp"))
    r = clean(p, "--stages", "pii", "--output", out, "--report", rep, "--skip-bad", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "skipped 3 malformed records" in r.stdout
    assert len(out.read_text().splitlines()) == 2
    bad = json.loads(rep.read_text())["bad_records"]
    assert bad["skipped"] == 3 and bad["reasons"] == {"malformed_json": 1, "empty": 1, "missing_field": 1}
    line = one_line_error(clean(p, "--field", "body", "--stages", "pii", "--output", out, "--report", rep,
                                "--overwrite"))
    assert f"{p}:1: field 'body' missing (fields: text" in line
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("红楼梦第一回\n".encode("gbk"))
    line = one_line_error(clean(gbk, "--stages", "pii", "--output", out, "--report", rep, "--overwrite"))
    assert f"{gbk}:1: not UTF-8 text" in line
    line = one_line_error(clean(p, "--output", p, "--report", rep, "--skip-bad"))
    assert "the output is also an input" in line


def test_clean_cli_interrupted_run_leaves_no_output(tmp_path):
    mod = tmp_path / "slowscore.py"
    mod.write_text("import time\n\ndef score(text):\n    time.sleep(0.05)\n    return 1.0\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 4\nstages:\n  - perplexity: {scorer: 'slowscore:score', max_perplexity: 10}\n")
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(400)))
    out, rep = tmp_path / "o.jsonl", tmp_path / "r.json"
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "data", "clean", str(inp), "--config", str(cfg),
                             "--output", str(out), "--report", str(rep)], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a test run started as a background job inherits SIGINT ignored: Ctrl-C as a terminal
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not list(tmp_path.glob(".o.jsonl.*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".o.jsonl.*.tmp")), "the run never started writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not out.exists() and not rep.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_whole_book_dropped_as_one_document_says_so_and_how_to_split_it(tmp_path):
    """tinyshakespeare.txt is one document (the whole file) and fails the quality filter's word cap: the command
    said nothing of it under --quiet and wrote an empty output; now one warning names the stage and --txt-split."""
    from lmforge.assets import TINYSHAKESPEARE

    out = tmp_path / "c.jsonl"
    r = clean(TINYSHAKESPEARE, "--output", out, "--report", tmp_path / "r.json", "--quiet", "--stages", "quality")
    assert r.returncode == 0 and out.read_text() == "", r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"warning: {out}: no document kept of 1"), r.stderr
    assert "quality: too_many_words 1" in lines[0] and "--txt-split paragraph" in lines[0], lines[0]
    r = clean(TINYSHAKESPEARE, "--output", tmp_path / "p.jsonl", "--report", tmp_path / "p.json", "--quiet",
              "--stages", "quality", "--txt-split", "paragraph")
    assert r.returncode == 0 and r.stderr == "" and (tmp_path / "p.jsonl").read_text(), r.stderr
