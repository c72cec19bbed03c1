"""`lmforge peft merge` and `lmforge peft export` as users run them (subprocesses), on the bundled stories260K."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_run import refused

from lmforge.assets import STORIES260K
from lmforge.checkpoint import load_model
from lmforge.commands.args import find_tokenizer_path
from lmforge.peft import apply_peft, load_adapter, save_adapter
from lmforge.peft.base import get_adapter_params
from lmforge.peft.lora import lora_layers

ROOT = Path(__file__).resolve().parents[1]
X = torch.tensor([[1, 403, 407, 261, 378, 58, 84, 300, 22]])


def lmforge(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def make_adapter(out: Path, method: str, options: dict, seed: int = 1) -> torch.Tensor:
    """Save an adapter with random non-zero B on stories260K; returns the adapted logits on X."""
    model = load_model(STORIES260K)
    resolved = apply_peft(model, method, options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in get_adapter_params(model).items():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    with torch.no_grad():
        base = load_model(STORIES260K)(X)
        adapted = model(X)
    assert (adapted - base).abs().max() > 1e-2
    save_adapter(model, out, str(STORIES260K), resolved, method)
    return adapted


@pytest.mark.parametrize("method,options,tol", [("lora", {"targets": "q,v,fc2"}, 1e-5),
                                                 ("qlora", {"targets": "all-linear", "r": 4}, 1e-4)])
def test_peft_merge_writes_a_plain_checkpoint_with_the_adapted_logits(method, options, tol, tmp_path):
    adapted = make_adapter(tmp_path / "adapter", method, options)
    r = lmforge("peft", "merge", "--model", str(STORIES260K), "--adapter", str(tmp_path / "adapter"),
                "--output", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    assert "merged into" in r.stdout
    merged = load_model(tmp_path / "merged")
    assert not lora_layers(merged) and all(type(m).__name__ != "NF4Linear" for m in merged.modules())
    with torch.no_grad():  # fp32 rounding grows with the logits (|logit| ~ 13 here): tolerance relative to them
        assert (merged(X) - adapted).abs().max().item() <= tol * adapted.abs().max().item()
    assert find_tokenizer_path(tmp_path / "merged", merged.cfg.vocab_size) is not None


def test_peft_export_formats(tmp_path):
    adapted = make_adapter(tmp_path / "adapter", "lora", {"targets": "all-linear", "r": 4})
    # lmforge layout (base from the adapter's base_model_name_or_path), then back to PEFT's layout
    r = lmforge("peft", "export", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "lm"),
                "--format", "lmforge")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "lm" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LMFORGE" and cfg["lmforge_method"] == "lora"
    r = lmforge("peft", "export", "--adapter", str(tmp_path / "lm"), "--output", str(tmp_path / "pe"),
                "--format", "peft", "--base-name", "stories260K-hf")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "pe" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "stories260K-hf"
    for d in ("lm", "pe"):
        model = load_model(STORIES260K)
        load_adapter(model, tmp_path / d)
        with torch.no_grad():
            assert (model.eval()(X) - adapted).abs().max().item() <= 1e-5
    # hf: merged, as a transformers directory
    T = pytest.importorskip("transformers")
    r = lmforge("peft", "export", "--adapter", str(tmp_path / "pe"), "--model", str(STORIES260K),
                "--output", str(tmp_path / "hf"), "--format", "hf")
    assert r.returncode == 0, r.stderr
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (hf(X).logits - adapted).abs().max().item() <= 1e-4


def test_peft_command_errors_are_one_line(tmp_path):
    r = lmforge("peft", "merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "m"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "adapter_config.json: cannot read" in r.stderr
    (tmp_path / "adapter_config.json").write_text("[]")  # (an AttributeError)
    r = lmforge("peft", "merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "m"))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"lmforge peft: error: {tmp_path / 'adapter_config.json'}: expected a JSON object of settings, got list"]
    make_adapter(tmp_path / "ad", "lora", {"targets": "q"})
    r = lmforge("peft", "export", "--adapter", str(tmp_path / "ad"), "--output", str(tmp_path / "x"),
                "--format", "onnx")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = lmforge("peft", "--help")
    assert r.returncode == 0 and "merge" in r.stdout and "export" in r.stdout


def test_peft_outputs_never_replace_inputs_or_existing_outputs(tmp_path):
    """merge and export replaced any --output (an unrelated directory, the adapter itself, the base) with exit 0;
    export --format hf carried no tokenizer, so `generate` could not use its output."""
    make_adapter(tmp_path / "ad", "lora", {"targets": "q"})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("important")
    for cmd in (["merge"], ["export"], ["export", "--format", "hf"]):
        r = refused("peft", *cmd, "--adapter", str(tmp_path / "ad"), "--output", str(tmp_path / "mine"))
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            f"lmforge peft: error: --output {tmp_path / 'mine'}: exists; pass --overwrite to replace it"], r.stderr
        r = refused("peft", *cmd, "--adapter", str(tmp_path / "ad"), "--output", str(tmp_path / "ad"))
        assert r.returncode == 1 and "which is being read" in r.stderr, r.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "important"
    assert (tmp_path / "ad" / "adapter_model.safetensors").exists()
    r = refused("peft", "merge", "--adapter", str(tmp_path / "ad"), "--output", str(tmp_path / "mine"), "--overwrite")
    assert r.returncode == 1 and "holds no model" in r.stderr, r.stderr  # --overwrite deleted whatever it held
    assert (tmp_path / "mine" / "notes.txt").read_text() == "important"
    for _ in range(2):  # a model directory is replaced with --overwrite
        r = lmforge("peft", "merge", "--adapter", str(tmp_path / "ad"), "--output", str(tmp_path / "merged"),
                    "--overwrite")
        assert r.returncode == 0, r.stderr
    r = lmforge("peft", "export", "--adapter", str(tmp_path / "ad"), "--output", str(tmp_path / "hf"),
                "--format", "hf")
    assert r.returncode == 0, r.stderr
    assert find_tokenizer_path(tmp_path / "hf", 512) is not None
    r = lmforge("generate", "--model", str(tmp_path / "hf"), "--prompt", "Once", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr


def test_merge_and_hf_export_keep_the_adapters_chat_template(tmp_path):
    """An adapter trained with a template (sft writes chat_template.jinja beside it): merging it, or exporting it
    merged for transformers, dropped the template, so the merged model chatted in another format (found by an
    audit)."""
    from lmforge.infer.chat import BUILTIN, encode_chat
    from lmforge.loading import load_model_and_tokenizer

    make_adapter(tmp_path / "ad", "lora", {"targets": "q,v"})
    chatml = BUILTIN["chatml"].source
    (tmp_path / "ad" / "chat_template.jinja").write_text(chatml)
    msgs = [{"role": "user", "content": "Hi"}]
    r = lmforge("peft", "merge", "--adapter", str(tmp_path / "ad"), "--output", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    _, adapted_tok = load_model_and_tokenizer(str(tmp_path / "ad"), None)
    _, merged_tok = load_model_and_tokenizer(str(tmp_path / "merged"), None)
    assert encode_chat(merged_tok, None, msgs) == encode_chat(adapted_tok, None, msgs)
    assert merged_tok.chat_template == chatml
    T = pytest.importorskip("transformers")
    r = lmforge("peft", "export", "--adapter", str(tmp_path / "ad"), "--output", str(tmp_path / "hf"),
                "--format", "hf")
    assert r.returncode == 0, r.stderr
    hf_tok = T.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_an_adapter_on_another_base_than_its_own_is_said(tmp_path):
    """An adapter applied to a model other than the base it records was taken without a word (eval then scored a
    model that never existed)."""
    import shutil

    make_adapter(tmp_path / "adapter", "lora", {"targets": "q,v"})
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(STORIES260K, other / "stories260K.bin")
    shutil.copy(STORIES260K.parent / "tok512.bin", other / "tok512.bin")
    common = ("generate", "--prompt", "Once", "--max-new-tokens", "2", "--adapter", str(tmp_path / "adapter"))
    own = lmforge(*common, "--model", str(STORIES260K))
    assert own.returncode == 0 and "warning" not in own.stderr, own.stderr
    r = lmforge(*common, "--model", str(other / "stories260K.bin"))
    assert r.returncode == 0 and (f"warning: {tmp_path / 'adapter'} was trained on {STORIES260K}; applying it to "
                                  f"{other / 'stories260K.bin'}") in r.stderr, r.stderr
