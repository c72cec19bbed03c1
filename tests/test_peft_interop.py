"""LoRA adapters interoperate with Hugging Face peft: lmforge's adapter files load with ``PeftModel.from_pretrained``
on the transformers export of the base and give lmforge's logits; adapters made by ``peft`` load into lmforge and give
peft's logits. LLaMA-family (q/k/v and gate/up are slices of lmforge's fused layers) and GPT-2-family bases (HF's own
fused Conv1D c_attn, fan_in_fan_out), plus NeoX/BLOOM/Falcon (per-head interleaved query_key_value)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import build_model, load_model
from lmforge.errors import LMForgeError
from lmforge.interop.hf import config_from_hf, state_dict_from_hf, write_hf_dir
from lmforge.peft import apply_peft, is_adapter_dir, load_adapter, save_adapter
from lmforge.peft.base import get_adapter_params
from lmforge.peft.lora import lora_layers

T = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = 101
TOL = 1e-4
SMOLLM2 = Path(os.path.expanduser("~/.cache/lmforge/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def hf_config(name: str):
    return {
        "llama-gqa": lambda: T.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64),
        "llama-tied": lambda: T.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                                            tie_word_embeddings=True),
        "gpt2": lambda: T.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64),
        "bloom": lambda: T.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4),
        "falcon-gqa": lambda: T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                                             max_position_embeddings=64),
    }[name]()


def make_base(name: str, tmp: Path):
    """(lmforge model, HF export dir) with random weights away from the default init."""
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(hf_config(name)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg, arch = config_from_hf(hf.config.to_dict())
    model = build_model(cfg, state_dict_from_hf(hf.state_dict(), cfg, arch, name), name)
    write_hf_dir(tmp / "hf", model.cfg, dict(model.state_dict()))  # lmforge's own export of the base
    return model, tmp / "hf"


def randomize_b(params: dict[str, torch.nn.Parameter], seed: int = 1, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in params.items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def ids(seed: int = 3):
    return torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_dir: Path, adapter: Path, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    base = T.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    pm = peft.PeftModel.from_pretrained(base, adapter).eval().to(dtype)
    with torch.no_grad():
        return pm(x).logits


CASES = [
    ("llama-gqa", "q,v", {}),
    ("llama-gqa", "all-linear", {"rslora": True}),
    ("llama-gqa", "qkv,fc1,proj", {}),  # one A shared by q/k/v (and gate/up): exported as per-module copies
    ("llama-tied", "q_proj,down_proj,lm_head", {}),
    ("gpt2", "c_attn,c_fc", {}),
    ("gpt2", "q,v,proj", {}),  # two slices inside HF's fused c_attn: ranks stacked, rank_pattern
    ("gpt2", "all-linear", {"alpha": 4}),
    ("gpt_neox", "all-linear", {}),
    ("bloom", "qkv,fc2", {}),
    ("falcon-gqa", "q,k,fc1", {}),
]


@pytest.mark.parametrize("name,targets,extra", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_lmforge_adapter_loads_in_peft_with_the_same_logits(name, targets, extra, tmp_path):
    model, hf_dir = make_base(name, tmp_path)
    x = ids()
    with torch.no_grad():
        base = model(x)
    resolved = apply_peft(model, "lora", {"targets": targets, "r": 4, "dropout": 0.1, **extra})
    randomize_b(get_adapter_params(model))
    model.eval()
    with torch.no_grad():
        ours = model(x)
    assert (ours - base).abs().max() > 1e-2  # the adapter does something
    save_adapter(model, tmp_path / "adapter", str(hf_dir), resolved)
    assert is_adapter_dir(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(hf_dir)
    assert cfg["fan_in_fan_out"] == (name == "gpt2")
    theirs = hf_logits(hf_dir, tmp_path / "adapter", x)
    assert (ours - theirs).abs().max().item() <= TOL
    # and back into a fresh lmforge base
    fresh = load_model(hf_dir)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert (fresh.eval()(x) - ours).abs().max().item() <= 1e-5


PEFT_CASES = [
    ("llama-gqa", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {}),
    ("llama-gqa", ["q_proj", "v_proj"], {"use_rslora": True, "rank_pattern": {"v_proj": 2},
                                        "alpha_pattern": {"layers.1.self_attn.q_proj": 3.0}}),
    ("llama-tied", "all-linear", {}),
    ("gpt2", ["c_attn", "c_proj"], {"fan_in_fan_out": True}),
    ("gpt_neox", ["query_key_value", "dense_4h_to_h"], {}),
    ("llama-gqa", ["q_proj", "lm_head"], {}),  # peft also saves lm_head's base weight (save_embedding_layers)
]


@pytest.mark.parametrize("name,targets,extra", PEFT_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(PEFT_CASES)])
def test_peft_made_adapter_loads_in_lmforge_with_the_same_logits(name, targets, extra, tmp_path):
    _, hf_dir = make_base(name, tmp_path)
    base = T.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    lc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **extra)
    pm = peft.get_peft_model(base, lc)
    randomize_b(dict(pm.named_parameters()), seed=4)
    pm.eval()
    x = ids(7)
    with torch.no_grad():
        theirs = pm(x).logits
    pm.save_pretrained(tmp_path / "peft_adapter")
    model = load_model(hf_dir)
    resolved = load_adapter(model, tmp_path / "peft_adapter")
    assert resolved["method"] == "lora"
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    with torch.no_grad():
        ours = model.eval()(x)
    assert (ours - theirs).abs().max().item() <= TOL
    n_peft = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    n_ours = sum(p.numel() for p in get_adapter_params(model).values())
    assert n_ours == n_peft  # the same modules adapted, at the same ranks


def test_peft_copy_of_a_changed_base_layer_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _, hf_dir = make_base("llama-gqa", tmp_path)
    pm = peft.get_peft_model(T.AutoModelForCausalLM.from_pretrained(hf_dir),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    pm.save_pretrained(tmp_path / "ad")
    f = tmp_path / "ad" / "adapter_model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("lm_head.base_layer.weight"))
    sd[key] = sd[key] + 1.0
    save_file(sd, f)
    with pytest.raises(LMForgeError, match="is a changed copy of the base's lm_head weight"):
        load_adapter(load_model(hf_dir), tmp_path / "ad")


def test_bad_adapters_give_one_line_errors(tmp_path):
    model, hf_dir = make_base("llama-gqa", tmp_path)
    with pytest.raises(LMForgeError, match="not an adapter directory"):
        load_adapter(model, tmp_path)
    d = tmp_path / "ad"
    resolved = apply_peft(model, "lora", {"targets": "q"})
    save_adapter(model, d, None, resolved)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LMForgeError, match="use_dora=True is not supported"):
        load_adapter(load_model(hf_dir), d)
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(LMForgeError, match="peft_type='IA3'"):
        load_adapter(load_model(hf_dir), d)
    # values PEFT would refuse or that break the weights (a NaN alpha merged into NaN weights with exit 0), named
    # with the adapter's own path
    for change, says in [({"lora_alpha": float("nan")}, "lora_alpha=nan: must be a finite number"),
                         ({"r": 0}, "r=0: must be an integer >= 1"), ({"r": 2.5}, "r=2.5: must be an integer"),
                         ({"lora_dropout": 1.0}, "lora_dropout=1.0: must be in [0, 1)"),
                         ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern['q_proj']=inf"),
                         ({"target_modules": ["nonexistent_proj"]}, "target_modules=['nonexistent_proj'] does not "
                          "name model.layers.0.self_attn.q_proj"),
                         ({"target_modules": "q_proj"}, "target_modules='q_proj' does not name"),
                         ({"r": 4}, "q_proj's lora_A has rank 8; adapter_config.json says r=4")]:
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(LMForgeError) as e:
            load_adapter(load_model(hf_dir), d)
        assert str(e.value).startswith(str(d) + "/adapter_") and says in str(e.value), (change, str(e.value))
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": r".*\.q_proj"}))  # a regex
    load_adapter(load_model(hf_dir), d)


def test_lmforge_layout_for_bases_without_a_transformers_equivalent(tmp_path):
    from lmforge.model import Decoder
    from lmforge.presets import get_preset

    cfg = get_preset("tiny-llama")
    cfg.parallel_block, cfg.n_layer = True, 2  # PaLM-style parallel block with separate norms: no HF twin here
    cfg.parallel_shared_norm = False
    cfg.rope_interleaved = True
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    resolved = apply_peft(model, "lora", {"targets": "q,v,fc2", "r": 2})
    randomize_b(get_adapter_params(model))
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        want = model(x)
    save_adapter(model, tmp_path / "ad", None, resolved)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["peft_type"] == "LMFORGE"
    torch.manual_seed(0)
    fresh = Decoder(cfg).eval()
    load_adapter(fresh, tmp_path / "ad")
    with torch.no_grad():
        assert (fresh(x) - want).abs().max().item() <= 1e-6
    with pytest.raises(LMForgeError, match="PEFT format"):
        save_adapter(model, tmp_path / "ad2", None, resolved, fmt="peft")
    llama, hf_dir = make_base("llama-gqa", tmp_path)  # a PEFT-format adapter of another model on this base
    save_adapter(llama, tmp_path / "ad3", str(hf_dir), apply_peft(llama, "lora", {"targets": "q"}))
    with pytest.raises(LMForgeError) as e:  # said "PEFT adapter: the base has no transformers equivalent (cannot
        load_adapter(Decoder(cfg), tmp_path / "ad3")  # export ...)", naming neither the adapter nor its base
    assert str(e.value).startswith(f"{tmp_path / 'ad3'}: not an adapter for this base model (it was made for {hf_dir})")


@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"{SMOLLM2} absent (scripts/fetch_smollm2.sh)")
def test_smollm2_lora_adapter_matches_peft(tmp_path):
    model = load_model(SMOLLM2)
    write_hf_dir(tmp_path / "hf", model.cfg, dict(model.state_dict()))
    resolved = apply_peft(model, "lora", {"targets": "q,v", "r": 4})
    randomize_b(get_adapter_params(model), std=0.02)
    assert len(lora_layers(model)) == model.cfg.n_layer
    model.eval()
    x = torch.tensor([[1, 504, 3458, 28, 2088, 314, 253, 1789]])
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "hf"), resolved)
    with torch.no_grad():  # in float64: 30 layers' float32 rounding alone reached 0.9-1.3e-4 of logits up to 22
        ours = model.double()(x)
    theirs = hf_logits(tmp_path / "hf", tmp_path / "adapter", x, torch.float64)
    assert (ours - theirs).abs().max().item() <= TOL
