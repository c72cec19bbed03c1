"""A prompt shared by several responses runs once (``branch_ids`` in the decoder, ``data.preference.shared_rows``):
hidden states, reward scores, DPO log-probs, losses and gradients equal running each response on its own."""

from __future__ import annotations

import pytest
import torch

from lmforge.data.preference import PreferenceRecord, collate_groups, common_prefix, shared_rows
from lmforge.model import Decoder
from lmforge.model.decoder import supports_branches
from lmforge.model.heads import ScalarHeadModel
from lmforge.peft import apply_peft
from lmforge.presets import get_preset
from lmforge.stages.dpo import dpo_loss_fn, pair_groups, response_logprobs
from lmforge.stages.reward import GroupBatches, encode_group, group_len, reward_loss_fn, score_groups

# a prompt of 5 tokens whose first two responses also share a first token; equal responses; nothing shared
GROUPS = [
    [[1, 5, 6, 7, 8, 20, 21, 22], [1, 5, 6, 7, 8, 20, 30], [1, 5, 6, 7, 8, 40, 41, 42, 43]],
    [[1, 9, 10, 50, 51], [1, 9, 10, 50, 51]],
    [[2, 60, 61], [3, 62]],
]


def _groups(seqs=GROUPS):
    return [[{"input_ids": s, "labels": [-100] * min(3, len(s)) + s[3:]} for s in g] for g in seqs]


def test_shared_rows_write_each_prompt_once_and_index_every_response_token():
    batch = collate_groups(_groups(), pad_id=0, share_prefix=True)
    rows = batch["rows"]
    assert [common_prefix(g) for g in GROUPS] == [5, 5, 0]
    # row lengths: trunk + the rest of each response; padding is branch -1
    assert (rows["branch_ids"] >= 0).sum(-1).tolist() == [5 + 3 + 2 + 4, 5, 5]
    assert rows["branch_ids"][0, :10].tolist() == [0] * 5 + [1, 1, 1, 2, 2]
    ids, att = batch["input_ids"], batch["attention_mask"]
    flat_ids, flat_pos = rows["input_ids"].flatten(), rows["position_ids"].flatten()
    for n in range(ids.shape[0]):
        real = att[n].bool()
        assert torch.equal(flat_ids[rows["index"][n]][real], ids[n][real])
        assert torch.equal(flat_pos[rows["index"][n]][real], torch.arange(int(real.sum())))


def test_batches_by_length_follow_the_shared_rows():
    """With shared prompts a group's padded width is its row (prompt once + every remainder), not its longest
    response: held-out batches run longest row first and training batches group similar rows."""
    g = _groups()
    assert [group_len(x, shared=True) for x in g] == [14, 5, 5] and [group_len(x) for x in g] == [9, 5, 3]
    rows = collate_groups(g, pad_id=0, share_prefix=True)["rows"]
    assert [group_len(x, shared=True) for x in g] == (rows["branch_ids"] >= 0).sum(-1).tolist()
    # group 0: longest response 12, row 9 + 3 + 3; group 1: longest 13, row 13 + 1 (nothing shared)
    seqs = [[[1] * 9 + [2] * 3, [1] * 9 + [3] * 3], [[4] * 13, [5]]]
    src = GroupBatches(_groups(seqs), 1, shuffle=False, by_length=True, share_prefix=True)
    assert [b["rows"]["input_ids"].shape[1] for b in src.fixed_batches(0, 0)] == [15, 14]
    src = GroupBatches(_groups(seqs), 1, shuffle=False, by_length=True)
    assert [b["input_ids"].shape[1] for b in src.fixed_batches(0, 0)] == [13, 12]
    # training: rows 15, 14, 13, 4 pair as {15, 14}, {13, 4}; by longest response (12, 13, 13, 2) the pairs would
    # be {14, 13} and {15, 4}, padded to 14 and 15
    seqs += [[[1] * 12 + [9], [1] * 12], [[6, 6], [7, 7]]]
    src = GroupBatches(_groups(seqs), 2, seed=3, by_length=True, share_prefix=True)
    assert sorted(src.next_batch()["rows"]["input_ids"].shape[1] for _ in range(2)) == [13, 15]


def _shared_vs_alone(dec: Decoder, seqs=GROUPS):
    batch = collate_groups(_groups(seqs), pad_id=0, share_prefix=True)
    r = batch["rows"]
    h = dec.hidden_states(r["input_ids"], r["position_ids"], branch_ids=r["branch_ids"]).flatten(0, 1)[r["index"]]
    return batch, h, [dec.hidden_states(torch.tensor([s]))[0] for g in seqs for s in g]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-chatglm2", "tiny-palm"])  # rope/learned, GQA
def test_branches_give_the_hidden_states_and_gradients_of_separate_runs(preset):
    torch.manual_seed(0)
    dec = Decoder(get_preset(preset)).eval()
    assert supports_branches(dec.cfg)
    batch, h, alone = _shared_vs_alone(dec)
    w = torch.randn(h.shape[-1])
    shared_loss, alone_loss = 0.0, 0.0
    for n, a in enumerate(alone):
        torch.testing.assert_close(h[n, : len(a)], a, atol=2e-5, rtol=1e-4)
        shared_loss = shared_loss + (h[n, : len(a)] @ w).tanh().sum()
        alone_loss = alone_loss + (a @ w).tanh().sum()
    params = [p for n, p in dec.named_parameters() if not n.startswith("lm_head")]  # hidden states only
    g_shared = torch.autograd.grad(shared_loss, params)
    g_alone = torch.autograd.grad(alone_loss, params)
    for a, b in zip(g_shared, g_alone):
        # the trunk's gradient is summed in another order: equal up to float32 rounding of the whole tensor
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-6


@pytest.mark.parametrize("method", ["prefix", "prompt", "lora"])
def test_branches_with_virtual_tokens_and_adapters(method):
    torch.manual_seed(0)
    dec = Decoder(get_preset("tiny-llama"))
    apply_peft(dec, method, {"num_virtual_tokens": 4} if method != "lora" else {})
    with torch.no_grad():  # adapters that change the output
        for p in dec.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    _, h, alone = _shared_vs_alone(dec.eval())
    for n, a in enumerate(alone):
        torch.testing.assert_close(h[n, : len(a)], a, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("preset", ["tiny-bloom", "tiny-gpt3", "tiny-chatglm"])  # ALiBi, banded layers, GLM 2D
def test_models_whose_attention_depends_on_row_order_refuse_branches(preset):
    dec = Decoder(get_preset(preset))
    assert not supports_branches(dec.cfg)
    r = shared_rows(_groups(), 0)
    with pytest.raises(ValueError, match="branch_ids"):
        dec.hidden_states(r["input_ids"], r["position_ids"], branch_ids=r["branch_ids"])


def _records():
    return [PreferenceRecord([{"role": "user", "content": "Tom saw a big dog."}],
                             [" He was happy.", " No.", " He ran to the dog and sat."], "Tom saw a big dog."),
            PreferenceRecord([{"role": "user", "content": "Sue"}], [" ran home and slept.", " sat."], "Sue")]


def test_reward_scores_loss_and_gradients_equal_with_and_without_sharing(stories):
    torch.manual_seed(0)
    model = ScalarHeadModel(stories[0]).train()
    tok = stories[1]
    groups = [encode_group(tok, r, None, 64) for r in _records()]  # a ranked list of 3, a pair
    loss_fn = reward_loss_fn(0.0)
    out = {}
    for share in (False, True):
        batch = GroupBatches(groups, 2, shuffle=False, share_prefix=share).fixed_batches(0, 0)[0]
        assert ("rows" in batch) == share
        model.zero_grad()
        loss, count, metrics = loss_fn(model, batch)
        loss.backward()
        out[share] = (loss.detach(), metrics, [p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(out[True][2], out[False][2]):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-6
    model.eval()
    scores = score_groups(model, groups, 0, batch_size=2)  # the scoring pass after training shares the prompt
    with torch.no_grad():
        alone = [[model.score(torch.tensor([ex["input_ids"]])).item() for ex in g] for g in groups]
    for s, a in zip(scores, alone):
        assert s == pytest.approx(a, abs=1e-5)


def test_dpo_logprobs_and_loss_equal_with_and_without_sharing(stories):
    model, tok = stories
    groups = pair_groups(tok, _records(), None, 64)  # 3 pairs from the ranked list, 1 pair
    loss_fn = dpo_loss_fn("sigmoid", 0.1, 0.0, peft=False)
    got = {}
    for share in (False, True):
        batch = GroupBatches(groups, 4, shuffle=False, share_prefix=share).fixed_batches(0, 0)[0]
        with torch.no_grad():
            lp = response_logprobs(model, batch)
            batch["ref"] = lp.detach() - 0.5 * torch.arange(lp.shape[0])
            got[share] = (lp, loss_fn(model, batch)[0])
    torch.testing.assert_close(got[True][0], got[False][0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got[True][1], got[False][1], atol=1e-5, rtol=1e-5)

    class Wrapped(torch.nn.Module):  # no reachable lm_head (as under FSDP): the full logits are gathered instead
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *a, **kw):
            return self.inner(*a, **kw)

    batch = GroupBatches(groups, 4, shuffle=False, share_prefix=True).fixed_batches(0, 0)[0]
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(Wrapped(), batch), got[False][0], atol=1e-4, rtol=1e-5)


def test_a_row_may_be_longer_than_the_context_when_each_branch_fits():
    torch.manual_seed(0)
    dec = Decoder(get_preset("tiny-llama")).eval()
    n = dec.cfg.block_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 100, (n - 8,), generator=g).tolist()
    seqs = [[prompt + torch.randint(3, 100, (8,), generator=g).tolist() for _ in range(3)]]
    batch, h, alone = _shared_vs_alone(dec, seqs)
    assert batch["rows"]["input_ids"].shape[1] == n + 16 > n
    for k, a in enumerate(alone):
        torch.testing.assert_close(h[k], a, atol=2e-5, rtol=1e-4)
    r = shared_rows(_groups([[prompt + [5] * 9]]), 0)  # one position too many
    with pytest.raises(ValueError, match="exceeds block_size"):
        dec.hidden_states(r["input_ids"], r["position_ids"], branch_ids=r["branch_ids"])
