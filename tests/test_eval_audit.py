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


def test_mmlu_on_a_jsonl_file_says_it_is_not_an_mmlu_csv(tmp_path):
    """An ARC JSONL line split at its commas has > 10 columns: IndexError naming no file, as --data and demos."""
    js = tmp_path / "arc.jsonl"
    js.write_text('{"id": "a", "question": {"stem": "x", "choices": [{"text": "a", "label": "A"}, {"text": "b", '
                  '"label": "B"}, {"text": "c", "label": "C"}, {"text": "d", "label": "D"}]}, "answerKey": "A", '
                  '"e": 1, "f": 2, "g": 3, "h": 4, "i": 5}\n')
    csv = tmp_path / "anatomy_dev.csv"
    csv.write_text("Q?,a,b,c,d,A\n")
    for extra in ([], ["--fewshot-data", str(js), "--shots", "1"]):
        r = lmforge("eval", "--task", "mmlu", "--data", str(csv if extra else js), *extra, check=False)
        err = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(err) == 1, r.stderr
        assert f"{js}:1: not an MMLU CSV" in err[0] and "found 16 columns" in err[0], err


def test_perplexity_reads_a_json_array_of_texts(tmp_path):
    """A .json array of {"text"} records was scored as its raw JSON source; now read like .jsonl."""
    text = "Once upon a time, there was a little girl named Lily. She liked to play outside. " * 3
    js, jl = tmp_path / "t.json", tmp_path / "t.jsonl"
    js.write_text(json.dumps([{"text": text}, {"text": text}]))
    jl.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": text}) + "\n")
    a, b = (lmforge("eval", "--task", "perplexity", "--data", str(p)).stdout.strip().splitlines()[-1] for p in (js, jl))
    assert a == b
    js.write_text(json.dumps([{"text": text}, {"txt": text}]))
    r = lmforge("eval", "--task", "perplexity", "--data", str(js), check=False)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        f"lmforge eval: error: {js}: record 2: expected a string field 'text'"], r.stderr


def _subjects(tmp_path):
    d = tmp_path / "mmlu"
    d.mkdir()
    for s in ("anatomy", "virology"):
        (d / f"{s}_test.csv").write_text("Q1?,a,b,c,d,A\nQ2?,a,b,c,d,B\nQ3?,a,b,c,d,C\n")
        (d / f"{s}_dev.csv").write_text("D1?,a,b,c,d,A\nD2?,a,b,c,d,B\n")
    return d


def test_limit_is_per_subject_on_a_folder(tmp_path):
    """--limit on an MMLU folder took the first N questions overall (one subject); the harness' is per subject."""
    out = tmp_path / "r.json"
    r = lmforge("eval", "--task", "mmlu", "--data", str(_subjects(tmp_path)), "--limit", "2", "--output", str(out))
    assert r.stdout.strip().endswith("n=4")
    assert {k: v["n"] for k, v in json.loads(out.read_text())["subjects"].items()} == {"anatomy": 2, "virology": 2}


def test_fewer_demonstrations_than_shots_is_warned_once_per_subject(tmp_path):
    """--shots 5 with 2 dev questions per subject silently gave 2."""
    d = _subjects(tmp_path)
    r = lmforge("eval", "--task", "mmlu", "--data", str(d), "--fewshot-data", str(d), "--shots", "5")
    warn = [x for x in r.stderr.splitlines() if x.startswith("warning: --shots")]
    assert warn == [f"warning: --shots 5 but only 2 demonstration(s) available for subject {s!r} (the question "
                    "itself is never one)" for s in ("anatomy", "virology")], r.stderr
    r = lmforge("eval", "--task", "mmlu", "--data", str(d), "--fewshot-data", str(d), "--shots", "2")
    assert "warning: --shots" not in r.stderr


def test_a_question_with_one_choice_and_a_temperature_without_samples_are_refused(tmp_path):
    """A one-choice question was scored correct whatever the model said (audit C F19); --temperature without
    --samples > 1 was accepted and did nothing, one answer being greedy (F18)."""
    js = tmp_path / "c.jsonl"
    js.write_text(json.dumps({"question": "Q?", "choices": ["a", "b"], "answer": 0}) + "\n"
                  + json.dumps({"question": "Q?", "choices": ["a"], "answer": 0}) + "\n")
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}]},
                               "answerKey": "A"}) + "\n")
    for task, f, line in (("jsonl", js, 2), ("arc", arc, 1)):
        r = lmforge("eval", "--task", task, "--data", str(f), check=False)
        assert r.returncode != 0 and r.stderr.strip().splitlines() == [
            f"lmforge eval: error: {f}:{line}: 1 choice(s); a multiple-choice question needs at least 2"], r.stderr
    gsm = tmp_path / "g.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    r = lmforge("eval", "--task", "gsm8k", "--data", str(gsm), "--temperature", "0.3", check=False)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "lmforge eval: error: --temperature 0.3: applies with --samples > 1 (self-consistency); one answer is "
        "decoded greedily"], r.stderr
