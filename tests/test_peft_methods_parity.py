"""Prefix tuning, prompt tuning and P-tuning against ``peft`` on the same weights: the base is exported with
lmforge's transformers export; adapters saved by lmforge load into ``peft.PeftModel`` and adapters saved by
``peft`` load into lmforge, with the same logits (<= 1e-4), on tiny LLaMA (grouped-query) and GPT-2 bases."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.interop.hf import config_from_hf, write_hf_dir
from lmforge.model import Decoder
from lmforge.peft import prefix, prompt, ptuning
from lmforge.peft.base import get_adapter_params

T = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
st = pytest.importorskip("safetensors.torch")

V = 101
TOL = 1e-4


def hf_config(kind: str):
    if kind == "llama":
        return T.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return T.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def base(request, tmp_path_factory):
    """(lmforge base factory, exported transformers directory)."""
    kind = request.param
    cfg, _ = config_from_hf(hf_config(kind).to_dict())
    torch.manual_seed(0)
    model = Decoder(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp(f"base-{kind}")
    write_hf_dir(out, cfg, sd)

    def fresh() -> Decoder:
        m = Decoder(cfg)
        m.load_state_dict(sd)
        return m.eval()

    return fresh, out


def hf_model(path):
    return T.AutoModelForCausalLM.from_pretrained(path).eval()


def x_ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(4))


def peft_logits(pm, x: torch.Tensor, n_virtual: int, soft: bool) -> torch.Tensor:
    with torch.no_grad():
        out = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits
    return out[:, n_virtual:] if soft else out


LM_OPTS = {
    "prefix": (prefix, {"num_virtual_tokens": 5}, False),
    "prefix-mlp": (prefix, {"num_virtual_tokens": 5, "prefix_projection": True, "encoder_hidden_size": 16}, False),
    "prompt": (prompt, {"num_virtual_tokens": 6}, True),
    "ptuning-mlp": (ptuning, {"num_virtual_tokens": 4}, True),
    "ptuning-lstm": (ptuning, {"num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM",
                               "encoder_hidden_size": 12}, True),
}


def save_lmforge(model, mod, resolved, path, base_path) -> None:
    config, tensors = mod.to_peft(model, resolved)
    config["base_model_name_or_path"] = str(base_path)
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    st.save_file(tensors, str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", list(LM_OPTS))
def test_lmforge_adapter_loads_into_peft(base, method, tmp_path):
    fresh, base_dir = base
    mod, opts, soft = LM_OPTS[method]
    model = fresh()
    torch.manual_seed(2)
    resolved = mod.apply(model, opts)
    with torch.no_grad():
        for p in get_adapter_params(model).values():
            p.add_(torch.randn_like(p) * 0.2)
    save_lmforge(model, mod, resolved, tmp_path / "adapter", base_dir)
    pm = peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "adapter").eval()
    x = x_ids()
    with torch.no_grad():
        ours = model(x)
        base_logits = fresh()(x)
    theirs = peft_logits(pm, x, resolved["num_virtual_tokens"], soft)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter changes the model
    assert (ours - theirs).abs().max() <= TOL


def peft_config(method: str):
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), False
    if method == "prefix-mlp":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True,
                                       encoder_hidden_size=16), False
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6), True
    kind = "LSTM" if method == "ptuning-lstm" else "MLP"
    return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=12,
                                    encoder_reparameterization_type=kind), True


@pytest.mark.parametrize("method", list(LM_OPTS))
def test_peft_adapter_loads_into_lmforge(base, method, tmp_path):
    fresh, base_dir = base
    config, soft = peft_config(method)
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf_model(base_dir), config)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tensors = st.load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    mod = LM_OPTS[method][0]
    model = fresh()
    resolved = mod.from_peft(model, cfg, tensors)
    x = x_ids()
    n = resolved["num_virtual_tokens"]
    with torch.no_grad():
        ours = model(x)
        assert (ours - fresh()(x)).abs().max() > 1e-2  # the adapter changes the model
    assert (ours - peft_logits(pm, x, n, soft)).abs().max() <= TOL
    assert pm.peft_config["default"].num_virtual_tokens == n


@pytest.mark.parametrize("method", ["prefix-mlp", "ptuning-mlp", "ptuning-lstm"])
def test_reparameterised_encoders_match_peft_while_training(base, method):
    """lmforge's prefix MLP and P-tuning encoders, given PEFT's encoder weights (same parameter names), produce
    PEFT's virtual tokens (the unfolded training-time forward)."""
    fresh, base_dir = base
    config, soft = peft_config(method)
    torch.manual_seed(5)
    pm = peft.get_peft_model(hf_model(base_dir), config)
    mod, opts, _ = LM_OPTS[method]
    model = fresh()
    mod.apply(model, {**opts, "encoder_hidden_size": 16 if method == "prefix-mlp" else 12})
    theirs = {k.replace("embedding.weight", "embedding") if method == "prefix-mlp" else k: v
              for k, v in pm.prompt_encoder["default"].state_dict().items()}
    hook = model.kv_prefix if method == "prefix-mlp" else model.soft_prompt
    hook.load_state_dict(theirs)
    pm.eval()
    x = x_ids()
    with torch.no_grad():
        ours = model(x)
    assert (ours - peft_logits(pm, x, opts["num_virtual_tokens"], soft)).abs().max() <= TOL
