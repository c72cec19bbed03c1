"""Audit fixes of ``lmforge eval``: overflowing perplexities, .json arrays of texts, files that are not MMLU CSVs,
--limit per subject, fewer demonstrations than --shots."""

from __future__ import annotations

import json
import math

from test_eval import lmforge

from lmforge.eval.scoring import perplexity_metrics

CHINESE = "滿紙荒唐言一把辛酸淚都云作者痴誰解其中味" * 15  # no whitespace: one "word"


def test_perplexity_overflow_is_inf_and_json_null(tmp_path):
    """Word perplexity of Chinese text overflowed math.exp (OverflowError) after all the scoring."""
    m = perplexity_metrics(5000.0, 1000, 3000, 1)
    assert m["word_perplexity"] == math.inf and math.isclose(m["ppl"], math.exp(5.0))
    assert perplexity_metrics(1e6, 1, 10, 1)["ppl"] == math.inf
    txt = tmp_path / "zh.txt"
    txt.write_text(CHINESE, encoding="utf-8")
    out = tmp_path / "r.json"
    r = lmforge("eval", "--task", "perplexity", "--data", str(txt), "--context", "64", "--output", str(out))
    assert r.stdout.strip().splitlines()[-1].startswith("perplexity ppl=")
    assert any(line.split()[:2] == ["word_perplexity", "inf"] for line in r.stdout.splitlines()), r.stdout
    d = json.loads(out.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # strict JSON
    assert d["metrics"]["word_perplexity"] is None and d["metrics"]["ppl"] > 1
