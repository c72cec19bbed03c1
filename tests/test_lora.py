"""LoRA and QLoRA: the forward against the formula, targets (fused q/k/v and gate/up slices, HF names), merge and
unmerge, gradients, NF4 against its definition, QLoRA gradients through the 4-bit base, KV-cache decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Decoder
from lmforge.peft import METHODS, apply_peft, load_adapter, lora, merge_adapter, save_adapter, unmerge_adapter
from lmforge.peft.base import count_params, disable_adapter, get_adapter_params
from lmforge.peft.lora import LoRALinear, lora_layers, parse_targets, row_slices, unwrap
from lmforge.quant.modules import QuantLinear
from lmforge.quant.nf4 import BLOCK, NF4_CODE, NF4Linear, dequantize_nf4, quantize_nf4

V = 97


def tiny(**kw) -> Decoder:
    """A small LLaMA-shaped decoder (GQA, SwiGLU, untied or tied head) with random weights."""
    base = dict(family="llama", vocab_size=V, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                mlp="swiglu", intermediate_size=48, norm="rmsnorm", position="rope", tie_embeddings=False,
                qkv_bias=False, attn_out_bias=False, mlp_bias=False, lm_head_bias=False, init_std=0.1)
    base.update(kw)
    torch.manual_seed(0)
    return Decoder(ModelConfig(**base)).eval()


def randomize_b(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in get_adapter_params(model).items():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def ids(b=2, t=11, seed=5):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_tiny_config_is_what_the_tests_assume():
    m = tiny()
    assert m.cfg.kv_heads == 2 and m.cfg.gated and m.blocks[0].attn.qkv.out_features == (4 + 2 * 2) * 8


# ---- forward formula --------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_matches_formula_on_slices(rslora):
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True)
    r, alpha = 4, 8.0
    s = alpha / math.sqrt(r) if rslora else alpha / r
    m = LoRALinear(base, {"a": (0, 4, r, s), "c": (8, 12, r, s)})
    with torch.no_grad():
        for n in ("a", "c"):
            m.lora_B[n].normal_()
    x = torch.randn(3, 5, 16)
    want = F.linear(x, base.weight, base.bias).clone()
    want[..., 0:4] += s * x @ m.lora_A["a"].T @ m.lora_B["a"].T
    want[..., 8:12] += s * x @ m.lora_A["c"].T @ m.lora_B["c"].T
    torch.testing.assert_close(m(x), want, rtol=0, atol=1e-5)
    assert s == pytest.approx(alpha / (math.sqrt(r) if rslora else r))


def test_init_is_peft_s_kaiming_a_and_zero_b():
    m = LoRALinear(nn.Linear(400, 30), {"x": (0, 30, 64, 2.0)})
    a, b = m.lora_A["x"].detach(), m.lora_B["x"].detach()
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)): sqrt(6 / ((1 + 5) fan_in))
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(b) == 0
    x = torch.randn(2, 400)
    torch.testing.assert_close(m(x), m.base(x))  # starts as the base model


def test_dropout_applies_to_the_input_of_the_update_only():
    torch.manual_seed(0)
    m = LoRALinear(nn.Linear(8, 6, bias=False), {"x": (0, 6, 2, 1.0)}, dropout=0.5).train()
    with torch.no_grad():
        m.lora_B["x"].normal_()
    x = torch.randn(4, 8)
    torch.manual_seed(7)
    y = m(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, True)
    want = x @ m.base.weight.T + xd @ m.lora_A["x"].T @ m.lora_B["x"].T
    torch.testing.assert_close(y, want, rtol=0, atol=1e-6)


# ---- targets ------------------------------------------------------------------------------------


def test_targets_in_lmforge_and_hf_names_choose_the_same_slices():
    cfg = tiny().cfg
    nq, nkv, h = 32, 16, 48
    assert row_slices(cfg, "blocks.0.attn.qkv", parse_targets("q,v")) == {"q": (0, nq), "v": (nq + nkv, nq + 2 * nkv)}
    assert parse_targets("q_proj,v_proj") == parse_targets("q,v")
    assert parse_targets(["gate_proj", "up_proj", "down_proj", "o_proj"]) == {"gate", "up", "fc2", "proj"}
    assert parse_targets("c_attn,c_proj,c_fc") == {"qkv", "proj", "fc2", "fc1"}
    assert parse_targets("query_key_value,dense,dense_h_to_4h,dense_4h_to_h") == {"qkv", "proj", "fc1", "fc2"}
    assert row_slices(cfg, "blocks.1.mlp.fc1", parse_targets("up")) == {"up": (h, 2 * h)}
    assert row_slices(cfg, "blocks.1.mlp.fc1", parse_targets("fc1")) == {"fc1": (0, 2 * h)}
    # all-linear cuts as transformers' LLaMA does: q, k, v, o, gate, up, down (not lm_head, as PEFT)
    allp = parse_targets("all-linear")
    assert set(row_slices(cfg, "blocks.0.attn.qkv", allp)) == {"q", "k", "v"}
    assert set(row_slices(cfg, "blocks.0.mlp.fc1", allp)) == {"gate", "up"}
    assert row_slices(cfg, "lm_head", allp) == {}
    with pytest.raises(LMForgeError, match="unknown module 'qq_proj'"):
        parse_targets("q,qq_proj")
    with pytest.raises(LMForgeError, match="already includes"):
        row_slices(cfg, "blocks.0.attn.qkv", parse_targets("qkv,q"))


def test_apply_q_v_adapts_only_q_and_v_rows():
    m = tiny()
    x = ids()
    with torch.no_grad():
        ref_qkv = m.blocks[0].attn.qkv(m.wte(x))
    opts = apply_peft(m, "lora", {"targets": "q,v", "r": 4})
    assert opts["r"] == 4 and opts["alpha"] == 16.0 and opts["dropout"] == 0.05
    assert set(lora_layers(m)) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    randomize_b(m)
    with torch.no_grad():
        y = m.blocks[0].attn.qkv(m.wte(x))
    assert (y[..., 32:48] - ref_qkv[..., 32:48]).abs().max() == 0  # k rows untouched
    assert (y[..., :32] - ref_qkv[..., :32]).abs().max() > 1e-3
    assert (y[..., 48:] - ref_qkv[..., 48:]).abs().max() > 1e-3
    trainable, total = count_params(m)
    assert trainable == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))  # 2 layers x (q: A, B; v: A, B)
    assert all(p.requires_grad == (".lora_" in n) for n, p in m.named_parameters())


def test_apply_peft_rejects_unknown_options_and_methods():
    with pytest.raises(LMForgeError, match=r"peft\.rank: not an option of lora"):
        apply_peft(tiny(), "lora", {"rank": 4})
    with pytest.raises(LMForgeError, match="--peft 'dora'"):
        apply_peft(tiny(), "dora", {})
    with pytest.raises(LMForgeError, match=r"peft\.r 0"):
        apply_peft(tiny(), "lora", {"r": 0})
    assert set(METHODS) >= {"lora", "qlora"}
    for mod in METHODS.values():
        assert isinstance(mod.DEFAULTS, dict) and mod.SUGGESTED_LR > 0


# ---- merge, disable, gradients, decoding ---------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_merge_unmerge_and_disable(tied):
    m = tiny(tie_embeddings=tied)
    x = ids()
    with torch.no_grad():
        base = m(x)
    apply_peft(m, "lora", {"targets": "all-linear,lm_head", "rslora": True})
    randomize_b(m, std=0.05)
    with torch.no_grad():
        adapted = m(x)
        assert (adapted - base).abs().max() > 1e-2
        with disable_adapter(m):
            torch.testing.assert_close(m(x), base, rtol=0, atol=1e-6)
        emb = m.wte.weight.clone()
        merge_adapter(m)
        assert all(layer.merged for layer in lora_layers(m).values())
        torch.testing.assert_close(m(x), adapted, rtol=0, atol=1e-5)
        torch.testing.assert_close(m.wte.weight, emb, rtol=0, atol=0)  # a tied head was untied, not merged into
        with disable_adapter(m):
            torch.testing.assert_close(m(x), base, rtol=0, atol=1e-5)
        unmerge_adapter(m)
        torch.testing.assert_close(m(x), adapted, rtol=0, atol=1e-5)
        with disable_adapter(m):
            torch.testing.assert_close(m(x), base, rtol=0, atol=1e-5)
        unwrap(m)
        assert not lora_layers(m) and type(m.blocks[0].attn.qkv) is nn.Linear
        torch.testing.assert_close(m(x), adapted, rtol=0, atol=1e-5)


def test_new_adapters_on_an_adapted_model_start_from_it_and_disabled_give_it(tmp_path):
    """An adapter directory loaded as the model (SFT's output as DPO's start) is folded in before new adapters:
    the new model computes the fine-tuned one, and so does its reference (adapters disabled); a chain of saved
    adapters loads back; adapters that cannot merge are refused."""
    m, x = tiny(), ids()
    apply_peft(m, "lora", {"targets": "all-linear"})
    randomize_b(m, std=0.05)
    save_adapter(m, tmp_path / "sft", "base", {"method": "lora", **lora.resolve({"targets": "all-linear"})}, "lora")
    with torch.no_grad():
        tuned = m(x)
        with disable_adapter(m):
            base_out = m(x)
    assert (tuned - base_out).abs().max() > 1e-2
    apply_peft(m, "lora", {"targets": "q,v"})
    layers = lora_layers(m)
    assert set(layers) == {f"blocks.{i}.attn.qkv" for i in range(2)}  # only the new adapters remain
    randomize_b(m, seed=3, std=0.05)
    with torch.no_grad():
        with disable_adapter(m):
            torch.testing.assert_close(m(x), tuned, rtol=0, atol=1e-5)
        dpo = m(x)
    assert (dpo - tuned).abs().max() > 1e-2
    save_adapter(m, tmp_path / "dpo", "base", {"method": "lora", **lora.resolve({"targets": "q,v"})}, "lora")
    again = tiny()
    load_adapter(again, tmp_path / "sft")
    load_adapter(again, tmp_path / "dpo")
    with torch.no_grad():
        torch.testing.assert_close(again(x), dpo, rtol=0, atol=1e-5)
    p = tiny()
    apply_peft(p, "prefix", {"num_virtual_tokens": 2})
    with pytest.raises(LMForgeError, match="cannot be merged"):
        apply_peft(p, "lora")


def test_gradients_reach_only_the_adapter_and_training_lowers_the_loss():
    m = tiny()
    apply_peft(m, "lora", {"targets": "q,v,gate,up,fc2", "r": 4, "dropout": 0.0})
    x = ids(4, 16)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    m.train()
    for _ in range(15):
        logits = m(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if not losses:
            grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
            assert grads and all(".lora_" in n for n in grads)
            assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)
            assert all(g.abs().sum() == 0 for n, g in grads.items() if ".lora_A." in n)  # B = 0 at the start
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_kv_cache_generation_equals_full_forward(method):
    m = tiny()
    apply_peft(m, method, {"targets": "all-linear", "r": 4})
    randomize_b(m, std=0.5)
    m.eval()
    prompt = [3, 14, 15, 9, 26]
    out = generate(m, prompt, SamplingParams(max_new_tokens=12, temperature=0.0))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


# ---- NF4 and QLoRA -----------------------------------------------------------------------------


def test_nf4_code_book_is_the_normal_quantile_construction():
    # QLoRA appendix E / bitsandbytes create_normal_map(offset=0.9677083): 8 positive quantiles of N(0,1) between
    # offset and 1/2, 7 negative ones, and zero; normalised by the largest
    icdf = torch.distributions.Normal(0.0, 1.0).icdf
    off = 0.9677083
    pos = icdf(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1].float())
    neg = -icdf(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1].float())
    v = torch.cat([pos, torch.zeros(1), neg]).sort().values
    v = v / v.abs().max()
    torch.testing.assert_close(v, NF4_CODE, rtol=0, atol=2e-6)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_quantize_rounds_each_block_to_the_nearest_level(double_quant):
    torch.manual_seed(0)
    w = torch.randn(48, 40)  # 1920 values: 30 blocks of 64
    t = quantize_nf4(w, double_quant)
    back = dequantize_nf4(t, (48, 40))
    blocks = w.reshape(-1, BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True)
    ref = NF4_CODE[(blocks / absmax).unsqueeze(-1).sub(NF4_CODE).abs().argmin(-1)] * absmax  # nearest, brute force
    if double_quant:
        assert t["absmax_q"].dtype == torch.int8 and "absmax" not in t
        rel = ((back.reshape(-1, BLOCK) - ref).abs() / absmax).max()
        assert rel < 0.01  # absmax stored in 8 bits: 1 % at most
    else:
        torch.testing.assert_close(back.reshape(-1, BLOCK), ref, rtol=0, atol=1e-6)
    bits = sum(v.numel() * v.element_size() * 8 for v in t.values()) / w.numel()
    assert bits < (4.3 if double_quant else 4.6)


@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_qlora_gradients_flow_through_the_dequantized_base(quant):
    m = tiny()
    x = ids(2, 12)
    opts = apply_peft(m, "qlora", {"quant": quant, "targets": "q,v,fc2", "r": 4, "dropout": 0.0})
    assert opts["quant"] == quant
    kinds = {type(mod) for mod in m.modules()}
    assert (NF4Linear if quant == "nf4" else QuantLinear) in kinds and nn.Linear not in {
        type(getattr(b, n)) for blk in m.blocks for b, n in ((blk.attn, "proj"), (blk.mlp, "fc1"))}
    assert not any(p.requires_grad for n, p in m.named_parameters() if ".lora_" not in n)
    assert all(b.dtype in (torch.uint8, torch.int8) for n, b in m.named_buffers() if n.endswith(("code", "qweight")))
    randomize_b(m, std=0.3)
    # the reference: the same model with every 4-bit layer replaced by a float layer holding its dequantized weight
    ref_layers = {}
    for name, mod in m.named_modules():
        if isinstance(mod, (NF4Linear, QuantLinear)):
            ref_layers[name] = mod.dequantize()
    m.train()
    loss = F.cross_entropy(m(x[:, :-1]).reshape(-1, V), x[:, 1:].reshape(-1))
    loss.backward()
    ref = Decoder(m.cfg)
    sd = {}
    for name, w in ref_layers.items():
        sd[name.replace(".base", "") + ".weight"] = w
    for k, v in m.state_dict().items():
        if ".lora_" not in k and not k.endswith(("code", "absmax", "absmax_q", "dq_scale", "dq_mean", "qweight",
                                                 "scales", "zeros")):
            sd[k.replace(".base.", ".")] = v
    ref.load_state_dict(sd)
    apply_peft(ref, "lora", {"targets": "q,v,fc2", "r": 4, "dropout": 0.0})
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(get_adapter_params(m).items(), get_adapter_params(ref).items()):
            assert n1 == n2
            p2.copy_(p1)
    ref.train()
    loss_ref = F.cross_entropy(ref(x[:, :-1]).reshape(-1, V), x[:, 1:].reshape(-1))
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) < 1e-5
    for (n1, p1), (_, p2) in zip(get_adapter_params(m).items(), get_adapter_params(ref).items()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=n1)
        assert p1.grad.abs().sum() > 0


def test_qlora_base_is_several_times_smaller_than_float():
    m = tiny(n_embd=128, n_head=4, n_kv_head=4, intermediate_size=256)
    lin = [mod for n, mod in m.named_modules() if n.startswith("blocks.") and isinstance(mod, nn.Linear)]
    float_bytes = sum(mod.weight.numel() * 4 for mod in lin)
    apply_peft(m, "qlora", {})
    q = [mod for mod in m.modules() if isinstance(mod, NF4Linear)]
    q_bytes = sum(b.numel() * b.element_size() for mod in q for b in mod.buffers())
    assert len(q) == len(lin) and float_bytes / q_bytes > 7


def test_qlora_adapter_save_load_merge(tmp_path):
    m = tiny()
    x = ids()
    opts = apply_peft(m, "qlora", {"targets": "q,k,v,proj", "r": 4, "double_quant": False})
    randomize_b(m)
    with torch.no_grad():
        want = m(x)
    save_adapter(m, tmp_path / "ad", "base", opts, "qlora")
    fresh = tiny()
    got_opts = load_adapter(fresh, tmp_path / "ad")
    assert got_opts["method"] == "qlora" and got_opts["double_quant"] is False
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=1e-5)
        unwrap(fresh)  # dequantize, merge, plain float layers
        assert not any(isinstance(mod, (NF4Linear, LoRALinear)) for mod in fresh.modules())
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=1e-4)


def test_lora_on_a_quantized_checkpoint_trains_and_merges_to_float(tmp_path):
    from lmforge.quant import QuantConfig, load_quantized, quantize_model, save_quantized, set_compute

    m = tiny(tie_embeddings=True)
    quantize_model(m, QuantConfig(bits=4, group_size=32, method="rtn"))  # int4 blocks, int8 tied embedding + head
    save_quantized(m, tmp_path / "q")
    q = load_quantized(tmp_path / "q")
    apply_peft(q, "lora", {"targets": "q,v,lm_head", "r": 4, "dropout": 0.0})
    randomize_b(q, std=0.05)
    x = ids()
    q.train()
    loss = F.cross_entropy(q(x[:, :-1]).reshape(-1, V), x[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in get_adapter_params(q).values())
    q.eval()
    set_compute(q, "dequant")  # exact float32 (the packed bfloat16 kernels differ from it by ~3e-3)
    with torch.no_grad():
        want = q(x)
        unwrap(q)
        assert not any(isinstance(mod, (QuantLinear, LoRALinear)) for mod in q.modules())
        assert type(q.wte) is nn.Embedding and not q.cfg.tie_embeddings  # the adapted head got its own weight
        torch.testing.assert_close(q(x), want, rtol=0, atol=1e-4)
