"""``lmforge pipeline``: the whole life of a model as one YAML list of stages (tokenizer, clean, prepare, pretrain,
sft, reward, dpo/ppo, rejection-sample, eval, quantize), run in order, resumable, measured and reported."""

from pathlib import Path

from lmforge.pipeline.spec import KINDS, Pipeline, read_pipeline

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.yaml"))}


__all__ = ["KINDS", "PRESETS_DIR", "Pipeline", "presets", "read_pipeline"]
