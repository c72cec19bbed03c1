"""`lmforge data clean` on the fixture slices of the real corpora (tests/fixtures/clean, no ../shared needed):
planted exact / near duplicates, evaluation-set overlap and PII must be found, the clean originals left alone."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
from test_clean import perturb  # tests/ is on sys.path under pytest

from lmforge.data.clean import clean
from lmforge.data.clean.dedup import NearDedup

FIXTURES = Path(__file__).parent / "fixtures" / "clean"
CJK = "\u4e00-\u9fff"
PLACEHOLDER = re.compile(r"<(EMAIL|PHONE|ID_CARD|IP|CARD)>")


def c4_records() -> list[dict]:
    return [json.loads(x) for x in (FIXTURES / "c4_slice.jsonl").read_text(encoding="utf-8").splitlines()]


def wiki() -> list[str]:
    return [x for x in (FIXTURES / "wiki_slice.txt").read_text(encoding="utf-8").splitlines() if x.strip()]


def chapters() -> list[str]:
    t = (FIXTURES / "hongloumeng_slice.txt").read_text(encoding="utf-8")
    return [c.strip() for c in re.split(r"\n(?=第[^\n]{1,6}回\s)", t)]


def ref_shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Independent shingling: lower-cased words (letters/digits) or single CJK characters, n at a time."""
    t = re.findall(f"[{CJK}]|[^\\W_{CJK}]+", text.lower())
    return {tuple(t[i:i + n]) for i in range(len(t) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def test_minhash_estimates_track_exact_jaccard_on_fixture_text():
    rng = random.Random(0)
    base = [r["text"] for r in c4_records() if len(ref_shingles(r["text"])) >= 250][:4] + wiki()[:2]
    pairs = [(t, perturb(t, f, rng)) for t in base for f in (0.01, 0.05, 0.15, 0.3)]
    pairs += [(c, perturb(c, f, rng)) for c in chapters()[:2] for f in (0.02, 0.1)]
    pairs += [(base[0], base[1]), (chapters()[0], chapters()[1])]  # unrelated: J near 0
    k = 256
    nd = NearDedup(num_perm=k, ngram=5)
    sigs = nd.minhash.signatures([nd.shingles(x) for p in pairs for x in p])
    for i, (a, b) in enumerate(pairs):
        exact = jaccard(ref_shingles(a), ref_shingles(b))
        est = float((sigs[2 * i] == sigs[2 * i + 1]).mean())
        assert abs(est - exact) <= 4 * math.sqrt(exact * (1 - exact) / k) + 0.02, (i, est, exact)


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    """The default pipeline + decontamination over the fixture corpora with planted problems."""
    rng = random.Random(7)
    d = tmp_path_factory.mktemp("offline")
    recs = c4_records()
    rows = [{"text": r["text"], "id": f"c4-{r['c4_line']}"} for r in recs]
    rows += [{"text": t, "id": f"wiki-{i}"} for i, t in enumerate(wiki())]
    rows += [{"text": t, "id": f"hlm-{i}"} for i, t in enumerate(chapters())]
    originals = {r["id"]: r["text"] for r in rows}
    long_en = [r for r in rows[:len(recs)] if len(ref_shingles(r["text"])) >= 150]
    planted = [
        {"text": "  " + long_en[0]["text"].upper() + "\n", "id": "exact", "of": long_en[0]["id"]},
        {"text": perturb(long_en[1]["text"], 0.01, rng), "id": "near-en", "of": long_en[1]["id"]},
        {"text": perturb(rows[-3]["text"], 0.01, rng), "id": "near-zh", "of": rows[-3]["id"]},
    ]
    # PII planted into two originals in place (a planted copy would be a near-duplicate)
    pii = {"wiki-1": " Mail a.b@example.com or call +44 20 7946 0958 from 10.0.0.7.",
           "hlm-2": "\n请联系13812345678，身份证11010519491231002X，卡号4111 1111 1111 1111。"}
    for r in rows:
        if r["id"] in pii:
            r["text"] += pii[r["id"]]
            r["id"] = "pii-" + r["id"]
            del originals[r["id"][4:]]
    for p in planted:
        if "of" in p:
            assert jaccard(ref_shingles(p["text"]), ref_shingles(originals[p["of"]])) >= 0.9  # default threshold 0.8
    eval_src = long_en[2]["text"].split()
    (d / "eval.jsonl").write_text(json.dumps({"text": " ".join(eval_src[10:40])}) + "\n", encoding="utf-8")
    inp = d / "in.jsonl"
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + planted), encoding="utf-8")
    rep = clean([str(inp)], d / "out.jsonl", d / "report.json", {}, eval_files=[str(d / "eval.jsonl")],
                progress=False)
    out = [json.loads(x) for x in (d / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    return out, rep, originals, long_en[2]["id"]


def test_planted_duplicates_and_eval_overlap_removed(cleaned):
    out, rep, originals, contaminated = cleaned
    ids = [r["id"] for r in out]
    for p in ("exact", "near-en", "near-zh", contaminated):
        assert p not in ids, p
    stages = {s["stage"]: s for s in rep["stages"]}
    assert stages["exact_dedup"]["removed"]["exact_duplicate"]["documents"] == 1
    assert stages["near_dedup"]["removed"]["near_duplicate"]["documents"] == 2
    assert stages["decontaminate"]["removed"]["eval_overlap"]["documents"] == 1
    assert stages["near_dedup"]["duplicate_clusters"]["count"] == 2
    # per-stage bookkeeping is consistent
    for s in rep["stages"]:
        assert s["documents_in"] - s["documents_out"] == sum(v["documents"] for v in s["removed"].values())
    assert rep["documents_out"] == len(out) == rep["stages"][-1]["documents_out"]


def test_pii_only_where_planted_or_labelled(cleaned):
    out, rep, originals, _ = cleaned
    labels = json.loads((FIXTURES / "c4_demo_pii.json").read_text())["items"]
    labelled = {f"c4-{x['line']}" for x in labels}
    by_id = {r["id"]: r["text"] for r in out}
    assert by_id["pii-wiki-1"].endswith("Mail <EMAIL> or call <PHONE> from <IP>.")
    assert by_id["pii-hlm-2"].endswith("请联系<PHONE>，身份证<ID_CARD>，卡号<CARD>。")
    for i, t in by_id.items():
        if i in originals and i not in labelled:
            assert not PLACEHOLDER.search(t), (i, PLACEHOLDER.findall(t))
    pii = next(s for s in rep["stages"] if s["stage"] == "pii")["replacements"]
    assert pii["ID_CARD"] == 1 and pii["CARD"] == 1 and pii["IP"] == 1
    assert pii["EMAIL"] >= 1 and pii["PHONE"] >= 2


def test_originals_survive(cleaned):
    """Nothing from the clean originals is removed as a duplicate (all are distinct texts)."""
    out, rep, originals, _ = cleaned
    for st in ("exact_dedup", "near_dedup"):
        s = next(s for s in rep["stages"] if s["stage"] == st)
        removed = [r["doc"] for c in s["duplicate_clusters"]["largest"] for r in c["removed"]]
        assert len(removed) == s["documents_removed"]
    kept = {r["id"] for r in out}
    shingles = {i: ref_shingles(t) for i, t in originals.items()}
    sims = [jaccard(shingles[a], shingles[b]) for a in originals for b in originals if a < b]
    assert max(sims) < 0.5  # the originals really are distinct
    assert np.mean([i in kept for i in originals]) > 0.7  # filters are not wiping out real text
