"""Reward-model, DPO and PPO objectives (lmforge/losses.py) against plain-loop / numpy formulas and against the peers'
formulas (tests/reference_impls.py transcribes OpenRLHF and TRL; TRL's own functions are called when installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference_impls as ref
import torch

from lmforge import losses as L


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _mask(lengths, T):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])


# ---- masked statistics ----------------------------------------------------------------------------------------


def test_masked_mean_var_whiten_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3 + 2
    m = _mask([7, 3, 5, 1], 7)
    vals = x.numpy()[m.numpy() > 0]
    assert L.masked_mean(x, m).item() == pytest.approx(vals.mean())
    assert L.masked_var(x, m).item() == pytest.approx(vals.var(ddof=1))
    assert L.masked_var(x, m, unbiased=False).item() == pytest.approx(vals.var())
    w = L.masked_whiten(x, m).numpy()
    expect = (x.numpy() - vals.mean()) / math.sqrt(vals.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w[m.numpy() > 0], expect[m.numpy() > 0], rtol=1e-10)
    assert w[m.numpy() > 0].mean() == pytest.approx(0, abs=1e-10)
    kept = L.masked_whiten(x, m, shift_mean=False).numpy()[m.numpy() > 0]
    assert kept.mean() == pytest.approx(vals.mean())  # scale normalised, mean kept
    assert kept.std(ddof=1) == pytest.approx(1.0, rel=1e-6)
    # padding values do not change the statistics
    x2 = x.clone()
    x2[m == 0] = 1e6
    torch.testing.assert_close(L.masked_whiten(x2, m)[m > 0], L.masked_whiten(x, m)[m > 0])
    # and TRL's (pre-0.12) formulas agree
    torch.testing.assert_close(L.masked_whiten(x, m, shift_mean=False), ref.trl_masked_whiten(x, m, shift_mean=False))
    torch.testing.assert_close(L.masked_whiten(x, m), ref.trl_masked_whiten(x, m))
    torch.testing.assert_close(L.masked_mean(x, m, dim=1), (x * m).sum(1) / m.sum(1))


# ---- log-probs, entropy ---------------------------------------------------------------------------------------


def test_token_logprobs_temperature_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    toks = torch.randint(0, 5, (2, 3), generator=g)
    for temp in (1.0, 0.7, 1.3):
        lp = L.token_logprobs(logits, toks, temp)
        for b in range(2):
            for t in range(3):
                z = [v / temp for v in logits[b, t].tolist()]
                lse = math.log(sum(math.exp(v) for v in z))
                assert lp[b, t].item() == pytest.approx(z[toks[b, t]] - lse, abs=1e-6)
    # temperature matters: the sampling distribution was softmax(z / T), not softmax(z)
    assert not torch.allclose(L.token_logprobs(logits, toks, 0.7), L.token_logprobs(logits, toks))


def test_entropy_loop_and_masked_mean():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    ent = L.entropy_from_logits(logits)
    for b in range(2):
        for t in range(4):
            z = logits[b, t].tolist()
            s = sum(math.exp(v) for v in z)
            p = [math.exp(v) / s for v in z]
            assert ent[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-5)
    m = _mask([4, 2], 4)
    assert L.masked_entropy(logits, m).item() == pytest.approx(ent[m > 0].mean().item())
    uniform = torch.zeros(1, 1, 8)
    assert L.entropy_from_logits(uniform).item() == pytest.approx(math.log(8), abs=1e-6)


def test_logprobs_entropy_match_trl():
    pytest.importorskip("trl")
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=g)
    toks = torch.randint(0, 11, (3, 5), generator=g)
    torch.testing.assert_close(L.token_logprobs(logits, toks), selective_log_softmax(logits, toks))
    torch.testing.assert_close(L.token_logprobs(logits, toks, 0.6), selective_log_softmax(logits / 0.6, toks))
    torch.testing.assert_close(L.entropy_from_logits(logits), entropy_from_logits(logits))


def test_sequence_logprobs_excludes_prompt_and_padding():
    g = torch.Generator().manual_seed(4)
    B, T, V = 2, 6, 7
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    # row 0: prompt 2 tokens, response 4; row 1: prompt 3, response 2, 1 padding
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]])
    out = L.sequence_logprobs(logits, ids, loss_mask)
    norm = L.sequence_logprobs(logits, ids, loss_mask, normalize=True)
    for b in range(B):
        total, n = 0.0, 0
        for t in range(1, T):
            if loss_mask[b, t]:
                z = logits[b, t - 1].tolist()
                total += z[ids[b, t]] - math.log(sum(math.exp(v) for v in z))
                n += 1
        assert out[b].item() == pytest.approx(total, abs=1e-5)
        assert norm[b].item() == pytest.approx(total / n, abs=1e-5)
    # changing prompt tokens' predictions or the padding does not move the sum
    logits2 = logits.clone()
    logits2[0, 0] += 5.0  # predicts token 1 (prompt)
    logits2[1, 4] += 5.0  # predicts token 5 (padding)
    torch.testing.assert_close(L.sequence_logprobs(logits2, ids, loss_mask), out)


# ---- reward model ---------------------------------------------------------------------------------------------


def test_pairwise_reward_loss_formula_and_metrics():
    rw = torch.tensor([1.0, 0.2, -0.5, 2.0])
    rl = torch.tensor([0.0, 0.7, -1.0, 2.5])
    loss, met = L.pairwise_reward_loss(rw, rl)
    expect = sum(-math.log(_sig(a - b)) for a, b in zip(rw.tolist(), rl.tolist())) / 4
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert met["accuracy"] == pytest.approx(0.5)
    assert met["margin"] == pytest.approx(((rw - rl).sum() / 4).item())
    assert met["chosen"] == pytest.approx(rw.mean().item()) and met["rejected"] == pytest.approx(rl.mean().item())
    loss_m, _ = L.pairwise_reward_loss(rw, rl, margin=torch.tensor([0.5, 0.0, 1.0, 0.0]))
    expect_m = sum(-math.log(_sig(a - b - m)) for a, b, m in zip(rw.tolist(), rl.tolist(), [0.5, 0, 1, 0])) / 4
    assert loss_m.item() == pytest.approx(expect_m, rel=1e-6)
    s, met_s = L.pairwise_reward_loss(rw, rl, reduction="sum")
    assert s.item() == pytest.approx(expect * 4, rel=1e-6)
    assert met_s["accuracy"] == 2 and met_s["margin"] == pytest.approx((rw - rl).sum().item())
    with pytest.raises(ValueError, match="reduction"):
        L.pairwise_reward_loss(rw, rl, reduction="none")
    assert loss.item() == pytest.approx(ref.openrlhf_pairwise_loss(rw, rl).item(), rel=1e-6)
    assert loss_m.item() == pytest.approx(
        ref.openrlhf_pairwise_loss(rw, rl, torch.tensor([0.5, 0.0, 1.0, 0.0])).item(), rel=1e-6)


def test_ranked_pairs_and_instructgpt_normalisation():
    assert L.ranked_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    for k in range(2, 8):
        assert len(L.ranked_pairs(k)) == k * (k - 1) // 2
    # two prompts: K=4 and K=2; flat scores laid out group after group, best first
    scores = torch.tensor([2.0, 1.0, 1.5, -1.0, 0.3, 0.4])
    loss, met = L.ranked_reward_loss(scores, [4, 2])
    per_prompt = []
    for start, k in ((0, 4), (4, 2)):
        terms = [-math.log(_sig(scores[start + i].item() - scores[start + j].item()))
                 for i in range(k) for j in range(i + 1, k)]
        per_prompt.append(sum(terms) / len(terms))
    assert loss.item() == pytest.approx(sum(per_prompt) / 2, rel=1e-6)
    # metrics are weighted like the loss: each prompt's pair accuracy, averaged over prompts
    per_prompt_acc = []
    for start, k in ((0, 4), (4, 2)):
        right = [scores[start + i] > scores[start + j] for i in range(k) for j in range(i + 1, k)]
        per_prompt_acc.append(sum(right) / len(right))
    assert met["accuracy"] == pytest.approx(sum(per_prompt_acc) / 2)
    loss_sum, met_sum = L.ranked_reward_loss(scores, [4, 2], reduction="sum")
    assert loss_sum.item() == pytest.approx(sum(per_prompt)) and met_sum["accuracy"] == pytest.approx(
        sum(per_prompt_acc))
    # K=2 everywhere is the plain pairwise loss
    lk2, _ = L.ranked_reward_loss(torch.tensor([1.0, 0.0, 0.2, 0.9]), [2, 2])
    lp, _ = L.pairwise_reward_loss(torch.tensor([1.0, 0.2]), torch.tensor([0.0, 0.9]))
    assert lk2.item() == pytest.approx(lp.item())
    with pytest.raises(ValueError):
        L.ranked_pair_index([3, 1])


def test_ranked_loss_gradients_flow():
    scores = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    loss, _ = L.ranked_reward_loss(scores, [3])
    loss.backward()
    assert scores.grad[0] < 0 < scores.grad[2]  # push the best up, the worst down


# ---- DPO ------------------------------------------------------------------------------------------------------


DPO_INPUTS = dict(policy_chosen=torch.tensor([-10.0, -22.0, -5.0]), policy_rejected=torch.tensor([-12.0, -20.0, -9.0]),
                  ref_chosen=torch.tensor([-11.0, -21.0, -6.0]), ref_rejected=torch.tensor([-11.5, -21.0, -8.0]))


def test_dpo_sigmoid_with_label_smoothing():
    pc, pr, rc, rr = (DPO_INPUTS[k].tolist() for k in ("policy_chosen", "policy_rejected", "ref_chosen",
                                                        "ref_rejected"))
    for beta in (0.1, 0.5):
        for eps in (0.0, 0.2):
            loss, met = L.dpo_loss(**DPO_INPUTS, beta=beta, label_smoothing=eps)
            terms = []
            for i in range(3):
                d = (pc[i] - rc[i]) - (pr[i] - rr[i])
                terms.append(-(1 - eps) * math.log(_sig(beta * d)) - eps * math.log(_sig(-beta * d)))
            assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-6)
            ref_loss, ref_c, ref_r = ref.openrlhf_dpo_loss(*DPO_INPUTS.values(), beta, eps)
            assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
            assert met["rewards_chosen"] == pytest.approx(ref_c.mean().item())
            assert met["rewards_rejected"] == pytest.approx(ref_r.mean().item())
            assert met["reward_accuracy"] == pytest.approx((ref_c > ref_r).float().mean().item())
            assert met["reward_margin"] == pytest.approx((ref_c - ref_r).mean().item(), rel=1e-6)
            loss_s, met_s = L.dpo_loss(**DPO_INPUTS, beta=beta, label_smoothing=eps, reduction="sum")
            assert loss_s.item() == pytest.approx(3 * loss.item(), rel=1e-6)
            assert met_s["reward_accuracy"] == pytest.approx(3 * met["reward_accuracy"])


def test_dpo_hinge_and_ipo_length_normalised():
    beta = 0.2
    lc, lr = torch.tensor([4.0, 10.0, 2.0]), torch.tensor([5.0, 1.0, 8.0])
    cl = DPO_INPUTS["policy_chosen"] - DPO_INPUTS["ref_chosen"]
    rl = DPO_INPUTS["policy_rejected"] - DPO_INPUTS["ref_rejected"]
    hinge, _ = L.dpo_loss(**DPO_INPUTS, beta=beta, loss_type="hinge")
    assert hinge.item() == pytest.approx(sum(max(0.0, 1 - beta * (a - b)) for a, b in zip(cl.tolist(), rl.tolist()))
                                         / 3, rel=1e-6)
    assert hinge.item() == pytest.approx(ref.trl_dpo_per_sequence_loss(cl, rl, beta, "hinge").mean().item(), rel=1e-6)
    ipo, _ = L.dpo_loss(**DPO_INPUTS, beta=beta, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    expect = sum((a / n - b / m - 1 / (2 * beta)) ** 2 for a, b, n, m in zip(cl.tolist(), rl.tolist(), lc.tolist(),
                                                                             lr.tolist())) / 3
    assert ipo.item() == pytest.approx(expect, rel=1e-6)
    assert ipo.item() == pytest.approx(ref.trl_dpo_per_sequence_loss(cl, rl, beta, "ipo", lc, lr).mean().item(),
                                       rel=1e-6)
    sig, _ = L.dpo_loss(**DPO_INPUTS, beta=beta)
    assert sig.item() == pytest.approx(ref.trl_dpo_per_sequence_loss(cl, rl, beta, "sigmoid").mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="ipo"):
        L.dpo_loss(**DPO_INPUTS, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown"):
        L.dpo_loss(**DPO_INPUTS, loss_type="kto")


def test_dpo_gradient_raises_chosen_lowers_rejected():
    pc = torch.tensor([-10.0], requires_grad=True)
    pr = torch.tensor([-10.0], requires_grad=True)
    loss, _ = L.dpo_loss(pc, pr, torch.tensor([-10.0]), torch.tensor([-10.0]), beta=0.1)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)  # beta * sigmoid(0)


# ---- PPO ------------------------------------------------------------------------------------------------------


def test_kl_estimators_schulman():
    g = torch.Generator().manual_seed(5)
    lp, rlp = -torch.rand(3, 4, generator=g) * 3, -torch.rand(3, 4, generator=g) * 3
    for kind in ("k1", "k2", "k3"):
        torch.testing.assert_close(L.kl_estimate(lp, rlp, kind), ref.openrlhf_compute_approx_kl(lp, rlp, kind))
    for a, b in zip(lp.flatten().tolist(), rlp.flatten().tolist()):
        r = math.exp(b - a)
        assert L.kl_estimate(torch.tensor(a), torch.tensor(b), "k3").item() == pytest.approx(r - 1 - math.log(r),
                                                                                               abs=1e-6)
    # k1 and k3 are unbiased: on samples from p their means approach KL(p||q)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        est = L.kl_estimate(p.log()[x], q.log()[x], kind).mean().item()
        assert est == pytest.approx(true_kl, abs=0.01)
    assert (L.kl_estimate(p.log()[x], q.log()[x], "k3") >= 0).all()
    with pytest.raises(ValueError):
        L.kl_estimate(lp, rlp, "k4")


def test_ppo_rewards_score_at_true_last_token():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -0.3], [-0.2, -0.4, -9.0, -9.0]])
    rlp = torch.tensor([[-1.5, -1.0, -0.5, -0.1], [-0.1, -0.9, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # row 1 ended after 2 tokens (stop token included), padding
    scores = torch.tensor([2.0, -1.0])
    ended = torch.tensor([False, True])
    beta = 0.1
    rew, kl = L.ppo_rewards(scores, lp, rlp, mask, beta, ended=ended, missing_eos_penalty=1.0)
    for b in range(2):
        n = int(mask[b].sum())
        for t in range(4):
            k = (lp[b, t] - rlp[b, t]).item() if t < n else 0.0
            assert kl[b, t].item() == pytest.approx(k)
            expect = -beta * k
            if t == n - 1:
                expect += scores[b].item() - (0.0 if ended[b] else 1.0)
            assert rew[b, t].item() == pytest.approx(expect), (b, t)
    assert rew[1, 2] == 0 and rew[1, 3] == 0  # nothing at padding after EOS
    # OpenRLHF's compute_reward puts the score at the same place
    rew0, kl0 = L.ppo_rewards(scores, lp, rlp, mask, beta)
    torch.testing.assert_close(rew0, ref.openrlhf_compute_reward(scores, beta, kl0, mask))


def test_last_token_index():
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]])
    assert L.last_token_index(m).tolist() == [1, 3, -1, 2]
    with pytest.raises(ValueError):
        L.ppo_rewards(torch.zeros(4), torch.zeros(4, 4), torch.zeros(4, 4), m, 0.1)


def _gae_loop(rewards, values, n, gamma, lam):
    adv = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values[:n])]


def test_gae_against_plain_backward_loop():
    g = torch.Generator().manual_seed(6)
    lengths = [6, 3, 1, 5]
    T = 6
    rewards, values = torch.randn(4, T, generator=g), torch.randn(4, T, generator=g)
    mask = _mask(lengths, T)
    rewards_padded = rewards.clone()
    rewards_padded[mask == 0] = 123.0  # whatever sits in the padding must not leak in
    values_padded = values.clone()
    values_padded[mask == 0] = -55.0
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (1.0, 1.0)):
        adv, ret = L.gae(rewards_padded, values_padded, mask, gamma, lam)
        for b, n in enumerate(lengths):
            ea, er = _gae_loop(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
            assert adv[b, :n].tolist() == pytest.approx(ea, abs=1e-5)
            assert ret[b, :n].tolist() == pytest.approx(er, abs=1e-5)
            assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
    # lambda = 1, gamma = 1: the return is the sum of future rewards (Monte Carlo)
    _, ret = L.gae(rewards, values, mask, 1.0, 1.0)
    for b, n in enumerate(lengths):
        assert ret[b, 0].item() == pytest.approx(rewards[b, :n].sum().item(), abs=1e-5)


def test_clipped_policy_loss_below_inside_above():
    eps = 0.2
    old = torch.zeros(1, 6)
    ratios = torch.tensor([[0.5, 0.9, 1.1, 1.5, 0.5, 1.5]])  # below, inside, inside, above (A>0); below, above (A<0)
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 6)
    new = ratios.log().requires_grad_()
    loss, met = L.policy_loss(new, old, adv, mask, eps)
    # per token: -min(r A, clip(r) A)
    expect = [-min(r * a, min(max(r, 1 - eps), 1 + eps) * a) for r, a in zip(ratios[0].tolist(), adv[0].tolist())]
    assert loss.item() == pytest.approx(sum(expect) / 6, rel=1e-6)
    # below with A>0: unclipped (r A < clip A) -> gradient flows; above with A>0: clipped -> no gradient
    # below with A<0: clipped (no gradient); above with A<0: unclipped (gradient)
    loss.backward()
    grad = new.grad[0].tolist()
    assert grad[0] != 0 and grad[1] != 0 and grad[2] != 0 and grad[3] == 0 and grad[4] == 0 and grad[5] != 0
    assert met["clipfrac"] == pytest.approx(2 / 6)
    ref_loss, ref_clip = ref.openrlhf_policy_loss(ratios.log(), old, adv, mask, eps)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert met["clipfrac"] == pytest.approx(ref_clip.item())
    lr = ratios.log()
    assert met["approx_kl"] == pytest.approx(((ratios - 1) - lr).mean().item(), rel=1e-5)
    # a padded token changes nothing
    loss_p, met_p = L.policy_loss(torch.cat([ratios.log(), torch.tensor([[3.0]])], 1), torch.zeros(1, 7),
                                  torch.cat([adv, torch.tensor([[9.0]])], 1), torch.tensor([[1.0] * 6 + [0.0]]), eps)
    assert loss_p.item() == pytest.approx(loss.item()) and met_p["clipfrac"] == pytest.approx(met["clipfrac"])


def test_policy_loss_ratio_one_gives_minus_mean_advantage():
    adv = torch.tensor([[0.3, -1.2, 2.0]])
    loss, met = L.policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), adv, torch.ones(1, 3))
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert met["clipfrac"] == 0 and met["approx_kl"] == 0 and met["ratio"] == 1


def test_clipped_value_loss():
    eps = 0.2
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    new = torch.tensor([[1.5, 1.1, 0.5, 0.7]], requires_grad=True)
    ret = torch.tensor([[1.2, 2.0, 0.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    loss, met = L.value_loss(new, old, ret, mask, eps)
    terms, clipped = [], 0
    for v, o, r in zip(new[0].tolist(), old[0].tolist(), ret[0].tolist()):
        vc = o + min(max(v - o, -eps), eps)
        terms.append(max((v - r) ** 2, (vc - r) ** 2))
        clipped += (vc - r) ** 2 > (v - r) ** 2
    assert loss.item() == pytest.approx(0.5 * sum(terms) / 4, rel=1e-6)
    assert met["vf_clipfrac"] == pytest.approx(clipped / 4)
    assert 0 < clipped < 4
    assert loss.item() == pytest.approx(ref.openrlhf_value_loss(new.detach(), old, ret, mask, eps).item(), rel=1e-6)
    unclipped, _ = L.value_loss(new, old, ret, mask, None)
    assert unclipped.item() == pytest.approx(0.5 * ((new.detach() - ret) ** 2).mean().item(), rel=1e-6)


def test_kl_controllers_and_resume():
    ours, theirs = L.AdaptiveKLController(0.2, target=6.0, horizon=10000), ref.TrlAdaptiveKLController(0.2, 6.0, 10000)
    for kl, n in ((12.0, 256), (6.6, 256), (1.0, 512), (5.9, 64), (0.0, 1000)):
        ours.update(kl, n)
        theirs.update(kl, n)
        assert ours.value == pytest.approx(theirs.value, rel=1e-12)
    # the error is clipped to +-0.2
    c = L.AdaptiveKLController(1.0, target=1.0, horizon=100)
    c.update(100.0, 10)
    assert c.value == pytest.approx(1.0 + 0.2 * 10 / 100)
    c.update(0.0, 10)
    assert c.value == pytest.approx((1.0 + 0.02) * (1 - 0.02))
    c.update(1.05, 100)
    assert c.value == pytest.approx((1.0 + 0.02) * (1 - 0.02) * 1.05)
    restored = L.AdaptiveKLController(9.0, target=2.0, horizon=5)
    restored.load_state_dict(c.state_dict())
    assert restored.state_dict() == c.state_dict()
    f = L.FixedKLController(0.05)
    f.update(100.0, 10)
    assert f.value == 0.05
    f2 = L.FixedKLController(1.0)
    f2.load_state_dict(f.state_dict())
    assert f2.value == 0.05


def test_ptx_loss():
    ppo, pre = torch.tensor(0.7, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    total = L.ptx_loss(ppo, pre, 27.8)
    assert total.item() == pytest.approx(0.7 + 27.8 * 3.0)
    total.backward()
    assert pre.grad.item() == pytest.approx(27.8) and ppo.grad.item() == 1.0


def test_rewards_and_gae_match_torchtune_formulas():
    g = torch.Generator().manual_seed(8)
    lengths = [5, 2, 4]
    mask = _mask(lengths, 5)
    lp, rlp = -torch.rand(3, 5, generator=g), -torch.rand(3, 5, generator=g)
    scores = torch.randn(3, generator=g)
    rew, _ = L.ppo_rewards(scores, lp * mask, rlp * mask, mask, 0.05)
    tt_rew, _, _ = ref.torchtune_get_rewards_ppo(scores, lp * mask, rlp * mask, 0.05, torch.tensor(lengths) - 1)
    torch.testing.assert_close(rew, tt_rew * mask)
    values = torch.randn(3, 5, generator=g) * mask  # torchtune zeroes values after the last real token too
    adv, ret = L.gae(rew, values, mask, 0.99, 0.9)
    tt_adv, tt_ret = ref.torchtune_gae(values, rew * mask, 0.99, 0.9)
    torch.testing.assert_close(adv, tt_adv * mask)
    torch.testing.assert_close(ret, tt_ret * mask)
