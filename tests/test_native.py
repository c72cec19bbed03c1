"""The C-assisted decoding step (``lmforge.infer.native``): the same logits as a full forward of each sequence, for
every model shape it covers, float32 and quantized; the choice between it and the PyTorch step; the build."""

from __future__ import annotations

import pytest
import torch
from slot_decode import decode_against_full_forward

from lmforge.infer import clib, engine, native
from lmforge.infer.engine import MIN_CACHE_LEN, NATIVE_TRIALS, SlotRunner
from lmforge.infer.params import SamplingParams
from lmforge.infer.sampling import TokenSampler, noted_argmax, select
from lmforge.model import Decoder
from lmforge.presets import get_preset
from lmforge.quant import QuantConfig, quantize_model, set_compute

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here: decoding keeps the PyTorch step")

# (preset, overrides): rotary halves and pairs, partial rotary, grouped and multi-query heads, learned positions with
# LayerNorm and biases, heads of 8 to 64 channels (the attention loop differs above 16), every activation
SHAPES = {
    "llama": ("tiny-llama", {}),
    "qwen": ("tiny-qwen", {}),  # qkv bias, grouped-query
    "chatglm2": ("tiny-chatglm2", {}),  # interleaved pairs on half the channels, qkv bias
    "gpt2": ("tiny-gpt2", {}),  # learned positions, LayerNorm, GELU (tanh), biases everywhere
    "hd64-mqa-gelu": ("tiny-llama", dict(n_embd=128, n_head=2, n_kv_head=1, mlp="gelu", intermediate_size=200,
                                         qkv_bias=True, attn_out_bias=True, mlp_bias=True)),
    "hd8-relu-geglu": ("tiny-llama", dict(n_embd=64, n_head=8, n_kv_head=4, mlp="geglu_tanh", intermediate_size=96)),
    "reglu-nonorm": ("tiny-gpt2", dict(mlp="reglu", final_norm=False, position="none")),
    "silu-interleaved": ("tiny-llama", dict(mlp="silu", rope_interleaved=True, intermediate_size=80)),
}


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv("LMFORGE_NATIVE", "1")


def _model(shape: str) -> Decoder:
    torch.manual_seed(0)
    name, kw = SHAPES[shape]
    model = Decoder(get_preset(name, block_size=64, vocab_size=97, **kw)).eval()
    for p in model.parameters():  # norms and biases away from their initial 1 and 0
        p.data += 0.05 * torch.randn_like(p)
    return model.requires_grad_(False)


def _check_decode(model: Decoder, atol: float, steps: int = 5, long: bool = False) -> SlotRunner:
    runner = SlotRunner(model, 4, 64)
    seqs = {0: [5, 6, 7, 8, 9, 10, 11], 1: [3], 3: [40, 41, 42, 43]}  # slot 2 idle, rows at their own lengths
    if long:  # keys in blocks of 16 and a remainder (the AVX512 score loop) at every step
        seqs[0] = [(7 * i) % 97 for i in range(40)]
    worst = max((got - want).abs().max().item() for _, got, want in decode_against_full_forward(
        runner, model, seqs, steps))
    assert worst <= atol, worst
    return runner


@pytest.mark.parametrize("whole", [True, False], ids=["one-call", "torch-products"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_native_step_equals_full_forward(shape, whole, forced, monkeypatch):
    """Small models run the whole step as one C call with its own products (biases included); larger ones keep
    PyTorch's products between the C calls (SMALL_PRODUCTS = 0 here)."""
    if not whole:
        monkeypatch.setattr(native, "SMALL_PRODUCTS", 0)
    model = _model(shape)
    runner = _check_decode(model, atol=2e-5)
    one_call = whole and bool(native.library().lmf_linear_fast())
    n = 3 if one_call else 4  # a one-call step maps rows to slots: the 3 given rows alone (slot 2 is idle)
    plans = runner._path[n, torch.get_num_threads()]  # kept, or still in trials: the C step at each thread count
    assert n in runner._native and all(native for native, _ in (plans if isinstance(plans, dict) else [plans]))
    assert (3 in runner._native) == one_call  # (no 3-row step planned in vain)
    assert (runner._native[n]._step is not None) == one_call


@pytest.mark.parametrize("bias", [True, False])
def test_gemv_products_of_a_few_rows(bias):
    """A float32 layer of up to GEMV_ROWS rows (a decoding step of a large float32 model, a speculative check, a
    short prefill) as lmf_gemv, reading the weight in place: equal to F.linear for 1-7 rows (blocks of 4 rows and
    each remainder), 16, 33 and 64 rows, a remainder of outputs past the blocks of 4 (N = 202) and the last tile's
    part, strided input rows; an in-place change is read; a replaced weight makes it Stale; K not a multiple of 16
    keeps F.linear."""
    if not native.library().lmf_gemv_ok(64):
        pytest.skip("no AVX512 here: float32 products stay PyTorch's")
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 202, bias=bias).requires_grad_(False)
    for rows in (1, 2, 3, 4, 5, 6, 7, 16, 33, native.GEMV_ROWS):
        fn = native.gemv(lin, rows)
        x = torch.randn(rows, 160)[:, :128]  # rows 160 floats apart
        want = torch.nn.functional.linear(x, lin.weight, lin.bias)
        assert torch.allclose(fn(x), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(2)
    assert torch.allclose(fn(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    fresh = native.gemv(lin, 4, fresh=True)
    assert fresh(x) is not fresh(x) and fn(x) is fn(x)
    lin.weight = torch.nn.Parameter(lin.weight.clone(), requires_grad=False)
    with pytest.raises(native.Stale):
        fn(x)
    assert native.gemv(torch.nn.Linear(72, 16), 1) is None


def test_one_call_step_follows_changed_weights(monkeypatch):
    """The one-call step keeps its weights transposed: a weight changed in place (an optimizer step between PPO
    rollouts) or replaced plans the step again, and its logits follow the new weights as the PyTorch step's do."""
    model = _model("llama").requires_grad_(True)  # trainable: both runners leave the weights' layout as it is
    runners = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LMFORGE_NATIVE", flag)
        runners[flag] = SlotRunner(model, 2, 64)
        runners[flag].prefill(0, [5, 6, 7])
        runners[flag].decode([8, None])
    first = runners["1"]._native[1]  # (the given row alone: slot 1 is idle)
    assert first._step is not None or not native.library().lmf_linear_fast()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight.mul_(1.5)
        model.lm_head.weight.mul_(0.5)
    got = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LMFORGE_NATIVE", flag)
        got[flag] = runners[flag].decode([9, None])[0]
    assert runners["1"]._native[1] is not first and not runners["0"]._native
    assert torch.allclose(got["1"], got["0"], atol=2e-5), (got["1"] - got["0"]).abs().max()
    second = runners["1"]._native[1]
    model.blocks[0].attn.proj.weight = torch.nn.Parameter(model.blocks[0].attn.proj.weight * 2, requires_grad=False)
    monkeypatch.setenv("LMFORGE_NATIVE", "1")
    runners["1"].decode([10, None])
    assert runners["1"]._native[1] is not second


def test_one_call_step_follows_a_changed_bias(monkeypatch):
    """A bias changed alone (bias-only tuning) plans the one-call step again too: the logits follow it as the
    PyTorch step's do."""
    model = _model("qwen").requires_grad_(True)  # qkv bias; trainable: the weights' layout stays as it is
    runners = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LMFORGE_NATIVE", flag)
        runners[flag] = SlotRunner(model, 1, 64)
        runners[flag].prefill(0, [5, 6, 7])
        runners[flag].decode([8])
    first = runners["1"]._native[1]
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias.add_(0.5)
    got = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LMFORGE_NATIVE", flag)
        got[flag] = runners[flag].decode([9])[0]
    assert runners["1"]._native[1] is not first
    assert torch.allclose(got["1"], got["0"], atol=2e-5), (got["1"] - got["0"]).abs().max()


def test_the_step_gathers_a_plain_embedding_tables_rows_itself(forced, monkeypatch):
    """A plain float32 table is read by the C step's input (a numpy gather, no tensor operations): prefill and
    decode never call ``_embed``, the logits equal full forwards, and a table changed in place or replaced is
    followed. Learned positions still go through ``_embed``."""
    model = _model("llama")

    def refused(*a, **k):
        raise AssertionError("_embed called")

    monkeypatch.setattr(SlotRunner, "_embed", refused)
    _check_decode(model, 2e-5)
    with torch.no_grad():
        model.wte.weight[:50].mul_(-2.0)  # in place: the step reads the same memory
    _check_decode(model, 2e-5)
    model.wte.weight = torch.nn.Parameter(model.wte.weight.flip(0).clone(), requires_grad=False)
    runner = _check_decode(model, 2e-5)
    assert runner._table[0] is model.wte.weight
    with pytest.raises(AssertionError, match="_embed called"):
        _check_decode(_model("gpt2"), 2e-5)


@pytest.mark.parametrize("shape", ["hd64-mqa-gelu", "llama", "hd8-relu-geglu"])
def test_native_step_over_longer_contexts(shape, forced):
    _check_decode(_model(shape), atol=2e-5, steps=18, long=True)


@pytest.mark.parametrize("heads", [(8, 4), (3, 1), (4, 4)], ids=["pairs", "pair-and-one", "one-each"])
def test_heads_of_8_decode_over_a_copy_in_blocks_made_again_where_the_cache_is_rewritten(heads, forced, monkeypatch):
    """Heads of 8 channels decode over the runner's copy of the cache transposed in blocks of 16 positions
    (kv_blocks), kept by the C step as it reads (kv_blocks_len: positions copied). Rows of 1-3 heads per key head, at
    lengths crossing blocks, equal full forwards; so do they after the copied positions are written again: a new
    prompt in a slot (through the C step and through the decoder), a speculative check taken back (``extend``, then
    ``lens`` set back), a step of the PyTorch decoder."""
    if not native.library().lmf_kv_blocks_ok():
        pytest.skip("no AVX512 here: heads of 8 channels read the cache itself")
    torch.manual_seed(0)
    nh, nkv = heads
    model = Decoder(get_preset("tiny-llama", block_size=96, vocab_size=97, n_embd=8 * nh, n_head=nh, n_kv_head=nkv,
                               intermediate_size=48)).eval().requires_grad_(False)
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    runner = SlotRunner(model, 4, 96)
    seqs = {0: [(7 * i) % 97 for i in range(30)], 1: [3], 3: [(5 * i) % 97 for i in range(14)]}

    def check(seqs: dict[int, list[int]], steps: int) -> None:
        worst = max((got - want).abs().max().item() for _, got, want in decode_against_full_forward(
            runner, model, seqs, steps))
        assert worst <= 2e-5, worst
        assert all(runner.kv_blocks_len[:, s].tolist() == [runner.lens[s]] * model.cfg.n_layer for s in seqs)

    check(seqs, 20)  # slot 0 from 30 to 50 positions, slot 1 from 1 to 21, slot 3 across 16 and 32
    assert runner.kv_blocks is not None and runner.kv_blocks_len.shape == (model.cfg.n_layer, 4)
    check({0: [11, 12, 13]}, 4)  # a new prompt through the C step: its 3 rows write positions 0-2 again
    monkeypatch.setattr(engine, "NATIVE_PREFILL_ROWS", 0)
    check({3: [9, 8, 7, 6, 5]}, 3)  # through the decoder
    ids = [1, 2, 3, 4]
    runner.prefill(1, ids)
    runner.decode([None, 20])
    runner.extend(1, [21, 22, 23])  # a speculative check of three tokens; the last two taken back
    runner.lens[1] -= 2
    seq = ids + [20, 21]
    for tok in (30, 31, 32):
        seq.append(tok)
        got = runner.decode([None, tok])[0]
        assert torch.allclose(got, model(torch.tensor([seq]))[0, -1], atol=2e-5)
    runner.lens[1] -= 2  # the last two taken back, and the first of them written again by the PyTorch decoder
    seq[-2:] = [33]
    with monkeypatch.context() as m:
        m.setattr(runner, "_native_step", lambda n: None)
        runner._native.clear()
        runner.decode([None, 33])
    seq.append(34)
    assert torch.allclose(runner.decode([None, 34])[0], model(torch.tensor([seq]))[0, -1], atol=2e-5)


@pytest.mark.parametrize("step", ["1", "0"])
def test_the_cache_grows_while_decoding(step, monkeypatch):
    """The cache is allocated as slots and positions are used: slots 0, 1 and 3 prefilled one after another grow it
    to 1, 2 and 4 slots; rows crossing MIN_CACHE_LEN positions double it mid-decoding. What was written is kept and
    the C step (or the PyTorch one) is planned on the new cache: logits equal full forwards; ``release`` gives it
    back."""
    monkeypatch.setenv("LMFORGE_NATIVE", step)
    torch.manual_seed(0)
    model = Decoder(get_preset("tiny-llama", block_size=1024, vocab_size=97)).eval().requires_grad_(False)
    runner = SlotRunner(model, 4, 1024)
    assert (runner.slots, runner.cap) == (0, 0)
    m = MIN_CACHE_LEN
    seqs = {0: [(5 * i) % 97 for i in range(m - 4)], 1: [3], 3: [(3 * i) % 97 for i in range(30)]}
    worst = max((got - want).abs().max().item() for _, got, want in decode_against_full_forward(
        runner, model, seqs, steps=8))
    assert worst <= 2e-5, worst
    assert (runner.slots, runner.cap) == (4, 2 * m) and runner.k.shape[1::2] == (4, 2 * m)
    assert bool(runner._native) == (step == "1")
    runner.release()
    assert (runner.slots, runner.cap) == (0, 0) and runner.k.numel() == 0


def _prefill_counting(model, monkeypatch) -> list:
    """Count the decoder's forwards (a prefill through the decoder is one)."""
    calls, orig = [], model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda *a, **k: calls.append(1) or orig(*a, **k))
    return calls


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_short_prompts_prefill_through_the_c_step(shape, monkeypatch):
    """Every prompt token is a row of one C step (19 rows padded to 32): each prompt's logits equal a full forward's
    and its keys and values the decoder prefill's; a slot prefilled before keeps its cache (padding rows write
    nothing); the decoder is not called."""
    model = _model(shape)
    prompts = {0: [5, 6, 7, 8, 9, 10, 11], 1: [3], 3: [40 + i for i in range(11)]}
    caches = {}
    for limit in (engine.NATIVE_PREFILL_ROWS, 0):
        monkeypatch.setattr(engine, "NATIVE_PREFILL_ROWS", limit)
        runner = SlotRunner(model, 4, 64)
        runner.prefill(2, [1, 2, 3])
        kept = runner.k[:, 2].clone(), runner.v[:, 2].clone()
        calls = _prefill_counting(model, monkeypatch)
        logits = runner.prefill_many(list(prompts), list(prompts.values()))
        monkeypatch.undo()
        assert len(calls) == (0 if limit else 1) and (32 in runner._native) == bool(limit)
        assert runner.lens == [7, 1, 3, 11]
        assert torch.equal(runner.k[:, 2], kept[0]) and torch.equal(runner.v[:, 2], kept[1])
        for (slot, ids), got in zip(prompts.items(), logits):
            with torch.no_grad():
                want = model(torch.tensor([ids]))[0, -1]
            assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (slot, (got - want).abs().max())
        caches[limit] = runner
    c, d = caches.values()
    for slot, ids in prompts.items():
        for a, b in ((c.k, d.k), (c.v, d.v)):
            assert torch.allclose(a[:, slot, :, : len(ids)], b[:, slot, :, : len(ids)], atol=2e-5)
    assert c.prefill(1, [3, 4, 5]).shape == (97,) and c.lens[1] == 3  # one prompt alone: 3 rows, padded to 4
    assert 4 in c._native
    if c._native[4]._step is not None:  # one-call steps of several row counts share the transposed weights
        shared = {e[1].data_ptr() for e in c.transposed.values()}
        assert len(c.transposed) == 4 * model.cfg.n_layer + 1
        for st in (c._native[32], c._native[4]):
            assert shared <= {t.data_ptr() for t in st._keep if isinstance(t, torch.Tensor)}


def test_quantized_and_long_prompts_keep_the_decoder_prefill(monkeypatch):
    """Quantized products compute by row count (the C step's few rows would round in bfloat16), and prompts over
    NATIVE_PREFILL_ROWS tokens are the decoder's batched products' work: both prefill through the decoder."""
    model = _model("llama")
    runner = SlotRunner(model, 2, 64)
    calls = _prefill_counting(model, monkeypatch)
    monkeypatch.setattr(engine, "NATIVE_PREFILL_ROWS", 8)
    runner.prefill_many([0, 1], [[1, 2, 3, 4, 5], [6, 7, 8, 9]])
    runner.prefill(0, list(range(1, 10)))
    assert len(calls) == 2
    runner.prefill(1, [1, 2, 3])
    assert len(calls) == 2
    monkeypatch.undo()
    quantize_model(model, QuantConfig(bits=8))
    runner = SlotRunner(model, 2, 64)
    calls = _prefill_counting(model, monkeypatch)
    runner.prefill(0, [1, 2, 3])
    assert len(calls) == 1


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, None)])
def test_native_step_quantized_float32_kernels_equal_full_forward(bits, group, forced):
    """Quantized layers through their exact float32 kernels: padded K (200 -> 256 with groups of 64) and padded
    output rows (N = 200, padded to 208) read through the right strides; biases added on the C side."""
    model = _model("hd64-mqa-gelu")  # K = 128 and 200, N = 256, 128 and 200
    model.blocks[0].attn.proj = torch.nn.Linear(128, 128, bias=False).requires_grad_(False)  # a plain layer among
    quantize_model(model, QuantConfig(bits=bits, group_size=group, embedding=False))
    set_compute(model, "float32")
    _check_decode(model, atol=2e-5)


def test_native_step_quantized_auto_mode_matches_the_pytorch_step(monkeypatch):
    """Auto mode: the PyTorch step's bfloat16 activations (on AVX512) and the C step's (the same, or lmf_int4's int8
    activations with AVX512-VNNI) give the same logits up to their rounding."""
    model = _model("silu-interleaved")
    quantize_model(model, QuantConfig(bits=4, group_size=32))
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LMFORGE_NATIVE", flag)
        runner = SlotRunner(model, 2, 48)
        runner.prefill(0, [5, 6, 7, 8])
        runner.prefill(1, [9, 10])
        out[flag] = torch.stack([runner.decode([t, t + 1]) for t in (11, 12, 13)])
        assert bool(runner._native) == (flag == "1")
    scale = out["0"].abs().max().item()
    assert (out["1"] - out["0"]).abs().max().item() <= 2e-2 * scale


def test_native_step_follows_a_changed_compute_mode(forced):
    model = _model("llama")
    quantize_model(model, QuantConfig(bits=4, group_size=32))
    runner = SlotRunner(model, 1, 48)
    ids = [5, 6, 7, 8, 9]
    runner.prefill(0, ids[:-1])
    runner.decode([ids[-1]])
    set_compute(model, "dequant")  # the planned step's kernels no longer apply: planned again
    runner.prefill(0, ids[:-1])
    got = runner.decode([ids[-1]])[0]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0, -1]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt1", "tiny-palm", "tiny-bloom", "tiny-gpt3"])
def test_shapes_it_does_not_cover_keep_the_pytorch_step(name, forced):
    """Post-norm, parallel blocks, ALiBi, local attention: the PyTorch step, unchanged."""
    torch.manual_seed(0)
    model = Decoder(get_preset(name, block_size=64, vocab_size=97)).eval().requires_grad_(False)
    runner = SlotRunner(model, 2, 48)
    runner.prefill(0, [1, 2, 3])
    got = runner.decode([4, None])[0]
    assert runner._native == {} and runner._native_ok is False
    with torch.no_grad():
        want = model(torch.tensor([[1, 2, 3, 4]]))[0, -1]
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4)


def test_each_row_count_keeps_the_fastest_plan(monkeypatch):
    """Without LMFORGE_NATIVE the plans (C step or not, the caller's threads or one) take turns for NATIVE_TRIALS
    timed steps each (after an untimed one), then the fastest is kept for that row count and runs at its threads;
    the caller's thread count is restored after every step; another runner of the model keeps the choice."""
    monkeypatch.delenv("LMFORGE_NATIVE", raising=False)
    monkeypatch.setattr(native, "SMALL_PRODUCTS", 0)  # PyTorch's products between the C calls: plans are timed
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _model("llama")
        runner = SlotRunner(model, 2, 48)
        runner.prefill(0, [1, 2])
        ran = []
        real_run = native.NativeStep.run

        def counting(self, *a):
            ran.append(torch.get_num_threads())
            return real_run(self, *a)

        monkeypatch.setattr(native.NativeStep, "run", counting)
        plans = [(True, 2), (True, 1), (False, 2), (False, 1)]
        for t in range(len(plans) * (NATIVE_TRIALS + 1)):
            runner.decode([3 + t, None])
            assert torch.get_num_threads() == 2
        chosen = runner._path[2, 2]  # decided: a plan per row count (and caller's threads)
        assert chosen in plans and sorted(ran) == [1] * (NATIVE_TRIALS + 1) + [2] * (NATIVE_TRIALS + 1)
        ran.clear()
        for t in range(4):
            runner.decode([20 + t, None])
        assert ran == ([chosen[1]] * 4 if chosen[0] else [])
        again = SlotRunner(model, 2, 48)  # a new generation with the same model: no trials
        again.prefill(0, [1, 2])
        ran.clear()
        again.decode([5, None])
        assert again._path[2, 2] == chosen and ran == ([chosen[1]] if chosen[0] else [])
        runner._path[2, 2] = (True, 1)  # a kept plan runs at its threads
        runner.decode([30, None])
        assert ran[-1] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_one_call_step_is_kept_without_trials(monkeypatch):
    """A small model's one-call step has no PyTorch product to win back by threads or by the PyTorch step: it is
    kept at the first step, at the caller's threads, and every step runs it."""
    monkeypatch.delenv("LMFORGE_NATIVE", raising=False)
    model = _model("llama")
    runner = SlotRunner(model, 2, 48)
    runner.prefill(0, [1, 2])
    if not runner._native_step(2).whole:
        pytest.skip("no vectorized C products here")
    calls = []
    monkeypatch.setattr(runner, "_fast", lambda *a: calls.append(a))
    outs = [runner.decode([3 + t, None]) for t in range(3)]  # (slot 0's row alone: a step of one row)
    assert runner._path[1, torch.get_num_threads()] == (True, torch.get_num_threads()) and calls == []
    assert len({o.data_ptr() for o in outs}) == 3 and all(o.shape[0] == 1 for o in outs)  # callers may keep them


def test_the_one_call_step_notes_each_rows_argmax(monkeypatch):
    """The one-call step finds each row's argmax where it wrote the logits (over the vocabulary, not its padding to
    16): greedy selection takes it, of the rows asked for, while the logits are unchanged; changed in place, they
    are looked at again."""
    monkeypatch.delenv("LMFORGE_NATIVE", raising=False)
    model = _model("llama")  # 97 logits a row, padded to 112 in the step
    runner = SlotRunner(model, 4, 64)
    if not runner._native_step(1).whole:
        pytest.skip("no vectorized C products here")
    for slot in (0, 2):
        runner.prefill(slot, [5, 6, 7])
    greedy = [TokenSampler(SamplingParams(temperature=0), [], 97) for _ in range(2)]
    for t in range(3):  # (the first step plans it under inference mode: nothing noted on an inference tensor)
        logits = runner.decode([8 + t, None, 9 + t])
    top = noted_argmax(logits)
    assert logits.shape == (2, 97) and top == logits.argmax(dim=-1).tolist()
    assert [c.token for c in select(logits, greedy[:1], [1])] == top[1:]
    with torch.no_grad():
        logits[1, 3] = 1e9  # changed in place: the note no longer holds
    assert noted_argmax(logits) is None and [c.token for c in select(logits, greedy)] == [top[0], 3]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert runner.start([11, None, 12])
        got = runner.finish()
        assert noted_argmax(got) == got.argmax(dim=-1).tolist()
    finally:
        torch.set_num_threads(before)


def test_off_switch_and_a_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_NATIVE", "0")
    assert native.library() is None
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(clib.shutil, "which", lambda name: None)
    assert native.build() is None


def test_build_is_cached_per_source_and_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib = native.build()
    assert lib is not None and lib.parent == tmp_path / "lmforge" / "native"
    stamp = lib.stat().st_mtime_ns
    assert native.build() == lib and lib.stat().st_mtime_ns == stamp  # found, not built again


def test_a_damaged_library_in_the_cache_is_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LMFORGE_NATIVE", raising=False)
    lib = native.build()
    lib.write_bytes(b"not a shared library")
    monkeypatch.setattr(clib, "_LIB", False)
    assert native.library() is not None and native.library().lmf_attention
    assert lib.read_bytes() != b"not a shared library"


@pytest.mark.parametrize("top", [8, 97])
def test_int8_output_projection_recomputes_its_top_candidates_exactly(top, forced):
    """A tied int8 output projection (SmolLM2's layout) decodes through the bfloat16 kernel and recomputes its
    ``refine_top`` largest logits per row exactly, in C: those equal the float32 computation, the others are the
    kernel's (bfloat16-rounded) values, and the greedy choice is the float32 one."""
    model = _model("gpt2")  # tied embeddings: the head computes with the int8 table
    quantize_model(model, QuantConfig(bits=8))
    set_compute(model, "float32")  # exact layers; the head as auto mode takes it for SmolLM2 on AVX512:
    head = model.lm_head
    head.refine_top, head.compute = top, "bfloat16"
    runner = SlotRunner(model, 2, 48)
    seqs = {0: [5, 6, 7, 8], 1: [9]}
    for s, ids in seqs.items():
        runner.prefill(s, ids)
    for step in range(3):
        new = [11 + step, 40 + step]
        got = runner.decode(new)
        assert runner._native[2].head.__name__ == "head"  # the C recomputation, not the module's
        head.compute = "float32"  # the exact logits (the step is planned again after this)
        for s, t in enumerate(new):
            seqs[s].append(t)
            with torch.no_grad():
                want = model(torch.tensor([seqs[s]]))[0, -1]
            exact = (got[s] - want).abs() <= 2e-5
            assert exact.sum() >= top and got[s].argmax() == want.argmax()
            assert exact[want.topk(3).indices].all()  # the largest are among the recomputed
            assert (got[s] - want).abs().max() <= 0.02 * want.abs().max()  # the rest: bfloat16 rounding
        head.compute = "bfloat16"


@pytest.mark.parametrize("rows", [2, 3, 13])  # row chunks of 8, 4, 2 and 1
def test_int8_output_projection_of_several_rows_on_int8_activations(rows, forced):
    """Several rows of the int8 output projection run lmf_head_vnni (activations quantized to int8 per group of 32
    inputs, int32 dot products; AVX512-VNNI) and then the exact recomputation: the top candidates equal the float32
    computation, the greedy choice is its choice, the rest is close; the interleaved weight is built once per
    module and serves one row too."""
    if not native.library().lmf_vnni_ok():
        pytest.skip("no AVX512-VNNI here: the bfloat16 kernel serves every row count")
    torch.manual_seed(0)
    model = Decoder(get_preset("tiny-gpt2", block_size=64, vocab_size=112)).eval().requires_grad_(False)
    quantize_model(model, QuantConfig(bits=8))
    set_compute(model, "float32")
    head = model.lm_head
    head.refine_top, head.compute = 8, "bfloat16"
    runner = SlotRunner(model, rows, 48)
    seqs = {s: [(5 + 3 * s + i) % 112 for i in range(1 + s % 5)] for s in range(rows)}
    for s, ids in seqs.items():
        runner.prefill(s, ids)
    new = [(20 + s) % 112 for s in range(rows)]
    got = runner.decode(new)
    assert runner._native[rows].head.__name__ == "head" and "_lmforge_vnni" in head.__dict__
    built = head.__dict__["_lmforge_vnni"]
    head.compute = "float32"
    for s, t in enumerate(new):
        with torch.no_grad():
            want = model(torch.tensor([seqs[s] + [t]]))[0, -1]
        exact = (got[s] - want).abs() <= 2e-5
        assert exact.sum() >= 8 and got[s].argmax() == want.argmax() and exact[want.topk(3).indices].all()
        assert (got[s] - want).abs().max() <= 0.03 * want.abs().max()
    head.compute = "bfloat16"
    again = SlotRunner(model, rows, 48)  # a new runner of that many rows: the interleaved weight is reused
    for s in range(rows):
        again.prefill(s, [1, 2])
    again.decode([3] * rows)
    assert rows in again._native and head.__dict__["_lmforge_vnni"] is built
    one = SlotRunner(model, 1, 48)  # one row too (VNNI_HEAD_ROWS = 1), on the same interleaved weight
    one.prefill(0, [1, 2])
    got = one.decode([3])[0]
    assert one._native[1].head.__name__ == "head" and head.__dict__["_lmforge_vnni"] is built
    head.compute = "float32"
    with torch.no_grad():
        want = model(torch.tensor([[1, 2, 3]]))[0, -1]
    assert got.argmax() == want.argmax() and ((got - want).abs() <= 2e-5)[want.topk(3).indices].all()



def test_short_calls_keep_the_interpreter_lock_and_argmax_matches_torch():
    """The argmax of a few rows and the step's gather of embedding rows are C calls made holding the interpreter lock
    (ctypes.PyDLL): NumPy's and PyTorch's calls let it go, and a decoding thread then waited for it while the HTTP
    thread ran. The argmax is torch's: the first of equal maxima, the first NaN as the largest."""
    from lmforge.infer import sampling

    lib = native.library()
    for name in ("lmf_argmax_rows", "lmf_gather_rows"):
        assert getattr(lib.held, name)._flags_ & clib.ctypes._FUNCFLAG_PYTHONAPI
    assert not lib.lmf_step._flags_ & clib.ctypes._FUNCFLAG_PYTHONAPI  # the step itself lets other threads run
    torch.manual_seed(0)
    x = torch.randn(9, 517)  # not a multiple of 16
    x[1, [7, 300]] = 9.0  # a tie
    x[2, 11], x[2, 400], x[2, 40] = float("nan"), float("nan"), 1e9  # NaN wins, the first of them
    x[3, :] = float("-inf")
    x[4, :] = 0.0
    x[5, 516] = float("inf")
    x[6, 0] = float("nan")
    x[7, 515], x[7, 516] = 1e9, float("nan")  # a NaN in the last block
    called = []
    real = lib.held.lmf_argmax_rows
    try:
        lib.held.lmf_argmax_rows = lambda *a: (called.append(a[1:3]), real(*a))[1]
        assert sampling._argmax(x) == x.argmax(dim=-1).tolist()
        wide = torch.randn(4, 600)
        assert sampling._argmax(wide[:, :517]) == wide[:, :517].argmax(dim=-1).tolist()  # rows 600 apart
        assert sampling._argmax(wide[:, ::2]) == wide[:, ::2].argmax(dim=-1).tolist()  # not unit-strided: NumPy
        big = torch.randn(2, sampling.HELD_ARGMAX)  # more than a short call's worth: NumPy
        assert sampling._argmax(big) == big.argmax(dim=-1).tolist()
    finally:
        lib.held.lmf_argmax_rows = real
    assert called == [(9, 517), (4, 517)]


def test_the_steps_gather_refuses_an_id_outside_the_table_and_reads_any_layout(forced):
    model = _model("llama")
    runner = SlotRunner(model, 2, 48)
    runner.prefill(0, [1, 2])
    step = runner._native_step(1)
    x0 = runner._step_input([5], [2])
    if not isinstance(x0, tuple):
        pytest.skip("this model's step input is not a gather from its table")
    V = model.wte.weight.shape[0]
    with pytest.raises(IndexError, match=f"token id {V} is outside the embedding table of {V} rows"):
        step.run((x0[0], [V]), [2])
    logits = step.run(x0, [2])  # (the same step goes on)
    assert logits.shape[0] == 1 and torch.isfinite(logits).all()
    # a table laid out column-major (a tied output projection's layout for PyTorch's product): the same rows
    column_major = x0[0].T.copy().T
    assert not column_major.flags.c_contiguous
    assert torch.equal(step.run((column_major, [5]), [2]), step.run(x0, [2]))


def test_a_step_begun_in_the_background_refuses_stale_weights_and_works_after_a_fork(forced):
    """``lmf_step_start`` (called keeping the interpreter lock: it only hands the step over) runs the whole step on a
    thread of the library's own, ``lmf_step_join`` waits for it letting the lock go. A weight changed since the step
    was planned is not begun (``decode`` plans again); a forked child gets a thread of its own (the parent's stayed
    behind) and the same logits."""
    import os
    import time

    lib = native.library()
    if not lib.lmf_linear_fast():
        pytest.skip("no one-call step on this CPU")
    assert lib.held.lmf_step_start._flags_ & clib.ctypes._FUNCFLAG_PYTHONAPI
    assert not lib.lmf_step_join._flags_ & clib.ctypes._FUNCFLAG_PYTHONAPI
    model = _model("llama")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = SlotRunner(model, 2, 64)
        r.prefill(1, [5, 6, 7])
        for _ in range(2):
            r.decode([None, 8])
        assert r.start([None, 9])
        r.finish()
        with torch.no_grad():
            model.blocks[0].mlp.fc1.weight.mul_(1.5)
        assert not r.start([None, 10]) and r.lens[1] == 6  # stale: nothing begun, nothing written
        r.decode([None, 10])  # planned again
        assert r.start([None, 11])
        r.finish()
        step, table = r._native[1], r._table_np()  # (slot 1's row alone: a step of one row at slot 1)
        lens = [r.lens[1]]
        pid = os.fork()
        if pid == 0:  # the child: the library's thread is the parent's, not here
            code = 1
            try:
                torch.set_num_threads(1)  # (no OpenMP team in a forked child)
                want = step.run((table, [12]), lens, [1]).clone()
                code = 0 if step.start((table, [12]), lens, [1]) and torch.equal(step.finish(), want) else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's step never ended")
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        torch.set_num_threads(before)
