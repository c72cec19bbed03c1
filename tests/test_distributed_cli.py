"""`lmforge pretrain` itself under torchrun: DDP and FSDP (with the recipe's weight EMA) end like one process, and
an FSDP run resumes exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.train.state import latest_checkpoint

ARGS = ["pretrain", "--recipe", "baby-gpt-shakespeare", "--model.n_layer", "2", "--model.n_embd", "32",
        "--model.n_head", "2", "--data.block_size", "32", "--model.block_size", "32", "--eval-interval", "3",
        "--train.eval_iters", "2", "--save-interval", "3", "--train.decay_iters", "6", "--train.warmup_iters", "2"]


def pretrain(out: Path, *extra: str, procs: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmforge", *ARGS, "--out", str(out), *extra]
    if procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "lmforge", *ARGS, "--out", str(out), *extra]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def final(out: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(out) / name))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    pretrain(out, "--max-iters", "6", "--train.batch_size", "4")
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_pretrain_command_under_torchrun_matches_one_process(tmp_path, single, mode):
    r = pretrain(tmp_path, "--max-iters", "6", "--train.batch_size", "2", "--train.distributed", mode, procs=2)
    assert r.stderr.count("done: step 6") == 1  # one report, from rank 0
    for name in ("model.safetensors", "train_weights.safetensors"):  # the EMA and the raw weights
        a, b = final(single, name), final(tmp_path, name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=f"{name} {k}")


def test_fsdp_run_resumes_exactly(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    fsdp = ("--train.batch_size", "2", "--train.distributed", "fsdp")
    pretrain(full, "--max-iters", "6", *fsdp, procs=2)
    pretrain(cut, "--max-iters", "3", *fsdp, procs=2)
    r = pretrain(cut, "--max-iters", "6", "--resume", *fsdp, procs=2)
    assert "resumed from" in r.stderr
    for name in ("model.safetensors", "train_weights.safetensors"):
        a, b = final(full, name), final(cut, name)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name} {k}"
