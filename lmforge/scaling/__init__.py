"""lmforge.scaling: Chinchilla and Kaplan scaling laws, fitting L(N, D) to runs, sweeps, memory and FLOPs."""

from lmforge.scaling.fit import Run, fit_law, read_run
from lmforge.scaling.laws import EPOCH, HOFFMANN, KAPLAN, ChinchillaLaw, chinchilla_report, kaplan_report
from lmforge.scaling.memory import Parallel, analytic_params, flops_per_token, memory_estimate

__all__ = ["EPOCH", "HOFFMANN", "KAPLAN", "ChinchillaLaw", "Parallel", "Run", "analytic_params", "chinchilla_report",
           "fit_law", "flops_per_token", "kaplan_report", "memory_estimate", "read_run"]
