"""Weight-only quantization: formulas, packing, QuantLinear vs dequantized reference, save/load, perplexity, CLI."""

from __future__ import annotations

import argparse
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.assets import STORIES260K, STORIES260K_TOKENIZER
from lmforge.checkpoint import load_model, save_checkpoint, write_manifest
from lmforge.errors import LMForgeError
from lmforge.quant import (
    DECODE_ROWS,
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    dequantize_int4,
    gptq_int4,
    load_quantized,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    refit_int4_params,
    save_quantized,
    search_int4_params,
    self_calibration,
    set_compute,
    unpack_int4,
)
from lmforge.quant.modules import _DECODE_MODE
from lmforge.quant.packing import dequantize_int8

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
TINYSTORIES = SHARED / "data" / "corpora" / "en" / "tinystories_sample.txt"


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0] = 0.0  # an all-zero row
    w[1, 3] = 1.5  # an outlier
    w[2] += 0.3  # a row that is all positive-ish (asymmetric case)
    return w


# ---- formulas ---------------------------------------------------------------------------------


def test_int8_matches_formula_and_error_bound():
    w = _weights(48, 100)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    expected = w.abs().amax(dim=1).double() / 127  # s = max|w_row| / 127
    nz = expected > 0
    torch.testing.assert_close(s.double()[nz], expected[nz], rtol=1e-6, atol=0)
    assert int(q.abs().max()) <= 127
    deq = q.double() * s.double()[:, None]
    err = (deq - w.double()).abs()
    assert (err <= s.double()[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert deq[0].abs().max() == 0  # the zero row stays exactly zero


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matches_formula_and_error_bound(group_size, symmetric):
    n, k = 40, 200  # k is not a multiple of any group size: zero padding
    w = _weights(n, k, seed=group_size)
    packed, scales, zeros = quantize_int4(w, group_size, symmetric)
    kp = math.ceil(k / group_size) * group_size
    assert packed.dtype == torch.uint8 and packed.shape == (n, kp // 2)
    assert scales.shape == (n, kp // group_size)
    assert (zeros is None) == symmetric
    # independent unpack with numpy: low nibble = even column
    b = packed.numpy()
    q = np.empty((n, kp), dtype=np.int64)
    q[:, 0::2], q[:, 1::2] = b & 0x0F, b >> 4
    wp = np.zeros((n, kp))
    wp[:, :k] = w.double().numpy()
    g = wp.reshape(n, kp // group_size, group_size)
    s = scales.double().numpy()
    if symmetric:
        ref_s = np.abs(g).max(-1) / 7.5
        z = np.zeros_like(s)
    else:
        ref_s = (g.max(-1) - g.min(-1)) / 15
        z = zeros.double().numpy()
        np.testing.assert_allclose(z, g.min(-1) + 8 * s, rtol=1e-6, atol=1e-9)
    nz = ref_s > 0
    np.testing.assert_allclose(s[nz], ref_s[nz], rtol=1e-6)
    deq = ((q.reshape(g.shape) - 8) * s[..., None] + z[..., None]).reshape(n, kp)
    assert (np.abs(deq - wp) <= s.repeat(group_size, axis=1) / 2 * (1 + 1e-5) + 1e-7).all()
    ours = dequantize_int4(packed, scales, zeros, k).double().numpy()
    np.testing.assert_allclose(ours, deq[:, :k], rtol=1e-6, atol=1e-7)


def test_pack_roundtrip_and_layout():
    q = torch.randint(0, 16, (7, 64), generator=torch.Generator().manual_seed(1))
    packed = pack_int4(q)
    assert packed.shape == (7, 32)
    assert torch.equal(unpack_int4(packed).long(), q)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)


def _weighted_group_error(w, h, scales, zeros, group_size):
    """sum_k h_k (w - w^)^2 per group, with w^ the nearest level for the given scales/zeros (float64, numpy)."""
    n, k = w.shape
    kp = math.ceil(k / group_size) * group_size
    wp, hp = np.zeros((n, kp)), np.zeros((n, kp))
    wp[:, :k], hp[:, :k] = w.double().numpy(), np.broadcast_to(h.double().numpy(), (n, k))
    g, hg = wp.reshape(n, -1, group_size), hp.reshape(n, -1, group_size)
    s = scales.double().numpy()[..., None]
    z = np.zeros_like(s) if zeros is None else zeros.double().numpy()[..., None]
    lv = np.clip(np.round((g - z) / s), -8, 7)
    return (hg * (g - lv * s - z) ** 2).sum(-1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_search_lowers_weighted_error_vs_round_to_nearest(symmetric):
    gen = torch.Generator().manual_seed(3)
    w = _weights(64, 200, seed=7)
    w[3:] = torch.randn(61, 200, generator=gen) ** 3 * 0.05  # heavy tails: clipping pays off
    h = torch.rand(200, generator=gen) ** 4 * 10  # uneven column importance (a Hessian diagonal)
    _, s0, z0 = quantize_int4(w, 32, symmetric)
    s1, z1 = search_int4_params(w, h, 32, symmetric)
    assert s1.shape == s0.shape and z1.shape == s0.shape
    if symmetric:
        assert (z1 == 0).all()
        assert (s1 < 0).any()  # the extra level -8 is put on the side of the largest magnitude
    e0 = _weighted_group_error(w, h, s0, z0, 32)
    e1 = _weighted_group_error(w, h, s1, None if symmetric else z1, 32)
    assert (e1 <= e0 * (1 + 1e-5) + 1e-12).all()  # round to nearest is one of the candidates: never worse
    assert e1.sum() < 0.8 * e0.sum(), (e1.sum(), e0.sum())
    # the weighting matters: the search weighted by h beats the unweighted search on the h-weighted error
    s2, z2 = search_int4_params(w, None, 32, symmetric)
    assert e1.sum() < _weighted_group_error(w, h, s2, None if symmetric else z2, 32).sum()
    assert (e1[0] == 0).all()  # the all-zero row stays exact


def _layer_problem(n=48, k=128, t=512, seed=0):
    """A weight and the Hessian 2 X^T X / t of correlated, uneven inputs X (t, k)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / math.sqrt(k) + torch.eye(k)
    x = (torch.randn(t, k, generator=gen) * torch.rand(k, generator=gen) * 3) @ mix
    w = torch.randn(n, k, generator=gen) ** 3 * 0.05  # heavy-tailed, like trained weights
    return w, 2 * x.t() @ x / t


def _output_error(w, h, packed, scales, zeros):
    d = (w - dequantize_int4(packed, scales, zeros, w.shape[1])).double()
    return float(((d @ h.double()) * d).sum())


@pytest.mark.parametrize("symmetric", [True, False])
def test_refit_lowers_hessian_weighted_error_with_levels_fixed(symmetric):
    w, h = _layer_problem(seed=1)
    packed, s0, z0 = quantize_int4(w, 32, symmetric)
    z0 = torch.zeros_like(s0) if z0 is None else z0
    levels = unpack_int4(packed).float() - 8
    s1, z1 = refit_int4_params(w, levels, h, 32, symmetric, (s0, z0))
    before = _output_error(w, h, pack_int4(levels + 8), s0, None if symmetric else z0)
    after = _output_error(w, h, pack_int4(levels + 8), s1, None if symmetric else z1)
    assert after < 0.9 * before, (after, before)
    if symmetric:
        assert (z1 == 0).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_with_search_and_refit_beats_plain_gptq_and_rtn(symmetric):
    w, h = _layer_problem(seed=2)
    rtn = _output_error(w, h, *quantize_int4(w, 32, symmetric))
    plain = _output_error(w, h, *gptq_int4(w, h, 32, symmetric, search=False, refine=0))
    ours = gptq_int4(w, h, 32, symmetric)
    assert (ours[2] is None) == symmetric
    better = _output_error(w, h, *ours)
    assert plain < rtn and better < 0.95 * plain, (rtn, plain, better)
    # the stored levels reproduce the layer: QuantLinear computes with exactly this weight (negative scales too)
    ql = QuantLinear(128, 48, 4, 32, symmetric)
    ql.qweight, ql.scales = ours[0], ours[1]
    if not symmetric:
        ql.zeros = ours[2]
    x = torch.randn(2, 128)
    for mode in ("float32", "dequant"):
        ql.compute = mode
        torch.testing.assert_close(ql(x), F.linear(x, dequantize_int4(*ours, 128)), rtol=1e-4, atol=1e-5)


# ---- the layer --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 32, True), (4, 64, False),
                                                       (4, 128, True)])
@pytest.mark.parametrize("mode", ["auto", "float32", "dequant"])
def test_quantlinear_matches_dequantized_reference(bits, group_size, symmetric, mode):
    torch.manual_seed(0)
    lin = torch.nn.Linear(172, 88, bias=True)  # K=172 pads to the group size, N=88 pads to 16 in the kernel
    ql = QuantLinear.from_linear(lin, bits, group_size, symmetric)
    ql.compute = mode
    w = ql.dequantize()
    assert w.shape == (88, 172)
    for shape in [(1, 172), (2, 172), (3, 5, 172), (2, 40, 172)]:
        x = torch.randn(*shape)
        ref = F.linear(x, w, lin.bias.detach())
        y = ql(x)
        assert y.shape == ref.shape
        rel = ((y - ref).abs().max() / ref.abs().max()).item()
        # auto may decode (<= DECODE_ROWS rows) with bfloat16 activations where that kernel is faster (timed):
        # ~3e-3 relative; more rows (prefill, scoring) are computed exactly
        decoding = x.numel() // 172 <= DECODE_ROWS
        assert rel <= (1e-2 if mode == "auto" and decoding else 1e-4), (shape, rel)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_quantlinear_bfloat16_mode_is_close(bits, group_size):
    """The fast mode feeds bfloat16 activations to the kernels: ~3e-3 relative, documented as approximate."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=False)
    ql = QuantLinear.from_linear(lin, bits, group_size)
    ql.compute = "bfloat16"
    x = torch.randn(4, 256)
    ref = F.linear(x, ql.dequantize())
    assert ((ql(x) - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
@pytest.mark.parametrize("mode", ["bfloat16", "auto"])
def test_output_projection_refines_its_largest_outputs(bits, group_size, mode):
    """The bfloat16 kernels round their output to bfloat16 (steps of 0.125 near 25: greedy ties); an output
    projection recomputes its largest outputs exactly, so they and the argmax are the exact path's."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 1000, bias=True)
    ql = QuantLinear.from_linear(lin, bits, group_size)
    ql.refine_top, ql.compute = 16, mode
    for shape in [(1, 256), (3, 256), (2, 3, 256)]:
        x = 20 * torch.randn(*shape)
        ref = F.linear(x, ql.dequantize(), lin.bias.detach())
        y = ql(x)
        top = ref.topk(8, dim=-1).indices
        torch.testing.assert_close(y.gather(-1, top), ref.gather(-1, top), rtol=1e-5, atol=1e-4)
        assert torch.equal(y.argmax(-1), ref.argmax(-1))
        assert ((y - ref).norm() / ref.norm()).item() < 1e-2  # the rest: the kernel's values
    ql.refine_top = 0
    ql._decode = {}
    if mode == "bfloat16":  # without refinement the top outputs carry the bfloat16 rounding
        x = 20 * torch.randn(4, 256)
        ref = F.linear(x, ql.dequantize(), lin.bias.detach())
        top = ref.topk(8, dim=-1).indices
        assert (ql(x).gather(-1, top) - ref.gather(-1, top)).abs().max() > 1e-3


@pytest.mark.parametrize("n,k,group", [(1000, 256, 128), (1024, 256, 128), (1000, 576, 64), (1024, 96, 32),
                                       (2500, 64, 64)])  # the last: built in three slices of rows
def test_int8_output_projection_split_kernel_equals_the_int8_kernel(n, k, group):
    """An int8 output projection decodes through the int4 kernel on its weight split into two 4-bit halves
    (q + 128 = 16 a + b): the same products as the int8 kernel, up to both kernels' bfloat16 output rounding; its
    groups are as long as K allows (one scale per row)."""
    torch.manual_seed(0)
    ql = QuantLinear.from_linear(torch.nn.Linear(k, n, bias=False), 8)
    ql.refine_top = 16
    x = 20 * torch.randn(3, k)
    exact = F.linear(x.bfloat16().float(), dequantize_int8(ql.qweight, ql.scales.bfloat16().float()))
    split = ql._packed_mm("bfloat16")(x).float()
    int8 = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), ql.qweight, ql.scales.bfloat16()).float()
    assert split.shape == (3, n) and "split" in ql._kernel and ql._kernel["split_group"] == group
    bound = exact.abs().max().item() / 128  # bfloat16 keeps 8 significant bits
    assert (split - exact).abs().max().item() <= bound and (int8 - exact).abs().max().item() <= bound
    ql.refine_top = 0  # other int8 layers keep the int8 kernel
    ql._kernel = None
    ql._packed_mm("bfloat16")(x)
    assert "split" not in ql._kernel


def test_int4_decoding_keeps_only_the_scales_it_computes_with():
    """The kernel layout builds scales per activation dtype on first use; auto mode drops the float32 ones it
    timed and did not choose (a quarter of the int4 weight's size); float32 mode still works afterwards."""
    torch.manual_seed(0)
    ql = QuantLinear.from_linear(torch.nn.Linear(256, 96, bias=False), 4, 32, False)
    x = torch.randn(1, 256)
    ql(x)  # auto: times the modes for one row
    chosen = _decode_mode_for(ql, 1)
    assert (torch.float32 in ql._kernel) == (chosen == "float32")
    ql.compute = "float32"
    torch.testing.assert_close(ql(x), F.linear(x, ql.dequantize()), rtol=1e-4, atol=1e-4)
    assert torch.float32 in ql._kernel


def _decode_mode_for(ql: QuantLinear, rows: int) -> str:
    return _DECODE_MODE[(ql.bits, ql.out_features, ql.in_features, ql.group_size, rows)]


# ---- whole models -------------------------------------------------------------------------------


def _stories():
    return load_model(STORIES260K)


@pytest.mark.parametrize("qcfg", [QuantConfig(8), QuantConfig(4, 32, False), QuantConfig(4, 32, embedding=False),
                                  QuantConfig(4, 64, True, lm_head=True, embedding=False)],
                         ids=["int8", "int4-g32-asym", "int4-float-embedding", "int4-g64-lmhead"])
def test_save_load_gives_identical_logits(tmp_path, qcfg):
    model = quantize_model(_stories(), qcfg)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    save_quantized(model, tmp_path / "q")
    stored = set(safe_open_keys(tmp_path / "q" / "model.safetensors"))
    assert ("wte.qweight" in stored) == qcfg.embedding and ("wte.weight" in stored) != qcfg.embedding
    assert not {"lm_head.weight", "lm_head.qweight"} & stored or qcfg.lm_head  # a tied head is stored once
    for loaded in (load_quantized(tmp_path / "q"), load_model(tmp_path / "q")):
        head_quantized = qcfg.lm_head or qcfg.embedding
        assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 20 + int(head_quantized)
        with torch.no_grad():
            assert torch.equal(loaded(ids), before)
            for mode in ("float32", "bfloat16"):  # the packed kernels on loaded buffers (they need aligned memory)
                set_compute(loaded, mode)
                assert (loaded(ids[:1, :8]) - before[:1, :8]).abs().max() < 0.01 * before.abs().max()
            set_compute(loaded, "auto")
        if qcfg.embedding:  # the output projection computes with the embedding's int8 table itself
            assert isinstance(loaded.wte, QuantEmbedding) and loaded.lm_head.bits == 8
            assert loaded.lm_head.refine_top > 0 and model.lm_head.refine_top > 0
            assert loaded.lm_head.qweight is loaded.wte.qweight and loaded.lm_head.scales is loaded.wte.scales
        elif not qcfg.lm_head:  # tied output projection stays tied to the float embedding
            assert loaded.lm_head.weight is loaded.wte.weight


def test_a_quantized_directory_is_used_in_place_from_its_file(tmp_path):
    """``save_quantized`` aligns every tensor to 64 bytes in the file, so ``load_quantized`` uses them on a mapping of
    it (no copy in the process's own memory); safetensors' own reader reads the file alike. A file of safetensors'
    writer (8-byte alignment) still loads, its tensors copied."""
    from safetensors.torch import load_file, save_file

    from lmforge.memory import file_mappings

    model = quantize_model(_stories(), QuantConfig(4, 32, False))
    save_quantized(model, tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    ref = load_file(str(path))
    loaded = load_quantized(tmp_path / "q")
    mapped = file_mappings()
    bufs = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}
    for k, t in ref.items():
        assert torch.equal(bufs[k], t)
        assert bufs[k].data_ptr() % 64 == 0
        start = bufs[k].data_ptr()
        assert any(lo <= start < hi for lo, hi in mapped), f"{k} was copied"
    save_file(ref, str(path), metadata={"format": "pt"})  # another writer: tensors 8-byte aligned only
    (tmp_path / "q" / "MANIFEST.json").unlink()  # (as directories written before manifests were)
    old = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(old(ids), loaded(ids))
    assert all(t.data_ptr() % 64 == 0 for t in (*old.parameters(), *old.buffers()))


def test_a_quantized_directory_with_non_finite_scales_is_refused(tmp_path):
    """NaN in a scale (a damaged file whose tensors still parse): refused with one line naming the tensor."""
    model = quantize_model(_stories(), QuantConfig(4, 32, False))
    model.blocks[1].mlp.fc2.scales[0, 0] = float("nan")
    save_quantized(model, tmp_path / "q")
    with pytest.raises(LMForgeError, match=r"blocks\.1\.mlp\.fc2\.scales.*NaN or infinite"):
        load_quantized(tmp_path / "q")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are given back on Linux only")
def test_a_loaded_int4_weight_changed_in_place_keeps_its_change(tmp_path):
    """Building the C step's int4 layout gives back the pages of the weight it copied (read again from the file when
    needed), but not of a weight written since loading: those pages hold the change."""
    from lmforge.infer import native

    save_quantized(quantize_model(_stories(), QuantConfig(4, 32, False)), tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    mods = sorted((m for m in loaded.modules() if isinstance(m, QuantLinear) and m.bits == 4),
                  key=lambda m: -m.qweight.numel())  # the largest: whole pages of their own in the file
    assert mods[1].qweight.numel() >= 2 * 4096
    if not native.int4_ok(mods[0]):
        pytest.skip("no lmf_int4 here (AVX512-VNNI and a C compiler)")
    kept, changed = mods[0], mods[1]
    want = kept.qweight.clone()
    with torch.no_grad():
        changed.qweight.bitwise_xor_(0x11)
    mine = changed.qweight.clone()
    for m in (kept, changed):
        native._int4_layout(m)
    assert torch.equal(kept.qweight, want)  # given back, read again from the file
    assert torch.equal(changed.qweight, mine)  # its change is still there


def safe_open_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_quant_embedding_matches_its_dequantized_table():
    """The int8 table: per-row scale max|row| / 127, every element within half a step, lookups use it exactly, and
    a tied head's logits equal F.linear with the dequantized table."""
    model = _stories()
    table = model.wte.weight.detach().clone()
    quantize_model(model, QuantConfig(8))
    emb = model.wte
    deq = emb.dequantize()
    torch.testing.assert_close(emb.scales, table.abs().amax(1) / 127)
    assert ((deq - table).abs() <= emb.scales[:, None] / 2 + 1e-7).all()
    ids = torch.tensor([[0, 5, 511, 5], [1, 2, 3, 4]])
    assert torch.equal(emb(ids), deq[ids])
    h = torch.randn(3, 7, 64)
    set_compute(model, "dequant")
    torch.testing.assert_close(model.lm_head(h), F.linear(h, deq), rtol=1e-5, atol=1e-5)


def test_gptq_default_path_save_load_round_trip(tmp_path):
    """The default int4 path (symmetric GPTQ with searched, possibly negative, scales) saves and loads exactly."""
    model = _stories()
    calib = self_calibration(model, 4, 64)
    model = quantize_model(model, QuantConfig(4, 32, True, method="gptq"), calib)
    scales = torch.cat([m.scales.flatten() for m in model.modules() if isinstance(m, QuantLinear)])
    assert (scales < 0).any() and (scales > 0).any()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    save_quantized(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 21  # + the tied int8 head
    with torch.no_grad():
        assert torch.equal(loaded(ids), before)
        set_compute(loaded, "float32")  # the packed int4 kernel agrees with the dequantized weights
        torch.testing.assert_close(loaded(ids), before, rtol=1e-4, atol=1e-4)


def test_gptq_runs_each_block_only_as_far_as_a_layer_needs():
    """Each layer's statistics need the block only up to that layer: the forwards stop there (qkv's and proj's
    inside the attention), and the float block's last statistics forward gives its output. Per block the attention
    runs to its end 5 times (float: for fc1, fc2; quantized: for fc1, fc2 and the output) where every forward ran
    whole (10 times), the same weights coming out."""
    model = _stories()
    calib = self_calibration(model, 2, 32)
    finished = []
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(lambda mod, inp, out, i=i: finished.append(i))  # (copied with the block)
    quantize_model(model, QuantConfig(4, 32, method="gptq"), calib)
    assert [finished.count(i) for i in range(len(model.blocks))] == [5] * len(model.blocks)


@pytest.mark.parametrize("method,symmetric", [("rtn", True), ("rtn", False), ("gptq", True)])
def test_int4_scales_and_zeros_are_rounded_to_float16_values(method, symmetric):
    """``quantize_model`` rounds every int4 layer's scales and zeros to float16 values (float32 tensors), its levels
    kept: the C step lays them out as float16 (half the bytes a token reads). Each dequantized weight moves by at most
    the rounding of its group's parameters (levels -8..7: 8 x 2^-11 of the scale, 2^-11 of the zero); a layer whose
    scales leave float16's range keeps float32."""
    from lmforge.infer import native
    from lmforge.quant.quantize import half_params

    torch.manual_seed(0)
    model = _stories()
    plain = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    calib = self_calibration(model, 2, 32) if method == "gptq" else None
    quantize_model(model, QuantConfig(4, 32, symmetric, method=method), calib)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.bits == 4]
    assert len(layers) == 20
    for name, m in layers:
        assert torch.equal(m.scales.half().float(), m.scales), name
        assert m.zeros is None or torch.equal(m.zeros.half().float(), m.zeros), name
    name, m = layers[0]
    if native.library() is not None and native.int4_ok(m):
        assert native._int4_layout(m)[-1]  # read as float16
    # against the same levels with unrounded parameters (round to nearest: quantize_int4's)
    if method == "rtn":
        q, s, z = quantize_int4(plain[name], 32, symmetric)
        assert torch.equal(q, m.qweight)
        moved = (m.dequantize() - dequantize_int4(q, s, z, m.in_features)).abs()
        bound = 8 * s.abs() * 2.0 ** -11 + (0 if z is None else z.abs() * 2.0 ** -11)
        assert (moved <= bound.repeat_interleave(32, dim=1)[:, : m.in_features] * 1.001 + 1e-12).all()
    big = QuantLinear.from_linear(torch.nn.Linear(64, 4), 4, 32)
    with torch.no_grad():
        big.scales[0, 0] = 1e6
    kept = big.scales.clone()
    assert not half_params(big) and torch.equal(big.scales, kept)


def test_load_rejects_inconsistent_files(tmp_path):
    import json

    save_quantized(quantize_model(_stories(), QuantConfig(8)), tmp_path / "q")
    qj = tmp_path / "q" / "quantization.json"
    d = json.loads(qj.read_text())
    d.update(bits=4, group_size=32)
    qj.write_text(json.dumps(d))
    with pytest.raises(LMForgeError, match="quantization.json has .* bytes, its manifest says"):
        load_quantized(tmp_path / "q")
    write_manifest(tmp_path / "q")  # the edit made to look intended: the layer check itself
    with pytest.raises(LMForgeError, match="blocks.0.attn.qkv"):
        load_quantized(tmp_path / "q")
    with pytest.raises(LMForgeError, match="group-size"):
        QuantConfig(4, 48).validate()
    with pytest.raises(LMForgeError, match="asymmetric"):
        QuantConfig(8, symmetric=False).validate()


def test_int4_weights_are_3_5x_smaller(tmp_path):
    save_checkpoint(_stories(), tmp_path / "fp32")
    save_quantized(quantize_model(_stories(), QuantConfig(4, 32)), tmp_path / "int4")
    fp32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    int4 = (tmp_path / "int4" / "model.safetensors").stat().st_size
    assert fp32 / int4 >= 3.5, (fp32, int4)


# ---- perplexity on held-out text --------------------------------------------------------------


def _llama2c_encode_fallback(text: str) -> list[int]:
    """Minimal reader of llama2.c's tokenizer.bin + its merge-by-score encoder (used if lmforge.tokenizer is absent)."""
    raw = STORIES260K_TOKENIZER.read_bytes()
    pieces, scores, off = [], [], 4
    while off < len(raw):
        score, n = struct.unpack_from("<fi", raw, off)
        pieces.append(raw[off + 8 : off + 8 + n])
        scores.append(score)
        off += 8 + n
    lookup = {p: i for i, p in reversed(list(enumerate(pieces)))}
    ids = []
    for ch in " " + text:
        i = lookup.get(ch.encode())
        ids.extend([i] if i is not None else [b + 3 for b in ch.encode()])
    while True:
        best, at = -1e10, -1
        for j in range(len(ids) - 1):
            i = lookup.get(pieces[ids[j]] + pieces[ids[j + 1]])
            if i is not None and scores[i] > best:
                best, at, merged = scores[i], j, i
        if at < 0:
            return ids
        ids[at : at + 2] = [merged]


def _heldout_sequences() -> list[list[int]]:
    if not TINYSTORIES.is_file():
        pytest.skip(f"{TINYSTORIES} not found (shared data is beside the repo)")
    stories = [s.strip() for s in TINYSTORIES.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
    try:
        from lmforge.tokenizer import load_tokenizer

        tok = load_tokenizer(str(STORIES260K_TOKENIZER))
        encode = tok.encode
    except ImportError:
        encode = _llama2c_encode_fallback
    return [[1] + encode(s)[:511] for s in stories]


@torch.no_grad()
def _perplexity(model, seqs: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for s in seqs:
        x = torch.tensor([s])
        logits = model(x[:, :-1])
        nll += F.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum").item()
        n += len(s) - 1
    return math.exp(nll / n)


def test_perplexity_stays_close_to_fp32():
    seqs = _heldout_sequences()
    assert sum(len(s) for s in seqs) > 1000
    base = _perplexity(_stories(), seqs)
    assert 1.5 < base < 10  # a trained model on its own domain
    int8 = _perplexity(quantize_model(_stories(), QuantConfig(8)), seqs)
    assert int8 <= base * 1.01, (base, int8)
    rtn = _perplexity(quantize_model(_stories(), QuantConfig(4, 32)), seqs)
    model = _stories()
    # the default int4 path of `lmforge quantize` (symmetric GPTQ with scale search, refit and input correction),
    # calibrated on text the model samples itself (disjoint from the held-out stories), half the default sample count
    calib = self_calibration(model, 64, 512)
    gptq = _perplexity(quantize_model(model, QuantConfig(4, 32, method="gptq"), calib), seqs)
    print(f"stories260K perplexity: fp32 {base:.4f}, int8 {int8:.4f}, int4-g32 rtn {rtn:.4f}, gptq {gptq:.4f}")
    assert gptq < rtn  # error compensation must help
    # Issue 5's target: int4-g32 within 5 % of fp32. Plain GPTQ landed at +6..+8.6 % symmetric (+15 % round to
    # nearest); this path at +3..+5 % depending on the calibration sample (+3.1 % with this one).
    assert gptq <= base * 1.05, (base, gptq)


# ---- commands -----------------------------------------------------------------------------------


def _run_quantize(argv: list[str]) -> None:
    from lmforge.commands import quantize

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    quantize.add_parser(sub, "quantize", "quantize")
    args = parser.parse_args(["quantize", *argv])
    args.func(args)


def test_quantize_command_and_generate_subprocess(tmp_path, capsys):
    out = tmp_path / "q4"
    _run_quantize(["--bits", "4", "--method", "rtn", "--asymmetric", "--output", str(out)])
    assert "20 linear layers as int4-g32-asym" in capsys.readouterr().out
    assert {"config.json", "quantization.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    with pytest.raises(LMForgeError, match="group-size"):
        _run_quantize(["--bits", "4", "--group-size", "16", "--output", str(tmp_path / "bad")])
    adapter = tmp_path / "ad"  # said "not a checkpoint directory (no config.json)"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "x"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(LMForgeError, match=r"an adapter directory; merge it into its base first \(lmforge peft merge"):
        _run_quantize(["--model", str(adapter), "--bits", "8", "--output", str(tmp_path / "bad")])
    with pytest.raises(LMForgeError, match=r"^--calib-samples 100000000: .*lower --calib-samples$"):  # "--max-len"
        _run_quantize(["--bits", "4", "--calib-samples", "100000000", "--calib-len", "8", "--output",
                       str(tmp_path / "bad")])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "lmforge", "generate", "--model", str(out), "--max-new-tokens", "30",
                        "--temperature", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) >= 5, r.stdout


def test_set_compute_validates():
    model = quantize_model(_stories(), QuantConfig(8))
    set_compute(model, "float32")
    assert all(m.compute == "float32" for m in model.modules() if isinstance(m, QuantLinear))
    with pytest.raises(LMForgeError):
        set_compute(model, "int2")
