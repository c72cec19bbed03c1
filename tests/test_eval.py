"""lmforge.eval: cached/batched scoring against a plain one-sequence-at-a-time forward, rolling windows against the
harness' definition, demonstration selection against independent formulas (and bm25s), answer extraction, CLI."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.data.preference import common_prefix
from lmforge.errors import LMForgeError
from lmforge.eval.fewshot import BM25, Selector, mmr, tfidf, words
from lmforge.eval.runner import build_context, majority, mean_stderr
from lmforge.eval.scoring import CPU_BATCH_TOKENS, JOIN_SLACK, Group, Scorer, encode_pair, rolling_windows
from lmforge.eval.tasks import (
    COT_EXEMPLARS,
    INVALID,
    TASKS,
    cot_rationale,
    extract_flexible,
    extract_strict,
    normalize_answer,
    read_choice_csv,
)
from lmforge.infer.sampling import cut_at_stop
from lmforge.model import Decoder
from lmforge.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "eval"


def shared(sub: str) -> Path:
    p = SHARED / sub
    if not p.exists():
        pytest.skip(f"{p} absent (the shared eval data)")
    return p


# ---- reference: one sequence at a time, no cache, no padding -------------------------------------------------------
def ref_loglik(model, ctx: list[int], cont: list[int]) -> float:
    """lm-evaluation-harness' _loglikelihood_tokens for one request: (ctx + cont)[:-1] in one forward, the last
    len(cont) log-softmax rows gathered at cont."""
    inp = torch.tensor([(ctx + cont)[-(model.cfg.block_size + 1):][:-1]])
    with torch.no_grad():
        lp = torch.log_softmax(model(inp)[0].double(), -1)[-len(cont):]
    return float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum())


def random_model(name: str, seed: int = 0, **kw) -> Decoder:
    torch.manual_seed(seed)
    m = Decoder(get_preset(name).replace(**kw)).eval()
    with torch.no_grad():  # spread the logits so that choices are far from ties
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bloom"])  # rope, learned positions, ALiBi
def test_cached_batched_scores_equal_one_sequence_forward(name):
    model = random_model(name)
    g = torch.Generator().manual_seed(1)
    groups = []
    for n in [3, 17, 9, 30, 1, 12]:  # different context lengths: left padding inside a batch
        ctx = torch.randint(0, 500, (n,), generator=g).tolist()
        conts = [torch.randint(0, 500, (k,), generator=g).tolist() for k in (1, 4, 2, 7)]
        groups.append(Group(ctx, conts))
    scorer = Scorer(model, None, batch_tokens=64, max_batch=4, cache_bytes=20_000)  # several batches and chunks
    got = scorer.score(groups)
    for gr, s in zip(groups, got):
        for cont, v in zip(gr.continuations, s):
            assert v == pytest.approx(ref_loglik(model, gr.context, cont), abs=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bloom"])
def test_shared_prefixes_run_once_and_score_like_one_sequence_forward(name):
    """Few-shot contexts: a 40-token header and demonstrations shared in nested ways (a prefix tree), plus
    contexts sharing nothing. Scores equal the plain forward; fewer tokens run than without sharing."""
    model = random_model(name, block_size=512)
    g = torch.Generator().manual_seed(2)

    def rand(n: int) -> list[int]:
        return torch.randint(0, 500, (n,), generator=g).tolist()

    header, demos = rand(40), [rand(n) for n in (30, 45, 38, 41, 33)]
    groups = []
    for q in range(5):  # each question after the other four demonstrations (the layout of the shared dev files)
        ctx = header + [t for k, d in enumerate(demos) if k != q for t in d] + rand(5 + 3 * q)
        groups.append(Group(ctx, [rand(k) for k in (1, 3, 1, 2)]))
    for q in range(4):  # one fixed demonstration block before each question (MMLU test with dev shots)
        groups.append(Group(header + demos[0] + demos[1] + rand(7 + 5 * q), [rand(k) for k in (1, 1, 4, 1)]))
    groups += [Group(rand(n), [rand(2), rand(1)]) for n in (12, 50, 3)]  # nothing shared
    plain = Scorer(model, None, batch_tokens=512, max_batch=4, cache_bytes=20_000)
    plain.share_prefixes = False
    shared = Scorer(model, None, batch_tokens=512, max_batch=4, cache_bytes=20_000)
    families, alone = shared._families(groups)
    if name == "tiny-bloom":  # ALiBi's distances are key slots: padding after the prefix would change them
        assert families == []
    else:
        assert [len(f) for f in families] == [9] and len(alone) == 3  # all nine share at least the header
    got, want = shared.score(groups), plain.score(groups)
    for gr, s, w in zip(groups, got, want):
        for cont, v, u in zip(gr.continuations, s, w):
            assert v == pytest.approx(u, abs=1e-4)
            assert v == pytest.approx(ref_loglik(model, gr.context, cont), abs=1e-4)
    assert shared.tokens < 0.7 * plain.tokens or name == "tiny-bloom"
    if name != "tiny-bloom":  # the contexts run about as few tokens as their prefix tree holds
        ctxs = sorted(gr.context for gr in groups[:9])
        tree = len(ctxs[0]) + sum(len(b) - common_prefix((a, b)) for a, b in zip(ctxs, ctxs[1:]))
        alone = sum(len(gr.context) for gr in groups[9:])
        rest = sum(len(c) - 1 for gr in groups for c in gr.continuations)  # continuation tokens after the first
        assert shared.tokens - rest - alone <= tree + JOIN_SLACK, (shared.tokens - rest - alone, tree)


def test_long_prefixes_run_in_pieces_of_batch_tokens_and_score_the_same():
    model = random_model("tiny-llama", block_size=512)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 500, (100,), generator=g).tolist()
    groups = [Group(prefix + torch.randint(0, 500, (n,), generator=g).tolist(), [[7], [8, 9, 10]]) for n in (5, 9, 3)]
    scorer = Scorer(model, None, batch_tokens=16)
    widths = []
    run = model.hidden_states
    model.hidden_states = lambda x, **kw: widths.append(x.shape[1]) or run(x, **kw)
    try:
        got = scorer.score(groups)
    finally:
        del model.hidden_states
    assert max(widths) <= 16 and len(widths) > 100 // 16
    for gr, s in zip(groups, got):
        for cont, v in zip(gr.continuations, s):
            assert v == pytest.approx(ref_loglik(model, gr.context, cont), abs=1e-4)


def test_batch_tokens_default_by_device():
    assert Scorer(random_model("tiny-llama"), None).batch_tokens == CPU_BATCH_TOKENS


def test_context_truncated_from_the_left_like_the_harness():
    model = random_model("tiny-llama", block_size=32)
    groups = [Group(list(range(40)), [[5]]), Group(list(range(3, 33)), [[7], [8, 9]]), Group([4, 5], [[1] * 12])]
    got = Scorer(model, None).score(groups)  # one batch would need 32 + 12 - 1 positions: split
    for g, s in zip(groups, got):
        for cont, v in zip(g.continuations, s):
            assert v == pytest.approx(ref_loglik(model, g.context, cont), abs=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bloom"])  # prefix sharing (families) and the plain path
def test_only_continuations_that_overflow_lose_context_like_the_harness(name):
    """At the context limit each (context, continuation) is cut on its own, as lm-evaluation-harness does
    (``(context + continuation)[-(block_size + 1):][:-1]``): a choice that fits after the whole context keeps all of
    it even when a longer choice of the same question overflows."""
    model = random_model(name, block_size=64)
    g = torch.Generator().manual_seed(4)

    def rand(n: int) -> list[int]:
        return torch.randint(0, 500, (n,), generator=g).tolist()

    header = rand(40)  # shared by the first two questions: a family where prefixes are shared
    groups = [Group(header + rand(15), [rand(3), rand(10), rand(14), rand(9), rand(14)]),  # 55 + 10 fits, 55 + 14 not
              Group(header + rand(18), [rand(12), rand(2), rand(20)]),
              Group(rand(60), [rand(1), rand(5), rand(6), rand(30)]),
              Group(rand(70), [rand(2), rand(1)])]  # longer than the model's context: every choice is cut
    got = Scorer(model, None, batch_tokens=256, max_batch=4).score(groups)
    for gr, s in zip(groups, got):
        assert len(s) == len(gr.continuations)
        for cont, v in zip(gr.continuations, s):
            assert v == pytest.approx(ref_loglik(model, gr.context, cont), abs=1e-4)
    # the choice that fits is scored after the whole context: not what a cut by the longest choice gives
    short = groups[0].continuations[1]
    assert got[0][1] != pytest.approx(ref_loglik(model, groups[0].context[-(64 + 1 - 14):], short), abs=1e-3)
    with pytest.raises(LMForgeError, match="does not fit"):
        Scorer(model, None).score([Group([1, 2], [rand(65)])])


def test_encode_pair_moves_trailing_space(stories):
    _, tok = stories
    ctx, cont = encode_pair(tok, "Answer: ", "Lily")
    assert ctx == tok.encode("Answer:")
    whole = tok.encode("Answer: Lily")
    assert ctx + cont == whole[: len(ctx)] + whole[len(ctx):] and cont == whole[len(ctx):]
    ctx0, cont0 = encode_pair(tok, "", "Lily")
    assert ctx0 == [tok.bos_id] and cont0 == tok.encode("Lily")


# ---- perplexity --------------------------------------------------------------------------------------------------
def harness_windows(tokens, prefix, max_len, context_len):
    """lm-evaluation-harness utils.get_rolling_token_windows + make_disjoint_window, restated."""
    out, pred_len, done = [], max_len - context_len + 1, 0
    first = min(max_len, len(tokens))
    out.append(([prefix] + tokens[: first - 1], tokens[:first]))
    done = first
    while done < len(tokens):
        k = min(len(tokens) - done, pred_len)
        end = done + k
        out.append((tokens[end - max_len - 1 : end - 1], tokens[end - k : end]))
        done += k
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in out]


@pytest.mark.parametrize("n,L,stride", [(1, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 8), (50, 8, 3), (50, 8, 1),
                                        (7, 16, 5)])
def test_rolling_windows_predict_every_token_once_and_match_the_harness(n, L, stride):
    toks = list(range(100, 100 + n))
    seq = [-1] + toks
    wins = rolling_windows(n, L, stride)
    predicted = []
    for a, b, k in wins:
        assert b - a <= L and k <= b - a
        predicted += seq[a + 1 : b + 1][-k:]
    assert predicted == toks
    ref = harness_windows(toks, -1, L, L - stride + 1)
    mine = [(seq[a:b], seq[a + 1 : b + 1][-k:]) for a, b, k in wins]
    # the harness runs (context + continuation)[:-1] of each disjoint window: the same inputs, the same scored tokens
    assert mine == [((c + t)[:-1], t) for c, t in ref]


def test_rolling_nll_equals_per_token_reference():
    model = random_model("tiny-llama", block_size=16)

    class Tok:
        bos_id, eos_id = 1, 2

    ids = torch.randint(3, 500, (45,), generator=torch.Generator().manual_seed(0)).tolist()
    for stride in (16, 5):
        nll, n = Scorer(model, Tok(), max_batch=3).rolling(ids, 16, stride)
        seq, ref, prev_end = [1] + ids, 0.0, 0
        for a, b, k in rolling_windows(len(ids), 16, stride):
            # each scored token, one forward per token over exactly the window's inputs before it
            ref -= sum(ref_loglik(model, seq[a : b + 1 - k + j], [seq[b + 1 - k + j]]) for j in range(k))
            prev_end = b
        assert prev_end == len(ids) and n == len(ids)
        assert nll == pytest.approx(ref, rel=1e-4)
    with pytest.raises(LMForgeError, match="stride must be between 1"):  # 0 ran as the default stride
        Scorer(model, Tok()).rolling(ids, 16, 0)


def test_perplexity_metrics_formulas():
    from lmforge.eval.scoring import perplexity_metrics

    m = perplexity_metrics(nll=20.0, tokens=10, n_bytes=40, n_words=8)
    assert m["ppl"] == pytest.approx(math.exp(2.0))
    assert m["bits_per_byte"] == pytest.approx(20 / 40 / math.log(2))
    assert m["word_perplexity"] == pytest.approx(math.exp(20 / 8))


# ---- demonstrations -------------------------------------------------------------------------------------------------
DOCS = ["the cat sat on the mat", "dogs chase cats in the park", "the stock market fell today",
        "a cat and a dog", "interest rates and the stock market", "the mat was red"]


def test_bm25_matches_the_formula_and_bm25s():
    toks = [words(d) for d in DOCS]
    bm = BM25(toks)
    q = words("cat on a mat")
    N, avg = len(toks), sum(map(len, toks)) / len(toks)
    for i, d in enumerate(toks):
        ref = 0.0
        for w in set(q):
            df = sum(w in x for x in toks)
            if not df:
                continue
            idf = math.log((N - df + 0.5) / (df + 0.5) + 1)
            f = d.count(w)
            ref += idf * f * 2.5 / (f + 1.5 * (1 - 0.75 + 0.75 * len(d) / avg))
        assert bm.scores(q)[i] == pytest.approx(ref)
    bm25s = pytest.importorskip("bm25s")
    r = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
    r.index(toks, show_progress=False)
    # Lucene (and bm25s' "lucene") leave out the constant (k1 + 1) factor of the numerator: same ranking
    assert list(r.get_scores(q) * 2.5) == pytest.approx(list(bm.scores(q)), rel=1e-5)


def test_mmr_picks_relevant_then_diverse():
    qs = torch.tensor([0.9, 0.89, 0.5]).numpy()
    ds = torch.tensor([[1.0, 0.99, 0.0], [0.99, 1.0, 0.0], [0.0, 0.0, 1.0]]).numpy()
    assert mmr(qs, ds, 2, lam=0.5) == [0, 2]  # the near-duplicate of 0 loses to the different one
    assert mmr(qs, ds, 2, lam=1.0) == [0, 1]  # pure relevance


def test_selector_methods_and_order():
    pool = [{"question": d} for d in DOCS]
    text = lambda d: d["question"]  # noqa: E731
    q = {"question": "the cat on the mat"}
    assert Selector(pool, text, "first_n").select(q, 2) == pool[:2]
    r1 = Selector(pool, text, "random", seed=3).select(q, 3, index=5)
    assert r1 == Selector(pool, text, "random", seed=3).select(q, 3, index=5) and len({id(x) for x in r1}) == 3
    sim = Selector(pool, text, "similar").select(q, 2)
    bm = BM25([words(d) for d in DOCS]).scores(words(q["question"]))
    top = sorted(range(len(DOCS)), key=lambda i: -bm[i])[:2]
    assert sim == [pool[i] for i in top]
    last = Selector(pool, text, "similar", order="similar_last").select(q, 2)
    assert last[-1] == pool[top[0]]  # most similar right before the query
    div = Selector(pool, text, "diverse").select(q, 3)
    assert len(div) == 3 and div[0] == pool[0]
    _, _, m = tfidf([words(d) for d in DOCS])
    assert m.shape[0] == len(DOCS)
    # the query itself is never its own demonstration
    assert q not in Selector(pool + [q], text, "similar").select(q, 6)


def test_mmlu_prompt_is_the_harness_prompt():
    t = TASKS["mmlu"]
    doc = {"question": " 2+2? ", "choices": ["1", "2", "3", "4"], "gold": 3, "subject": "high_school_mathematics"}
    demo = {"question": "1+1?", "choices": ["2", "3", "4", "5"], "gold": 0, "subject": "high_school_mathematics"}
    assert build_context(t, doc, [demo]) == (
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
        "1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert t.doc_to_choices(doc) == ["A", "B", "C", "D"]
    arc = TASKS["arc"]
    assert build_context(arc, {"question": "Why?", "choices": ["x", "y"], "gold": 1}, []) == "Question: Why?\nAnswer:"


def test_csv_forms(tmp_path):
    a = tmp_path / "astronomy_test.csv"
    a.write_text('"What, is it?",x,y,z,w,C\n')
    b = tmp_path / "b_dev.csv"
    b.write_text("question,choice0,choice1,choice2,choice3,answer\nq,x,y,z,w,2\n")
    c = tmp_path / "c.csv"
    c.write_text(",Question,A,B,C,D,Answer\n0,问题,甲,乙,丙,丁,C\n")
    for f in (a, b, c):
        (d,) = read_choice_csv(f)
        assert d["gold"] == 2 and len(d["choices"]) == 4
    assert read_choice_csv(a)[0]["subject"] == "astronomy" and read_choice_csv(a)[0]["question"] == "What, is it?"
    no_choices = tmp_path / "noch.csv"  # said: "answer 'A' is neither a letter A-J nor an index 0--1"
    for text, where in (("question,answer\nWhat?,A\n", "header"), ("What?,A\n", "first row")):
        no_choices.write_text(text)
        with pytest.raises(LMForgeError, match=f"noch.csv:1: 0 choice column\\(s\\) in the {where}: expected"):
            read_choice_csv(no_choices)


# ---- generation answers -------------------------------------------------------------------------------------------
def test_gsm8k_extraction_and_exact_match():
    strict = TASKS["gsm8k"].strict
    assert extract_strict("so 5+5=10\n#### 1,000", strict) == "1,000"
    assert extract_strict("no marker 12", strict) == INVALID
    assert extract_flexible("He pays $1,200. Then 3 more, total $45.") == "$45."
    assert extract_flexible("nothing") == INVALID
    assert normalize_answer("$45.") == "45" and normalize_answer("1,000") == "1000"
    assert normalize_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    cot = TASKS["gsm8k_cot"].strict
    assert extract_strict("5 * 4 = 20. The answer is 29.", cot) == "29"
    assert cot_rationale("A has <<2*3=6>>6 apples.\nThen 7.\n#### 7") == "A has 6 apples. Then 7. The answer is 7."
    assert len(COT_EXEMPLARS) == 8 and all(a.endswith(".") and "The answer is" in a for _, a in COT_EXEMPLARS)
    assert majority(["3", INVALID, "4", "4", "3"]) == "3" and majority(["4", "3", "3"]) == "3"
    assert majority([INVALID]) == INVALID
    assert cut_at_stop("1 2\n\nQuestion: x", ["Question:", "</s>"]) == "1 2\n\n"


def test_gsm8k_extraction_matches_harness_filters():
    ex = pytest.importorskip("lm_eval.filters.extraction")
    texts = ["so #### 12", "It costs $1,234.50 in total. The answer is 7.", "none", "-3 and 4 and 5."]
    for pattern, mine in [(TASKS["gsm8k"].strict, lambda t: extract_strict(t, TASKS["gsm8k"].strict)),
                          (TASKS["gsm8k_cot"].strict, lambda t: extract_strict(t, TASKS["gsm8k_cot"].strict))]:
        ref = list(ex.RegexFilter(regex_pattern=pattern).apply([[t] for t in texts], [{}] * len(texts)))
        assert [r[0] for r in ref] == [mine(t) for t in texts]
    flex = ex.RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    ref = list(flex.apply([[t] for t in texts], [{}] * len(texts)))
    assert [r[0] for r in ref] == [extract_flexible(t) for t in texts]


def test_mean_stderr_is_sample_stderr():
    xs = [1.0, 0.0, 1.0, 1.0, 0.0]
    m, se = mean_stderr(xs)
    assert m == pytest.approx(0.6) and se == pytest.approx(statistics.stdev(xs) / math.sqrt(5))


# ---- the command ---------------------------------------------------------------------------------------------------
def lmforge(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_cli_mmlu_five_shot_json_and_contract(tmp_path):
    dev = shared("mmlu_dev")
    out = tmp_path / "r.json"
    r = lmforge("eval", "--task", "mmlu", "--data", str(dev / "anatomy_dev.csv"), "--fewshot-data", str(dev),
                "--shots", "4", "--limit", "3", "--output", str(out))
    last = r.stdout.strip().splitlines()[-1]
    d = json.loads(out.read_text())
    assert last == f"mmlu acc={d['metrics']['acc']:.4f} acc_norm={d['metrics']['acc_norm']:.4f} n=3"
    rec = d["records"][0]
    assert rec["prompt"].startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert rec["prompt"].count("\nAnswer:") == 5 and len(rec["scores"]) == 4
    assert rec["choice"] == max(range(4), key=lambda j: rec["scores"][j])
    # the demonstrations are the other dev questions, not the query itself
    assert rec["prompt"].count(rec["prompt"].split("\n\n")[-1].split("\n")[0]) == 1


def test_cli_arc_jsonl_cmmlu_perplexity_gsm8k(tmp_path):
    arc = shared("arc") / "arc_easy_dev.jsonl"
    r = lmforge("eval", "--task", "arc", "--data", str(arc), "--limit", "4")
    assert r.stdout.strip().splitlines()[-1].startswith("arc acc=") and r.stdout.strip().endswith("n=4")
    js = tmp_path / "mc.jsonl"
    js.write_text('{"question": "Lily saw a", "choices": ["cat", "dog"], "answer": "dog"}\n'
                  '{"query": "Once upon a", "choices": ["time", "stone"], "answer": 0}\n')
    r = lmforge("eval", "--task", "jsonl", "--data", str(js), "--output", str(tmp_path / "j.json"))
    assert r.stdout.strip().endswith("n=2")
    assert json.loads((tmp_path / "j.json").read_text())["records"][1]["prompt"] == "Once upon a"
    cm = tmp_path / "cm"
    cm.mkdir()
    (cm / "agronomy_test.csv").write_text(",Question,A,B,C,D,Answer\n0,问题一,甲,乙,丙,丁,C\n1,问题二,甲,乙,丙,丁,A\n")
    (cm / "agronomy_dev.csv").write_text(",Question,A,B,C,D,Answer\n0,例题,甲,乙,丙,丁,B\n")
    r = lmforge("eval", "--task", "cmmlu", "--data", str(cm), "--fewshot-data", str(cm), "--shots", "1",
                "--output", str(tmp_path / "c.json"))
    assert r.stdout.strip().splitlines()[-1].startswith("cmmlu acc=")
    p = json.loads((tmp_path / "c.json").read_text())["records"][0]["prompt"]
    assert p.startswith("以下是关于agronomy的单项选择题") and p.endswith("答案：") and "答案： B\n\n" in p
    txt = tmp_path / "t.txt"
    txt.write_text("Once upon a time, there was a little girl named Lily. She liked to play outside. " * 12)
    r = lmforge("eval", "--task", "perplexity", "--data", str(txt), "--context", "64", "--stride", "32")
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity ppl=") and "bits_per_byte=" in last
    ppl = float(last.split("ppl=")[1].split()[0])
    assert 1.0 < ppl < 50.0  # stories260K knows this text
    gsm = tmp_path / "g.jsonl"
    gsm.write_text('{"question": "Lily has 2 apples and gets 3 more. How many?", "answer": "2+3=5\\n#### 5"}\n')
    r = lmforge("eval", "--task", "gsm8k", "--data", str(gsm), "--fewshot-data", str(gsm), "--shots", "0",
                "--max-new-tokens", "8", "--samples", "3", "--output", str(tmp_path / "g.json"))
    assert r.stdout.strip().splitlines()[-1].startswith("gsm8k exact_match_strict=")
    rec = json.loads((tmp_path / "g.json").read_text())["records"][0]
    assert len(rec["generations"]) == 3
    assert rec["prompt"] == "Question: Lily has 2 apples and gets 3 more. How many?\nAnswer:"
    r = lmforge("eval", "--task", "gsm8k", "--data", str(gsm), "--cot", "--shots", "2", "--max-new-tokens", "4",
                "--output", str(tmp_path / "c2.json"))
    p = json.loads((tmp_path / "c2.json").read_text())["records"][0]["prompt"]
    assert p.startswith("Q: There are 15 trees") and p.count("The answer is") == 2 and p.endswith("\nA:")


def test_cli_perplexity_context_beyond_the_model_is_said(tmp_path):
    """--context larger than the model's context was cut to it without a word."""
    txt = tmp_path / "t.txt"
    txt.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside. " * 12)
    big = lmforge("eval", "--task", "perplexity", "--data", str(txt), "--context", "4096")
    assert "note: --context 4,096 is more than the model's context of 512: windows of 512 tokens" in big.stderr
    fit = lmforge("eval", "--task", "perplexity", "--data", str(txt), "--context", "512")
    assert "note:" not in fit.stderr, fit.stderr
    assert big.stdout.strip().splitlines()[-1] == fit.stdout.strip().splitlines()[-1]


def test_cli_evaluates_the_model_with_its_adapter(tmp_path):
    from test_lora_cli import make_adapter

    make_adapter(tmp_path / "ad", "lora", {"targets": "all-linear"})
    txt = tmp_path / "t.txt"
    txt.write_text("Once upon a time, there was a little girl named Lily. She liked to play outside. " * 4)
    base = lmforge("eval", "--task", "perplexity", "--data", str(txt)).stdout.strip().splitlines()[-1]
    adapted = lmforge("eval", "--task", "perplexity", "--data", str(txt), "--adapter", str(tmp_path / "ad"))
    last = adapted.stdout.strip().splitlines()[-1]
    assert float(last.split("ppl=")[1].split()[0]) > float(base.split("ppl=")[1].split()[0]) * 1.01  # random B


def test_zero_shot_cot_prompt_and_answer(stories, tmp_path):
    from lmforge.eval import EvalConfig, evaluate

    model, tok = stories
    gsm = tmp_path / "g.jsonl"
    gsm.write_text('{"question": "Lily has 2 apples and gets 3 more. How many?", "answer": "2+3=5\\n#### 5"}\n')
    res = evaluate(model, tok, EvalConfig("gsm8k", str(gsm), cot=True, shots=0, max_new_tokens=6))
    rec = res.records[0]
    assert rec["prompt"] == "Q: Lily has 2 apples and gets 3 more. How many?\nA: Let's think step by step."
    assert res.config["prompt_task"] == "gsm8k_cot_zeroshot" and rec["gold"] == "5"
    text = rec["generations"][0]
    m = re.search(r"The answer is (-?[0-9.,]+)\.", text)  # the CoT answer form, nothing else
    strict = m.group(1).replace(",", "").rstrip(".") if m else INVALID
    assert rec["strict"] == strict and len(rec["generations"]) == 1


def test_cli_errors_are_one_line(tmp_path):
    r = lmforge("eval", "--task", "arc", "--data", str(tmp_path / "missing.jsonl"), check=False)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    r = lmforge("eval", "--task", "arc", "--data", str(bad), check=False)
    assert r.returncode == 1 and "bad.jsonl:1" in r.stderr and "Traceback" not in r.stderr
    r = lmforge("eval", "--task", "arc", "--data", str(bad), "--cot", check=False)
    assert r.returncode == 1 and "--cot" in r.stderr


def test_malformed_arc_and_gsm8k_records_are_refused_naming_their_line(tmp_path):
    """An ARC record with 1 choice text for 2 labels was scored (always wrong); a null GSM8K answer became the gold
    answer "None"; a missing field showed a KeyError repr."""
    from lmforge.eval.tasks import load_arc, load_gsm8k

    arc = tmp_path / "arc.jsonl"
    good = {"question": "x", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}
    for bad, why in (({**good, "choices": {"text": ["a"], "label": ["A", "B"]}}, "1 choice texts for 2 labels"),
                     ({"question": "x", "answerKey": "B"}, "no field 'choices'"),
                     ({**good, "answerKey": "C"}, "an answerKey among the labels")):
        arc.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(LMForgeError, match=rf"arc\.jsonl:2: not an ARC record \(.*{re.escape(why)}"):
            load_arc(arc)
    gsm = tmp_path / "gsm.jsonl"
    for bad in ({"question": "x", "answer": None}, {"question": ["x"], "answer": "#### 2"}, {"question": "x"}):
        gsm.write_text(json.dumps(bad) + "\n")
        with pytest.raises(LMForgeError, match=r"gsm\.jsonl:1: expected fields question \(text\) and answer"):
            load_gsm8k(gsm)
    gsm.write_text(json.dumps({"question": "x", "answer": 2}) + "\n")
    assert load_gsm8k(gsm)[0]["answer"] == "2"
    # without its final '#### N' the whole rationale was the gold answer (nothing could match it); '#### ten' too
    for answer in ("She has 3 + 4 = <<3+4=7>>7 apples.", "So #### ten"):
        gsm.write_text(json.dumps({"question": "x", "answer": answer}) + "\n")
        with pytest.raises(LMForgeError, match=r"gsm\.jsonl:1: answer has no final '#### N'"):
            load_gsm8k(gsm)
    for answer in ("3 + 4 = 7\n#### 7", "#### 1,234.5", "-3", "$12"):
        gsm.write_text(json.dumps({"question": "x", "answer": answer}) + "\n")
        assert load_gsm8k(gsm)[0]["answer"] == answer


def test_eval_files_with_a_byte_order_mark_bools_and_empty_demonstrations(tmp_path, stories):
    """A UTF-8 byte-order mark was scored as text (perplexity) or read into the CSV header ("answer 'answer' is
    neither a letter"); `"answer": true` was choice 1; an empty --fewshot-data file ran zero-shot with exit 0."""
    from lmforge.eval.tasks import load_choice_jsonl, load_mmlu, load_text

    bom = b"\xef\xbb\xbf"
    txt = tmp_path / "b.txt"
    txt.write_bytes(bom + b"Once upon a time.\n")
    assert load_text(txt)[0]["text"] == "Once upon a time.\n"
    csv = tmp_path / "x_test.csv"
    csv.write_bytes(bom + b"question,choice0,choice1,answer\nWhat?,yes,no,1\n")
    assert load_mmlu(csv)[0]["gold"] == 1
    nohead = tmp_path / "n_test.csv"
    nohead.write_text("question,choice0,choice1\nWhat?,yes,no\n")
    with pytest.raises(LMForgeError, match=r"n_test\.csv:1: its header has no 'answer' column"):
        load_mmlu(nohead)
    bad = tmp_path / "bad_test.csv"
    bad.write_bytes(b"question,A,B,answer\nWhat?,yes,n\xff,B\n")
    with pytest.raises(LMForgeError, match=r"bad_test\.csv:2: not UTF-8"):
        load_mmlu(bad)
    mc = tmp_path / "mc.jsonl"
    mc.write_bytes(bom + json.dumps({"question": "q", "choices": ["a", "b"], "answer": True}).encode() + b"\n")
    with pytest.raises(LMForgeError, match=r"mc\.jsonl:1: answer True is not a choice index"):
        load_choice_jsonl(mc)
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    mc.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1}) + "\n")
    r = lmforge("eval", "--task", "jsonl", "--data", str(mc), "--fewshot-data", str(empty), "--shots", "2",
                check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].endswith(
        f"{empty}: no demonstrations in it (--fewshot-data, --shots 2)"), r.stderr[-2000:]


def test_run_task_library_function(stories, tmp_path):
    from lmforge.eval import run_task

    model, tok = stories
    js = tmp_path / "mc.jsonl"
    js.write_text('{"question": "Lily saw a", "choices": ["cat", "dog"], "answer": 1}\n')
    model.train()
    m = run_task(model, tok, {"task": "jsonl", "data": str(js)})
    assert model.training  # restored
    assert set(m) >= {"acc", "acc_norm", "n"} and m["n"] == 1.0
    with pytest.raises(Exception, match="unknown eval task option"):
        run_task(model, tok, {"task": "jsonl", "data": str(js), "shot": 1})


def test_cli_output_never_replaces_an_input_or_an_existing_file(tmp_path):
    """--output was written over whatever was there, the --data file included (no --overwrite existed)."""
    story = tmp_path / "story.txt"
    story.write_text("Once upon a time there was a cat.\n")
    r = lmforge("eval", "--task", "perplexity", "--data", str(story), "--output", str(story), check=False)
    assert r.returncode == 1 and "which is being read" in r.stderr and story.read_text().startswith("Once")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    r = lmforge("eval", "--task", "perplexity", "--data", str(story), "--output", str(notes), check=False)
    assert r.returncode == 1 and "exists; pass --overwrite" in r.stderr and notes.read_text() == "mine\n"
    lmforge("eval", "--task", "perplexity", "--data", str(story), "--output", str(notes), "--overwrite")
    assert json.loads(notes.read_text())["task"] == "perplexity" and not list(tmp_path.glob(".notes*"))


def test_context_and_stride_are_refused_where_they_do_nothing(stories, tmp_path):
    """--context/--stride set perplexity's rolling windows; a multiple-choice task ignored them without a word."""
    from lmforge.eval import EvalConfig, evaluate

    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"question": "Q?", "choices": ["a", "b"], "answer": 0}) + "\n")
    for kw in ({"context": 64}, {"stride": 32}):
        with pytest.raises(LMForgeError, match="apply to perplexity"):
            evaluate(*stories, EvalConfig(task="jsonl", data=str(data), **kw))
