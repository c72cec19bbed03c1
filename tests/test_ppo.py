"""`lmforge ppo`: the command on stories260K with a rule-based reward, exact resume, and the pieces of the loop
(ratio exactly 1 on the first minibatch of a rollout, score at the true last token, reward-function loading)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_run import refused
from safetensors.torch import load_file

from lmforge.data.preference import Prompt, read_prompts
from lmforge.errors import LMForgeError
from lmforge.losses import AdaptiveKLController, masked_mean, policy_loss
from lmforge.stages.ppo import (
    PPOConfig,
    PPOOptions,
    PPOSource,
    kl_horizon,
    load_reward_fn,
    make_loss_fn,
    run_ppo,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ppo.rollout_batch", "2", "--ppo.minibatch", "1", "--ppo.epochs", "1", "--ppo.max_new_tokens", "8"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "lmforge", "ppo", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ppo") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Write a story about a {a} named {n}."}) + "\n"
                         for a, n in [("cat", "Tom"), ("dog", "Lily"), ("bird", "Sam")]))
    return p


def _policy_and_critic(out: Path) -> dict[str, torch.Tensor]:
    sd = load_file(str(out / "model.safetensors"))
    sd.update({f"critic.{k}": v for k, v in load_file(str(out / "critic" / "model.safetensors")).items()})
    sd.update({f"head.{k}": v for k, v in load_file(str(out / "critic" / "value_head.safetensors")).items()})
    return sd


def test_ppo_command_runs_and_resumes_exactly(prompts, tmp_path):
    """A run cut after one iteration and resumed ends bitwise equal to an uninterrupted one."""
    common = ["--reward", "lmforge.data.stories:story_reward", "--prompts", str(prompts), *TINY]
    whole = _run(*common, "--out", str(tmp_path / "whole"), "--steps", "2")
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "done: 2 iterations" in whole.stderr
    assert "adaptive, target 4, horizon 2)" in whole.stderr  # scaled to the run: 2 x 2 / 10, at least a batch (2)
    # a tenth of the SFT rate: stories260K's full fine-tuning rate is 1e-5 x 30 (the small-model cap)
    assert "; lr 3e-05;" in whole.stderr
    cut = _run(*common, "--out", str(tmp_path / "cut"), "--steps", "1")
    assert cut.returncode == 0, cut.stderr[-2000:]
    resumed = _run(*common, "--out", str(tmp_path / "cut"), "--steps", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    summary = json.loads((tmp_path / "cut" / "ppo_summary.json").read_text())
    # resuming the finished run does nothing and keeps its figures (it said "score nan, KL nan", emptied "last")
    again = _run(*common, "--out", str(tmp_path / "cut"), "--steps", "2", "--resume")
    assert again.returncode == 0 and "nan" not in again.stderr, again.stderr[-2000:]
    assert json.loads((tmp_path / "cut" / "ppo_summary.json").read_text()) == summary
    # a resumed run with other settings (a forgotten flag) is refused: they switched mid-run without a word
    other = [x if x != "8" else "16" for x in common]  # --ppo.max_new_tokens 16
    r = _run(*other, "--out", str(tmp_path / "cut"), "--steps", "3", "--resume")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "it was trained with ppo.max_new_tokens 8 (this run: 16)" in r.stderr.strip().splitlines()[-1], r.stderr
    a, b = _policy_and_critic(tmp_path / "whole"), _policy_and_critic(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the starting policy was changed by training
    start = load_file(str(tmp_path / "cut" / "ckpt-0000002" / "model.safetensors"))
    assert any(not torch.equal(v, a[k.removeprefix("actor.")]) for k, v in start.items() if k.startswith("actor."))
    rows = [json.loads(ln) for ln in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train_score" in r]
    assert len(steps) == 4  # 2 iterations x 2 minibatches x 1 epoch
    for key in ("train_score", "train_kl", "train_entropy", "train_policy_loss", "train_value_loss",
                "train_clipfrac", "train_vf_clipfrac", "train_approx_kl", "train_early_stops", "train_beta"):
        assert all(key in r for r in steps), key
    assert steps[0]["train_kl"] == 0.0  # first rollout: policy == reference
    assert (tmp_path / "whole" / "ppo.png").is_file()
    # the output directory is a loadable model
    gen = subprocess.run([sys.executable, "-m", "lmforge", "generate", "--model", str(tmp_path / "whole"),
                          "--prompt", "Once", "--max-new-tokens", "4"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=600)
    assert gen.returncode == 0, gen.stderr[-2000:]


def test_ppo_command_errors(prompts, tmp_path):
    r = refused("ppo", "--prompts", str(prompts), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "exactly one of --reward-model" in r.stderr and "Traceback" not in r.stderr
    r = refused("ppo", "--reward", "lmforge.data.stories:nope", "--prompts", str(prompts), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "has no function nope" in r.stderr
    r = refused("ppo", "--reward", "lmforge.data.stories:length", "--prompts", str(prompts), "--out",
                str(tmp_path / "x"), "--steps", "-3")  # said "train.max_iters=-12: must be >= 0"
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == "lmforge ppo: error: --steps -3: must be >= 1"
    common = ["--reward", "lmforge.data.stories:length", "--prompts", str(prompts), "--out", str(tmp_path / "x")]
    for flags, says in ((["--ppo.kl_coef", "-1"], "ppo.kl_coef -1: must be >= 0"),  # (a KL bonus, exit 0)
                        (["--ppo.kl_target", "nan"], "ppo.kl_target nan: must be a finite number"),
                        (["--ppo.clip", "-1"], "ppo.clip -1: must be > 0"),
                        (["--ppo.gamma", "2"], "ppo.gamma 2: must be in [0, 1]"),
                        (["--ppo.kl_estimator", "k9"], "ppo.kl_estimator 'k9': allowed values are ['k1', 'k2', 'k3']"),
                        (["--ppo.max_new_tokens", "0"], "ppo.max_new_tokens 0: must be >= 1"),
                        (["--ptx-data", str(prompts)], "--ptx-data: PPO-ptx needs its weight too"),  # (was ignored)
                        (["--eval-prompts", str(tmp_path / "none.txt")], "--eval-prompts"),  # (said --prompts)
                        ):
        r = refused("ppo", *common, *flags)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith("lmforge ppo: error: ") and says in last, (flags, r.stderr)
        assert "\nppo: " not in "\n" + r.stderr  # refused before the models load (the "ppo: ..." line)
    f = tmp_path / "rw.py"
    f.write_text("def nan(prompts, responses):\n    return [float('nan')] * len(responses)\n"
                 "def none(prompts, responses):\n    return [None] * len(responses)\n"
                 "def boom(prompts, responses):\n    raise ValueError('boom')\n"
                 "def one(responses):\n    return [1.0] * len(responses)\n")
    # a function that raised, or took one argument, said "ValueError: boom" / "TypeError: ..." naming no flag
    r = refused("ppo", "--reward", f"{f}:one", "--prompts", str(prompts), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "one must take (prompts, responses)" in r.stderr.strip().splitlines()[-1], r.stderr
    for fn, says in [("nan", "the reward function gave nan for response 0"),
                     ("none", f"--reward {f}:none: must return a list of numbers"),
                     ("boom", f"--reward {f}:boom: it raised ValueError: boom")]:
        out = tmp_path / fn  # a NaN score made a NaN loss: the run wrote NaN weights and exited 0
        r = _run("--reward", f"{f}:{fn}", "--prompts", str(prompts), "--out", str(out), "--steps", "1", *TINY)
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not (out / "model.safetensors").exists()
    binary, empty = tmp_path / "bin.txt", tmp_path / "empty.txt"
    binary.write_bytes(b"ab\xb1\xff\n")
    empty.write_text("")
    for flags, says in [(["--ppo.max_new_tokens", "100000"], "ppo.max_new_tokens 100,000: leaves no room for a "
                         "prompt in the model's context of 512"),  # (prompts "longer than -99488 tokens")
                        (["--ptx-data", str(binary), "--ppo.ptx_coef", "1"], f"{binary}:1: not UTF-8 text"),
                        (["--ptx-data", str(empty), "--ppo.ptx_coef", "1"], f"--ptx-data {empty}: 0 tokens, too few")]:
        r = _run("--reward", "lmforge.data.stories:story_reward", "--prompts", str(prompts),
                 "--out", str(tmp_path / "y"), "--steps", "1", *TINY, *flags)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and says in last and "Traceback" not in r.stderr, (flags, r.stderr[-2000:])


def test_reward_function_from_file_and_prompts(tmp_path):
    f = tmp_path / "rw.py"
    f.write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    fn = load_reward_fn(f"{f}:length")
    assert fn(["a"], ["xyz"]) == [3.0]
    with pytest.raises(LMForgeError):
        load_reward_fn("no_colon")
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n{"instruction": "b", "input": "c"}\n'
                 '{"messages": [{"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}]}\n'
                 '{"messages": [{"role": "user", "content": "f"}, {"role": "assistant", "content": "g"}, '
                 '{"role": "user", "content": "h"}]}\n')
    got = read_prompts(str(p))
    assert [x.messages for x in got] == [
        [{"role": "user", "content": "a"}], [{"role": "user", "content": "b\nc"}],  # Alpaca's join, as SFT's
        [{"role": "user", "content": "d"}],  # a final answer is not part of the prompt
        [{"role": "user", "content": "f"}, {"role": "assistant", "content": "g"},
         {"role": "user", "content": "h"}]]  # earlier turns are the conversation
    assert [x.text for x in got] == ["a", None, None, None] and [x.user_text for x in got] == ["a", "b\nc", "d", "h"]
    t = tmp_path / "p.txt"
    t.write_text("one\n\ntwo\n")
    assert read_prompts(str(t)) == [Prompt([{"role": "user", "content": "one"}], "one"),
                                    Prompt([{"role": "user", "content": "two"}], "two")]
    t.write_text('\n{"prompt": "a"}\n')  # PPO read such lines as records, rejection-sample as prompts
    with pytest.raises(LMForgeError, match=r"p.txt:2: a JSON record in a text file .* name the file .jsonl"):
        read_prompts(str(t))
    for line, msg in (('{"messages": [{"role": "wizard", "content": "x"}]}', "unknown role 'wizard'"),  # was passed on
                      ('{"messages": [{"role": "assistant", "content": "x"}]}', "the prompt has no user turn"),
                      ('{"query": "x"}', "field 'prompt': missing"), ('[1]', "expected a JSON object")):
        p.write_text(line + "\n")
        with pytest.raises(LMForgeError, match=f"p.jsonl:1: .*{re.escape(msg)}"):
            read_prompts(str(p))


def _source(tmp_path, scores, opts: PPOOptions):
    """A PPOSource on stories260K with a fixed per-response score."""
    from lmforge.loading import load_model_and_tokenizer
    from lmforge.model.heads import ScalarHeadModel
    from lmforge.rl.rollout import disable_dropout
    from lmforge.stages.ppo import PPOModel

    actor, tok = load_model_and_tokenizer(None, None, "cpu")
    disable_dropout(actor)
    import copy

    ref = copy.deepcopy(actor).requires_grad_(False)
    model = PPOModel(actor, ScalarHeadModel(copy.deepcopy(actor)))
    prompts = [tok.encode("Once upon a time"), tok.encode("The cat"), tok.encode("A big dog ran")]

    def scorer(r, ps, rs):
        return torch.tensor(scores[: len(rs)])

    return PPOSource(model, prompts, ["a", "b", "c"], opts, 3, scorer, tok.decode, [tok.eos_id], 0, 5, ref), model


def test_first_minibatch_ratio_is_exactly_one(tmp_path):
    opts = PPOOptions(rollout_batch=4, minibatch=2, epochs=2, max_new_tokens=6, kl_coef=0.0)
    src, model = _source(tmp_path, [1.0, 2.0, 3.0, 4.0], opts)
    loss_fn = make_loss_fn(src, opts)
    b = src.next_batch()
    assert b["first"] and len(src.queue) == 3  # 2 epochs x 2 minibatches, one taken
    loss, n, metrics = loss_fn(model, b)
    assert metrics["first_ratio_max_dev"] == 0.0 and metrics["ratio"] == 1.0 and metrics["approx_kl"] == 0.0
    # the same policy-loss value from the independent formula at ratio 1: -mean(A)
    m = b["response_mask"]
    expect, _ = policy_loss(b["old_logprobs"], b["old_logprobs"], b["advantages"], m)
    assert torch.allclose(expect, -masked_mean(b["advantages"], m))
    # an update moves the policy: the next minibatch's ratio is no longer 1
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss.backward()
    opt.step()
    _, _, m2 = loss_fn(model, src.next_batch())
    assert m2["ratio"] != 1.0 and "first_ratio_max_dev" not in m2


def test_rollout_state_resumes_the_stream(tmp_path):
    opts = PPOOptions(rollout_batch=2, minibatch=2, epochs=1, max_new_tokens=4)
    src, _ = _source(tmp_path, [1.0, 0.0], opts)
    src.next_batch()
    assert src.at_boundary() and not src.exhausted()
    state = json.loads(json.dumps(src.state_dict()))
    a = src.next_batch()
    src2, _ = _source(tmp_path, [1.0, 0.0], opts)
    src2.load_state_dict(state)
    b = src2.next_batch()
    assert torch.equal(a["input_ids"], b["input_ids"]) and src2.kl.value == src.kl.value
    src.next_batch()
    assert src.exhausted()


def test_kl_horizon_scales_with_the_run():
    """Unset, the horizon is steps x rollout_batch / 10: beta can grow ~e^2 over any run whose KL stays far above
    target (with Ziegler et al.'s 10,000 it grew 1 % in 30 iterations of 16); a set horizon is kept."""
    for steps in (20, 30, 300):
        o = PPOOptions(rollout_batch=16)
        assert kl_horizon(o, steps) == steps * 16 / 10
        c = AdaptiveKLController(0.05, target=4.0, horizon=kl_horizon(o, steps))
        for _ in range(steps):
            c.update(40.0, o.rollout_batch)
        assert 6.0 < c.value / 0.05 < 7.39
    assert kl_horizon(PPOOptions(kl_horizon=10000.0), 30) == 10000.0
    with pytest.raises(LMForgeError, match="ppo.kl_horizon 4 must be 0 .* or at least ppo.rollout_batch 16"):
        kl_horizon(PPOOptions(rollout_batch=16, kl_horizon=4.0), 30)  # 1 - 0.2 x 16 / 4 < 0: beta negative
    for steps in range(1, 10):  # short runs: at least one batch, so beta moves x0.8-1.2 per update, never below 0
        o = PPOOptions(rollout_batch=16)
        assert kl_horizon(o, steps) == 16
        low, high = (AdaptiveKLController(0.05, target=4.0, horizon=kl_horizon(o, steps)) for _ in range(2))
        low.update(0.0, o.rollout_batch)
        high.update(40.0, o.rollout_batch)
        assert low.value == pytest.approx(0.04) and high.value == pytest.approx(0.06)


def test_config_defaults_resolve():
    cfg = PPOConfig()
    assert cfg.ppo.temperature > 0 and cfg.steps > 0 and callable(run_ppo)


def test_ppo_lora_shared_base(prompts, tmp_path):
    """--peft lora: actor and critic share the base, the reference is the base with adapters disabled (KL 0 on the
    first rollout), one iteration trains only the adapters and the value head; the output loads as --model."""
    from lmforge.loading import load_model_and_tokenizer
    from lmforge.train.config import TrainConfig

    cfg = PPOConfig(reward="lmforge.data.stories:story_reward", prompts=str(prompts), out=str(tmp_path / "lora"),
                    steps=1, ppo=PPOOptions(rollout_batch=2, minibatch=1, epochs=1, max_new_tokens=6),
                    train=TrainConfig(), peft={"method": "lora", "r": 4})
    s = run_ppo(cfg)
    assert s["iterations"] == 1 and s["last"]["kl"] == 0.0
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").is_file() and (out / "critic_head.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # adapters only, the base is referenced
    model, _ = load_model_and_tokenizer(str(out), None, "cpu")
    assert any("lora" in k for k in model.state_dict())
