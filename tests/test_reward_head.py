"""The scalar value/reward head (lmforge/model/heads.py): init, score at the last real token under right and left
padding, normalisation, and a saved reward model that is also a loadable ``--model``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lmforge.checkpoint import load_model
from lmforge.errors import LMForgeError
from lmforge.model import Decoder
from lmforge.model.heads import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    ScalarHeadModel,
    last_real_index,
    load_scalar_model,
    positions_from_mask,
    read_head_config,
    save_scalar_model,
)
from lmforge.presets import get_preset


def _tiny(preset: str = "tiny-llama", seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(get_preset(preset)).eval()


def test_head_init_distribution():
    dec = _tiny()
    d = dec.cfg.n_embd
    torch.manual_seed(1)
    w = torch.cat([ScalarHeadModel(dec).head.weight.flatten() for _ in range(60)])
    assert w.std().item() == pytest.approx(1 / math.sqrt(d + 1), rel=0.06)
    assert abs(w.mean().item()) < 0.1 / math.sqrt(d + 1) * 3
    m = ScalarHeadModel(dec)
    assert m.head.bias.item() == 0.0 and m.norm_gain.item() == 1.0 and m.norm_bias.item() == 0.0


def test_last_real_index_and_positions():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_real_index(right).tolist() == [2, 3, 0]
    assert last_real_index(left).tolist() == [3, 3, 3]
    assert positions_from_mask(left).tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 0, 0]]
    with pytest.raises(ValueError):
        last_real_index(torch.tensor([[0, 0]]))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-bloom"])  # rope, learned, alibi positions
def test_score_same_unpadded_right_and_left_padded(preset):
    dec = _tiny(preset)
    model = ScalarHeadModel(dec).eval()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (5, 9, 2)]
    single = torch.stack([model.score(torch.tensor([s]))[0] for s in seqs])
    T = max(map(len, seqs))
    for side in ("right", "left"):
        ids = torch.full((3, T), 7)  # a real token id as padding: only the mask may hide it
        mask = torch.zeros(3, T, dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[i, sl] = torch.tensor(s)
            mask[i, sl] = 1
        seen: list[dict] = []
        orig = dec.hidden_states
        dec.hidden_states = lambda *a, seen=seen, orig=orig, **kw: (seen.append(kw), orig(*a, **kw))[1]
        torch.testing.assert_close(model.score(ids, mask), single, atol=2e-5, rtol=1e-4)
        del dec.hidden_states
        # right padding runs without a key mask (the memory-efficient attention kernel); left padding needs it
        assert ("key_mask" in seen[0]) == (side == "left")
    # without a mask the score of a right-padded row would be read at the padding: the mask matters
    assert not torch.allclose(model.score(ids), single, atol=1e-3)


def test_normalize_mean0_std1_and_gradients():
    model = ScalarHeadModel(_tiny())
    ids = torch.randint(3, 100, (8, 6), generator=torch.Generator().manual_seed(3))
    raw = model.score(ids, normalized=False).detach()
    model.normalize(raw)
    s = model.score(ids).detach()
    assert s.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert s.std().item() == pytest.approx(1.0, rel=1e-5)
    model.train()
    model.score(ids).sum().backward()
    assert model.head.weight.grad is not None and model.decoder.wte.weight.grad is not None
    # equal scores (a degenerate training set) are centred, not scaled: the trained model is still saved
    assert model.normalize(2.5 * torch.ones(4)) is False
    assert model.norm_gain.item() == 1.0 and model.norm_bias.item() == -2.5
    with pytest.raises(LMForgeError, match="non-finite"):
        model.normalize(torch.tensor([1.0, float("nan")]))


def test_save_load_reward_model_dir_is_a_model(tmp_path, stories):
    dec, tok = stories
    model = ScalarHeadModel(dec)
    with torch.no_grad():
        model.head.bias.fill_(0.25)
    ids = torch.tensor([tok.encode("Once upon a time", bos=True, eos=False)])
    model.normalize(torch.tensor([0.5, 1.0, 3.0]))
    out = save_scalar_model(model, tmp_path / "rm", tokenizer=tok, extra={"val_accuracy": 0.7})
    for name in ("config.json", "model.safetensors", HEAD_WEIGHTS, HEAD_CONFIG):
        assert (out / name).is_file(), name
    meta = read_head_config(out)
    assert meta["kind"] == "reward" and meta["val_accuracy"] == 0.7
    assert meta["norm_gain"] == pytest.approx(model.norm_gain.item())
    back = load_scalar_model(out)
    torch.testing.assert_close(back.score(ids), model.score(ids))
    torch.testing.assert_close(back.score(ids, normalized=False), model.score(ids, normalized=False))
    # the LM part loads as a plain model with the same logits
    lm = load_model(out)
    torch.testing.assert_close(lm(ids), dec(ids))
    # and `lmforge generate --model DIR` runs on it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "lmforge", "generate", "--model", str(out), "--prompt", "Once upon",
                        "--max-new-tokens", "8", "--temperature", "0"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("Once upon")
    json.loads((out / HEAD_CONFIG).read_text())


def test_load_errors(tmp_path):
    from lmforge.errors import LMForgeError

    with pytest.raises(LMForgeError, match="not a reward/value model"):
        load_scalar_model(tmp_path)
    model = ScalarHeadModel(_tiny())
    out = save_scalar_model(model, tmp_path / "rm")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1, 3), "bias": torch.zeros(1)}, str(out / HEAD_WEIGHTS))
    with pytest.raises(LMForgeError, match="expected tensors weight"):
        load_scalar_model(out)
