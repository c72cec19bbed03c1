"""The trainer as the one loop for every stage: loss normalised over the whole step, metrics and best-checkpoint
selection, epoch batch sources (padding, packing, exact mid-epoch resume), trainable-only checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.losses import IGNORE, cross_entropy, token_loss_sum
from lmforge.model import Decoder
from lmforge.peft.base import set_trainable_params
from lmforge.train.batches import BatchSource, ExampleBatches, TokenWindows
from lmforge.train.config import TrainConfig
from lmforge.train.loop import Trainer
from lmforge.train.state import latest_checkpoint, load_training_checkpoint

CFG = ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_embd=16, n_head=2, multiple_of=16)


def examples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Examples of uneven length whose first half is an (unscored) prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 20, (1,), generator=g))
        ids = torch.randint(1, 40, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [IGNORE] * cut + ids[cut:]})
    return out


def sft_loss(model, batch):
    logits = model(batch["input_ids"], **batch.get("model_kwargs", {}))
    return token_loss_sum(logits, batch["targets"])


def grads_after_one_step(batch_size: int, accum: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Decoder(CFG)
    data = ExampleBatches(examples(8), batch_size, max_len=31, shuffle=False)
    t = TrainConfig(batch_size=batch_size, grad_accum=accum, grad_clip=0, precision="fp32", device="cpu")
    trainer = Trainer(model, t, data, sft_loss, "/nonexistent")
    loss, _, units, _ = trainer.train_step()
    return {"loss": torch.tensor(loss), "units": torch.tensor(units),
            **{k: p.grad.clone() for k, p in model.named_parameters()}}


def test_accumulation_equals_one_big_batch_with_uneven_masks():
    big, small = grads_after_one_step(8, 1), grads_after_one_step(1, 8)
    assert big["units"] == small["units"]
    for k in big:
        torch.testing.assert_close(small[k], big[k], rtol=1e-5, atol=1e-6, msg=k)
    # and the gradient is that of the mean over all scored tokens of the step (not a mean of micro-batch means)
    torch.manual_seed(0)
    model = Decoder(CFG)
    exs = examples(8)
    total, n = 0.0, 0
    for ex in exs:
        x, y = torch.tensor([ex["input_ids"][:-1]]), torch.tensor([ex["labels"][1:]])
        s, c = token_loss_sum(model(x), y)
        total, n = total + s, n + c
    (total / n).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, big[k], rtol=1e-5, atol=1e-6, msg=k)


def test_packed_loss_equals_unpacked_loss():
    torch.manual_seed(0)
    model = Decoder(CFG).eval()
    exs = examples(12, seed=3)
    packed = ExampleBatches(exs, 3, max_len=32, packing=True, shuffle=False).fixed_batches(0, 0)
    padded = ExampleBatches(exs, 3, max_len=32, packing=False, shuffle=False).fixed_batches(0, 0)
    assert len(packed) < len(padded)  # packing put several examples in a row
    assert any(int(b["model_kwargs"]["segment_ids"].max()) >= 2 for b in packed)

    @torch.no_grad()
    def total(batches):
        s, n = 0.0, 0
        for b in batches:
            ls, c = sft_loss(model, b)
            s, n = s + float(ls), n + c
        return s, n

    (sp, n_p), (su, n_u) = total(packed), total(padded)
    with torch.no_grad():
        ref = sum(float(cross_entropy(model(torch.tensor([e["input_ids"][:-1]])), torch.tensor([e["labels"][1:]]),
                                      reduction="sum")) for e in exs)
    assert n_p == n_u
    assert sp == pytest.approx(ref, rel=1e-5) and su == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("packing,by_length", [(False, False), (True, False), (False, True)])
def test_example_batches_resume_mid_epoch_and_cover_each_epoch(packing, by_length):
    exs = examples(10, seed=1)
    ref = ExampleBatches(exs, 2, max_len=24, packing=packing, seed=7, by_length=by_length)
    assert isinstance(ref, BatchSource)
    seq = [ref.next_batch() for _ in range(9)]
    again = ExampleBatches(exs, 2, max_len=24, packing=packing, seed=7, by_length=by_length)
    for _ in range(4):
        again.next_batch()
    state = json.loads(json.dumps(again.state_dict()))
    fresh = ExampleBatches(exs, 2, max_len=24, packing=packing, seed=123, by_length=by_length)
    fresh.load_state_dict(state)
    for b in seq[4:]:
        nb = fresh.next_batch()
        assert torch.equal(nb["input_ids"], b["input_ids"]) and torch.equal(nb["targets"], b["targets"])
    if not packing:  # 5 batches of 2 make one epoch: each example exactly once, in a new order the next epoch
        first = sorted(tuple(r[r != 0].tolist()) for b in seq[:5] for r in b["input_ids"])
        assert first == sorted(tuple(e["input_ids"][:-1]) for e in exs)
        assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(seq[:4], seq[5:9]))


@pytest.mark.parametrize("by_length", [False, True])
def test_ranks_split_the_global_batch(by_length):
    exs = examples(12, seed=2)
    both = ExampleBatches(exs, 4, max_len=24, seed=5, by_length=by_length).next_batch()
    r0, r1 = (ExampleBatches(exs, 2, max_len=24, seed=5, rank=r, world=2, by_length=by_length).next_batch()
              for r in (0, 1))
    width = both["input_ids"].shape[1]

    def pad(t, w):
        return torch.nn.functional.pad(t, (0, w - t.shape[1]))
    assert torch.equal(torch.cat([pad(r0["input_ids"], width), pad(r1["input_ids"], width)]), both["input_ids"])


def accuracy_loss(model, batch):
    logits = model(batch["input_ids"])
    s, n = token_loss_sum(logits, batch["targets"])
    correct = ((logits.argmax(-1) == batch["targets"]) & (batch["targets"] != IGNORE)).sum()
    return s, n, {"accuracy": correct}


def test_metrics_logged_and_best_checkpoint_by_metric(tmp_path):
    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (3000,))
    train, val = TokenWindows(tokens[:2500], 16, 4, seed=1), TokenWindows(tokens[2500:], 16, 4, seed=2)
    t = TrainConfig(max_iters=12, eval_interval=4, eval_iters=2, save_interval=4, keep_last=5, lr=3e-3,
                    warmup_iters=0, precision="fp32", device="cpu", best_metric="val_accuracy", best_mode="max",
                    log_interval=1)
    out = Trainer(Decoder(CFG), t, train, accuracy_loss, tmp_path, val_data=val).fit()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12] and all(0 <= r["val_accuracy"] <= 1 for r in evals)
    assert all("train_accuracy" in r for r in rows if "train_loss" in r)
    best = max((r for r in evals if r["step"] > 0), key=lambda r: r["val_accuracy"])
    assert out["best_val"] == pytest.approx(best["val_accuracy"])
    assert (tmp_path / "best").read_text().strip() == f"ckpt-{best['step']:07d}"


def test_unknown_best_metric_is_one_line_error(tmp_path):
    from lmforge.errors import LMForgeError

    tokens = torch.randint(0, 40, (2000,))
    t = TrainConfig(max_iters=2, eval_interval=1, eval_iters=1, device="cpu", best_metric="val_bleu")
    trainer = Trainer(Decoder(CFG), t, TokenWindows(tokens, 16, 2), sft_loss, tmp_path,
                      val_data=TokenWindows(tokens, 16, 2))
    with pytest.raises(LMForgeError, match="val_bleu"):
        trainer.fit()


def test_a_non_finite_loss_without_the_spike_guard_stops_before_the_update(tmp_path):
    """Without the spike guard (PPO turns it off) a NaN loss must not reach the optimizer: one line, weights
    unchanged."""
    from lmforge.errors import LMForgeError

    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (2000,))
    model = Decoder(CFG)
    calls = []

    def nan_at_third_step(m, batch):
        calls.append(1)
        loss, *rest = sft_loss(m, batch)
        return (loss * float("nan") if len(calls) == 3 else loss, *rest)

    t = TrainConfig(max_iters=5, eval_interval=100, device="cpu", precision="fp32", spike_guard=False, lr=1e-3,
                    save_interval=1)
    trainer = Trainer(model, t, TokenWindows(tokens, 16, 2), nan_at_third_step, tmp_path)
    with pytest.raises(LMForgeError, match="loss is nan at step 2: stopped before the update.*ckpt-0000002"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_auto_precision_is_remembered_and_a_resume_keeps_the_saved_one(tmp_path, monkeypatch):
    """bf16 or fp32 was timed anew by every run: runs of one seed differed, and a resume could switch precision."""
    import lmforge.train.loop as L

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = Decoder(CFG)
    L._BF16_FASTER.clear()
    first = L.bf16_is_faster(model, 64)
    cache = json.loads((tmp_path / "cache" / "lmforge" / L.PRECISION_CACHE).read_text())
    assert list(cache.values()) == [first]
    (tmp_path / "cache" / "lmforge" / L.PRECISION_CACHE).write_text(json.dumps({k: not v for k, v in cache.items()}))
    L._BF16_FASTER.clear()  # a new process: the machine's remembered decision, not a new timing
    assert L.bf16_is_faster(model, 64) is (not first)
    L._BF16_FASTER.clear()

    tokens = torch.randint(0, 40, (2000,))
    t = TrainConfig(max_iters=2, eval_interval=100, device="cpu", precision="auto", save_interval=1)
    trainer = Trainer(Decoder(CFG), t, TokenWindows(tokens, 16, 2), sft_loss, tmp_path / "run")
    trainer.set_precision(None)  # whatever was measured, the run is fp32...
    trainer.fit()
    assert load_training_checkpoint(tmp_path / "run" / "ckpt-0000002")["trainer"]["precision"] == "fp32"
    t.max_iters = 3
    again = Trainer(Decoder(CFG), t, TokenWindows(tokens, 16, 2), sft_loss, tmp_path / "run")
    again.set_precision(torch.bfloat16)  # ...and a resume that measured bf16 goes on in fp32
    again.fit(resume=True)
    assert again.amp_dtype is None


class _InfGrad(torch.autograd.Function):
    """The identity, with an infinite gradient: a finite loss whose update would write NaN into the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("guard", [True, False])
def test_infinite_gradients_of_a_finite_loss_never_reach_the_weights(tmp_path, guard):
    from lmforge.errors import LMForgeError

    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (2000,))
    model = Decoder(CFG)
    calls = []

    def inf_grad_at_third_step(m, batch):
        calls.append(1)
        loss, *rest = sft_loss(m, batch)
        return (_InfGrad.apply(loss) if len(calls) == 3 else loss, *rest)

    t = TrainConfig(max_iters=5, eval_interval=100, device="cpu", precision="fp32", spike_guard=guard, lr=1e-3,
                    save_interval=1)
    trainer = Trainer(model, t, TokenWindows(tokens, 16, 2), inf_grad_at_third_step, tmp_path)
    if guard:
        assert trainer.fit()["step"] == 5
        rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r.get("event") == "rollback"] == [2]
    else:
        with pytest.raises(LMForgeError, match="the gradient norm is (inf|nan) at step 2: stopped before the update"):
            trainer.fit()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("guard,at", [(True, 4), (False, 4), (False, 6)])
def test_an_update_that_overflows_the_weights_is_never_saved(tmp_path, guard, at):
    """A finite loss whose update overflowed (train.lr 1e30) wrote NaN checkpoints, rolled back to them, and the run
    exited 0 with a NaN model. Now: rolled back to the last finite checkpoint, or one line without the guard."""
    from lmforge.errors import LMForgeError

    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (2000,))
    model = Decoder(CFG)
    t = TrainConfig(max_iters=6, eval_interval=100, device="cpu", precision="fp32", spike_guard=guard, lr=1e-3,
                    save_interval=2)
    trainer = Trainer(model, t, TokenWindows(tokens, 16, 2), sft_loss, tmp_path / "run")
    step, updates = trainer.optimizer.step, []

    def overflowing_step(*a, **k):  # one update overflows, once, at a checkpoint (4) or the end (6)
        out = step(*a, **k)
        updates.append(1)
        if len(updates) == at:
            with torch.no_grad():
                model.blocks[0].mlp.fc2.weight[0, 0] = float("inf")
        return out

    trainer.optimizer.step = overflowing_step
    if guard:
        out = trainer.fit()
        assert out["step"] == 6 and len(updates) == 8  # steps 3-4 again after the rollback to ckpt-2
        rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        (ev,) = [r for r in rows if r.get("event") == "rollback"]
        assert ev["step"] == 4 and ev["to_step"] == 2
    else:
        with pytest.raises(LMForgeError, match=f"weights hold NaN or infinite values after step {at} .* not saved; "
                                               f"the last checkpoint is .*ckpt-{at - 2:07d}"):
            trainer.fit()
        assert not (tmp_path / "run" / f"ckpt-{at:07d}").exists()
    for ck in sorted((tmp_path / "run").glob("ckpt-*")):
        load_training_checkpoint(ck)  # every one finite (the load refuses others)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[0, 0] = float("nan")
    trainer.save()  # as an earlier version wrote them: the load refuses it, so resume moves it aside
    with pytest.raises(LMForgeError, match=r"damaged checkpoint: model.safetensors: tensor 'blocks.0.mlp.fc2.weight' "
                                           "holds NaN"):
        load_training_checkpoint(trainer.last_ckpt)


def test_frozen_base_checkpoints_only_trainable_weights_and_resumes_exactly(tmp_path):
    def make():
        torch.manual_seed(0)
        m = Decoder(CFG)
        set_trainable_params(m, {k: p for k, p in m.named_parameters() if k.startswith("blocks.1.mlp")})
        return m

    exs = examples(16, seed=4)
    t = TrainConfig(max_iters=6, save_interval=3, eval_interval=100, eval_iters=0, lr=1e-2, warmup_iters=0,
                    precision="fp32", device="cpu", batch_size=2, ema_decay=0.5, decay_iters=6)
    exported = []

    def export(model, d):
        exported.append(d.name)
        (d / "adapter.json").write_text("{}")

    full = Trainer(make(), t, ExampleBatches(exs, 2, 24, seed=1), sft_loss, tmp_path / "a", export_fn=export)
    full.fit()
    ck = latest_checkpoint(tmp_path / "a")
    files = {p.name for p in ck.iterdir()}
    assert "adapter.json" in files and "model.safetensors" not in files and "config.json" not in files
    state = load_training_checkpoint(ck)
    assert set(state["train_model"]) == {k for k in make().state_dict() if k.startswith("blocks.1.mlp")}

    # stop at step 3, resume: identical trainable weights at the end
    t3 = TrainConfig(**{**t.__dict__, "max_iters": 3, "decay_iters": 6})  # the same schedule, cut at step 3
    Trainer(make(), t3, ExampleBatches(exs, 2, 24, seed=1), sft_loss, tmp_path / "b", export_fn=export).fit()
    resumed = Trainer(make(), t, ExampleBatches(exs, 2, 24, seed=1), sft_loss, tmp_path / "b", export_fn=export)
    resumed.fit(resume=True)
    a, b = full.raw_model.state_dict(), resumed.raw_model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fused_linear_cross_entropy_equals_logits_then_cross_entropy():
    from lmforge.losses import linear_cross_entropy, lm_loss

    torch.manual_seed(0)
    h = torch.randn(3, 50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(300, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 300, (3, 50))
    y[0, :20] = IGNORE
    fused, n = linear_cross_entropy(h, w, y, b, chunk=37)
    (fused * 0.5).backward()
    got = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    ref, m = token_loss_sum(torch.nn.functional.linear(h, w, b), y)
    (ref * 0.5).backward()
    assert n == m == 130
    # the reference computes its logits in float32 (the one cross-entropy does); the fused path in float64 here
    torch.testing.assert_close(fused.float(), ref, rtol=1e-6, atol=1e-4)
    for a, t in zip(got, (h, w, b)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-5)
    # through a model with a large vocabulary: the fused path gives the plain path's loss and gradients
    cfg = ModelConfig(vocab_size=9000, block_size=16, n_layer=1, n_embd=16, n_head=2, multiple_of=16)
    model = Decoder(cfg)
    batch = {"input_ids": torch.randint(0, 9000, (2, 12)), "targets": torch.randint(0, 9000, (2, 12))}
    batch["targets"][1, :5] = IGNORE
    s1, c1 = lm_loss(model, batch)
    s1.backward()
    g1 = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    s2, c2 = token_loss_sum(model(batch["input_ids"]), batch["targets"])
    s2.backward()
    assert c1 == c2
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-4)
    for k, p in model.named_parameters():
        torch.testing.assert_close(g1[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_length_grouped_example_batches_pad_less():
    r = torch.Generator().manual_seed(0)
    exs = [{"input_ids": [5] * n, "labels": [5] * n} for n in torch.randint(3, 200, (160,), generator=r).tolist()]
    def padded(src):
        return sum(src.next_batch()["input_ids"].numel() for _ in range(src.steps_per_epoch))
    plain, grouped = (ExampleBatches(exs, 8, max_len=256, seed=1, by_length=b) for b in (False, True))
    assert padded(grouped) < 0.75 * padded(plain)
    val = ExampleBatches(exs, 8, max_len=256, shuffle=False, by_length=True).fixed_batches(2, 0)
    got = sorted(len(row[row != 0]) for b in val for row in b["input_ids"])
    assert got == sorted(len(e["input_ids"]) - 1 for e in exs[:16])  # the same examples as without grouping


def test_gradient_checkpointing_reaches_a_decoder_inside_a_wrapper(tmp_path):
    from lmforge.model.heads import ScalarHeadModel

    torch.manual_seed(0)
    rm = ScalarHeadModel(Decoder(CFG))
    t = TrainConfig(max_iters=1, eval_interval=100, eval_iters=0, precision="fp32", device="cpu", batch_size=2,
                    gradient_checkpointing=True)
    Trainer(rm, t, ExampleBatches(examples(4), 2, 24), sft_loss, tmp_path / "r")
    assert rm.decoder.gradient_checkpointing  # a reward model's (or PPO's actor's and critic's) decoder


def test_best_val_counts_the_start_only_when_it_can_be_the_result(tmp_path):
    """The untrained start (step 0) scored best, so the run reported its value as best_val while the model it wrote
    was a later step's (reward's done line named a random head's accuracy); with ``start_is_candidate`` it counts."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (3000,))

    class Scripted(Trainer):
        scores = iter([0.9, 0.5, 0.6])

        def evaluate(self):
            return {"val_loss": 1.0, "val_accuracy": next(self.scores)}

    for candidate, want, ckpt in ((False, 0.6, 4), (True, 0.9, 0)):
        Scripted.scores = iter([0.9, 0.5, 0.6])
        t = TrainConfig(max_iters=4, eval_interval=2, eval_iters=1, save_interval=2, lr=1e-3, warmup_iters=0,
                        precision="fp32", device="cpu", best_metric="val_accuracy", best_mode="max")
        out = Scripted(Decoder(CFG), t, TokenWindows(tokens, 16, 4, seed=1), accuracy_loss, tmp_path / str(candidate),
                       val_data=TokenWindows(tokens, 16, 4, seed=2), start_is_candidate=candidate).fit()
        assert out["best_val"] == want
        assert (tmp_path / str(candidate) / "best").read_text().strip() == f"ckpt-{ckpt:07d}"
