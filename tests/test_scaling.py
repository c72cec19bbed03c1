"""lmforge.scaling: the laws against their own definitions solved numerically, ZeRO's published memory example,
the analytic parameter count against the decoder, the Huber/L-BFGS fit on synthetic runs, and the command."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.errors import LMForgeError
from lmforge.presets import count_params, get_preset, list_presets
from lmforge.scaling.fit import Run, _objective, fit_law
from lmforge.scaling.laws import EPOCH, HOFFMANN, KAPLAN, chinchilla_report, kaplan_report
from lmforge.scaling.memory import Parallel, analytic_params, flops_per_token, memory_estimate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("law", [HOFFMANN, EPOCH])
@pytest.mark.parametrize("compute", [1e18, 5.76e23, 1e26])
def test_chinchilla_optimum_minimises_the_loss_on_the_isoflop(law, compute):
    from scipy.optimize import minimize_scalar

    n, d = law.optimal(compute)
    assert 6 * n * d == pytest.approx(compute)
    res = minimize_scalar(lambda x: law.loss(math.exp(x), compute / (6 * math.exp(x))), bounds=(0, 80),
                          method="bounded", options={"xatol": 1e-10})
    assert n == pytest.approx(math.exp(res.x), rel=1e-3)
    assert law.compute_for_params(n) == pytest.approx(compute, rel=1e-9)
    assert law.compute_for_tokens(d) == pytest.approx(compute, rel=1e-9)


def test_chinchilla_report_forms():
    r = chinchilla_report(params=70e9, tokens=1.4e12)
    assert r["compute"] == pytest.approx(5.88e23) and r["loss"] == pytest.approx(HOFFMANN.loss(70e9, 1.4e12))
    assert r["loss"] == pytest.approx(1.69 + 406.4 / 70e9**0.34 + 410.7 / 1.4e12**0.28)
    r = chinchilla_report(compute=5.88e23)
    # the anchored approaches all give Chinchilla itself at Chinchilla's compute
    for v in r["approaches"].values():
        assert v["params"] == pytest.approx(70e9) and v["tokens"] == pytest.approx(1.4e12)
    assert r["rule_20"]["tokens"] / r["rule_20"]["params"] == pytest.approx(20)
    # Epoch AI's refit puts the optimum near 20 tokens per parameter at Chinchilla's scale (their section 4)
    e = chinchilla_report(compute=5.88e23, law=EPOCH)
    assert 15 < e["tokens_per_param"] < 30
    # a budget with a size or a token count: the other follows from C = 6 N D (the second was ignored before)
    for kw in ({"params": 70e9}, {"tokens": 1.4e12}):
        r = chinchilla_report(compute=5.88e23, **kw)
        assert r["params"] == pytest.approx(70e9) and r["tokens"] == pytest.approx(1.4e12)
        assert r["loss"] == pytest.approx(HOFFMANN.loss(70e9, 1.4e12))
    r = chinchilla_report(compute=5.88e23, params=7e9)
    assert r["tokens"] == pytest.approx(1.4e13) and r["optimal"]["loss"] < r["loss"]
    with pytest.raises(LMForgeError, match="give two of the three"):
        chinchilla_report(compute=1e21, params=1e9, tokens=1e9)


def test_kaplan_formulas():
    k = KAPLAN
    r = kaplan_report(params=1.5e9, tokens=1e30)
    assert r["loss_N"] == pytest.approx((8.8e13 / 1.5e9) ** 0.076)
    # L(N, D) -> (N_c / N)^alpha_N as D -> infinity (eq. 1.5)
    assert r["loss_ND"] == pytest.approx((k["nd_N_c"] / 1.5e9) ** k["nd_alpha_N"], rel=1e-9)
    r = kaplan_report(compute=8.64e19)  # one PF-day
    assert r["efficient"]["params"] == pytest.approx(1.3e9) and r["loss_C"] == pytest.approx((3.1e8) ** 0.05)
    assert r["critical_batch_tokens"] == pytest.approx(2e8 / r["loss_C"] ** (1 / 0.21))
    with pytest.raises(LMForgeError, match="at most two"):  # C = 6ND: all three can contradict each other
        kaplan_report(compute=1e21, params=70e9, tokens=1e12)


def test_zero_memory_matches_the_paper_example():
    """Rajbhandari et al. 2020, Figure 1: 7.5B parameters on 64 GPUs, mixed-precision Adam: 120 GB per device
    baseline, 31.4 GB with P_os, 16.6 GB with P_os+g, 1.9 GB with P_os+g+p."""
    cfg = get_preset("llama-7b")
    scale = 7.5e9 / analytic_params(cfg)["total"]
    for stage, gb in [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)]:
        m = memory_estimate(cfg, 1, 16, "bf16", Parallel(dp=64, zero=stage))["bytes"]
        states = (m["weights"] + m["gradients"] + m["optimizer"]) * scale / 1e9
        assert states == pytest.approx(gb, abs=0.06)


def test_parallel_degrees_must_divide_heads_and_layers():
    cfg = get_preset("llama-7b")  # 32 heads, 32 layers
    memory_estimate(cfg, 1, 2048, "bf16", Parallel(tp=8, pp=4))
    with pytest.raises(LMForgeError, match="--tp 3 must divide the 32 attention heads"):
        memory_estimate(cfg, 1, 2048, "bf16", Parallel(tp=3))
    with pytest.raises(LMForgeError, match="--pp 5 must divide the 32 layers"):
        memory_estimate(cfg, 1, 2048, "bf16", Parallel(pp=5))


def test_activation_memory_formula():
    cfg = get_preset("gpt3-175b") if "gpt3-175b" in list_presets() else get_preset("llama-7b")
    s, b, h, a, L = 2048, 1, cfg.n_embd, cfg.n_head, cfg.n_layer
    m = memory_estimate(cfg, b, s, "bf16", Parallel())["bytes"]["activations"]
    assert m == pytest.approx(L * s * b * h * (34 + 5 * a * s / h))  # Korthikanti et al. eq. 2
    m8 = memory_estimate(cfg, b, s, "bf16", Parallel(tp=8))["bytes"]["activations"]
    assert m8 == pytest.approx(m / 8)  # eq. 4: tensor + sequence parallel divide everything by t
    m8n = memory_estimate(cfg, b, s, "bf16", Parallel(tp=8, sequence_parallel=False))["bytes"]["activations"]
    assert m8n == pytest.approx(L * s * b * h * (10 + 24 / 8 + 5 * a * s / (h * 8)))
    full = memory_estimate(cfg, b, s, "bf16", Parallel(recompute="full"))["bytes"]["activations"]
    assert full == pytest.approx(L * 2 * s * b * h)


@pytest.mark.parametrize("name", list_presets())
def test_analytic_params_equal_the_decoder_and_published_sizes(name):
    cfg = get_preset(name)
    n = analytic_params(cfg)["total"]
    assert n == count_params(cfg)
    text = cfg.extra.get("published_params")
    if text:  # the papers' rounded totals ("117M", "6.7B")
        published = float(text[:-1]) * {"M": 1e6, "B": 1e9}[text[-1]]
        digits = len(text[:-1].replace(".", "").lstrip("0"))
        assert abs(n - published) <= 0.5 * 10 ** (math.floor(math.log10(published)) - digits + 1) + 0.02 * published


def test_flops_per_token_matches_the_trainer():
    from lmforge.model import Decoder
    from lmforge.train.metrics import model_flops_per_token

    cfg = get_preset("tiny-gpt2")
    # the trainer's count keeps the learned position table (a lookup, not a matmul): the only difference
    wpe = cfg.block_size * cfg.n_embd
    assert flops_per_token(cfg)["train"] == pytest.approx(model_flops_per_token(Decoder(cfg)) - 6 * wpe)


def test_objective_gradient_is_exact():
    rng = np.random.default_rng(0)
    logn, logd = rng.uniform(15, 22, 12), rng.uniform(18, 25, 12)
    logl = np.log(np.array([HOFFMANN.loss(math.exp(x), math.exp(y)) for x, y in zip(logn, logd)])) + 0.01
    theta = np.array([6.0, 6.0, 0.5, 0.34, 0.28])
    f, g = _objective(theta, logn, logd, logl, 0.05)
    for i in range(5):
        e = np.zeros(5)
        e[i] = 1e-6
        up, down = _objective(theta + e, logn, logd, logl, 0.05)[0], _objective(theta - e, logn, logd, logl, 0.05)[0]
        num = (up - down) / 2e-6
        assert g[i] == pytest.approx(num, rel=1e-4, abs=1e-8)


def test_fit_recovers_a_law_and_predicts_a_held_out_run():
    rng = np.random.default_rng(1)
    truth = EPOCH
    runs = [Run(n, d, truth.loss(n, d) * math.exp(rng.normal(0, 0.002)))
            for n in np.geomspace(1e7, 1e9, 5) for d in np.geomspace(1e9, 1e11, 5)]
    runs.sort(key=lambda r: r.params * r.tokens)
    law, _ = fit_law(runs[:-1])
    big = (3e9, 3e11)  # beyond every fitted run
    assert law.loss(*big) == pytest.approx(truth.loss(*big), rel=0.01)
    assert law.loss(runs[-1].params, runs[-1].tokens) == pytest.approx(runs[-1].loss, rel=0.01)
    with pytest.raises(Exception, match="at least 5 runs"):
        fit_law(runs[:3])
    # one run given five times is one point ("fitted" with the start values); a Huber delta <= 0 or NaN crashed
    with pytest.raises(LMForgeError, match=r"distinct \(parameters, tokens\), got 1 among 5 runs"):
        fit_law(runs[:1] * 5)
    for delta in (0.0, -1.0, math.nan):
        with pytest.raises(LMForgeError, match="the Huber delta must be a finite number > 0"):
            fit_law(runs[:-1], delta)


# ---- the command ---------------------------------------------------------------------------------------------------
def lmforge(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "lmforge", "scaling", *args], capture_output=True, text=True, env=env,
                       timeout=900)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_cli_chinchilla_kaplan_memory_json(tmp_path):
    r = json.loads(lmforge("chinchilla", "--compute", "1e21", "--json").stdout)
    assert r["compute"] == 1e21 and r["params"] == pytest.approx(HOFFMANN.optimal(1e21)[0])
    r = json.loads(lmforge("chinchilla", "--params", "70B", "--tokens", "1.4T", "--fit", "epoch", "--json").stdout)
    assert r["loss"] == pytest.approx(EPOCH.loss(70e9, 1.4e12))
    r = json.loads(lmforge("kaplan", "--params", "1.5B", "--json").stdout)
    assert r["loss_N"] == pytest.approx((8.8e13 / 1.5e9) ** 0.076)
    r = json.loads(lmforge("memory", "--model", "llama-7b", "--dp", "8", "--fsdp", "--json").stdout)
    assert r["params"]["total"] == count_params(get_preset("llama-7b"))
    assert r["memory"]["parallel"]["zero"] == 3
    text = lmforge("memory", "--model", "gpt2-small").stdout
    assert "parameters" in text and "GiB" in text
    long = lmforge("memory", "--model", "gpt2-small", "--seq-len", "4096", "--json")  # past its 1,024 positions
    assert json.loads(long.stdout)["note"] == long.stderr.strip()[len("note: "):], long.stderr
    assert "beyond the model's context (1,024)" in long.stderr and "learned position table" in long.stderr
    assert "note" not in json.loads(lmforge("memory", "--model", "gpt2-small", "--seq-len", "1024", "--json").stdout)
    bad = lmforge("chinchilla", check=False)
    assert bad.returncode == 1 and "give --compute" in bad.stderr and "Traceback" not in bad.stderr
    bad = lmforge("memory", "--model", "no-such-model", check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    for law, flag, value in (("kaplan", "--tokens", "1e300"), ("chinchilla", "--params", "1e-300")):
        bad = lmforge(law, flag, value, check=False)  # (OverflowError, ZeroDivisionError)
        assert bad.returncode == 2 and f"{flag}: '{value}': out of range" in bad.stderr, bad.stderr
    hf = tmp_path / "hf"  # a Hugging Face checkpoint's config (it was refused as "unknown field(s)")
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000, "tie_word_embeddings": True}))
    r = json.loads(lmforge("memory", "--model", str(hf), "--json").stdout)
    assert r["params"]["total"] == 134_515_008  # SmolLM2-135M
    (tmp_path / "empty.json").write_text("{}")  # was the defaults' 134M model
    bad = lmforge("memory", "--model", str(tmp_path / "empty.json"), check=False)
    assert bad.returncode == 1 and "empty.json: not a model config" in bad.stderr
    bad = lmforge("memory", "--model", "gpt2-small", "--seq-len", "0", check=False)  # was the model's context
    assert bad.returncode == 1 and "--seq-len 0: must be >= 1" in bad.stderr
    bad = lmforge("memory", "--model", "gpt2-small", "--fsdp", "--zero", "1", check=False)  # became zero 3
    assert bad.returncode == 1 and "cannot be combined with --zero 1" in bad.stderr
    bad = lmforge("chinchilla", "--compute", "-1", check=False)  # said "not a number"
    assert bad.returncode == 2 and "--compute: not a positive number: '-1'" in bad.stderr


def test_cli_sweep_then_fit_tiny(tmp_path):
    out = tmp_path / "sweep"
    r = lmforge("sweep", "--out", str(out), "--sizes", "1x8,1x16", "--iters", "2,3,4", "--batch-size", "2",
                "--block-size", "8", "--eval-iters", "1", "--device", "cpu", "--json")
    d = json.loads(r.stdout)
    assert len(d["runs"]) == 6 and (out / "scaling.png").is_file() and (out / "sweep.json").is_file()
    h = d["held_out"]
    assert h["name"] == "L1-d16-i4" and h["tokens"] == 4 * 2 * 8
    assert h["predicted"] == pytest.approx(d["law"]["E"] + d["law"]["A"] / h["params"] ** d["law"]["alpha"]
                                           + d["law"]["B"] / h["tokens"] ** d["law"]["beta"])
    runs = sorted(str(p) for p in out.iterdir() if p.is_dir())
    f = json.loads(lmforge("fit", *runs, "--json").stdout)
    assert len(f["runs"]) == 6 and all(x["loss"] > 0 for x in f["runs"])
    assert {x["name"] for x in f["runs"]} == {x["name"] for x in d["runs"]}
    bad = lmforge("sweep", "--out", str(tmp_path / "dup"), "--sizes", "1x8,1x8,1x16", "--iters", "2,3",
                  check=False)  # (the same run fitted several times: "0.00 % error")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
        "lmforge scaling: error: --sizes: 1x8 is given twice")
    for flags, msg in ((["--iters", "0,2"], "--iters 0: must be >= 1"),  # said "train.eval_interval=0"
                       (["--eval-iters", "0"], "--eval-iters 0: must be >= 1"),  # trained, then "no val_loss"
                       (["--sizes", "0x8,1x16,2x16"], "--sizes 0x8: must be >= 1"),
                       (["--batch-size", "0"], "--batch-size 0: must be >= 1")):
        bad = lmforge("sweep", "--out", str(tmp_path / "bad"), *flags, check=False)
        assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [f"lmforge scaling: error: {msg}"]
    assert not (tmp_path / "bad").exists()


def test_sweep_trains_a_stored_run_again_when_its_settings_changed(tmp_path, monkeypatch):
    """A stored run was reused whatever the sweep's batch or block size now was: the old results fitted as new."""
    import lmforge.scaling.sweep as S
    import lmforge.stages.pretrain as P

    trained = []

    def fake_pretrain(rc):
        trained.append(rc.train.batch_size)
        Path(rc.out).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(P, "run_pretrain", fake_pretrain)
    monkeypatch.setattr(S, "read_run", lambda out: S.Run(1e3 * len(str(out)), 1e4, 3.0, Path(out).name))
    monkeypatch.setattr(S, "fit_law", lambda runs: (S.ChinchillaLaw(1.0, 1.0, 1.0, 0.3, 0.3), 0.0))
    monkeypatch.setattr(S, "plot", lambda result, law, png: png)
    cfg = S.SweepConfig(out=str(tmp_path), sizes=[(1, 8), (1, 16)], iters=[2, 3, 4], batch_size=2)
    S.sweep(cfg, quiet=True)
    S.sweep(cfg, quiet=True)  # the same settings: every run reused
    assert trained == [2] * 6
    other = S.SweepConfig(out=str(tmp_path), sizes=[(1, 8), (1, 16)], iters=[2, 3, 4], batch_size=1)
    # other settings replaced the stored runs with a note and exit 0: now that takes --overwrite
    with pytest.raises(LMForgeError, match=r"L1-d8-i2 \(and 5 more\) was trained with other settings .* "
                                           r"pass --overwrite"):
        S.sweep(other, quiet=True)
    assert trained == [2] * 6
    other.overwrite = True
    S.sweep(other, quiet=True)
    assert trained == [2] * 6 + [1] * 6
    (tmp_path / "notes.txt").write_text("mine")  # a directory holding what a sweep does not write
    with pytest.raises(LMForgeError, match=r"holds files a sweep does not write \(notes\.txt\)"):
        S.sweep(S.SweepConfig(out=str(tmp_path), sizes=[(1, 8), (1, 16)], iters=[2, 3, 4], batch_size=1), quiet=True)


def test_fit_on_a_fine_tuning_run_says_what_it_reads(tmp_path):
    """An SFT/DPO/reward run (its run config has no data.block_size) said "cannot read the trainer state:
    'block_size'", which reads as a damaged checkpoint."""
    from lmforge.config import ModelConfig
    from lmforge.scaling.fit import read_run

    run = tmp_path / "sft1"
    (run / "ckpt-0000002").mkdir(parents=True)
    ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_embd=16, n_head=2).save(run / "ckpt-0000002" / "config.json")
    (run / "ckpt-0000002" / "trainer_state.json").write_text(json.dumps(
        {"run_config": {"train": {"batch_size": 4}, "data": {"path": "x.jsonl", "max_len": 0}}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "val_loss": 1.0}) + "\n")
    with pytest.raises(LMForgeError, match=r"sft1: a fine-tuning run \(sft, reward, dpo or ppo\); scaling fit reads "
                                           r"pretraining runs"):
        read_run(run)


def test_a_damaged_metrics_file_is_named_by_line_and_a_fit_off_its_range_warns(tmp_path, capsys):
    """A metrics.jsonl with a broken line, a row that is not an object, a val_loss without its step or a NaN one gave
    bare JSONDecodeError/AttributeError/KeyError/TypeError; runs that do not pin the law down drove it to B = 5e172,
    then an OverflowError."""
    from lmforge.config import ModelConfig
    from lmforge.scaling.fit import read_run

    run = tmp_path / "r1"
    (run / "ckpt-0000004").mkdir(parents=True)
    ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_embd=16, n_head=2).save(run / "ckpt-0000004" / "config.json")
    (run / "ckpt-0000004" / "trainer_state.json").write_text(json.dumps(
        {"run_config": {"train": {"batch_size": 4}, "data": {"block_size": 32}}}))
    good = json.dumps({"step": 2, "train_loss": 3.0}) + "\n" + json.dumps({"step": 4, "val_loss": 2.5}) + "\n"
    (run / "metrics.jsonl").write_text(good)
    assert read_run(run).loss == 2.5 and read_run(run).tokens == 4 * 4 * 32
    for line, says in [('{"step": 2, "train_loss": brok', "metrics.jsonl:3: not JSON"),
                       ("[1, 2]", "metrics.jsonl:3: expected a JSON object"),
                       ('{"val_loss": 3.0}', "metrics.jsonl:3: step None: expected the step"),
                       ('{"step": 9, "val_loss": "NaN"}', "metrics.jsonl:3: val_loss 'NaN': expected a positive"),
                       ('{"step": 9, "val_loss": NaN}', "metrics.jsonl:3: val_loss nan")]:
        (run / "metrics.jsonl").write_text(good + line + "\n")
        with pytest.raises(LMForgeError, match=re.escape(says)):
            read_run(run)
    # losses that barely move with the tokens: the fit runs to the edge of its range and says so, without overflow
    runs = [Run(n, d, loss) for n, d, loss in [(3168, 2560, 4.0752), (3168, 5120, 3.9834), (7056, 2560, 4.0792),
                                               (7056, 5120, 3.9601), (14064, 2560, 3.9996), (14064, 5120, 3.8972)]]
    law, _ = fit_law(runs)
    assert "the fit ran to the edge of its range" in capsys.readouterr().err
    assert all(math.isfinite(law.loss(r.params, r.tokens)) for r in runs)
