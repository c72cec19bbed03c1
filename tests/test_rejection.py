"""`lmforge rejection-sample`: best-of-K by the reward model, written as SFT data that `lmforge sft` trains on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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
