"""lmforge.matmul: float32 products through oneDNN where MKL is slow, equal to F.linear and its gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import matmul as M


@pytest.fixture
def onednn(monkeypatch):
    """Force the oneDNN path and count its calls."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("this PyTorch build has no oneDNN linear")
    monkeypatch.setenv("LMFORGE_FP32_GEMM", "onednn")
    M.onednn_chosen.cache_clear()
    calls = []
    real = M._onednn

    def counting(x, w, b):
        calls.append(tuple(x.shape))
        return real(x, w, b)

    monkeypatch.setattr(M, "_onednn", counting)
    yield calls
    M.onednn_chosen.cache_clear()


def _ref(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("bias", [True, False])
def test_linear_and_its_gradients_equal_a_float64_reference(onednn, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, 96, generator=g, requires_grad=True)
    w = torch.randn(160, 96, generator=g, requires_grad=True)
    b = torch.randn(160, generator=g, requires_grad=True) if bias else None
    up = torch.randn(3, 70, 160, generator=g)
    y = M.linear(x, w, b)
    (y * up).sum().backward()
    assert len(onednn) == 3  # forward, input gradient, weight gradient
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    yd = _ref(xd, wd, bd)
    (yd * up.double()).sum().backward()
    torch.testing.assert_close(y.double(), yd, rtol=0, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=0, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=0, atol=1e-3)
    if bias:
        torch.testing.assert_close(b.grad.double(), bd.grad, rtol=0, atol=1e-4)


def test_only_the_gradients_asked_for_are_computed(onednn):
    x = torch.randn(64, 128)
    w = torch.randn(256, 128, requires_grad=True)
    M.linear(x, w).sum().backward()
    assert len(onednn) == 2 and w.grad is not None  # forward and the weight's gradient; none for x
    onednn.clear()
    with torch.no_grad():
        M.linear(x, w)
    assert len(onednn) == 1


def test_matmul_takes_transposed_views(onednn):
    a, b, c = torch.randn(200, 96), torch.randn(300, 96), torch.randn(200, 80)
    torch.testing.assert_close(M.matmul(a, b.t()), a @ b.t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(M.matmul(a.t(), c), a.t() @ c, rtol=1e-5, atol=1e-4)
    assert len(onednn) == 2


def test_a_weight_sliced_from_a_wider_matrix_reaches_onednn_dense(onednn, monkeypatch):
    """oneDNN's linear takes a weight whose rows sit at another stride (an int4 layer's dequantized weight sliced
    to in_features 172 of 192) to a reference kernel ~400x slower (10.9 s against 0.025 s for 65,536 rows): such a
    weight is made contiguous first; row-major and transposed weights go as they are."""
    seen = []
    real = torch.ops.mkldnn._linear_pointwise

    class Ops:  # torch.ops.mkldnn with its linear recording the weight's strides
        @staticmethod
        def _linear_pointwise(x, w, *rest):
            seen.append(w.stride())
            return real(x, w, *rest)

    monkeypatch.setattr(M.torch.ops, "mkldnn", Ops)
    x = torch.randn(300, 172)
    wide = torch.randn(64, 192)
    for w in (wide[:, :172], torch.randn(64, 172), torch.randn(172, 64).t()):
        torch.testing.assert_close(M.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert seen == [(172, 1), (172, 1), (1, 64)]


def test_small_products_other_dtypes_and_autocast_keep_f_linear(onednn):
    x, w = torch.randn(4, 16), torch.randn(8, 16)  # 512 multiply-adds: under MIN_MACS
    assert torch.equal(M.linear(x, w), F.linear(x, w))
    xb, wb = torch.randn(64, 256).bfloat16(), torch.randn(128, 256).bfloat16()
    M.linear(xb, wb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert M.linear(torch.randn(64, 256), torch.randn(128, 256)).dtype == torch.bfloat16
    assert onednn == []


def test_call_runs_hooks_and_other_modules_as_they_are(onednn):
    lin = nn.Linear(256, 128)
    x = torch.randn(64, 256)
    torch.testing.assert_close(M.call(lin, x), lin(x), rtol=1e-5, atol=1e-5)
    assert len(onednn) == 1
    seen = []
    handle = lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    M.call(lin, x)
    handle.remove()
    assert seen == [torch.Size([64, 128])] and len(onednn) == 1  # the hooked call went through the module
    seq = nn.Sequential(nn.Linear(256, 128))
    M.call(seq, x)  # not a plain Linear: called as a module (its Linear inside runs F.linear)
    assert len(onednn) == 1


def test_the_choice_follows_the_environment_and_the_processor(monkeypatch):
    try:
        for value, vendor, machine, want in [("mkl", "AuthenticAMD", "x86_64", False),
                                             ("", "GenuineIntel", "x86_64", False),
                                             ("auto", "AuthenticAMD", "x86_64", True),
                                             ("", "AuthenticAMD", "aarch64", False),
                                             ("", "", "x86_64", False)]:
            monkeypatch.setenv("LMFORGE_FP32_GEMM", value)
            monkeypatch.setattr(M, "_cpu_vendor", lambda v=vendor: v)
            monkeypatch.setattr(M.platform, "machine", lambda m=machine: m)
            M.onednn_chosen.cache_clear()
            usable = torch.backends.mkldnn.is_available()
            assert M.onednn_chosen() is (want and usable), (value, vendor, machine)
        monkeypatch.setenv("LMFORGE_FP32_GEMM", "fast")
        M.onednn_chosen.cache_clear()
        with pytest.raises(ValueError, match="LMFORGE_FP32_GEMM"):
            M.onednn_chosen()
    finally:
        M.onednn_chosen.cache_clear()


def test_a_decoder_training_step_matches_the_mkl_path(onednn, monkeypatch):
    """The whole decoder (attention, MLP, tied head, fused loss) through oneDNN: loss and gradients as with MKL."""
    from lmforge.config import ModelConfig
    from lmforge.losses import lm_loss
    from lmforge.model import Decoder

    cfg = ModelConfig(vocab_size=9000, n_layer=2, n_head=4, n_embd=128, block_size=64, tie_embeddings=True,
                      position="rope", norm="rmsnorm", mlp="swiglu")
    torch.manual_seed(0)
    model = Decoder(cfg)
    ids = torch.randint(0, 9000, (2, 65))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

    def step():
        model.zero_grad()
        total, n = lm_loss(model, batch)
        (total / n).backward()
        return total.item() / n, {k: p.grad.clone() for k, p in model.named_parameters()}

    loss1, grads1 = step()
    assert len(onednn) > 10
    monkeypatch.setenv("LMFORGE_FP32_GEMM", "mkl")
    M.onednn_chosen.cache_clear()
    onednn.clear()
    loss2, grads2 = step()
    assert onednn == []
    assert abs(loss1 - loss2) < 1e-5
    for k in grads1:
        torch.testing.assert_close(grads1[k], grads2[k], rtol=1e-4, atol=1e-6, msg=k)


def test_packed_weights_serve_inference_only_while_the_weight_is_unchanged(onednn, monkeypatch):
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        pytest.skip("this PyTorch build cannot pack oneDNN weights")
    seen = []
    counting = M._onednn
    monkeypatch.setattr(M, "_onednn", lambda x, w, b: (seen.append(w.is_mkldnn), counting(x, w, b))[1])
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(96, 300, bias=False)
    model = nn.Sequential(nn.Linear(96, 96), head, nn.Linear(96, 300))
    model[2].weight = head.weight  # tied: one packed copy
    x = torch.randn(4, 50, 96, generator=g)
    with M.packed_weights_in(model):
        assert model[1].__dict__[M._PACKED][2] is model[2].__dict__[M._PACKED][2]
        with torch.no_grad():
            for m in model:
                torch.testing.assert_close(M.call(m, x), F.linear(x, m.weight, m.bias), rtol=0, atol=1e-4)
        assert seen == [True, True, True]
        seen.clear()
        y = M.call(model[0], x)  # gradients on: the plain weight
        assert seen == [False] and y.requires_grad
        seen.clear()
        with torch.no_grad():
            model[0].weight.mul_(2)  # changed within: read as it is now
            torch.testing.assert_close(M.call(model[0], x), F.linear(x, model[0].weight, model[0].bias), rtol=0,
                                       atol=1e-4)
        assert seen == [False]
        outer = model[1].__dict__[M._PACKED]
        with M.packed_weights_in(model):  # nested: the outer copies stay, and stay after it
            assert model[1].__dict__[M._PACKED] is outer
        assert model[1].__dict__[M._PACKED] is outer
    assert all(M._PACKED not in m.__dict__ for m in model)
    with M.packed_weights_in(model, budget=96 * 96 * 4), torch.no_grad():  # room for the smallest weight only
        assert [M._PACKED in m.__dict__ for m in model] == [True, False, False]
