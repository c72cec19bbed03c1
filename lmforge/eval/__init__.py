"""lmforge.eval: benchmark tasks (perplexity, multiple choice, generation with answer extraction) scored the way
lm-evaluation-harness scores them, with the shared prompt prefix of every question encoded once.

    from lmforge.eval import run_task
    run_task(model, tokenizer, {"task": "mmlu", "data": "mmlu/", "fewshot_data": "mmlu/", "shots": 5})
"""

from lmforge.eval.runner import EvalConfig, EvalResult, evaluate, run_task

__all__ = ["EvalConfig", "EvalResult", "evaluate", "run_task"]
