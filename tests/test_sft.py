"""`lmforge sft`: instruction/chat data formats, response-only masks, mixing, bad records, and the command itself."""

from __future__ import annotations

import collections
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import refused

from lmforge.assets import STORIES260K
from lmforge.checkpoint import load_model
from lmforge.data.preference import encode_response, parse_record
from lmforge.data.sft import (
    BadCounts,
    default_template,
    iter_records,
    mix,
    read_conversations,
    record_to_conversations,
    split_heldout,
    tokenize_conversation,
)
from lmforge.errors import LMForgeError
from lmforge.files import current_umask
from lmforge.infer.chat import get_template
from lmforge.losses import IGNORE
from lmforge.peft import apply_peft
from lmforge.quant import QuantConfig, quantize_model, weight_count
from lmforge.stages.sft import SFTConfig, SFTData, build_examples
from lmforge.train.config import TrainConfig, plan_steps, stage_defaults
from lmforge.train.loop import Trainer
from lmforge.train.metrics import model_flops_per_token

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct"


def test_formats_become_one_conversation_form():
    alpaca = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief.",
              "history": [["hi", "hello"]]}
    assert record_to_conversations(alpaca) == [[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Add\n2 and 3"},
        {"role": "assistant", "content": "5"}]]
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"}
    assert record_to_conversations(share) == [[{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]]
    oai = {"messages": [{"role": "developer", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}
    assert record_to_conversations(oai)[0][0] == {"role": "system", "content": "s"}
    seed = {"instruction": "Classify", "instances": [{"input": "x", "output": "A"}, {"input": "", "output": "B"}]}
    assert [c[0]["content"] for c in record_to_conversations(seed)] == ["Classify\nx", "Classify"]


def test_preference_records_give_their_prompt_and_chosen_reply(tmp_path):
    """SFT on the chosen answers of preference data (the DPO paper's start for hh-rlhf), every form it comes in."""
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: rob a bank?\n\nAssistant: No.",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: rob a bank?\n\nAssistant: Sure, first"}
    assert record_to_conversations(hh) == [[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "rob a bank?"}, {"role": "assistant", "content": "No."}]]
    lf = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
          "rejected": {"from": "gpt", "value": "bad"}}
    trl = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    ranked = {"prompt": "q", "responses": ["good", "fair", "bad"]}
    for rec in (lf, trl, ranked):
        assert record_to_conversations(rec) == [[{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "good"}]], rec
    f = tmp_path / "prefs.jsonl"  # an empty best reply is data (say nothing), not a bad record
    f.write_text(json.dumps(trl) + "\n" + json.dumps({"chosen": "\n\nHuman: swear\n\nAssistant:",
                                                       "rejected": "\n\nHuman: swear\n\nAssistant: damn"}) + "\n")
    convs = read_conversations(f)
    assert [c.messages[-1]["content"] for c in convs] == ["good", ""]
    f.write_text(json.dumps({"prompt": "q", "chosen": "good"}) + "\n")
    with pytest.raises(LMForgeError, match=r"prefs.jsonl:1: .*rejected"):
        read_conversations(f)


def test_plain_text_preference_records_are_encoded_as_dpo_encodes_them(stories, tmp_path):
    """A model without a chat template: SFT on hh-rlhf transcripts trains exactly the chosen sequence DPO scores
    (plain text, prompt masked), not an Alpaca rendering of it; with --template the template is used."""
    _, tok = stories
    recs = [{"chosen": f"\n\nHuman: Tom{i} saw a dog.\n\nAssistant: He was happy.",
             "rejected": f"\n\nHuman: Tom{i} saw a dog.\n\nAssistant: No."} for i in range(4)]
    f = tmp_path / "hh.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = SFTConfig(data=SFTData(path=str(f), val_fraction=0.0))
    logs: list[str] = []
    train, _, _ = build_examples(cfg, tok, default_template(tok), logs.append)
    want = [encode_response(tok, parse_record(r), 0) for r in recs]
    assert sorted(map(str, train)) == sorted(map(str, want)) and "4 preference records as plain text" in logs[0]
    assert tok.decode([t for t in want[0]["labels"] if t >= 0]).strip() == "He was happy."
    cfg.data.template = "alpaca"
    train, _, _ = build_examples(cfg, tok, get_template("alpaca", tok), logs.append)
    assert "### Response" in tok.decode(train[0]["input_ids"])


def test_plain_text_preference_records_fill_vars_and_train_on_prompt(stories, tmp_path):
    """--data.vars fills the plain-text prompt and reply of a preference record, and --data.train_on_prompt scores
    its prompt tokens (every token but BOS), as they do for every other record."""
    _, tok = stories
    rec = {"chosen": "\n\nHuman: Who is {{name}}?\n\nAssistant: {{name}} is a cat.",
           "rejected": "\n\nHuman: Who is {{name}}?\n\nAssistant: No."}
    f = tmp_path / "hh.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    cfg = SFTConfig(data=SFTData(path=str(f), val_fraction=0.0, vars={"name": "Tom"}))
    (ex,), _, _ = build_examples(cfg, tok, default_template(tok), lambda m: None)
    filled = {k: v.replace("{{name}}", "Tom") for k, v in rec.items()}
    want = encode_response(tok, parse_record(filled), 0)
    assert ex == want and "{{" not in tok.decode(ex["input_ids"])
    cfg.data.train_on_prompt = True
    (ex,), _, _ = build_examples(cfg, tok, default_template(tok), lambda m: None)
    assert ex["input_ids"] == want["input_ids"]
    assert ex["labels"] == [-100] + want["input_ids"][1:] and want["input_ids"][0] == tok.bos_id


def test_bad_records_name_file_line_and_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": 3}\n')
    with pytest.raises(LMForgeError, match=r"d\.jsonl:3: field 'output' must be a string"):
        read_conversations(f)
    bad = BadCounts()
    assert len(read_conversations(f, skip_bad=True, bad=bad)) == 1 and bad.total == 1
    j = tmp_path / "d.json"
    j.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"conversations": [{"from": "alien", "value": "x"}]}\n]')
    with pytest.raises(LMForgeError, match=r"d\.json:3: field 'conversations\[0\]\.from'"):
        read_conversations(j)
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(LMForgeError, match=r"broken\.jsonl:2: malformed JSON"):
        list(iter_records(tmp_path / "broken.jsonl"))
    bad = BadCounts()  # --skip-bad counts a line that is not JSON (it stopped the run, as without the flag)
    assert len(read_conversations(tmp_path / "broken.jsonl", skip_bad=True, bad=bad)) == 1 and bad.total == 1
    (tmp_path / "lines.json").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    with pytest.raises(LMForgeError, match=r"lines\.json:2: malformed JSON \(Extra data .*name the file \.jsonl"):
        list(iter_records(tmp_path / "lines.json"))


def test_mixing_caps_and_weights_and_heldout_split():
    from lmforge.data.sft import Conversation

    a = [Conversation([{"role": "assistant", "content": f"a{i}"}], "a") for i in range(100)]
    b = [Conversation([{"role": "assistant", "content": f"b{i}"}], "b") for i in range(10)]
    mixed = mix([a, b], weights=[1.0, 2.0], cap=20, seed=0)
    assert sum(c.source == "a" for c in mixed) == 20 and sum(c.source == "b" for c in mixed) == 20
    assert len({c.messages[0]["content"] for c in mixed if c.source == "b"}) == 10
    half = mix([a], weights=[0.5], seed=1)
    assert len(half) == 50 and len({c.messages[0]["content"] for c in half}) == 50
    train, val = split_heldout(a, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90 and not {id(c) for c in val} & {id(c) for c in train}
    # NaN and inf crashed (ValueError, OverflowError), 1e9 filled the memory, a negative cap a ValueError
    for w in (math.nan, math.inf, 1e9, -1.0):
        with pytest.raises(LMForgeError, match=r"data\.weights: .*a weight is a number in \[0, 1000\]"):
            mix([a, b], weights=[1.0, w])
    with pytest.raises(LMForgeError, match=r"data\.cap: -5: must be >= 0"):
        mix([a], cap=-5)
    with pytest.raises(LMForgeError, match=r"data\.weights \[0, 0\]: they keep no example of the 110 given"):
        mix([a, b], weights=[0, 0])


def test_the_readmes_data_weights_flag(tmp_path):
    """`--data.weights 1,2`, as the README writes it, was refused ("expected a list, got '1,2'") before sft's own
    reading of it; one number is a list of one, and a word is named."""
    from lmforge.train.config import coerce

    assert coerce("1,2", list[float] | None, "data.weights") == [1.0, 2.0]
    assert coerce("0.5", list[float] | None, "data.weights") == [0.5] and coerce(2, list[float], "w") == [2.0]
    assert coerce([1, 2], list[float], "w") == [1.0, 2.0]
    with pytest.raises(LMForgeError, match=r"data\.weights\[1\]: expected float, got 'x'"):
        coerce("1,x", list[float], "data.weights")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for f, w in ((a, "cat"), (b, "dog")):
        f.write_text("".join(json.dumps({"instruction": f"Name a {w} {i}.", "output": f"Tom{i}."}) + "\n"
                             for i in range(12)))
    r = run("sft", "--data", f"{a},{b}", "--data.weights", "1,2", "--out", str(tmp_path / "o"), "--max-iters", "1",
            "--train.batch_size", "4")
    assert r.returncode == 0, r.stderr[-2000:]


def test_only_assistant_turns_are_scored_with_their_end_of_turn(stories):
    _, tok = stories
    msgs = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time."},
            {"role": "user", "content": "Another."}, {"role": "assistant", "content": "The end."}]
    ex = tokenize_conversation(tok, "alpaca", msgs)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) and ids[0] == tok.bos_id
    scored = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    assert scored.count(tok.eos_id) == 2  # each turn's end is learned
    text = tok.decode([i for i in scored if i != tok.eos_id])
    assert "Once upon a time." in text and "The end." in text and "Tell me" not in text and "Another" not in text
    # the prompt of the second turn is masked, so two runs of scored tokens
    runs = sum(1 for k in range(len(labels)) if labels[k] != IGNORE and (k == 0 or labels[k - 1] == IGNORE))
    assert runs == 2
    every = tokenize_conversation(tok, "alpaca", msgs, train_on_prompt=True)
    assert every["input_ids"] == ids and sum(lab != IGNORE for lab in every["labels"]) == len(ids) - 1
    plain = tokenize_conversation(tok, "plain", msgs)  # no end marker in the template: EOS appended to each turn
    assert sum(i == tok.eos_id for i, lab in zip(plain["input_ids"], plain["labels"]) if lab != IGNORE) == 2


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/instruct not present")
def test_shared_instruction_files_read():
    assert len(read_conversations(SHARED / "alpaca_en_demo.json")) == 999
    bad = BadCounts()
    zh = read_conversations(SHARED / "sharegpt_zh_1K_format.jsonl", skip_bad=True, bad=bad)
    assert len(zh) + bad.total == 1000 and any(len(c.messages) > 2 for c in zh)
    seeds = read_conversations(SHARED / "seed_tasks.jsonl")
    assert len(seeds) >= 175
    ident = read_conversations(SHARED / "identity.json", variables={"name": "Forge", "author": "lmforge"})
    assert not any("{{" in m["content"] for c in ident for m in c.messages)
    assert any("Forge" in m["content"] for c in ident for m in c.messages)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=300)


def test_sft_command_trains_resumes_and_leaves_a_loadable_model(tmp_path):
    data = tmp_path / "stories.jsonl"
    recs = [{"instruction": f"Write a story about a cat named Tom{i}.", "input": "",
             "output": f"Once upon a time, there was a cat named Tom{i}."} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "run"
    r = run("sft", "--data", str(data), "--out", str(out), "--max-iters", "4", "--train.batch_size", "4",
            "--train.save_interval", "2", "--packing")
    assert r.returncode == 0, r.stderr
    assert "template alpaca" in r.stderr and "full fine-tuning" in r.stderr and "max_iters 4" in r.stderr
    assert (out / "config.json").is_file() and (out / "chat_template.jinja").is_file()
    mask = current_umask()  # readable by others as anything the user writes (safetensors writes 0600, mkdtemp 0700)
    for f in [out, *out.rglob("*")]:
        assert f.stat().st_mode & 0o777 == (0o777 if f.is_dir() else 0o666) & ~mask, f
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in row for row in rows)
    g = run("generate", "--model", str(out), "--prompt", "Once", "--max-new-tokens", "5", "--temperature", "0")
    assert g.returncode == 0, g.stderr
    again = run("sft", "--data", str(data), "--out", str(out), "--max-iters", "6", "--train.batch_size", "4",
                "--packing", "--resume")
    assert again.returncode == 0 and "resumed from" in again.stderr and "step 6" in again.stderr


def test_sft_command_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x"}]')
    r = refused("sft", "--data", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("lmforge sft: error: ")
    assert "bad.json:1: field 'output' is missing" in r.stderr and "Traceback" not in r.stderr
    r = refused("sft", "--data", str(bad), "--peft.r", "4")
    assert r.returncode != 0 and "without a method" in r.stderr
    held = tmp_path / "q8"  # a quantized model's directory: its weights were replaced, quantization.json left
    held.mkdir()
    for n in ("config.json", "model.safetensors", "quantization.json"):
        (held / n).write_text("{}")
    r = refused("sft", "--data", str(bad), "--out", str(held))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"lmforge sft: error: {held}: already holds a model (config.json, model.safetensors, quantization.json) and "
        "no checkpoint to resume from; pass --overwrite to replace it, or choose another --out")
    r = refused("sft", "--data", str(bad), "--out", str(held), "--resume-or-start")  # (it removed the model's files)
    assert r.returncode == 1 and "already holds a model" in r.stderr and (held / "quantization.json").is_file()
    r = refused("sft", "--model", str(held), "--data", str(bad), "--out", str(held), "--overwrite")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"lmforge sft: error: --out {held}: it would replace {held}, the model being trained from; write elsewhere")
    r = refused("sft", "--data", str(bad), "--out", str(held), "--overwrite")  # (then the data is refused)
    assert r.returncode == 1 and "field 'output' is missing" in r.stderr
    assert not any((held / n).exists() for n in ("config.json", "model.safetensors", "quantization.json"))
    good = tmp_path / "good.jsonl"  # a batch of 10**9 rows wrapped round 5 examples until memory ran out
    good.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) + "\n" for i in range(5)))
    r = refused("sft", "--data", str(good), "--train.batch_size", "1000000000", "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "lmforge sft: error: train.batch_size 1000000000 is more than the 4 training examples: every batch would "
        "repeat them; use at most 4")  # (one of the 5 is held out)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_sft_with_peft_saves_adapter_only_and_loads_as_model(tmp_path, method):
    data = tmp_path / "d.jsonl"
    long = {"instruction": "Tell a long story.", "output": "Tom the cat ran home. " * 150}  # past the context:
    data.write_text("".join(json.dumps({"instruction": f"Name {i}", "output": f"Tom{i} the cat."}) + "\n"
                            for i in range(16)) + json.dumps(long) + "\n")  # cut to what the virtual tokens leave
    out = tmp_path / "run"
    r = run("sft", "--data", str(data), "--out", str(out), "--max-iters", "3", "--peft", method,
            "--train.batch_size", "4")
    assert r.returncode == 0, r.stderr
    assert f"peft {method}" in r.stderr
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"} <= files
    assert "model.safetensors" not in files and "config.json" not in files
    ck = sorted(out.glob("ckpt-*"))[-1]
    assert "train_weights.safetensors" in {p.name for p in ck.iterdir()}
    a = run("generate", "--model", str(out), "--prompt", "Once", "--max-new-tokens", "6", "--temperature", "0")
    b = run("generate", "--adapter", str(out), "--prompt", "Once", "--max-new-tokens", "6", "--temperature", "0")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout
    again = run("sft", "--data", str(data), "--out", str(out), "--max-iters", "4", "--peft", method,
                "--train.batch_size", "4", "--resume")
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr
    full = run("sft", "--model", str(out), "--data", str(data), "--out", str(tmp_path / "full"))  # its base frozen:
    assert full.returncode == 1 and full.stderr.strip().splitlines()[-1] == (  # "no trainable parameters"
        f"lmforge sft: error: {out}: an adapter directory; fully fine-tuning needs a plain model: add --peft METHOD "
        "(new adapters start from it), or make one with lmforge peft merge first")


def test_benchmark_tasks_run_at_each_evaluation(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Story {i}", "output": "Once upon a time."}) + "\n"
                            for i in range(12)))
    text = tmp_path / "heldout.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She liked to play outside.\n")
    out = tmp_path / "run"
    r = run("sft", "--data", str(data), "--out", str(out), "--max-iters", "2", "--train.eval_interval", "1",
            "--train.eval_tasks", f"[{{task: perplexity, data: {text}, name: stories}}]",
            "--train.best_metric", "stories_ppl")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    ppl = [row["stories_ppl"] for row in rows if "stories_ppl" in row]
    assert len(ppl) == 3 and all(p > 1 for p in ppl)  # steps 0, 1 and 2
    best = min((row for row in rows if "stories_ppl" in row and row["step"] > 0), key=lambda row: row["stories_ppl"])
    assert (out / "best").read_text().strip() == f"ckpt-{best['step']:07d}"
    r = run("sft", "--data", str(data), "--out", str(tmp_path / "bad"), "--max-iters", "1",
            "--train.eval_tasks", f"[{{task: nosuch, data: {text}, name: mine}}]")
    assert r.returncode == 1 and "error: train.eval_tasks mine: unknown task 'nosuch'" in r.stderr, r.stderr


def test_examples_whose_response_is_cut_off_are_dropped_or_refused():
    from lmforge.errors import LMForgeError
    from lmforge.losses import IGNORE
    from lmforge.stages.sft import drop_unscored

    late = {"input_ids": list(range(10)), "labels": [IGNORE] * 8 + [8, 9]}
    early = {"input_ids": list(range(10)), "labels": [IGNORE] * 2 + list(range(2, 10))}
    lines: list[str] = []
    assert drop_unscored([late, early], 5, 6, "training", lines.append) == [early]
    assert lines == ["dropped 1 training example(s) whose response starts after token 5"]
    with pytest.raises(LMForgeError, match="every training example's response starts after token 5"):
        drop_unscored([late], 5, 6, "training", lines.append)


def test_suggested_learning_rates_follow_the_reference_recipes():
    """Full fine-tuning 1e-5 at >= 1B (LLaMA-Factory), LoRA/QLoRA 1e-4 at 13B; both grow as 1/sqrt(params) for smaller
    models, at most 30x (stories260K)."""
    from lmforge.stages.sft import suggested_lr

    assert suggested_lr(None, 7e9) == pytest.approx(1e-5) and suggested_lr(None, 2.5e8) == pytest.approx(2e-5)
    assert suggested_lr("lora", 1.3e10) == pytest.approx(1e-4) and suggested_lr("lora", 7e10) == pytest.approx(1e-4)
    assert suggested_lr("lora", 1.35e8) == pytest.approx(9.81e-4, rel=1e-3)  # SmolLM2-135M: identity SFT learns
    assert suggested_lr("qlora", 1.35e8) == suggested_lr("lora", 1.35e8)
    assert suggested_lr("lora", 2.6e5) == pytest.approx(3e-3) and suggested_lr(None, 2.6e5) == pytest.approx(3e-4)
    assert suggested_lr("prompt", 1e9) == pytest.approx(3e-2)


def test_a_given_max_iters_sets_the_schedule():
    """``--max-iters 50`` on data worth 339 steps: warm-up, evaluations and checkpoints follow the 50 steps (they
    followed the epochs: 33 warm-up steps, no evaluation before the end)."""
    t = TrainConfig(max_iters=50)
    chosen = stage_defaults(339, 1e-3, True, t=t, explicit={"max_iters"})
    assert (chosen["max_iters"], chosen["warmup_iters"], chosen["eval_interval"]) == (50, 5, 10)
    assert stage_defaults(339, 1e-3, True, t=t, explicit=set())["warmup_iters"] == 33
    assert plan_steps(3, 339, 339) == "3 epochs = 339 steps"
    # small-batch noise is no spike in fine-tuning: a reward model's losses (mean 0.65) met a batch at 1.2
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = TrainConfig(**{**TrainConfig().__dict__, **stage_defaults(339, 1e-3, True)})
    trainer.recent = collections.deque([0.65 + 0.1 * ((i * 7) % 5 - 2) for i in range(50)], maxlen=50)
    assert not trainer.is_spike(1.2) and trainer.is_spike(2.0) and trainer.is_spike(float("nan"))
    assert plan_steps(3, 339, 50) == "50 steps (max_iters; 3 epochs would be 339)"


def test_a_quantized_base_counts_as_the_weights_it_stands_for():
    """Learning-rate rules read the model's size: an NF4 (QLoRA) or int8 base is as big as the float one (it counted
    only the float parameters left: QLoRA on SmolLM2 got 2.1e-3 instead of LoRA's 9.8e-4)."""
    full = weight_count(load_model(STORIES260K))
    assert full == sum(p.numel() for p in load_model(STORIES260K).parameters())
    counts = {}
    for method in ("lora", "qlora"):
        m = load_model(STORIES260K)
        apply_peft(m, method, {})
        counts[method] = weight_count(m)
    assert counts["lora"] == counts["qlora"] > full
    q8 = load_model(STORIES260K)
    quantize_model(q8, QuantConfig(8, embedding=True))  # the tied output projection shares the table: counted once
    assert weight_count(q8) == full
    # the trainer's FLOPs per token (MFU) of such a model read wte.weight, which a quantized table has not: sft --peft
    # lora on a `lmforge quantize` directory crashed with AttributeError before its first step
    assert model_flops_per_token(q8) == model_flops_per_token(load_model(STORIES260K))


def test_resume_refuses_another_stages_run_and_accepts_the_same_adapters_spelt_out(tmp_path):
    """`lmforge sft --resume` into a DPO run resumed from DPO's checkpoint, appended to its metrics and kept DPO's
    best model (its loss is another objective's): refused now, in one line. `--peft.r 8` (LoRA's default) on a
    run trained without it was refused as "peft.r none (this run: 8)": the adapters are compared as resolved."""
    from lmforge.assets import ASSETS

    prefs = ASSETS / "instruct" / "stories_preferences.jsonl"
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Name {i}", "output": f"Tom{i} the cat."}) + "\n"
                            for i in range(24)))
    small = ["--train.batch_size", "4", "--train.save_interval", "2", "--train.eval_interval", "2"]
    dpo = tmp_path / "dpo"
    r = run("dpo", "--data", str(prefs), "--out", str(dpo), "--max-iters", "2", *small)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("sft", "--data", str(data), "--out", str(dpo), "--max-iters", "4", "--resume", *small)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[-1].startswith(f"lmforge sft: error: {dpo / 'ckpt-0000002'}: cannot resume from it: it is a "
                                "checkpoint of lmforge dpo, this is lmforge sft"), lines[-1]
    lora = tmp_path / "lora"
    r = run("sft", "--data", str(data), "--out", str(lora), "--max-iters", "2", "--peft", "lora", *small)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("sft", "--data", str(data), "--out", str(lora), "--max-iters", "4", "--peft", "lora", "--peft.r", "8",
            "--resume", *small)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    r = run("sft", "--data", str(data), "--out", str(lora), "--max-iters", "6", "--peft", "lora", "--peft.r", "4",
            "--resume", *small)
    assert r.returncode == 1 and "peft.r 8 (this run: 4)" in r.stderr, r.stderr[-2000:]
