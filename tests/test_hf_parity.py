"""Logits parity with Hugging Face transformers (random weights, fp32), KV-cache decoding, import/export round trips."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from lmforge.assets import STORIES260K
from lmforge.checkpoint import build_model, load_checkpoint, load_model, save_checkpoint
from lmforge.errors import LMForgeError
from lmforge.interop.hf import config_from_hf, state_dict_from_hf, write_hf_dir
from lmforge.model import Decoder, KVCache
from lmforge.tokenizer import load_tokenizer
from lmforge.tokenizer.char import CharTokenizer

T = pytest.importorskip("transformers")

V = 101
TOL = 1e-4


def hf_configs() -> dict:
    return {
        "openai-gpt": T.OpenAIGPTConfig(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4),
        "gpt2": T.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4),
        "gpt_neox": T.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64),
        "gptj": T.GPTJConfig(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
        "falcon": T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 multi_query=True, parallel_attn=True, max_position_embeddings=64),
        "falcon-gqa": T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_kv_heads=2, new_decoder_architecture=True, max_position_embeddings=64),
        "bloom": T.BloomConfig(vocab_size=V, hidden_size=36, n_layer=2, n_head=6),  # 6 heads: non-power-of-2 ALiBi
        "llama": T.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64),
        "llama-gqa": T.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                   rope_theta=500000.0),
        "qwen2": T.Qwen2Config(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64),
        "glm": T.GlmConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, head_dim=8, pad_token_id=0,
                           max_position_embeddings=64),
    }


CASES = list(hf_configs())


def make_pair(name: str):
    torch.manual_seed(0)
    hf_cfg = hf_configs()[name]
    hf = T.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # move away from the zero biases / unit norms of the default init
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg, arch = config_from_hf(hf_cfg.to_dict())
    model = build_model(cfg, state_dict_from_hf(hf.state_dict(), cfg, arch, name), name)
    return hf, model


@pytest.mark.parametrize("name", CASES)
def test_logits_parity_full_and_cached(name):
    hf, model = make_pair(name)
    x = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
        assert (model(x) - ref).abs().max().item() <= TOL
        cache = KVCache(model.cfg, 2, 32)
        steps = [model(x[:, :6], cache=cache), model(x[:, 6:9], cache=cache)]  # prefill, then a 3-token chunk
        steps += [model(x[:, i : i + 1], cache=cache) for i in range(9, 13)]  # then one token at a time
        assert (torch.cat(steps, 1) - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", CASES)
def test_export_loads_in_transformers(name, tmp_path):
    hf, model = make_pair(name)
    write_hf_dir(tmp_path / "hf", model.cfg, {k: v for k, v in model.state_dict().items()})
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, V, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (reloaded(x).logits - hf(x).logits).abs().max().item() <= TOL
    # and back: HF dir -> lmforge through the generic loader
    again = load_model(tmp_path / "hf")
    with torch.no_grad():
        assert (again(x) - model(x)).abs().max().item() == 0.0


def test_converted_model_names_its_tokenizers_special_tokens(tmp_path):
    """Found by an audit: a tiny-llama trained with its own byte-level tokenizer (eos 0, no bos) was exported with
    the LLaMA preset's bos 1 / eos 2, so transformers' generate stopped at token 2 (a '"') and never at the end of a
    text. And llama2.c's tokenizer was written in its own format only, which transformers cannot read."""
    from lmforge.presets import get_preset
    from lmforge.tokenizer.train import train_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. The cat sat on a mat.\n" * 50)
    tok = train_tokenizer([str(text)], 300, "bytelevel-bpe", str(tmp_path / "tok"))
    cfg = get_preset("tiny-llama", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=4, n_kv_head=2,
                     block_size=32)
    assert (cfg.bos_id, cfg.eos_id) == (1, 2) and tok.eos_id == 0 and tok.bos_id is None
    save_checkpoint(Decoder(cfg), tmp_path / "ck", tok)
    r = subprocess.run([sys.executable, "-m", "lmforge", "convert", "--from", "lmforge", str(tmp_path / "ck"), "--to",
                        "hf", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert conf["eos_token_id"] == gen["eos_token_id"] == 0
    assert conf["bos_token_id"] is None and "bos_token_id" not in gen
    assert T.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token_id == 0
    # llama2.c's tokenizer (the bundled stories260K) gets a tokenizer.json: the same ids in transformers
    r = subprocess.run([sys.executable, "-m", "lmforge", "convert", "--from", "llama2c", str(STORIES260K), "--to",
                        "hf", str(tmp_path / "s")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    ours, theirs = load_tokenizer(str(tmp_path / "s")), T.AutoTokenizer.from_pretrained(tmp_path / "s")
    assert type(ours).__name__ == "Llama2cTokenizer"
    for text in ("Once upon a time, Lily saw a big dog.", "  two  spaces\nand lines\n", "naïve 中文 🤖", ""):
        assert theirs.encode(text) == [ours.bos_id, *ours.encode(text)], text
        assert theirs.decode(ours.encode(text)) == text
    # a tokenizer transformers cannot read is said so
    chars = CharTokenizer.from_text("abcdefgh \n")
    save_checkpoint(Decoder(replace(cfg, vocab_size=chars.vocab_size)), tmp_path / "ck2", chars)
    r = subprocess.run([sys.executable, "-m", "lmforge", "convert", "--from", "lmforge", str(tmp_path / "ck2"), "--to",
                        "hf", str(tmp_path / "c")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "the char tokenizer is written in lmforge's format only" in r.stderr, r.stderr


def test_a_chat_template_file_is_carried_through_conversions(tmp_path):
    """transformers saves a tokenizer's chat template as chat_template.jinja (not in tokenizer_config.json):
    `convert --from hf` left it behind, so the converted model chatted in the fallback format and its HF export had
    no template at all (found by an audit)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers

    hf, _ = make_pair("llama")
    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "\n"]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    fast = T.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = template
    hf.save_pretrained(tmp_path / "src")
    fast.save_pretrained(tmp_path / "src")
    assert (tmp_path / "src" / "chat_template.jinja").is_file()
    msgs = [{"role": "user", "content": "hi"}]
    for src, fmt, dst in ((tmp_path / "src", "hf", tmp_path / "lmf"), (tmp_path / "lmf", "lmforge", tmp_path / "back")):
        r = subprocess.run([sys.executable, "-m", "lmforge", "convert", "--from", fmt, str(src), "--to",
                            "lmforge" if fmt == "hf" else "hf", str(dst)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert load_tokenizer(str(tmp_path / "lmf")).chat_template == template
    back = T.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == fast.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)


def test_several_end_ids_survive_import_and_export(tmp_path):
    """config.json's eos_token_id [2, 7] and generation_config.json's [2, 7, 9] (as Llama 3's and Qwen2.5's list
    their ends) came back from lmforge as 2 alone, so transformers' generate of the export stopped at one of them
    (found by an audit)."""
    hf, _ = make_pair("llama")
    hf.config.eos_token_id = [2, 7]
    hf.generation_config.eos_token_id = [2, 7, 9]
    hf.save_pretrained(tmp_path / "src")
    for src, fmt, dst in ((tmp_path / "src", "hf", tmp_path / "lmf"), (tmp_path / "lmf", "lmforge", tmp_path / "back")):
        r = subprocess.run([sys.executable, "-m", "lmforge", "convert", "--from", fmt, str(src), "--to",
                            "lmforge" if fmt == "hf" else "hf", str(dst)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert load_checkpoint(tmp_path / "lmf").cfg.eos_id == 2
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "back" / name).read_text())["eos_token_id"] == [2, 7, 9], name
    assert T.AutoModelForCausalLM.from_pretrained(tmp_path / "back").generation_config.eos_token_id == [2, 7, 9]


def test_generation_stops_at_each_of_the_models_end_ids(tmp_path):
    """A model whose generation_config.json lists several end ids (Llama 3's <|eot_id|> beside <|end_of_text|>)
    stops at any of them in transformers; lmforge's generate (PyTorch and C decoding) and serve stopped only at
    the tokenizer's EOS and ran on (found by an audit)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers

    hf, _ = make_pair("llama")
    words = ["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(3, V))]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(["<s>", "</s>"])
    fast = T.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    prompt = fast("t5 t6", return_tensors="pt").input_ids
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        free = hf.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1]:].tolist()
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i] and free[i] > 2)  # an end id met later
    hf.config.eos_token_id = [2, free[k]]
    hf.generation_config.eos_token_id = [2, free[k]]
    hf.save_pretrained(tmp_path / "src")
    fast.save_pretrained(tmp_path / "src")
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert out == free[: k + 1]  # transformers stops at the end id
    r = subprocess.run([sys.executable, "-m", "lmforge", "convert", "--from", "hf", str(tmp_path / "src"), "--to",
                        "lmforge", str(tmp_path / "lmf")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for model in ("src", "lmf"):  # (the lmforge directory decodes in C, where the C helper builds)
        r = subprocess.run([sys.executable, "-m", "lmforge", "generate", "--model", str(tmp_path / model),
                            "--prompt", "t5 t6", "--temperature", "0", "--max-new-tokens", "16"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert f"({k} tokens;" in r.stderr, (model, k, r.stderr)
        assert r.stdout.split() == ["t5", "t6", *fast.convert_ids_to_tokens(free[:k])], (model, r.stdout)
    from lmforge.infer.chat import end_of_turn
    from lmforge.loading import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(str(tmp_path / "src"), None, "cpu")  # what serve and chat stop at
    assert tok.stop_ids() == [2, 1, free[k]] and free[k] in end_of_turn("chatml", tok)[1]


def test_mistral_sliding_window_bounds_the_context(tmp_path):
    """Found by an audit: Mistral's ``sliding_window`` was ignored, so past the window lmforge's logits (dense
    attention) differed from transformers' without a word. Within the window the two are the same: the context is
    cut to it."""
    hf_cfg = T.MistralConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, sliding_window=8)
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m")
    assert model.cfg.block_size == 8
    x = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= TOL
    with pytest.raises(Exception, match="8"):
        model(torch.randint(0, V, (1, 9)))


def test_lmforge_checkpoint_roundtrip(tmp_path):
    _, model = make_pair("gpt2")  # tied embeddings: saved once
    save_checkpoint(model, tmp_path / "ck")
    again = load_checkpoint(tmp_path / "ck")
    assert again.lm_head.weight.data_ptr() == again.wte.weight.data_ptr()
    x = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["n_layer"] == 2


def test_bad_inputs_give_one_line_errors(tmp_path):
    hf, model = make_pair("llama")
    d = tmp_path / "hf"
    write_hf_dir(d, model.cfg, dict(model.state_dict()))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48}))
    with pytest.raises(LMForgeError, match="shape"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-arch"}))
    with pytest.raises(LMForgeError, match="unknown architecture"):
        load_model(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(LMForgeError, match="model.safetensors"):
        load_model(d)
