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
    assert "linear probe" not in r.stderr  # the default head is random
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
    # converting it keeps the language model and says the head stays behind (found by an audit: said nothing)
    c = run("convert", "--from", "lmforge", str(out), "--to", "hf", str(tmp_path / "hf"))
    assert c.returncode == 0 and "is a reward/value model: its head (value_head.json" in c.stderr, c.stderr


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
            "--peft.r", "4", "--head-init", "probe", "--max-iters")
    again = run(*args, "2")
    assert again.returncode == 1 and "already holds checkpoints" in again.stderr.strip().splitlines()[-1]
    r = run(*args, "2", "--overwrite")
    assert r.returncode == 0 and "head fitted to the frozen features" in r.stderr, r.stderr[-2000:]  # LoRA + probe
    r = run(*args, "3", "--resume")
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    assert "linear probe" not in r.stderr  # the resumed head comes from the checkpoint


def test_reward_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "a"}) + "\n")
    r = run("reward", "--data", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("lmforge reward: error: ")
    assert "field 'rejected'" in r.stderr and "Traceback" not in r.stderr
    r = run("reward", "score", "--model", str(tmp_path), "--data", str(bad))
    assert r.returncode == 1 and "not a reward/value model directory" in r.stderr


# ---- the head fitted to frozen features (linear probe) ------------------------------------------------------------


def _planted(n_groups: int, k: int, d: int = 12, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Groups of k feature rows ranked best first by a planted direction (the same for every seed) plus noise,
    features of unequal scales."""
    w = torch.randn(d, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 2, d)
    feats = []
    for _ in range(n_groups):
        x = torch.randn(k, d, generator=g) * scale
        util = (x / scale) @ w + 0.8 * torch.randn(k, generator=g)
        feats.append(x[util.argsort(descending=True)])
    return feats, w / scale


def test_pairwise_head_fit_is_the_regularised_logistic_optimum():
    from lmforge.stages.reward import fit_pairwise_head, pair_differences

    feats, _ = _planted(60, 3)
    diffs, weights, group = pair_differences(feats)
    assert diffs.shape == (180, 12) and group.tolist()[:4] == [0, 0, 0, 1]
    assert weights.sum().item() == pytest.approx(60)  # each prompt counts once
    l2 = 0.1
    w = fit_pairwise_head(diffs, weights, l2).double()
    # stationarity of sum wn softplus(-d.w) + l2/2 sum (w_j s_j)^2, written out: the gradient vanishes
    x, wn = diffs.double(), weights.double() / weights.sum()
    s2 = x.pow(2).mean(0)
    grad = -(wn * torch.sigmoid(-(x @ w))) @ x + l2 * s2 * w
    assert grad.abs().max().item() < 1e-5 * s2.sqrt().max().item()
    assert w.abs().max().item() > 0
    # the same optimum as scikit-learn's L2 logistic regression (no intercept) on the standardised, mirrored pairs
    sk = pytest.importorskip("sklearn.linear_model")
    s = s2.sqrt()
    xs = (x / s).numpy()
    X = torch.cat([torch.tensor(xs), -torch.tensor(xs)]).numpy()
    y = [1] * len(xs) + [0] * len(xs)
    uniform = fit_pairwise_head(diffs, torch.ones(len(diffs)), l2).double()
    ref = sk.LogisticRegression(C=1 / (2 * len(xs) * l2), fit_intercept=False, tol=1e-10, max_iter=10_000).fit(X, y)
    assert torch.tensor(ref.coef_[0]) == pytest.approx((uniform * s).tolist(), abs=1e-4)


def test_probe_picks_l2_by_folds_of_prompts_and_finds_a_planted_direction():
    from lmforge.stages.reward import PROBE_L2, pair_differences, select_probe

    feats, w_true = _planted(200, 2, seed=1)
    diffs, weights, group = pair_differences(feats)
    fit = select_probe(diffs, weights, group, seed=0)
    assert fit["l2"] == min(PROBE_L2) and fit["cv_loss"] < 0.5  # a clear signal: the weakest penalty
    assert fit["cv_accuracy"] > 0.8  # chance is 0.5
    cos = torch.nn.functional.cosine_similarity(fit["weight"], w_true.float(), dim=0)
    assert cos.item() > 0.9
    test, _ = _planted(200, 2, seed=2)
    acc = sum(float((t[0] - t[1]) @ fit["weight"] > 0) for t in test) / len(test)
    assert acc > 0.8
    # pure noise: nothing to find, the held-out folds say so
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn(2, 12, generator=g) for _ in range(200)]
    fit = select_probe(*pair_differences(noise), seed=0)
    assert fit["cv_accuracy"] < 0.6 and fit["l2"] == max(PROBE_L2)


def test_probe_head_sets_the_head_from_the_models_features(stories):
    from lmforge.stages.reward import probe_head

    model, tok = stories
    rm = ScalarHeadModel(model)
    pairs = word_pairs(60, seed=4)
    groups = [encode_group(tok, PreferenceRecord([{"role": "user", "content": p["prompt"]}],
                                                 [p["chosen"], p["rejected"]], p["prompt"]), None, 128)
              for p in pairs]
    before = rm.head.weight.detach().clone()
    fit = probe_head(rm, groups, 0, batch_size=8, seed=0)
    assert not torch.equal(before, rm.head.weight) and rm.head.bias.item() == 0 and rm.training
    scores = score_groups(rm, groups, 0, normalized=False)
    train_acc = sum(s[0] > s[1] for s in scores) / len(scores)
    assert fit["cv_accuracy"] > 0.7 and train_acc > 0.9  # "happy" vs "tired" is in the frozen features


def test_fitted_head_alone_is_kept_when_training_only_makes_it_worse(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in word_pairs(100)))
    out = tmp_path / "rm"
    r = run("reward", "--data", str(data), "--out", str(out), "--max-iters", "2", "--train.batch_size", "8",
            "--data.val_fraction", "0.25", "--train.eval_interval", "2", "--train.lr", "3e-2",  # a rate that wrecks it
            "--head-init", "probe")
    assert r.returncode == 0, r.stderr
    assert "head fitted to the frozen features of the training pairs (linear probe)" in r.stderr
    evals = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_accuracy" in row]
    assert [e["step"] for e in evals] == [0, 2] and evals[0]["val_accuracy"] >= 0.8  # the fitted head, no step yet
    assert evals[1]["val_accuracy"] < evals[0]["val_accuracy"]
    assert (out / "best").read_text().strip() == "ckpt-0000000" and "final model from ckpt-0000000" in r.stderr
    head = json.loads((out / "value_head.json").read_text())
    assert head["val_accuracy"] == pytest.approx(evals[0]["val_accuracy"], abs=0.05)


def test_epochs_0_makes_the_fitted_head_the_reward_model(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in word_pairs(100)))
    out = tmp_path / "rm"
    r = run("reward", "--data", str(data), "--out", str(out), "--head-init", "probe", "--epochs", "0",
            "--data.val_fraction", "0.25")
    assert r.returncode == 0, r.stderr
    assert "no fine-tuning (--epochs 0: the fitted head is the model)" in r.stderr
    assert not list(out.glob("ckpt-*")) and not (out / "metrics.jsonl").exists()  # no training step was taken
    head = json.loads((out / "value_head.json").read_text())
    assert head["val_accuracy"] >= 0.8 and head["head_probe"]["cv_accuracy"] > 0.7  # chance is 0.5
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in word_pairs(40, seed=9)))
    s = run("reward", "score", "--model", str(out), "--data", str(held), "--output", str(tmp_path / "s.jsonl"))
    assert s.returncode == 0, s.stderr
    assert float(s.stdout.strip().splitlines()[-1].removeprefix("accuracy=")) >= 0.8
    for flags in (["--epochs", "0"], ["--epochs", "0", "--head-init", "probe", "--peft", "lora"]):
        bad = run("reward", "--data", str(data), "--out", str(tmp_path / "o"), *flags)
        assert bad.returncode == 1 and "--epochs 0 fine-tunes nothing" in bad.stderr.strip().splitlines()[-1]


def test_an_unknown_head_init_is_refused_in_one_line(tmp_path):
    cfg = tmp_path / "rm.yaml"
    cfg.write_text("head_init: zeros\n")
    r = run("reward", "--config", str(cfg), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "head_init='zeros'" in r.stderr.strip().splitlines()[-1], r.stderr[-1000:]


@pytest.mark.parametrize("cmd,flags,says", [
    ("reward", ["--margin", "nan"], "--margin nan: must be a finite number"),
    ("reward", ["--epochs", "-1"], "--epochs -1.0: must be >= 0"),
    ("dpo", ["--beta", "nan"], "--beta nan: must be a positive number"),  # NaN passed `beta <= 0`: a NaN loss
    ("dpo", ["--beta", "inf"], "--beta inf: must be a positive number"),
    ("dpo", ["--label-smoothing", "0.5"], "--label-smoothing 0.5: must be in [0, 0.5)"),
])
def test_loss_options_out_of_range_are_refused_before_loading(tmp_path, cmd, flags, says):
    r = run(cmd, "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"), *flags)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].endswith(says), r.stderr[-1000:]
