"""The lm-evaluation-harness adapter on tiny local tasks: the harness' own prompts, aggregation and metrics through
lmforge's model give the numbers ``lmforge eval`` gives on the same files."""

from __future__ import annotations

import json
import math

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm_eval)")

from lmforge.eval import EvalConfig, evaluate  # noqa: E402

MC = [
    {"question": "Lily went to the park and saw a big", "choices": ["dog", "sky", "spoon"], "answer": 0},
    {"question": "Tim was sad because his toy was", "choices": ["broken", "happy", "a tree"], "answer": 0},
    {"question": "The sun is", "choices": ["hot and bright", "a little cat"], "answer": 0},
    {"question": "Once upon a time, there was a", "choices": ["little girl", "car", "very big red ball"], "answer": 1},
]
TEXTS = [{"text": "Once upon a time, there was a little girl named Lily. She loved to play in the park."},
         {"text": "Tom had a red ball. He threw it to his friend Sam, and they played all day long. " * 4}]

TASKS = """
task: lmf_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {mc}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
ROLLING = """
task: lmf_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files: {{test: {texts}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GEN = """
task: lmf_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {mc}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


def test_harness_tasks_through_the_adapter(stories, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from lmforge.eval.harness import LMForgeLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    model, tok = stories
    mc, texts = tmp_path / "mc.jsonl", tmp_path / "texts.jsonl"
    mc.write_text("".join(json.dumps(d) + "\n" for d in MC))
    texts.write_text("".join(json.dumps(d) + "\n" for d in TEXTS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(TASKS.format(mc=mc))
    (tasks / "ppl.yaml").write_text(ROLLING.format(texts=texts))
    (tasks / "gen.yaml").write_text(GEN.format(mc=mc))
    lm = LMForgeLM(model=model, tokenizer=tok)
    res = lm_eval.simple_evaluate(model=lm, tasks=["lmf_tiny_mc", "lmf_tiny_ppl", "lmf_tiny_gen"],
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    r = res["results"]
    mine = evaluate(model, tok, EvalConfig("jsonl", str(mc)))
    assert r["lmf_tiny_mc"]["acc,none"] == pytest.approx(mine.metrics["acc"])
    assert r["lmf_tiny_mc"]["acc_norm,none"] == pytest.approx(mine.metrics["acc_norm"])
    assert r["lmf_tiny_mc"]["acc_stderr,none"] == pytest.approx(mine.metrics["acc_stderr"])
    # per question, the harness' log-likelihoods of every choice equal lmforge eval's scores
    for s, rec in zip(sorted(res["samples"]["lmf_tiny_mc"], key=lambda s: s["doc_id"]), mine.records):
        assert [x[0][0] for x in s["resps"]] == pytest.approx(rec["scores"], abs=1e-4)
    ppl = evaluate(model, tok, EvalConfig("perplexity", str(texts)))
    assert r["lmf_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(ppl.metrics["bits_per_byte"], rel=1e-5)
    assert r["lmf_tiny_ppl"]["word_perplexity,none"] == pytest.approx(ppl.metrics["word_perplexity"], rel=1e-5)
    assert math.isfinite(r["lmf_tiny_gen"]["exact_match,none"])
    gens = [s["resps"][0][0] for s in sorted(res["samples"]["lmf_tiny_gen"], key=lambda s: s["doc_id"])]
    assert all(isinstance(g, str) and "." not in g for g in gens) and any(gens)


def test_adapter_greedy_flag(stories, monkeypatch):
    from lm_eval.api.instance import Instance

    from lmforge.eval.harness import LMForgeLM

    model, tok = stories
    lm = LMForgeLM(model=model, tokenizer=tok)
    (gen,) = lm.generate_until([Instance("generate_until", {}, ("Once upon a time", {"until": ["\n"],
                                                                                      "max_gen_toks": 5}), 0)])
    # several requests are generated together, each as it would be alone
    prompts = [("Once upon a time", 5), ("Lily and her mom went to the park. They saw a", 9), ("Tom", 3)]
    from lmforge.infer import generate as G

    calls = []
    real = G.generate_batch
    monkeypatch.setattr(G, "generate_batch", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1])
    many = lm.generate_until([Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": n}), k)
                              for k, (p, n) in enumerate(prompts)])
    monkeypatch.undo()
    assert calls == [3]  # one batch
    alone = [lm.generate_until([Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": n}), 0)])[0]
             for p, n in prompts]
    assert many == alone and many[0] == gen
    reqs = [Instance("loglikelihood", {}, ("Once upon a time", gen), 0),
            Instance("loglikelihood", {}, ("Once upon a time", gen + " zebra"), 0)]
    (lp1, g1), (lp2, g2) = lm.loglikelihood(reqs)
    assert g1 and not g2 and lp2 < lp1 < 0


def test_harness_command_line_runs_lmforge_models(tmp_path):
    """What a user types: the harness' own CLI through ``python -m lmforge.eval.harness`` on an lmforge model."""
    import subprocess
    import sys

    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(d) + "\n" for d in MC))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(TASKS.format(mc=mc))
    env = {**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "lmforge.eval.harness", "--model", "lmforge", "--tasks", "lmf_tiny_mc",
                        "--include_path", str(tasks), "--output_path", str(out)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lmf_tiny_mc" in r.stdout and "acc" in r.stdout
    (res_file,) = out.rglob("results_*.json")
    got = json.loads(res_file.read_text())["results"]["lmf_tiny_mc"]
    from lmforge.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(None, None, "cpu")
    mine = evaluate(model, tok, EvalConfig("jsonl", str(mc)))
    assert got["acc,none"] == pytest.approx(mine.metrics["acc"])
    assert got["acc_norm,none"] == pytest.approx(mine.metrics["acc_norm"])


def test_adapter_cuts_each_request_on_its_own_at_the_context_limit(stories):
    """LMForgeLM.loglikelihood at the context limit equals the harness' HFLM computation per request:
    ``(context + continuation)[-(block_size + 1):][:-1]``, so a choice that fits keeps the whole context."""
    import torch
    from lm_eval.api.instance import Instance

    from lmforge.eval.harness import LMForgeLM
    from lmforge.model import Decoder
    from lmforge.presets import get_preset

    _, tok = stories
    torch.manual_seed(0)
    model = Decoder(get_preset("tiny-llama").replace(block_size=32, vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ctx = "Once upon a time, there was a little girl named Lily. She loved to play. One day she"
    conts = [" ran", " went to the big park with her mom and dad to play", " saw a dog"]
    c_ids = tok.encode(ctx)
    lens = [len(tok.encode(ctx + c)) - len(c_ids) for c in conts]
    assert len(c_ids) + min(lens) <= 33 < len(c_ids) + max(lens)  # one choice fits, one overflows

    def ref(c: str) -> float:  # HFLM._encode_pair and _loglikelihood_tokens, one request at a time
        whole = tok.encode(ctx + c)
        cont = whole[len(c_ids):]
        inp = torch.tensor([(c_ids + cont)[-(32 + 1):][:-1]])
        with torch.no_grad():
            lp = torch.log_softmax(model(inp)[0].double(), -1)[-len(cont):]
        return float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum())

    lm = LMForgeLM(model=model, tokenizer=tok)
    got = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, c), k) for k, c in enumerate(conts)])
    for c, (lp, _) in zip(conts, got):
        assert lp == pytest.approx(ref(c), abs=1e-4)
