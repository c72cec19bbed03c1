"""`lmforge ppo`: RLHF with PPO (InstructGPT): actor, critic, frozen reference and a reward model or function."""

from __future__ import annotations

from lmforge.commands.args import seed_type
from lmforge.commands.common import add_resume_args, report, train_in
from lmforge.commands.sft import _drop_none
from lmforge.errors import LMForgeError


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Optimise a policy against a reward with PPO: rollouts sampled with the KV-cache generator, "
                    "per-token rewards -beta*KL to the frozen reference plus the score at the last token, GAE, "
                    "several minibatch epochs of the clipped policy and value losses, early stop on approx-KL, "
                    "an adaptive KL coefficient and optional PPO-ptx. Settings: --config YAML, the flags below, "
                    "then --section.key value overrides (sections ppo, train, peft; e.g. --ppo.kl_target 2 "
                    "--ppo.rollout_batch 32). The output directory is a loadable --model (the policy); the critic "
                    "is saved in OUT/critic. Metrics in OUT/metrics.jsonl, score and KL plotted in OUT/ppo.png.")
    p.add_argument("--model", help="initial policy (default: the bundled stories260K)")
    p.add_argument("--tokenizer", help="tokenizer path (default: the one beside the model)")
    p.add_argument("--reward-model", help="reward model directory (lmforge reward)")
    p.add_argument("--reward", help="reward function module:function or path/file.py:function, called as "
                                    "function(prompts: list[str], responses: list[str]) -> list[float]")
    p.add_argument("--prompts", help="JSONL with a prompt (or instruction, or messages) field, or a text file "
                                     "with one prompt per line")
    p.add_argument("--eval-prompts", help="held-out prompts: mean reward before and after training")
    p.add_argument("--ptx-data", help="pretraining text file or prepared directory for PPO-ptx (--ppo.ptx_coef)")
    p.add_argument("--template", help="chat template (default: the model's own, else alpaca)")
    p.add_argument("--peft", help="lora | qlora: actor and critic share the base; the reference is the base "
                                  "with adapters disabled")
    p.add_argument("--steps", type=int, help="PPO iterations, each a rollout and its update (default 20)")
    p.add_argument("--config", help="YAML config (keys model, reward_model, reward, prompts, ppo, train, peft, ...)")
    p.add_argument("--out", help="run directory (default runs/ppo)")
    add_resume_args(p)
    p.add_argument("--seed", type=seed_type, help="random seed")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> None:
    from lmforge.stages.ppo import PPOConfig, load_ppo_config, run_ppo
    from lmforge.train.config import merge, parse_overrides, read_yaml

    d: dict = read_yaml(args.config) if args.config else {}
    flags = _drop_none({"model": args.model, "tokenizer": args.tokenizer, "reward_model": args.reward_model,
                        "reward": args.reward, "prompts": args.prompts, "eval_prompts": args.eval_prompts,
                        "ptx_data": args.ptx_data, "template": args.template, "steps": args.steps, "out": args.out,
                        "train": {"seed": args.seed}, "peft": {"method": args.peft}})
    d = merge(merge(d, flags), parse_overrides(getattr(args, "overrides", []), PPOConfig))
    explicit = set((d.get("train") or {}).keys())
    if isinstance(d.get("peft"), str):
        d["peft"] = {"method": d["peft"]}
    if d.get("peft") and "method" not in d["peft"]:
        raise LMForgeError(f"peft options {sorted(d['peft'])} given without a method: add --peft METHOD")
    cfg = load_ppo_config(d, where=args.config or "command line")
    s = train_in(args, cfg.out, lambda resume: run_ppo(cfg, explicit_train=explicit, resume=resume))
    last = s["last"]
    msg = (f"done: {s['iterations']} iterations, score {last.get('score', float('nan')):.4f}, "
           f"KL {last.get('kl', float('nan')):.4f}, beta {s['beta']:.4g}, early stops {s['early_stops']}")
    if s["heldout_after"] is not None:
        before = "n/a" if s["heldout_before"] is None else f"{s['heldout_before']:.4f}"
        msg += f"; held-out reward {before} -> {s['heldout_after']:.4f}"
    report(msg + f"; policy in {cfg.out}")  # under torchrun only the first process reports
