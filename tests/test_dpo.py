"""`lmforge dpo`: prompt tokens out of every sum, the reference (stored / adapters disabled), the loss types, and
training that raises the implicit-reward accuracy on held-out pairs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from cli_run import refused
from test_reward_cli import word_pairs

from lmforge.data.preference import PreferenceRecord
from lmforge.loading import load_model_and_tokenizer
from lmforge.peft import load_adapter
from lmforge.stages.dpo import dpo_loss_fn, pair_groups, response_logprobs
from lmforge.stages.reward import GroupBatches


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=600)


def _batch(tok):
    recs = [PreferenceRecord([{"role": "user", "content": "Tom saw a big dog."}], [" He was happy.", " No."],
                             "Tom saw a big dog."),
            PreferenceRecord([{"role": "user", "content": "Sue"}], [" ran home and slept.", " sat."], "Sue")]
    groups = pair_groups(tok, recs, None, 64)
    return groups, GroupBatches(groups, batch_size=2, shuffle=False).fixed_batches(0, 0)[0]


def test_prompt_tokens_are_excluded_from_every_logprob_sum(stories):
    model, tok = stories
    groups, batch = _batch(tok)
    with torch.no_grad():
        got = response_logprobs(model, batch)
        rows = [ex for g in groups for ex in g]
        for r, ex in enumerate(rows):  # independent: unpadded forward, sum over the response positions only
            n_prompt = len(tok.encode(["Tom saw a big dog.", "Sue"][r // 2])) + 1  # + BOS
            ids = torch.tensor([ex["input_ids"]])
            lp = F.log_softmax(model(ids)[0].double(), -1)
            expect = sum(lp[t - 1, ex["input_ids"][t]].item() for t in range(n_prompt, len(ex["input_ids"])))
            assert got[r].item() == pytest.approx(expect, rel=1e-4, abs=1e-4)
            assert not batch["loss_mask"][r, :n_prompt].any() and batch["loss_mask"][r, n_prompt:len(ids[0])].all()
    # changing the logits at prompt positions changes nothing but the response's context (the sum skips them)
    logits = model(batch["input_ids"]).detach()
    from lmforge.losses import sequence_logprobs

    bumped = logits.clone()
    bumped[:, :2] += torch.randn_like(bumped[:, :2]) * 5  # predictions of tokens 1..2: prompt tokens in every row
    a = sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"])
    b = sequence_logprobs(bumped, batch["input_ids"], batch["loss_mask"])
    assert torch.allclose(a, b)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_fn_against_the_formulas(stories, loss_type):
    model, tok = stories
    groups, batch = _batch(tok)
    ref = torch.tensor([-20.0, -11.0, -30.0, -9.0])
    batch["ref"] = ref
    beta = 0.2
    loss, n, metrics = dpo_loss_fn(loss_type, beta, 0.0, peft=False)(model, batch)
    with torch.no_grad():
        pol = response_logprobs(model, batch)
    lengths = batch["loss_mask"][:, 1:].sum(-1).float()
    expect = 0.0
    for p in range(2):
        c, r = 2 * p, 2 * p + 1
        d = (pol[c] - ref[c]) - (pol[r] - ref[r])
        if loss_type == "sigmoid":
            expect += -math.log(1 / (1 + math.exp(-beta * d.item())))
        elif loss_type == "hinge":
            expect += max(0.0, 1 - beta * d.item())
        else:
            dn = (pol[c] - ref[c]) / lengths[c] - (pol[r] - ref[r]) / lengths[r]
            expect += (dn.item() - 1 / (2 * beta)) ** 2
    assert n == 2 and loss.item() == pytest.approx(expect, rel=1e-4)
    acc = sum(float(beta * (pol[2 * p] - ref[2 * p]) > beta * (pol[2 * p + 1] - ref[2 * p + 1])) for p in range(2))
    assert metrics["reward_accuracy"] == pytest.approx(acc)


def _rows(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_command_raises_implicit_reward_accuracy_and_leaves_a_loadable_model(tmp_path):
    data = tmp_path / "pairs.jsonl"  # TRL's flat {prompt, chosen, rejected}: joined as plain text
    data.write_text("".join(json.dumps(r) + "\n" for r in word_pairs(60, seed=1)))
    out = tmp_path / "dpo"
    r = run("dpo", "--data", str(data), "--out", str(out), "--max-iters", "8", "--train.batch_size", "8",
            "--data.val_fraction", "0.25", "--train.eval_interval", "4", "--beta", "0.1")
    assert r.returncode == 0, r.stderr
    assert "45 train / 15 held-out pairs" in r.stderr and "stored reference" in r.stderr and "plain text" in r.stderr
    assert "; lr 3e-05" in r.stderr  # a tenth of the SFT rate (3e-4 for stories260K)
    assert (out / "reference_logprobs.safetensors").is_file()
    evals = [row for row in _rows(out) if "val_reward_accuracy" in row]
    assert evals[0]["step"] == 0 and evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = ref
    assert {"val_reward_margin", "val_rewards_chosen", "val_rewards_rejected"} <= set(evals[-1])
    assert evals[-1]["val_reward_accuracy"] >= 0.8 and evals[-1]["val_reward_margin"] > 0
    g = run("generate", "--model", str(out), "--prompt", "Tom saw", "--max-new-tokens", "4", "--temperature", "0")
    assert g.returncode == 0, g.stderr
    again = run("dpo", "--data", str(data), "--out", str(out), "--max-iters", "9", "--train.batch_size", "8",
                "--data.val_fraction", "0.25", "--resume")
    assert again.returncode == 0 and "resumed from" in again.stderr and "read from" in again.stderr, again.stderr
    # the stored reference belongs to its model and pairs: another template (or model) is refused on --resume, and
    # computed again by a new run (--overwrite read the old run's, so step 0 was not policy = reference)
    other = ("dpo", "--data", str(data), "--out", str(out), "--max-iters", "1", "--train.batch_size", "8",
             "--data.val_fraction", "0.25", "--data.template", "chatml")
    r = run(*other, "--resume")
    assert r.returncode == 1 and "stored for another reference model, template or data" in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("lmforge dpo: error: ") and "Traceback" not in r.stderr
    r = run(*other, "--overwrite")
    assert r.returncode == 0 and "read from" not in r.stderr, r.stderr
    first = next(row for row in _rows(out) if "val_loss" in row)
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    rows = _rows(out)  # the run started again: none of the old run's rows are left (its step 0 was)
    assert [r["step"] for r in rows] == [0, 1], rows
    r = run(*other, "--resume")  # nothing left to do: no row added (a final row was, at every such resume)
    assert r.returncode == 0 and _rows(out) == rows, r.stderr


def test_dpo_command_with_lora_uses_the_base_as_reference(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in word_pairs(24, seed=2)))
    out = tmp_path / "dpo"
    r = run("dpo", "--data", str(data), "--out", str(out), "--max-iters", "3", "--train.batch_size", "4",
            "--peft", "lora", "--loss", "ipo", "--data.val_fraction", "0.25")
    assert r.returncode == 0, r.stderr
    assert "reference = adapters disabled" in r.stderr and "loss ipo" in r.stderr
    assert not (out / "reference_logprobs.safetensors").exists()
    first = next(row for row in _rows(out) if "val_loss" in row)
    assert first["step"] == 0 and first["val_reward_margin"] == pytest.approx(0.0, abs=1e-5)  # B = 0: policy = ref
    assert (out / "adapter_config.json").is_file()
    g = run("generate", "--model", str(out), "--prompt", "Tom", "--max-new-tokens", "3", "--temperature", "0")
    assert g.returncode == 0, g.stderr
    # resumed with a forgotten flag: refused in one line naming it (the objective or the adapters switched mid-run)
    common = ("dpo", "--data", str(data), "--out", str(out), "--max-iters", "4", "--train.batch_size", "4",
              "--data.val_fraction", "0.25", "--resume")
    for flags, says in ((["--peft", "lora"], "it was trained with loss ipo (this run: sigmoid)"),
                        (["--loss", "ipo"], "a --peft run (adapter_config.json): resume it with the same --peft")):
        r = run(*common, *flags)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith("lmforge dpo: error: ") and says in last, r.stderr


def test_sft_on_the_chosen_answers_then_dpo_from_it(tmp_path):
    """The DPO paper's recipe where no SFT model exists: ``lmforge sft`` on the preference file (prompt + chosen),
    then ``lmforge dpo --model SFT_DIR --peft lora``: the SFT adapter is merged into the start, which is also the
    reference, and the chain of adapters loads as a model."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in word_pairs(24, seed=3)))
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    r = run("sft", "--data", str(data), "--out", str(sft), "--max-iters", "3", "--train.batch_size", "4",
            "--peft", "lora")
    assert r.returncode == 0, r.stderr
    assert "22 train / 2 held-out conversations" in r.stderr and (sft / "adapter_config.json").is_file()
    assert "24 preference records as plain text" in r.stderr  # as DPO joins them for a model without a template
    r = run("dpo", "--model", str(sft), "--data", str(data), "--out", str(dpo), "--max-iters", "2",
            "--train.batch_size", "4", "--peft", "lora", "--data.val_fraction", "0.25", "--train.lr", "1e-3")
    assert r.returncode == 0, r.stderr
    first = next(row for row in _rows(dpo) if "val_loss" in row)
    assert first["step"] == 0 and first["val_reward_margin"] == pytest.approx(0.0, abs=1e-5)
    x = torch.tensor([[1, 45, 99, 230, 17, 3]])
    with torch.no_grad():
        chained, tuned = (load_model_and_tokenizer(str(d), None, "cpu")[0].eval()(x) for d in (dpo, sft))
        by_hand = load_model_and_tokenizer(None, None, "cpu")[0].eval()
        load_adapter(by_hand, sft)
        load_adapter(by_hand, dpo)
        torch.testing.assert_close(chained, by_hand(x), rtol=0, atol=1e-5)  # both adapters, not the SFT one only
    assert (chained - tuned).abs().max() > 1e-4
    outs = [run("generate", "--model", str(d), "--prompt", "Tom saw", "--max-new-tokens", "8", "--temperature", "0")
            for d in (sft, dpo)]
    assert all(g.returncode == 0 for g in outs), outs[0].stderr + outs[1].stderr


def test_dpo_errors_are_one_line(tmp_path):
    r = refused("dpo", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("lmforge dpo: error: ")
    assert "Traceback" not in r.stderr
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(6)))
    for cmd, what in (("dpo", "pairs"), ("reward", "prompts")):  # (5 of the 6 train: one is held out)
        r = refused(cmd, "--data", str(pairs), "--train.batch_size", "10000000", "--out", str(tmp_path / "o"))
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
            f"lmforge {cmd}: error: train.batch_size 10000000 is more than the "), r.stderr
        assert f"training {what}: every batch would repeat them" in r.stderr
    for cmd, flags, says in (("dpo", ["--epochs", "-2"], "--epochs -2.0: must be a positive number"),  # 1 step
                             ("sft", ["--epochs", "nan"], "--epochs nan: must be a positive number"),  # ValueError
                             ("reward", ["--epochs", "inf"], "--epochs inf: must be >= 0"),
                             ("sft", ["--data.max_len", "-5"], "data.max_len -5: must be >= 0")):  # the context
        r = refused(cmd, "--data", str(pairs), *flags, "--out", str(tmp_path / "o"))  # (sft reads the chosen replies)
        assert r.returncode == 1 and r.stderr.startswith(f"lmforge {cmd}: error: {says}"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    same = tmp_path / "same.jsonl"  # chosen == rejected: no preference to learn (the loss stayed ln 2, silently)
    same.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "a" if i % 3 else "b"}) + "\n"
                            for i in range(12)))
    late = tmp_path / "late.jsonl"
    late.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "once upon a time there was a dog " * 3 + "yes",
                                        "rejected": "once upon a time there was a dog " * 3 + "no"}) + "\n"
                            for i in range(12)))
    for cmd, what in (("dpo", "pairs"), ("reward", "prompts")):
        r = run(cmd, "--data", str(same), "--train.batch_size", "2", "--max-iters", "1", "--out", str(tmp_path / cmd),
                "--data.val_fraction", "0.25")
        assert r.returncode == 0 and f"training {what} have identical responses once encoded" in r.stderr, r.stderr
        assert f"held-out {what} have identical responses once encoded (max_len" in r.stderr  # (val accuracy 0, unsaid)
        r = run(cmd, "--data", str(late), "--data.max_len", "12", "--train.batch_size", "2", "--out",
                str(tmp_path / "o3"))  # (the answers differ past max_len)
        assert r.returncode == 1 and "identical responses once encoded (max_len 12): nothing to learn" in r.stderr
    # accepted and ignored: conservative DPO's smoothing with another loss; an untrained head saved as the model
    for cmd, flags, says in (("dpo", ["--loss", "ipo", "--label-smoothing", "0.2"],
                              "--label-smoothing 0.2: conservative DPO's smoothing is of the sigmoid loss"),
                             ("reward", ["--max-iters", "0", "--train.batch_size", "4"],
                              "--max-iters 0 fine-tunes nothing")):
        r = refused(cmd, "--data", str(pairs), *flags, "--out", str(tmp_path / "o2"))
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith(f"lmforge {cmd}: error: {says}"), r.stderr


def test_full_dpo_scores_only_the_pairs_its_steps_use(tmp_path, stories):
    """Full-model DPO computed the reference of every pair before step 1 (hh-rlhf's tens of thousands for a run of a
    few steps): now those of its first max_iters steps and of its evaluations; a resumed longer run adds the pairs
    it reaches, from the starting model, with the values a run that planned them at once computes; a pair met
    unplanned (a loss spike's skip) is scored by a second copy of the starting model (audit C F34)."""
    from safetensors.torch import load_file

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in word_pairs(64)))
    common = ["--data", str(data), "--train.batch_size", "4", "--train.eval_iters", "1", "--data.val_fraction", "0.25",
              "--train.precision", "fp32"]
    r = run("dpo", *common, "--max-iters", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reference log-probs of 12 pairs computed (those this run uses, of 64)" in r.stderr, r.stderr
    ref = load_file(str(tmp_path / "o" / "reference_logprobs.safetensors"))
    assert [int((~ref[k][:, 0].isnan()).sum()) for k in ("train", "val")] == [8, 4]
    step0 = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    assert step0["step"] == 0 and step0["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    r = run("dpo", *common, "--max-iters", "4", "--out", str(tmp_path / "o"), "--resume")
    assert r.returncode == 0 and "reference log-probs of 8 pairs computed" in r.stderr, r.stderr[-3000:]
    r = run("dpo", *common, "--max-iters", "4", "--out", str(tmp_path / "once"))
    assert r.returncode == 0 and "reference log-probs of 20 pairs computed" in r.stderr, r.stderr[-3000:]
    a, b = (load_file(str(tmp_path / d / "reference_logprobs.safetensors")) for d in ("o", "once"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, equal_nan=True)
    model, tok = stories
    _, batch = _batch(tok)
    with torch.no_grad():
        known = response_logprobs(model, batch)
        planned = dpo_loss_fn("sigmoid", 0.1, 0.0, peft=False)(model, {**batch, "ref": known})[0]
        late = dpo_loss_fn("sigmoid", 0.1, 0.0, peft=False, late=lambda b: known)(
            model, {**batch, "ref": torch.full_like(known, math.nan)})[0]
    assert torch.equal(planned, late) and torch.isfinite(late)
