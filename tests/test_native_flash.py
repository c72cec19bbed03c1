"""lmf_flash: attention of whole sequences in C, against a float64 softmax attention and against the decoder's SDPA."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.infer import native
from lmforge.model import Decoder

LIB = native.library()
pytestmark = pytest.mark.skipif(LIB is None or not LIB.lmf_flash_ok(64),
                                reason="no C compiler or no AVX-512 here: attention stays with SDPA")
HIDDEN = torch.finfo(torch.float32).min


def reference(q, k, v, mask, causal, scale):
    """softmax(q k^T scale + mask) v in float64, (B, T, H, D); a query that sees no key gets zeros."""
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(H // KV, 1)
    vv = v.double().repeat_interleave(H // KV, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    seen = torch.ones(B, H, T, S, dtype=torch.bool)
    if mask is not None:
        seen = seen & (mask > -1e30)
        s = s + mask.double().clamp_min(-1e30)
    elif causal:
        seen = seen & (torch.arange(S)[None, :] <= torch.arange(T)[:, None] + S - T)
    s = s.masked_fill(~seen, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vv).transpose(1, 2)


def qkv(B, H, KV, T, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H + 2 * KV, D, generator=g).transpose(1, 2)[:, :H]  # a view, as the decoder's
    return q, torch.randn(B, KV, S, D, generator=g), torch.randn(B, KV, S, D, generator=g)


@pytest.mark.parametrize("B,H,KV,T,S,D", [(2, 9, 3, 37, 37, 64), (1, 4, 4, 16, 45, 32), (2, 16, 1, 19, 19, 16),
                                          (1, 6, 2, 23, 50, 48), (1, 2, 1, 33, 33, 128)])
def test_causal_attention_equals_a_float64_reference(B, H, KV, T, S, D):
    q, k, v = qkv(B, H, KV, T, S, D)
    out = native.flash_attention(q, k, v, None, True, D**-0.5)
    torch.testing.assert_close(out.double(), reference(q, k, v, None, True, D**-0.5), rtol=0, atol=2e-5)


def test_masks_padding_per_head_bias_and_queries_that_see_nothing():
    B, H, KV, T, S, D = 3, 6, 2, 29, 41, 64
    q, k, v = qkv(B, H, KV, T, S, D, seed=1)
    seen = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None].repeat(B, 1, 1, 1)
    seen[0, :, :, :5] = False  # left padding of the first row's keys
    seen[1, :, 3, :] = False  # a query that sees nothing
    bias = -0.1 * torch.arange(H).view(1, H, 1, 1) * torch.rand(1, 1, T, S)  # per head (ALiBi-like)
    mask = torch.zeros(B, 1, T, S).masked_fill(~seen, HIDDEN)
    for m in (mask, (mask + bias).clamp_min(HIDDEN), mask[:1]):
        out = native.flash_attention(q, k, v, m, False, 0.3)
        ref = reference(q, k, v, m.expand(B, H, T, S), False, 0.3)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    assert native.flash_attention(q, k, v, mask, False, 0.3)[1, 3].abs().max() == 0


def test_queries_beyond_a_cached_prefix_and_no_mask():
    q, k, v = qkv(2, 9, 3, 20, 70, 64, seed=2)  # causal after 50 cached keys
    torch.testing.assert_close(native.flash_attention(q, k, v, None, True, 0.125).double(),
                               reference(q, k, v, None, True, 0.125), rtol=0, atol=2e-5)
    torch.testing.assert_close(native.flash_attention(q, k, v, None, False, 0.125).double(),
                               reference(q, k, v, None, False, 0.125), rtol=0, atol=2e-5)


def test_what_it_does_not_take_is_left_to_sdpa():
    q, k, v = qkv(1, 4, 2, 32, 32, 64)
    assert native.flash_ok(q, k, v, None)
    assert not native.flash_ok(q[:, :, :8], k[:, :, :8], v[:, :, :8], None)  # few rows: decoding
    assert not native.flash_ok(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert not native.flash_ok(q, k, v, torch.zeros(1, 1, 32, 31))
    assert native.flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, True, 0.1) is None


def _tiny(**kw) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"vocab_size": 200, "n_layer": 2, "n_head": 6, "n_kv_head": 2, "n_embd": 192,
                         "block_size": 128, **kw})
    return Decoder(cfg).eval()


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_the_decoder_gives_the_same_states_through_either_attention(position):
    """Padded rows after a cached prefix (eval's batches) and plain causal rows, with and without flash_attention_in;
    the C kernel runs (counted) and only without gradients."""
    model = _tiny(position=position)
    ids = torch.randint(0, 200, (3, 40))
    key_mask = torch.ones(3, 40, dtype=torch.bool)
    key_mask[0, :7] = False
    calls = []
    real = native.flash_attention

    def counted(*a):
        calls.append(1)
        return real(*a)

    with torch.inference_mode():
        plain = model.hidden_states(ids)
        padded = model.hidden_states(ids, key_mask=key_mask)
        with native.flash_attention_in(model):
            for m in model.modules():
                if getattr(m, "kernel", None) is not None:
                    m.kernel = counted
            plain2 = model.hidden_states(ids)
            padded2 = model.hidden_states(ids, key_mask=key_mask)
    assert len(calls) == 4 and all(m.kernel is None for m in model.blocks.modules() if hasattr(m, "kernel"))
    torch.testing.assert_close(plain2, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded2[0, 7:], padded[0, 7:], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded2[1:], padded[1:], rtol=0, atol=1e-5)
    with native.flash_attention_in(model):
        for m in model.modules():
            if getattr(m, "kernel", None) is not None:
                m.kernel = counted
        model.hidden_states(ids).sum()  # gradients on: SDPA
    assert len(calls) == 4


def test_sdpa_and_the_kernel_agree_on_eval_scores():
    """The scorer (which runs its forwards inside flash_attention_in) against a plain log-softmax of full logits."""
    from lmforge.eval.scoring import Group, Scorer

    model = _tiny()

    class Tok:
        def encode(self, s):
            return [ord(c) % 200 for c in s]

    sc = Scorer(model, Tok())
    ctx = list(range(1, 60))
    groups = [Group(ctx, [[5], [7, 8]]), Group(ctx[:45], [[9]])]
    got = sc.score(groups)
    with torch.inference_mode():
        for g, row in zip(groups, got, strict=True):
            for cont, lp in zip(g.continuations, row, strict=True):
                x = torch.tensor([g.context + cont[:-1]])
                logp = torch.log_softmax(model(x)[0], -1)
                want = sum(float(logp[len(g.context) - 1 + i, t]) for i, t in enumerate(cont))
                assert abs(lp - want) < 1e-4


def test_engine_prefill_of_long_prompts_runs_the_kernel(monkeypatch):
    """A prompt over the C step's prefill rows goes through the decoder with lmf_flash (counted), one or several
    at once; the logits and the cache's next step equal those of a plain forward."""
    from lmforge.infer import engine as E

    model = _tiny(block_size=512)
    calls = []
    real = native.flash_attention

    def counted(*a):
        out = real(*a)
        calls.append(out is not None)  # None: left to SDPA
        return out

    monkeypatch.setattr(native, "flash_attention", counted)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, 200, (E.NATIVE_PREFILL_ROWS + 20,), generator=g).tolist(), torch.randint(
        1, 200, (E.NATIVE_PREFILL_ROWS + 7,), generator=g).tolist()
    runner = E.SlotRunner(model, 2)
    first = runner.prefill(0, a)
    assert calls == [True] * model.cfg.n_layer
    both = runner.prefill_many([0, 1], [a, b])  # one forward of both
    assert calls == [True] * 2 * model.cfg.n_layer
    step = runner.decode([5, 6])
    with torch.inference_mode():
        for logits, ids, nxt, row in ((first, a, 5, 0), (both[0], a, 5, 0), (both[1], b, 6, 1)):
            want = model(torch.tensor([ids + [nxt]]))[0]
            torch.testing.assert_close(logits, want[-2], rtol=0, atol=1e-4)
            if logits is not first:
                torch.testing.assert_close(step[row], want[-1], rtol=0, atol=1e-4)
