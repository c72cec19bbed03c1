"""`lmforge rejection-sample`: best-of-K by the reward model, written as SFT data that `lmforge sft` trains on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from cli_run import refused

from lmforge.data.preference import PreferenceRecord, collate_groups
from lmforge.model.heads import ScalarHeadModel, save_scalar_model
from lmforge.stages.reward import encode_group, load_reward_model


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=600)


def test_rejection_sample_writes_the_best_of_k_as_sft_data(tmp_path, stories):
    model, tok = stories
    torch.manual_seed(0)
    rm_dir = save_scalar_model(ScalarHeadModel(model), tmp_path / "rm", tok)  # a tiny random reward model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Tom saw a dog.", "Lily had a cake."]))
    out = tmp_path / "best.jsonl"
    r = run("rejection-sample", "--model", "", "--reward", str(rm_dir), "--prompts", str(prompts), "--k", "4",
            "--out", str(out), "--max-new-tokens", "12", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "2 prompts x 4 samples" in r.stderr
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows) == 2
    rm, rtok, template = load_reward_model(rm_dir)
    for row, p in zip(rows, ["Tom saw a dog.", "Lily had a cake."]):
        msgs = row["messages"]
        assert msgs[0] == {"role": "user", "content": p} and msgs[-1]["role"] == "assistant"
        assert len(row["rewards"]) == 4 and row["reward"] == max(row["rewards"])
        # independent re-score of the written best response (plain text: prompt + response as written)
        rec = PreferenceRecord(msgs[:1], [msgs[-1]["content"]], p)
        b = collate_groups([encode_group(rtok, rec, template, 512)])
        with torch.no_grad():
            s = rm.score(b["input_ids"], b["attention_mask"]).item()
        assert s == pytest.approx(row["reward"], abs=1e-3)
    sft = run("sft", "--data", str(out), "--out", str(tmp_path / "sft"), "--max-iters", "1", "--train.batch_size",
              "2", "--data.val_fraction", "0")
    assert sft.returncode == 0, sft.stderr
    assert "2 train" in sft.stderr


def test_rejection_sample_errors_are_one_line(tmp_path):
    r = run("rejection-sample", "--model", "", "--reward", str(tmp_path), "--prompts", str(tmp_path / "p.txt"),
            "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("lmforge rejection-sample: error: ")
    assert "Traceback" not in r.stderr


def test_outputs_are_checked_before_any_work_and_long_prompts_left_out(tmp_path, stories):
    """rejection-sample --out and reward score --output replaced any file, their own inputs and the reward model's
    weights included; a prompt longer than the context was written as a blank reply; --batch-size -1 scored
    nothing with exit 0."""
    model, tok = stories
    torch.manual_seed(0)
    rm_dir = save_scalar_model(ScalarHeadModel(model), tmp_path / "rm", tok)
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat sat on the mat " * 300 + "\nTom saw a dog.\n")
    weights = (rm_dir / "model.safetensors").read_bytes()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": "A cat.", "rejected": "A dog."}) + "\n")

    def sample(*args: str) -> subprocess.CompletedProcess:
        return run("rejection-sample", "--model", "", "--reward", str(rm_dir), "--prompts", str(prompts), "--k", "2",
                   "--max-new-tokens", "4", *args)

    def refused(r: subprocess.CompletedProcess, message: str) -> None:
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].endswith(message), r.stderr

    refused(sample("--out", str(prompts)), f"--out {prompts}: it would replace {prompts}, which is being read; "
                                           "write elsewhere")
    refused(sample("--out", str(rm_dir / "model.safetensors")), "which is being read; write elsewhere")
    refused(sample("--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "0"), "--max-new-tokens 0: must be >= 1")
    refused(sample("--out", str(tmp_path / "o.jsonl"), "--top-p", "0"), "--top-p 0.0: must be in (0, 1]")
    r = sample("--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 0 and "1 of 2 prompts leave no room in the policy's context of 512 tokens" in r.stderr
    rows = [json.loads(ln) for ln in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [row["messages"][0]["content"] for row in rows] == ["Tom saw a dog."]
    refused(sample("--out", str(tmp_path / "o.jsonl")), "exists; pass --overwrite to replace it")
    assert sample("--out", str(tmp_path / "o.jsonl"), "--overwrite").returncode == 0

    def score(*args: str) -> subprocess.CompletedProcess:
        return run("reward", "score", "--model", str(rm_dir), "--data", str(pairs), *args)

    refused(score("--output", str(pairs)), "which is being read; write elsewhere")
    refused(score("--output", str(rm_dir / "model.safetensors")), f"it would replace a file of {rm_dir}, which is "
                                                                 "being read; write elsewhere")
    refused(score("--output", str(tmp_path)), f"--output {tmp_path}: is a directory; --output names a file")
    refused(score("--batch-size", "-1"), "--batch-size -1: must be >= 1")
    assert (rm_dir / "model.safetensors").read_bytes() == weights
    assert score("--output", str(tmp_path / "s.jsonl")).returncode == 0
    refused(score("--output", str(tmp_path / "s.jsonl")), "exists; pass --overwrite to replace it")
    refused(run("eval", "--task", "perplexity", "--data", str(prompts), "--output", str(tmp_path / "rm")),
            "is a directory; --output names a file")  # (it passed the check, then failed after the evaluation)


def test_eval_and_rejection_sample_flags_out_of_range_are_one_line_naming_the_flag(tmp_path, stories):
    """They gave ValueError/UnicodeDecodeError text (no file name), or --context 0 was silently the model's."""
    model, tok = stories
    rm_dir = save_scalar_model(ScalarHeadModel(model), tmp_path / "rm", tok)
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"caf\xe9\n")
    r = refused("rejection-sample", "--model", "", "--reward", str(rm_dir), "--prompts", str(prompts), "--out",
            str(tmp_path / "o.jsonl"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"lmforge rejection-sample: error: {prompts}:1: not UTF-8 text (byte 3); a prompts file is a text file")
    r = refused("rejection-sample", "--model", "", "--reward", str(rm_dir), "--prompts", str(tmp_path), "--out",
            str(tmp_path / "o.jsonl"))  # (a directory: "no such file")
    assert r.stderr.strip().splitlines()[-1].endswith(f"--prompts {tmp_path}: is a directory; give a file")
    r = subprocess.run([sys.executable, "-m", "lmforge", "chat", "--template", ""], input="hi\n", text=True,
                       capture_output=True, timeout=300)  # (".: is a directory")
    assert r.returncode == 1 and "--template '': empty; give a built-in name" in r.stderr, r.stderr
    prompts.write_text("Once upon a time.\n")
    r = refused("rejection-sample", "--model", "", "--reward", str(rm_dir), "--prompts", str(prompts), "--out",
            str(tmp_path / "o.jsonl"), "--temperature", "0", "--k", "4")  # (K identical greedy answers)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        "lmforge rejection-sample: error: --temperature 0 with --k 4: every sample would be the same"), r.stderr
    for flag, value, need in (("--max-new-tokens", "-3", ">= 1"), ("--temperature", "-1", ">= 0"),
                              ("--context", "0", ">= 2"), ("--samples", "0", ">= 1")):
        r = refused("eval", "--task", "perplexity", "--data", str(prompts), flag, value)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            f"lmforge eval: error: {flag} {float(value) if flag == '--temperature' else value}: must be {need}"]


def test_pipeline_rm_score_is_the_score_of_the_whole_prompt_and_response(tmp_path, stories):
    """The pipeline's rm_score cut every (prompt, response) to length 0: a chat template's input became empty (a
    crash in the SmolLM2 preset after 19 minutes of DPO), plain text kept only BOS + the response's first tokens."""
    from lmforge.pipeline.measure import rm_scores

    model, tok = stories
    torch.manual_seed(0)
    rm_dir = save_scalar_model(ScalarHeadModel(model), tmp_path / "rm", tok)
    prompts, responses = ["Tom saw a dog.", "Lily had a cake."], ["The dog ran.", "She ate it all and smiled."]
    got = rm_scores(rm_dir, prompts, responses, "cpu")
    rm, rtok, template = load_reward_model(rm_dir)
    for p, r, g in zip(prompts, responses, got):
        (ex,) = encode_group(rtok, PreferenceRecord([{"role": "user", "content": p}], [r]), template, None)
        assert len(ex["input_ids"]) > len(rtok.encode(r)) + 2  # the prompt is there
        b = collate_groups([[ex]], 0)
        assert g == pytest.approx(rm.score(b["input_ids"], b["attention_mask"]).item(), abs=1e-5)
