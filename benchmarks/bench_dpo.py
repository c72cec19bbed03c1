"""DPO training steps/s: lmforge's DPO loss on the one Trainer vs TRL's ``DPOTrainer``, same tiny GPT-2 (the issue's
0.94M parameters: 4 layers x 128, vocab 1024, context 128), same weights, same batch (8 pairs x 128 tokens: a
64-token prompt and 64-token responses), full fine-tuning, sigmoid loss, beta 0.1, fp32, same threads, one run.

lmforge runs with its defaults (``data.share_prompt``: a pair's prompt once for both responses, 192 tokens a pair
instead of 256) and, for comparison, without sharing. Both use a reference computed once before training (lmforge
stores it; TRL with ``precompute_ref_log_probs``), so a step is the policy's forward and backward over the pairs plus
AdamW; ``--trl-ref-model`` lets TRL run its reference model in every step instead (its default), reported
separately.

    python benchmarks/bench_dpo.py [--steps 20] [--warmup 3] [--trl-ref-model]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

P_LEN, R_LEN, PAIRS, VOCAB = 64, 64, 8, 1024


def hf_model():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=VOCAB, n_positions=P_LEN + R_LEN, n_embd=128, n_layer=4, n_head=4,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return T.GPT2LMHeadModel(cfg).eval()


def word_tokenizer():
    """A word-level tokenizer whose words w0..w1019 are single ids (so texts have exact token lengths)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(VOCAB - 4)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    r = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{r.randrange(VOCAB - 4)}" for _ in range(k))

    # responses one token short: TRL and lmforge both append EOS, making them R_LEN tokens
    return [{"prompt": words(P_LEN), "chosen": " " + words(R_LEN - 1), "rejected": " " + words(R_LEN - 1)}
            for _ in range(n)]


def bench_lmforge(hf, tok, data, steps: int, warmup: int, share: bool = True) -> float:
    from lmforge.checkpoint import build_model
    from lmforge.interop.hf import config_from_hf, state_dict_from_hf
    from lmforge.losses import IGNORE
    from lmforge.stages.dpo import _attach, dpo_loss_fn, reference_logprobs
    from lmforge.stages.reward import GroupBatches
    from lmforge.train.config import TrainConfig
    from lmforge.train.loop import Trainer

    cfg, arch = config_from_hf(hf.config.to_dict())
    model = build_model(cfg, state_dict_from_hf(hf.state_dict(), cfg, arch, "gpt2"), "gpt2")

    def enc(p: str, r: str) -> dict:
        p_ids, r_ids = tok(p)["input_ids"], tok(r)["input_ids"] + [tok.eos_token_id]
        return {"input_ids": p_ids + r_ids, "labels": [IGNORE] * len(p_ids) + r_ids}

    groups = [[enc(d["prompt"], d["chosen"]), enc(d["prompt"], d["rejected"])] for d in data]
    _attach(groups, reference_logprobs(model, groups, tok.pad_token_id, PAIRS, share_prefix=share))
    t = TrainConfig(batch_size=PAIRS, lr=5e-4, precision="fp32", max_iters=steps + warmup, warmup_iters=0)
    with tempfile.TemporaryDirectory() as d:
        src = GroupBatches(groups, PAIRS, tok.pad_token_id, share_prefix=share)  # the stage's default: shared
        trainer = Trainer(model, t, src, dpo_loss_fn("sigmoid", 0.1, 0.0, False), d, units="pairs", log=lambda m: None)
        trainer.model.train()

        def step() -> None:  # what Trainer.fit does per step, without its logging and checkpoints
            trainer.train_step()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return steps / (time.perf_counter() - t0)


def bench_trl(hf, tok, data, steps: int, warmup: int, ref_model: bool) -> float:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                marks["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            marks["t1"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(output_dir=d, per_device_train_batch_size=PAIRS, max_steps=steps + warmup, learning_rate=5e-4,
                         beta=0.1, loss_type=["sigmoid"], max_length=P_LEN + R_LEN, report_to=[],
                         logging_steps=10_000, save_strategy="no", use_cpu=True, bf16=False, fp16=False,
                         precompute_ref_log_probs=not ref_model, dataloader_num_workers=0, disable_dropout=True,
                         lr_scheduler_type="constant", seed=0)
        trainer = DPOTrainer(model=hf, args=args, train_dataset=Dataset.from_list(data * (steps + warmup)),
                             processing_class=tok, callbacks=[Clock()])
        trainer.train()
    return steps / (marks["t1"] - marks["t0"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--trl-ref-model", action="store_true", help="also time TRL with its per-step reference model")
    a = ap.parse_args()
    tok = word_tokenizer()
    data = pairs(PAIRS)
    hf = hf_model()
    n = sum(p.numel() for p in hf.parameters())
    print(f"GPT-2 {n / 1e6:.2f}M parameters, {PAIRS} pairs x {P_LEN + R_LEN} tokens, threads "
          f"{torch.get_num_threads()}")
    lm = bench_lmforge(hf, tok, data, a.steps, a.warmup)
    print(f"lmforge dpo: {lm:.2f} steps/s (defaults: the prompt once per pair)")
    lm1 = bench_lmforge(hf, tok, data, a.steps, a.warmup, share=False)
    print(f"lmforge dpo, data.share_prompt false: {lm1:.2f} steps/s")
    trl = bench_trl(hf_model(), tok, data, a.steps, a.warmup, False)
    print(f"TRL DPOTrainer (precomputed reference): {trl:.2f} steps/s; lmforge / TRL = {lm / trl:.2f}x")
    if a.trl_ref_model:
        trl2 = bench_trl(hf_model(), tok, data, a.steps, a.warmup, True)
        print(f"TRL DPOTrainer (reference model each step): {trl2:.2f} steps/s; lmforge / TRL = {lm / trl2:.2f}x")


if __name__ == "__main__":
    main()
