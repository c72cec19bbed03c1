"""The shared training core: schedules, parameter groups, exact resume after SIGKILL, spike rollback, torchrun."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import ModelConfig
from lmforge.model import Decoder
from lmforge.stages.pretrain import causal_loss
from lmforge.train.batches import TokenWindows
from lmforge.train.config import TrainConfig, coerce, load_run_config, parse_overrides
from lmforge.train.loop import Trainer
from lmforge.train.optim import lr_at, param_groups
from lmforge.train.state import latest_checkpoint, verify

SCRIPT = Path(__file__).with_name("train_script.py")
sys.path.insert(0, str(SCRIPT.parent))
from train_script import tokens  # noqa: E402


def run_script(*args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun),
               str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if r.get("train_loss") is not None}


def test_cosine_schedule_matches_formula():
    peak, warm, total = 1e-3, 10, 110
    assert lr_at(0, peak, "cosine", warm, total) == pytest.approx(peak / 10)
    assert lr_at(9, peak, "cosine", warm, total) == pytest.approx(peak)
    for s in (10, 35, 60, 85, 109):
        expect = 0.1 * peak + 0.5 * 0.9 * peak * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert lr_at(s, peak, "cosine", warm, total) == pytest.approx(expect)
    assert lr_at(500, peak, "cosine", warm, total) == pytest.approx(0.1 * peak)  # LLaMA: floor at 10 %
    assert lr_at(50, peak, "constant", warm, total) == peak
    assert lr_at(50, peak, "wsd", warm, total) == peak and lr_at(109, peak, "wsd", warm, total) < 0.2 * peak


def test_no_weight_decay_on_norms_biases_embeddings():
    m = Decoder(ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_embd=16, n_head=2, qkv_bias=True,
                            norm="layernorm", position="learned", multiple_of=16))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight",
        "lm_head.weight"}
    assert "wte.weight" in {names[id(p)] for p in no_decay["params"]} and no_decay["weight_decay"] == 0.0


def test_overrides_and_config_errors():
    d = parse_overrides(["--train.lr", "3e-4", "--model.n_layer", "6", "--out", "x", "--train.spike_guard", "false"])
    assert d == {"train": {"lr": 3e-4, "spike_guard": False}, "model": {"n_layer": 6}, "out": "x"}
    cfg = load_run_config(d)
    assert cfg.train.lr == 3e-4 and cfg.model == {"n_layer": 6}
    from lmforge.errors import LMForgeError

    with pytest.raises(LMForgeError, match="unknown key 'lrr'"):
        load_run_config({"train": {"lrr": 1}})
    with pytest.raises(LMForgeError, match="train.max_iters: expected int"):
        load_run_config({"train": {"max_iters": "many"}})
    # a list of numbers may be written as the README writes --data.weights: 1,2; other lists keep their brackets
    assert coerce(parse_overrides(["--data.weights", "1,2"])["data"]["weights"], list[float], "data.weights") == [1, 2]
    with pytest.raises(LMForgeError, match=r"^x: expected a list, got 'a,b' \(a list is written \[a,b\]\)$"):
        coerce("a,b", list[str], "x")


@pytest.mark.parametrize("ema", [[], ["--ema", "0.9"]], ids=["plain", "ema"])
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, ema):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_script(str(full), "12", *ema).returncode == 0
    r = run_script(str(cut), "12", "--kill-at", "10", *ema)
    assert r.returncode != 0  # killed
    assert latest_checkpoint(cut).name == "ckpt-0000008"
    r = run_script(str(cut), "12", "--resume", *ema)
    assert r.returncode == 0 and "resumed from" in r.stderr
    for name in ["model.safetensors"] + (["train_weights.safetensors"] if ema else []):
        a = load_file(str(full / "ckpt-0000012" / name))
        b = load_file(str(cut / "ckpt-0000012" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(full) == losses(cut)


def test_ema_checkpoints_hold_the_moving_average(tmp_path):
    """Each step's model.safetensors is the average e_k = d * e_(k-1) + (1 - d) * w_k of the raw weights w_k
    (train_weights.safetensors), and evaluation scores the average."""
    d, run = 0.8, tmp_path / "run"
    r = run_script(str(run), "6", "--ema", str(d), "--save-interval", "1")
    assert r.returncode == 0, r.stderr
    ck = [run / f"ckpt-{s:07d}" for s in range(1, 7)]
    avg = [load_file(str(c / "model.safetensors")) for c in ck]
    raw = [load_file(str(c / "train_weights.safetensors")) for c in ck]
    assert avg[0].keys() == raw[0].keys()
    for k in avg[0]:
        for s in range(1, 6):
            assert torch.allclose(avg[s][k], d * avg[s - 1][k] + (1 - d) * raw[s][k], rtol=0, atol=1e-6), (k, s)
        assert not torch.equal(avg[5][k], raw[5][k]), k



def test_corrupt_checkpoint_is_skipped_on_resume(tmp_path):
    run = tmp_path / "run"
    assert run_script(str(run), "8").returncode == 0
    newest = run / "ckpt-0000008"
    with open(newest / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    assert "checksum" in verify(newest)
    half = run / "ckpt-0000009"  # a directory without its manifest, as a crash mid-write could leave
    shutil.copytree(run / "ckpt-0000004", half)
    (half / "MANIFEST.json").unlink()
    assert latest_checkpoint(run, warn=lambda m: None).name == "ckpt-0000004"


def test_loss_spike_rolls_back_and_skips_batches(tmp_path):
    cfg = ModelConfig(vocab_size=61, block_size=16, n_layer=1, n_embd=32, n_head=4, multiple_of=16)
    torch.manual_seed(0)
    data = tokens()
    train = TokenWindows(data[:4000], 16, 4, seed=1)
    t = TrainConfig(max_iters=30, batch_size=4, lr=3e-3, warmup_iters=2, eval_interval=100, eval_iters=0,
                    log_interval=1, save_interval=5, spike_window=8, spike_factor=3.0, spike_skip=2)
    seen = []

    def loss_fn(m, batch):
        loss, n = causal_loss(m, batch)
        seen.append(train.batches)
        return (loss * 50 if train.batches == 13 else loss), n  # the 13th batch is poisoned

    trainer = Trainer(Decoder(cfg), t, train, loss_fn, tmp_path / "run")
    out = trainer.fit()
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["step"] == 12 and events[0]["to_step"] == 10
    assert seen.count(13) == 1 and 14 not in seen and 15 not in seen  # spike batch and the next 2 skipped
    assert out["step"] == 30 and math.isfinite(out["train_loss"])


@pytest.mark.parametrize("every,at", [(0, [0, 8]), (2, [0, 4, 8])])
def test_sample_every_n_evaluations(tmp_path, every, at):
    """train.sample_every was checked and never read: samples came at the start and the end only."""
    cfg = ModelConfig(vocab_size=61, block_size=16, n_layer=1, n_embd=32, n_head=4, multiple_of=16)
    t = TrainConfig(max_iters=8, batch_size=4, eval_interval=2, eval_iters=1, save_interval=100,
                    sample_every=every)
    data = tokens()
    steps: list[int] = []
    trainer = Trainer(Decoder(cfg), t, TokenWindows(data[:2000], 16, 4, seed=1), causal_loss, tmp_path / "run",
                      val_data=TokenWindows(data[2000:3000], 16, 4, seed=2),
                      sample_fn=lambda m: steps.append(trainer.step) or "text", log=lambda m: None)
    trainer.fit()
    assert steps == at


def test_a_spike_that_comes_back_after_a_rollback_goes_one_checkpoint_further_back(tmp_path):
    """Rolling back to the same checkpoint replayed a spike its weights led to until the run gave up; the second
    rollback before any new checkpoint now goes to the one before."""
    cfg = ModelConfig(vocab_size=61, block_size=16, n_layer=1, n_embd=32, n_head=4, multiple_of=16)
    torch.manual_seed(0)
    train = TokenWindows(tokens()[:4000], 16, 4, seed=1)
    t = TrainConfig(max_iters=20, batch_size=4, lr=3e-3, warmup_iters=2, eval_interval=5, eval_iters=1,
                    log_interval=1, save_interval=5, keep_last=3, spike_window=4, spike_factor=3.0)
    reached: list[int] = []

    def loss_fn(m, batch):
        loss, n = causal_loss(m, batch)
        reached.append(trainer.step)
        return (loss * 50 if trainer.step == 12 and reached.count(12) <= 2 else loss), n  # step 12 spikes twice

    trainer = Trainer(Decoder(cfg), t, train, loss_fn, tmp_path / "run",
                      val_data=TokenWindows(tokens()[4000:5000], 16, 4, seed=2))
    logs: list[str] = []
    trainer.log = logs.append
    out = trainer.fit()
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["to_step"]) for r in rows if r.get("event") == "rollback"] == [(12, 10), (12, 5)]
    assert any("came back after the rollback to ckpt-0000010: one checkpoint further back" in m for m in logs)
    assert out["step"] == 20 and reached.count(12) == 3
    # the step a rollback goes back to is not evaluated again (its weights were; the line showed the train loss of
    # the discarded step after it, and metrics.jsonl repeated the step)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 5, 10, 10, 15, 20]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, mode):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_script(str(one), "6", "--batch-size", "4", "--dropout", "0").returncode == 0
    r = run_script(str(two), "6", "--batch-size", "2", "--dropout", "0", "--distributed", mode, torchrun=2)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys() and len(a) == 6
    assert all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_auto_precision_under_torchrun_is_the_first_process_choice(monkeypatch):
    """``auto`` times kernels in each process; under torchrun every process takes the first one's choice (a loaded
    process could measure otherwise and compute in another precision)."""
    import lmforge.train.loop as L
    from lmforge.train import distributed as D

    sent = []

    def all_reduce(values, d):  # the first process measured fp32: it sends 0, every other process sends 0
        sent.append((d.rank, list(values)))
        return [0.0]

    monkeypatch.setattr(L, "pick_precision", lambda *a, **k: torch.bfloat16)  # what this process measured
    monkeypatch.setattr(L.D, "sum_all", all_reduce)
    model = torch.nn.Linear(4, 4)
    cpu = torch.device("cpu")
    assert L.train_precision(TrainConfig(precision="auto"), cpu, model, D.Dist(rank=1, world=2)) is None
    assert sent == [(1, [0.0])]
    monkeypatch.setattr(L.D, "sum_all", lambda values, d: sent.append((d.rank, list(values))) or list(values))
    assert L.train_precision(TrainConfig(precision="auto"), cpu, model, D.Dist(rank=0, world=2)) is torch.bfloat16
    assert sent[-1] == (0, [1.0])
    n = len(sent)
    assert L.train_precision(TrainConfig(precision="auto"), cpu, model) is torch.bfloat16  # one process: its own
    assert L.train_precision(TrainConfig(precision="bf16"), cpu, model, D.Dist(rank=1, world=2)) is torch.bfloat16
    assert len(sent) == n  # nothing to agree on


def test_a_stream_of_another_shape_is_refused_on_load():
    """The Trainer's own check (what a command cannot know before loading: another dataset's token count)."""
    import numpy as np

    from lmforge.train.batches import StreamMismatch, TokenWindows

    a = TokenWindows(np.arange(1000), 8, 2, seed=1)
    a.next_batch()
    state = a.state_dict()
    b = TokenWindows(np.arange(1000), 8, 2, seed=5)
    b.load_state_dict(state)
    assert b.next_batch()["input_ids"].tolist() == a.next_batch()["input_ids"].tolist()
    with pytest.raises(StreamMismatch, match="tokens=1000, this run's has 999"):
        TokenWindows(np.arange(999), 8, 2).load_state_dict(state)


def test_a_fused_optimizer_step_marks_the_weights_changed():
    """PyTorch's fused AdamW writes the parameters without bumping their version counters, so what was cached by
    version stayed as before the step: the RMSNorm's decoding weight (a PPO rollout after a step sampled from the
    old norm: a resumed run, with a fresh cache, took other samples and ended elsewhere) and the C step's plan."""
    import torch.nn.functional as F

    from lmforge.model.norms import RMSNorm
    from lmforge.train.optim import make_optimizer

    norm = RMSNorm(16, eps=1e-5)
    x = torch.randn(3, 1, 16)  # one new position per sequence: the decoding path, whose weight is cached
    opt = make_optimizer(norm, lr=0.5, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    assert opt.defaults["fused"]
    for _ in range(2):
        with torch.no_grad():
            y = norm(x)
        assert torch.allclose(y, F.rms_norm(x, (16,), norm.weight.detach(), 1e-5), atol=1e-6)
        v = norm.weight._version
        norm.weight.grad = torch.randn(16)
        opt.step()
        assert norm.weight._version > v
