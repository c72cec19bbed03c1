"""`lmforge pretrain` itself under torchrun: DDP and FSDP (with the recipe's weight EMA) end like one process, and
an FSDP run resumes exactly."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.train.state import latest_checkpoint

ARGS = ["pretrain", "--recipe", "baby-gpt-shakespeare", "--model.n_layer", "2", "--model.n_embd", "32",
        "--model.n_head", "2", "--data.block_size", "32", "--model.block_size", "32", "--eval-interval", "3",
        "--train.eval_iters", "2", "--save-interval", "3", "--train.decay_iters", "6", "--train.warmup_iters", "2"]


def pretrain(out: Path, *extra: str, procs: int = 0, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmforge", *ARGS, "--out", str(out), *extra]
    if procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "lmforge", *ARGS, "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 or not ok, r.stderr[-3000:]
    return r


def refused_resume(out: Path, says: str, procs: int = 0) -> None:
    """``--resume`` (and ``--resume-or-start``) with another number of processes than the checkpoints were written
    by: one line per process saying so, exit status 1, and nothing moved aside or written (it is not damage)."""
    before = sorted(p.name for p in out.iterdir())
    for flag in ("--resume", "--resume-or-start"):
        r = pretrain(out, "--max-iters", "9", "--train.batch_size", "2", flag, procs=procs, ok=False)
        assert r.returncode != 0
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("lmforge pretrain: error:")]
        # (under torchrun the other processes wait before they say the same, and torchrun stops them first)
        assert len(lines) == 1 and says in lines[0], r.stderr[-3000:]
        assert "lmforge/" not in r.stderr and "damaged" not in r.stderr  # no traceback from lmforge
        assert procs or len(r.stderr.strip().splitlines()) == 1  # refused before the model loads
        assert sorted(p.name for p in out.iterdir()) == before


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
    refused_resume(tmp_path, "written by a run of 2 process(es), this one has 1: resume it with torchrun "
                   "--nproc-per-node 2")


def test_a_one_process_run_is_not_resumed_by_two(tmp_path, single):
    run = tmp_path / "run"
    shutil.copytree(single, run)
    refused_resume(run, "written by a run of 1 process(es), this one has 2: resume it with one process", procs=2)


def test_fsdp_run_resumes_exactly(tmp_path):
    """With dropout: each process's random generators are checkpointed (only the first one's were, and on resume
    the second drew the first one's masks)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    fsdp = ("--train.batch_size", "2", "--train.distributed", "fsdp", "--model.dropout", "0.1")
    pretrain(full, "--max-iters", "6", *fsdp, procs=2)
    pretrain(cut, "--max-iters", "3", *fsdp, procs=2)
    r = pretrain(cut, "--max-iters", "6", "--resume", *fsdp, procs=2)
    assert "resumed from" in r.stderr
    for name in ("model.safetensors", "train_weights.safetensors"):
        a, b = final(full, name), final(cut, name)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name} {k}"


def test_ctrl_c_under_torchrun_writes_a_final_checkpoint(tmp_path):
    """A Ctrl-C reaches each process at another point of its step: one went to save (a collective) while the other
    was inside the step's all-reduce, and both hung until torchrun killed them (2 runs in 6). Every process now stops
    at the same step and the checkpoint of that step is written."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lmforge",
           *ARGS, "--out", str(tmp_path), "--max-iters", "100000", "--train.batch_size", "2", "--save-interval", "1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        metrics = tmp_path / "metrics.jsonl"
        while time.monotonic() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 20):
            time.sleep(0.2)  # training for a while (an evaluation every 3 steps: collectives of every kind)
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C does to torchrun (it passes it on)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    said = re.findall(r"interrupted at step (\d+): writing a final checkpoint", err)
    assert len(said) == 1, err[-3000:]
    assert (tmp_path / f"ckpt-{int(said[0]):07d}").is_dir(), err[-3000:]


def test_eval_tasks_under_fsdp_are_refused_in_one_line(tmp_path):
    """No process holds the whole model under FSDP: the tasks were skipped without a word (a bad spec too)."""
    r = pretrain(tmp_path, "--max-iters", "2", "--train.batch_size", "2", "--train.distributed", "fsdp",
                 "--train.eval_tasks", "[{task: nosuch, data: x}]", procs=2, ok=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("lmforge pretrain: error:")]
    assert r.returncode != 0 and lines[:1] == ["lmforge pretrain: error: train.eval_tasks: not run under "
                                           "train.distributed=fsdp (no process holds the whole model); use ddp, or "
                                           "run lmforge eval on the checkpoints"], r.stderr[-2000:]


def torchrun(*args: str, procs: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           "-m", "lmforge", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_reward_and_dpo_under_ddp_with_a_short_last_heldout_batch(tmp_path):
    """6 held-out prompts in batches of 4 per rank: rank 1 holds no held-out batch. Evaluation used to wait forever
    in DDP's forward (a collective) on rank 0 while rank 1 waited in the sum of the metrics; now both finish, the
    metrics count all 6 prompts, and the reward model equals the one-process run of the same global batch."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_reward_cli import word_pairs

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in word_pairs(64)))
    common = ["--data", str(data), "--max-iters", "4", "--train.precision", "fp32"]
    r = torchrun("reward", *common, "--out", str(tmp_path / "rm2"), "--train.batch_size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("done: step 4") == 1  # one report, from rank 0
    one = subprocess.run([sys.executable, "-m", "lmforge", "reward", *common, "--out", str(tmp_path / "rm1"),
                          "--train.batch_size", "8"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(str(tmp_path / "rm1" / "value_head.safetensors")), \
        load_file(str(tmp_path / "rm2" / "value_head.safetensors"))
    for k in a:  # the head, and the normalisation over the training responses (each process scored a share)
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    meta = [json.loads((tmp_path / d / "value_head.json").read_text()) for d in ("rm1", "rm2")]
    assert meta[0]["val_accuracy"] == meta[1]["val_accuracy"] and "116 responses of 58" in meta[1]["normalized_over"]
    for run in ("rm1", "rm2"):  # one line per step: an evaluated step's line holds its training figures too
        metrics = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4] and "val_accuracy" in metrics[-1]
        assert all("train_loss" in m for m in metrics[1:])
    r = torchrun("dpo", *common, "--out", str(tmp_path / "dpo"), "--train.batch_size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("done: step 4") == 1
    one = subprocess.run([sys.executable, "-m", "lmforge", "dpo", *common, "--out", str(tmp_path / "dpo1"),
                          "--train.batch_size", "8"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (load_file(str(tmp_path / d / "reference_logprobs.safetensors")) for d in ("dpo1", "dpo"))
    for k in ("train", "val"):  # each process computed a share of the stored reference (of the pairs the run uses)
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-5, msg=k, equal_nan=True)
        assert not a[k].isnan().all(), k


def test_fine_tuning_refuses_fsdp_in_one_line_and_ppo_refuses_several_processes(tmp_path):
    r = torchrun("sft", "--data", "builtin:stories_instruct", "--out", str(tmp_path / "s"), "--max-iters", "1",
                 "--train.distributed", "fsdp")
    assert r.returncode != 0
    assert "lmforge sft: error: sft: train.distributed=fsdp shards pretraining only" in r.stderr
    assert r.stderr.count("error:") == 1, r.stderr  # said once, not by every process
    assert "lmforge/stages" not in r.stderr  # no traceback from lmforge (torchrun prints its own)
    env = {**os.environ, "WORLD_SIZE": "2"}
    r = subprocess.run([sys.executable, "-m", "lmforge", "ppo", "--reward", "lmforge.data.stories:story_reward",
                        "--out", str(tmp_path / "p")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "ppo runs in one process: not under torchrun (WORLD_SIZE=2)" in r.stderr
    for cmd in (["rejection-sample", "--model", "m", "--reward", "r", "--prompts", "p", "--out", "o"],
                ["self-instruct", "--seeds", "s.jsonl", "--num", "2", "--out", str(tmp_path / "si")],
                ["generate", "--max-new-tokens", "2"],  # (each process ran the whole command)
                ["eval", "--task", "perplexity", "--data", "builtin:stories_heldout"]):
        r = subprocess.run([sys.executable, "-m", "lmforge", *cmd], capture_output=True, text=True, timeout=120,
                           env=env)
        assert r.returncode != 0 and f"{cmd[0]} runs in one process: not under torchrun (WORLD_SIZE=2)" in r.stderr
    # train.distributed none under torchrun trained an unsynchronised replica per process and saved rank 0's
    for cmd, instead in ((ARGS, "use ddp or fsdp"), (["sft", "--data", "builtin:stories_instruct"], "use ddp")):
        r = subprocess.run([sys.executable, "-m", "lmforge", *cmd, "--out", str(tmp_path / "n"), "--train.distributed",
                            "none"], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].endswith(
            "train.distributed=none under torchrun (WORLD_SIZE=2): each process would train a replica of its own on "
            f"its share of the data; {instead}, or run one process"), r.stderr
    # a stray WORLD_SIZE without torchrun's RANK (was "KeyError: 'RANK'")
    r = subprocess.run([sys.executable, "-m", "lmforge", *ARGS, "--out", str(tmp_path / "w"), "--max-iters", "1"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "lmforge pretrain: error: WORLD_SIZE=2 is set but RANK is not: launch the processes with torchrun, or unset "
        "WORLD_SIZE"), r.stderr


def test_reward_head_probe_under_ddp_shares_the_feature_pass(tmp_path):
    """--head-init probe under torchrun: each process computes the features of its share of the training prompts,
    and the head fitted from all of them equals the one-process fit (the start checkpoint holds it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_reward_cli import word_pairs

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in word_pairs(64)))
    common = ["--data", str(data), "--max-iters", "1", "--head-init", "probe", "--train.precision", "fp32"]
    r = torchrun("reward", *common, "--out", str(tmp_path / "two"), "--train.batch_size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "lmforge", "reward", *common, "--out", str(tmp_path / "one"),
                          "--train.batch_size", "8"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    fits = [re.search(r"held-out-fold accuracy ([0-9.]+), loss ([0-9.]+)", x.stderr).groups() for x in (one, r)]
    assert fits[0] == fits[1]
    a, b = (load_file(str(tmp_path / d / "ckpt-0000000" / "model.safetensors")) for d in ("one", "two"))
    torch.testing.assert_close(b["head.weight"], a["head.weight"], atol=1e-5, rtol=1e-4)


def test_an_error_of_another_process_alone_is_said_naming_its_rank():
    """A process other than a machine's first says its error after a moment (in case torchrun stops it because the
    first failed alike), naming its rank."""
    env = {**os.environ, "RANK": "3", "LOCAL_RANK": "1"}
    r = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--recipe", "nope"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 1 and r.stderr.strip() == (
        "lmforge pretrain: error: [rank 3] --recipe 'nope': unknown; known recipes: "
        f"{sorted(p.stem for p in (Path(__file__).parents[1] / 'lmforge' / 'recipes').glob('*.yaml'))}"), r.stderr
