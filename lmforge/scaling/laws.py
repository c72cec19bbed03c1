"""Published scaling laws: Chinchilla (Hoffmann et al. 2022) and Kaplan et al. (2020), with their constants' sources.

Chinchilla: L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D training tokens, loss in nats/token on
MassiveText); training compute C ~ 6 N D; the compute-optimal split (Hoffmann et al., eq. 4) is
N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b with a = beta/(alpha+beta), b = alpha/(alpha+beta),
G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lmforge.errors import LMForgeError

PF_DAY = 1e15 * 86400  # FLOPs in a petaflop/s-day (Kaplan et al. measure compute in PF-days)


@dataclass(frozen=True)
class ChinchillaLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def a(self) -> float:  # N_opt ∝ C^a
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:  # D_opt ∝ C^b
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L(N, D) subject to 6 N D = compute."""
        n = self.G * (compute / 6) ** self.a
        return n, compute / (6 * n)

    def compute_for_params(self, n: float) -> float:
        """The compute for which ``n`` parameters are optimal (inverse of N_opt(C))."""
        return 6 * (n / self.G) ** (1 / self.a)

    def compute_for_tokens(self, d: float) -> float:
        return 6 * (d * self.G) ** (1 / self.b)

    def to_dict(self) -> dict:
        return asdict(self)


# Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (arXiv:2203.15556), section 3.3 / eq. 10,
# approach 3 (parametric fit with a Huber loss): E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28 (the
# values printed in the paper; its TeX source carries alpha = 0.3392, beta = 0.2849, E = 1.6934).
HOFFMANN = ChinchillaLaw(1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022, approach 3 (eq. 10)")
# Besiroglu, Erdil, Barnett, You 2024, "Chinchilla Scaling: A replication attempt" (Epoch AI, arXiv:2404.10102),
# Table 1 refit of approach 3 on the data reconstructed from Hoffmann et al.'s Figure 4: E = 1.8172, A = 482.01,
# B = 2085.43, alpha = 0.3478, beta = 0.3658.
EPOCH = ChinchillaLaw(1.8172, 482.01, 2085.43, 0.3478, 0.3658, "Besiroglu et al. 2024 (Epoch AI) refit")
LAWS = {"hoffmann": HOFFMANN, "epoch": EPOCH}

# Hoffmann et al. 2022, Table 2: exponents of N_opt ∝ C^a and D_opt ∝ C^b from the three approaches.
APPROACHES = {"approach 1 (training curve envelope)": (0.50, 0.50), "approach 2 (IsoFLOP profiles)": (0.49, 0.51),
              "approach 3 (parametric fit)": (0.46, 0.54)}
# Chinchilla itself (Hoffmann et al. 2022, Table 1/3): 70B parameters, 1.4T tokens: the anchor of the approaches.
CHINCHILLA_N, CHINCHILLA_D = 70e9, 1.4e12
TOKENS_PER_PARAM = 20  # the rule of thumb read off Chinchilla (1.4T / 70B)


def approach_allocation(compute: float, a: float, b: float) -> tuple[float, float]:
    """(N, D) from an approach's exponents, anchored at Chinchilla's own allocation (70B, 1.4T tokens)."""
    c0 = 6 * CHINCHILLA_N * CHINCHILLA_D
    return CHINCHILLA_N * (compute / c0) ** a, CHINCHILLA_D * (compute / c0) ** b


def chinchilla_report(compute: float | None = None, params: float | None = None, tokens: float | None = None,
                      law: ChinchillaLaw = HOFFMANN) -> dict:
    """Compute-optimal allocation and predicted loss from any one of compute, params, tokens; with two of them
    (C = 6 N D gives the third) the predicted loss at that N and D beside the optimum for its compute."""
    given = [x for x in (compute, params, tokens) if x is not None]
    if not given:
        raise LMForgeError("give --compute, --params or --tokens")
    if any(not (x > 0 and math.isfinite(x)) for x in given):
        raise LMForgeError("--compute, --params and --tokens must be positive numbers")
    out: dict = {"law": law.to_dict(), "a": law.a, "b": law.b}
    if compute is not None and params is not None and tokens is not None:
        if not math.isclose(6 * params * tokens, compute, rel_tol=1e-3):
            raise LMForgeError(f"--compute {compute:.4g} disagrees with 6 x --params x --tokens = "
                               f"{6 * params * tokens:.4g}: give two of the three")
    elif compute is not None and params is not None:  # a budget and a size: the tokens follow from C = 6 N D
        tokens = compute / (6 * params)
    elif compute is not None and tokens is not None:
        params = compute / (6 * tokens)
    if params is not None and tokens is not None:
        c = 6 * params * tokens
        out.update(compute=c, params=params, tokens=tokens, loss=law.loss(params, tokens),
                   tokens_per_param=tokens / params)
        n_opt, d_opt = law.optimal(c)
        out["optimal"] = {"params": n_opt, "tokens": d_opt, "loss": law.loss(n_opt, d_opt)}
        return out
    if compute is None:
        compute = law.compute_for_params(params) if params is not None else law.compute_for_tokens(tokens)
    n, d = law.optimal(compute)
    rule_n = math.sqrt(compute / (6 * TOKENS_PER_PARAM))
    out.update(compute=compute, params=n, tokens=d, loss=law.loss(n, d), tokens_per_param=d / n,
               rule_20={"params": rule_n, "tokens": TOKENS_PER_PARAM * rule_n,
                        "loss": law.loss(rule_n, TOKENS_PER_PARAM * rule_n)},
               approaches={k: dict(zip(("params", "tokens"), approach_allocation(compute, a, b)), a=a, b=b)
                           for k, (a, b) in APPROACHES.items()})
    return out


# ---- Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (arXiv:2001.08361) ------------------------------
# N counts non-embedding parameters, D tokens, C_min compute in PF-days; losses in nats/token on WebText2.
KAPLAN = {
    "alpha_N": 0.076, "N_c": 8.8e13,  # eq. 1.1 / Table 5: L(N) = (N_c / N)^alpha_N
    "alpha_D": 0.095, "D_c": 5.4e13,  # eq. 1.2: L(D) = (D_c / D)^alpha_D
    "alpha_C": 0.050, "C_c": 3.1e8,  # eq. 1.3: L(C_min) = (C_c / C_min)^alpha_C, C_min in PF-days
    # eq. 1.5 with the Table 2 fit: L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D
    "nd_alpha_N": 0.076, "nd_alpha_D": 0.103, "nd_N_c": 6.4e13, "nd_D_c": 1.8e13,
    "B_star": 2e8, "alpha_B": 0.21,  # eq. 1.4: critical batch B_crit(L) = B_star / L^(1 / alpha_B) tokens
    # eq. 1.7 / Figure 14 (and section 6.1): compute-efficient allocation with C_min in PF-days
    "N_e": 1.3e9, "p_N": 0.73, "B_e": 2.0e6, "p_B": 0.24, "S_e": 5.4e3, "p_S": 0.03, "D_e": 2e10, "p_D": 0.27,
}


def kaplan_report(compute: float | None = None, params: float | None = None, tokens: float | None = None) -> dict:
    k = KAPLAN
    if all(x is None for x in (compute, params, tokens)):
        raise LMForgeError("give --compute, --params or --tokens")
    if any(x is not None and not (x > 0 and math.isfinite(x)) for x in (compute, params, tokens)):
        raise LMForgeError("--compute, --params and --tokens must be positive numbers")
    if None not in (compute, params, tokens):  # C = 6ND ties them: a third value can only contradict the other two
        raise LMForgeError("give at most two of --compute, --params and --tokens (C = 6·N·D fixes the third)")
    out: dict = {"constants": dict(k)}
    if params is not None:
        out["loss_N"] = (k["N_c"] / params) ** k["alpha_N"]
    if tokens is not None:
        out["loss_D"] = (k["D_c"] / tokens) ** k["alpha_D"]
    if params is not None and tokens is not None:
        out["loss_ND"] = ((k["nd_N_c"] / params) ** (k["nd_alpha_N"] / k["nd_alpha_D"]) + k["nd_D_c"] / tokens) \
            ** k["nd_alpha_D"]
        compute = compute or 6 * params * tokens
    if compute is None and params is not None:  # the compute for which these parameters are efficient
        compute = (params / k["N_e"]) ** (1 / k["p_N"]) * PF_DAY
    if compute is None and tokens is not None:
        compute = (tokens / k["D_e"]) ** (1 / k["p_D"]) * PF_DAY
    c = compute / PF_DAY
    out.update(compute=compute, compute_pf_days=c, loss_C=(k["C_c"] / c) ** k["alpha_C"],
               efficient={"params": k["N_e"] * c ** k["p_N"], "batch_tokens": k["B_e"] * c ** k["p_B"],
                          "steps": k["S_e"] * c ** k["p_S"], "tokens": k["D_e"] * c ** k["p_D"]})
    loss = out.get("loss_ND", out["loss_C"])
    out["critical_batch_tokens"] = k["B_star"] / loss ** (1 / k["alpha_B"])
    return out
