"""Pretraining-data cleaning (``lmforge data clean``): language identification, markup/keyword and heuristic
quality filters, an optional perplexity filter, de-duplication at sentence, document (exact and MinHash-LSH near)
and dataset (evaluation-set decontamination) level, and PII scrubbing. Each stage records how many documents and
characters it removed and why; :func:`clean` writes the surviving documents as JSONL and a JSON report."""

from lmforge.data.clean.base import Stage, StageStats
from lmforge.data.clean.pipeline import DEFAULT_STAGES, STAGES, build_stages, clean, load_config, run_stages

__all__ = ["DEFAULT_STAGES", "STAGES", "Stage", "StageStats", "build_stages", "clean", "load_config", "run_stages"]
