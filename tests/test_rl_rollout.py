"""Rollout helpers (lmforge/rl/rollout.py): left-padded prompts whose positions skip the padding give the log-probs
of unpadded single sequences, truncation after the stop token, response masks, scores at the true last token, and
the PPO probability ratio exactly 1 on the first minibatch when recomputed in the same mode (dropout off)."""

from __future__ import annotations

import pytest
import torch

from lmforge.losses import policy_loss, token_logprobs
from lmforge.model import Decoder
from lmforge.model.heads import ScalarHeadModel
from lmforge.presets import get_preset
from lmforge.rl.rollout import (
    disable_dropout,
    make_rollout,
    policy_logprobs,
    rollout_scores,
    rollout_values,
    sample_rollout,
    truncate_after_stop,
)

PROMPTS = [[1, 17, 30, 41], [1, 9], [1, 5, 6, 7, 8, 9, 10]]
RESPONSES = [[50, 51, 2, 77, 78], [60, 61, 62, 63], [70, 2]]  # 2 = stop


def _tiny(preset="tiny-llama", **kw) -> Decoder:
    torch.manual_seed(0)
    return Decoder(get_preset(preset, **kw)).eval()


def test_truncate_after_stop():
    assert truncate_after_stop([5, 6, 2, 7, 2], [2]) == ([5, 6, 2], True)
    assert truncate_after_stop([5, 6, 7], [2]) == ([5, 6, 7], False)
    assert truncate_after_stop([3, 5], [9, 3]) == ([3], True)
    assert truncate_after_stop([5, 6], []) == ([5, 6], False)


def test_make_rollout_layout():
    r = make_rollout(PROMPTS, RESPONSES, stop_ids=[2], pad_id=0)
    P = 7
    assert r.prompt_len == P and r.input_ids.shape == (3, P + 4)
    assert r.response_lists() == [[50, 51, 2], [60, 61, 62, 63], [70, 2]]
    assert r.ended.tolist() == [True, False, True]
    assert r.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert r.input_ids[1].tolist() == [0, 0, 0, 0, 0, 1, 9, 60, 61, 62, 63]
    assert r.attention_mask[1].tolist() == [0] * 5 + [1] * 6
    assert r.position_ids[1].tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]
    assert r.position_ids[0].tolist()[3:10] == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError):
        make_rollout([[1], [1]], [[2]])
    with pytest.raises(ValueError):
        make_rollout([[1]], [[]])


def _single_logprobs(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    logits = model(ids)[0, len(prompt) - 1 : -1]
    return token_logprobs(logits, torch.tensor(response), temperature)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-bloom"])  # rope, learned, alibi
def test_left_padded_batch_matches_unpadded_sequences(preset):
    model = _tiny(preset)
    r = make_rollout(PROMPTS, RESPONSES, stop_ids=[2], pad_id=3)
    for temp in (1.0, 0.7):
        lp, ent = policy_logprobs(model, r, temp, with_entropy=True)
        for i, (p, resp) in enumerate(zip(PROMPTS, r.response_lists())):
            single = _single_logprobs(model, p, resp, temp)
            torch.testing.assert_close(lp[i, : len(resp)], single, atol=2e-5, rtol=1e-4)
            assert (lp[i, len(resp) :] == 0).all() and (ent[i, len(resp) :] == 0).all()
    # the same rows with plain 0..T-1 positions (padding counted) differ for absolute/rotary positions
    if preset != "tiny-bloom":
        naive = model(r.input_ids, key_mask=r.attention_mask)[1, r.prompt_len - 1 : r.prompt_len + 3]
        assert not torch.allclose(token_logprobs(naive, r.responses[1]), lp[1], atol=1e-3)


def test_values_and_scores_at_true_last_token():
    dec = _tiny()
    vm = ScalarHeadModel(dec).eval()
    r = make_rollout(PROMPTS, RESPONSES, stop_ids=[2], pad_id=3)
    scores = rollout_scores(vm, r)
    values = rollout_values(vm, r)
    for i, (p, resp) in enumerate(zip(PROMPTS, r.response_lists())):
        full = torch.tensor([p + resp])
        assert scores[i].item() == pytest.approx(vm.score(full)[0].item(), abs=2e-5)  # at the stop token
        v = vm.values(full)[0, len(p) - 1 : -1]
        torch.testing.assert_close(values[i, : len(resp)], v, atol=2e-5, rtol=1e-4)
        assert (values[i, len(resp) :] == 0).all()
    # the padding after the stop token is never read: change it and nothing moves
    r2 = make_rollout(PROMPTS, RESPONSES, stop_ids=[2], pad_id=99)
    torch.testing.assert_close(rollout_scores(vm, r2), scores)


def test_sample_rollout_stories(stories):
    model, tok = stories
    prompts = [tok.encode("Once upon a time", bos=True, eos=False), tok.encode("Tom", bos=True, eos=False)]
    eos = 2
    r = sample_rollout(model, prompts, max_new_tokens=40, temperature=1.0, stop_ids=[eos], seed=7)
    again = sample_rollout(model, prompts, max_new_tokens=40, temperature=1.0, stop_ids=[eos], seed=7)
    assert torch.equal(r.input_ids, again.input_ids)
    for resp, ended in zip(r.response_lists(), r.ended.tolist()):
        assert (resp[-1] == eos) == ended and eos not in resp[:-1]
        assert len(resp) <= 40
    # multiple stop ids: generated to the end, then cut after the first one
    r3 = sample_rollout(model, prompts, max_new_tokens=20, temperature=1.0, stop_ids=[eos, 13], seed=1)
    for resp, ended in zip(r3.response_lists(), r3.ended.tolist()):
        assert ended == (resp[-1] in (eos, 13)) and not set(resp[:-1]) & {eos, 13}
    with pytest.raises(ValueError):
        sample_rollout(model, prompts, 5, temperature=0.0)


def test_ratio_exactly_one_on_first_minibatch():
    model = _tiny(dropout=0.1).train()  # train mode as in the PPO update
    r = make_rollout(PROMPTS, RESPONSES, stop_ids=[2])
    adv = torch.randn(r.response_mask.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        old = policy_logprobs(model, r, 0.8)
    new = policy_logprobs(model, r, 0.8)
    assert not torch.equal(new, old)  # dropout on: the recomputed policy is not the rollout policy
    disable_dropout(model)
    with torch.no_grad():
        old = policy_logprobs(model, r, 0.8)
    new = policy_logprobs(model, r, 0.8)  # with gradients, as in the update
    ratio = torch.exp(new - old)[r.response_mask]
    assert torch.equal(ratio, torch.ones_like(ratio))
    loss, met = policy_loss(new, old, adv, r.response_mask)
    assert met["clipfrac"] == 0 and met["approx_kl"] == 0 and met["ratio"] == 1.0
    loss.backward()
    assert model.wte.weight.grad is not None
