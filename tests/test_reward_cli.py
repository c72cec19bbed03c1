"""`lmforge reward` and `lmforge reward score`: training on ranked groups, held-out accuracy, normalisation, loading."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys

import pytest
import torch

from lmforge.data.preference import PreferenceRecord
from lmforge.losses import ranked_pairs
from lmforge.model.heads import ScalarHeadModel
from lmforge.stages.reward import (
    GroupBatches,
    PrefData,
    encode_group,
    load_reward_model,
    read_split,
    reward_loss_fn,
    score_groups,
)
from lmforge.train.config import TrainConfig

NAMES = ["Tom", "Lily", "Ben", "Sue", "Max", "Anna", "Sam", "Mia"]
THINGS = ["a ball", "a dog", "a cake", "a tree", "a box", "a hat", "a toy", "a bird"]
ENDS = ["ran home", "sat down", "went to sleep", "looked up", "ate a cake", "played outside"]


def word_pairs(n: int, seed: int = 0) -> list[dict]:
    """Toy preference: the chosen story contains "happy", the rejected one does not (otherwise alike)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        name, thing = r.choice(NAMES), r.choice(THINGS)
        end_a, end_b = r.sample(ENDS, 2)
        out.append({"prompt": f"{name} saw {thing}.", "chosen": f" {name} was happy and {end_a}.",
                    "rejected": f" {name} was tired and {end_b}."})
    return out


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=600)


def test_ranked_groups_share_a_batch_and_the_loss_matches_the_pairwise_formula(stories):
    model, tok = stories
    rm = ScalarHeadModel(model)
    recs = [PreferenceRecord([{"role": "user", "content": "Tom saw a dog."}], [" A", " B b", " C c c"], "Tom saw"),
            PreferenceRecord([{"role": "user", "content": "Sue ran."}], [" x y", " z"], "Sue ran.")]
    groups = [encode_group(tok, r, None, 64) for r in recs]
    batch = GroupBatches(groups, batch_size=2, shuffle=False).fixed_batches(0, 0)[0]
    assert batch["group_sizes"] == [3, 2] and batch["input_ids"].shape[0] == 5
    loss, n, metrics = reward_loss_fn(0.5)(rm, batch)
    with torch.no_grad():  # independent: each sequence scored alone, unpadded, at its last token
        s = [rm.score(torch.tensor([ex["input_ids"]]))[0].item() for g in groups for ex in g]
    expect = 0.0
    for start, k in ((0, 3), (3, 2)):
        pairs = ranked_pairs(k)
        bt = [-math.log(1 / (1 + math.exp(-(s[start + i] - s[start + j] - 0.5)))) for i, j in pairs]
        expect += sum(bt) / len(pairs)
    assert n == 2 and loss.item() == pytest.approx(expect, rel=1e-4)
    acc = sum(s[i] > s[j] for i, j in ranked_pairs(3)) / 3 + (s[3] > s[4])
    assert metrics["accuracy"] == pytest.approx(acc, abs=1e-6)


def _fake_groups(lengths: list[int]) -> list[list[dict]]:
    return [[{"input_ids": [1] * n, "labels": [1] * n}, {"input_ids": [2] * (n // 2 + 1), "labels": [1]}]
            for n in lengths]


def test_length_grouped_batches_cover_every_group_once_pad_less_and_resume_exactly():
    r = random.Random(0)
    lengths = [r.randint(5, 500) for _ in range(203)]
    groups = _fake_groups(lengths)

    def padded(src: GroupBatches, n: int) -> tuple[list[list[int]], int]:
        seen, pad = [], 0
        for _ in range(n):
            b = src.next_batch()
            seen.append(b["input_ids"][0::2, 0].tolist())  # the first token is 1 for the best responses
            pad += b["input_ids"].numel()
        return seen, pad

    plain, grouped = GroupBatches(groups, 8, seed=3), GroupBatches(groups, 8, seed=3, by_length=True)
    per_epoch = plain.steps_per_epoch
    _, pad_plain = padded(plain, per_epoch)
    for epoch in range(2):  # every group exactly once per epoch, in a different order each epoch
        order = grouped._order
        assert sorted(order) == list(range(len(groups)))
        assert order != grouped._permutation(1 - epoch)
        for _ in range(per_epoch):
            grouped.next_batch()
    g2 = GroupBatches(groups, 8, seed=3, by_length=True)
    widths = []
    pad_grouped = 0
    for _ in range(per_epoch):
        x = g2.next_batch()["input_ids"]
        widths.append(x.shape[1])
        pad_grouped += x.numel()
    assert pad_grouped < 0.75 * pad_plain  # 0.66 here; 0.47 on hh-rlhf, whose lengths are skewed
    assert widths != sorted(widths, reverse=True) and widths != sorted(widths)  # the batches are shuffled
    # resume: a fresh source loaded with the state after 7 batches continues with the same batches
    a = GroupBatches(groups, 8, seed=3, by_length=True)
    padded(a, 7)
    b = GroupBatches(groups, 8, seed=3, by_length=True)
    b.load_state_dict(a.state_dict())
    for _ in range(per_epoch):
        assert torch.equal(a.next_batch()["input_ids"], b.next_batch()["input_ids"])
    # held-out batches: the same groups as without grouping, sorted by length
    val = GroupBatches(groups, 8, shuffle=False, by_length=True)
    firsts = val.fixed_batches(3, 0)
    assert sum(x["input_ids"].shape[0] for x in firsts) == 48
    widths = [x["input_ids"].shape[1] for x in firsts]
    assert widths == sorted(widths, reverse=True) and widths[0] == max(lengths[:24])


def test_score_groups_runs_by_length_and_returns_scores_in_order(stories):
    model, tok = stories
    rm = ScalarHeadModel(model).eval()
    recs = [PreferenceRecord([{"role": "user", "content": "Tom saw " + "a dog " * k}], [" A" * (k + 1), " B", " C c"],
                             "x") for k in (1, 9, 3, 14, 0)]
    groups = [encode_group(tok, r, None, 128) for r in recs]
    got = score_groups(rm, groups, 0, batch_size=2)
    with torch.no_grad():
        want = [[rm.score(torch.tensor([ex["input_ids"]]))[0].item() for ex in g] for g in groups]
    assert [len(g) for g in got] == [3] * 5
    for a, b in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5)


def test_reward_command_learns_a_word_preference_normalises_and_scores(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in word_pairs(100)))
    out = tmp_path / "rm"
    r = run("reward", "--data", str(data), "--out", str(out), "--max-iters", "10", "--train.batch_size", "8",
            "--data.val_fraction", "0.25", "--train.eval_interval", "5", "--train.lr", "3e-4")
    assert r.returncode == 0, r.stderr
    assert "75 train prompts (75 pairs) / 25 held-out" in r.stderr and "best by val_accuracy" in r.stderr
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "val_accuracy" in row]
    assert "val_margin" in evals[-1] and max(e["val_accuracy"] for e in evals) >= 0.85  # chance is 0.5
    head = json.loads((out / "value_head.json").read_text())
    assert head["kind"] == "reward" and head["val_accuracy"] >= 0.85 and head["max_len"] == 512

    # normalised over the training prompts' responses: mean 0, std 1 (recomputed here from the saved model, in fp32;
    # the command scores them in the training precision, bf16 where that is faster: equal to about 1 %)
    rm, tok, template = load_reward_model(out)
    assert template is None  # stories260K has no chat template: plain text
    train, _ = read_split(PrefData(path=str(data), val_fraction=0.25), seed=TrainConfig().seed)
    scores = torch.tensor([x for g in score_groups(rm, [encode_group(tok, t, None, 512) for t in train], 0)
                           for x in g])
    assert abs(scores.mean().item()) < 0.02 and scores.std().item() == pytest.approx(1.0, abs=0.02)

    s = run("reward", "score", "--model", str(out), "--data", str(data), "--output", str(tmp_path / "s.jsonl"))
    assert s.returncode == 0, s.stderr
    last = s.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"accuracy=[01]\.\d{3}", last)
    per = [json.loads(ln) for ln in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(per) == 100 and all(p["margin"] == pytest.approx(p["chosen_score"] - p["rejected_score"]) for p in per)
    assert float(last.split("=")[1]) == pytest.approx(sum(p["correct"] for p in per) / 100, abs=6e-4)
    assert float(last.split("=")[1]) >= 0.85

    g = run("generate", "--model", str(out), "--prompt", "Tom saw", "--max-new-tokens", "4", "--temperature", "0")
    assert g.returncode == 0, g.stderr


def test_reward_command_with_lora_saves_a_merged_reward_model(tmp_path):
    data = tmp_path / "ranked.jsonl"
    recs = [{"prompt": f"{n} saw a dog.", "responses": [f" {n} was happy.", f" {n} was ok.", f" {n} was sad."]}
            for n in NAMES]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "rm"
    r = run("reward", "--data", str(data), "--out", str(out), "--max-iters", "2", "--peft", "lora",
            "--train.batch_size", "4", "--peft.r", "4")
    assert r.returncode == 0, r.stderr
    assert "(21 pairs)" in r.stderr and "peft lora" in r.stderr
    ck = sorted(out.glob("ckpt-*"))[-1]
    assert "train_weights.safetensors" in {p.name for p in ck.iterdir()}  # adapter + head only
    assert not (out / "adapter_config.json").exists()
    rm, tok, _ = load_reward_model(out)  # the adapter is merged: no base needed
    assert not any("lora" in k for k in rm.state_dict())
    g = run("generate", "--model", str(out), "--prompt", "Tom", "--max-new-tokens", "3")
    assert g.returncode == 0, g.stderr

    # the shared resume flags: a second run never overwrites the first's checkpoints unless told to
    args = ("reward", "--data", str(data), "--out", str(out), "--peft", "lora", "--train.batch_size", "4",
            "--peft.r", "4", "--max-iters")
    again = run(*args, "2")
    assert again.returncode == 1 and "already holds checkpoints" in again.stderr.strip().splitlines()[-1]
    assert run(*args, "2", "--overwrite").returncode == 0
    r = run(*args, "3", "--resume")
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]


def test_reward_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "a"}) + "\n")
    r = run("reward", "--data", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("lmforge reward: error: ")
    assert "field 'rejected'" in r.stderr and "Traceback" not in r.stderr
    r = run("reward", "score", "--model", str(tmp_path), "--data", str(bad))
    assert r.returncode == 1 and "not a reward/value model directory" in r.stderr
