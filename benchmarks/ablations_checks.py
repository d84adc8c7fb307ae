"""The paper's qualitative findings, each checked against the miniature's numbers (one dict per claim).

A claim is 'agrees' / 'disagrees' only when the paired difference is beyond 2 standard errors (NLL: same test
examples and noise; FID: a paired bootstrap over samples that start from the same noise), else 'within noise'.
"""

from __future__ import annotations

import math

from ablations_stats import median_noise_scale, paired_diff, paired_fid_diff, verdict


def fmt(x, nd=3) -> str:
    """``x`` with ``nd`` decimals; ``n/a`` for None and non-finite values."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def paper_checks(results: dict, features: dict | None = None, ref_stats=None, num_boot: int = 50,
                 seed: int = 0) -> list[dict]:
    """Compare the miniature's numbers with the paper's qualitative findings; one dict per claim.

    ``features``: ``{(sampler, steps): float64 [N, D]}`` sample features; with ``ref_stats`` the FID claims use a
    paired bootstrap of FID(a) - FID(b); without them, the two FIDs' own standard errors combined."""
    return (_nll_checks(results["nll"]) + _noise_checks(results["variants"])
            + _fid_checks(results["sampling"], features, ref_stats, num_boot, seed))


def _nll_checks(nll: dict) -> list[dict]:
    checks = []

    def claim(text, a, b):
        if a in nll and b in nll:
            d = paired_diff(nll[a]["per_example_bpd"], nll[b]["per_example_bpd"])
            checks.append({"claim": text, "measured": f"{fmt(nll[a]['bpd'])} vs {fmt(nll[b]['bpd'])} bits/dim "
                           f"(paired diff {d['diff']:+.3f} +- {d['stderr']:.3f})",
                           "verdict": verdict(d["diff"], d["stderr"], expect_negative=True)})

    claim("cosine schedule gives a better NLL than linear (L_hybrid)", "hybrid_cosine", "hybrid_linear")
    fixed = [n for n in ("simple_cosine", "simple_cosine_small") if n in nll]
    if fixed:  # the better of the two fixed variances (sigma^2 = beta, sigma^2 = beta-tilde)
        best = min(fixed, key=lambda n: nll[n]["bpd"])
        which = "beta~" if best.endswith("_small") else "beta"
        claim(f"L_hybrid (learned sigma) gives a better NLL than L_simple (fixed sigma^2={which}, the better "
              "fixed choice here)", "hybrid_cosine", best)
    claim("L_vlb with importance sampling gives the best NLL (better than L_hybrid)", "vlb_importance",
          "hybrid_cosine")
    claim("importance sampling improves L_vlb's NLL over uniform t", "vlb_importance", "vlb_uniform")
    return checks


def _noise_checks(v: dict) -> list[dict]:
    """Gradient-noise claims: noise scale, loss cv and grad-norm cv must all point the same way to agree."""
    checks = []
    active = v.get("vlb_importance", {}).get("importance_sampler_active_from_step")
    for a, b, claim in (("vlb_uniform", "hybrid_cosine", "L_vlb (uniform t) has noisier gradients than L_hybrid"),
                        ("vlb_uniform", "vlb_importance", "importance sampling reduces the gradient noise of L_vlb")):
        if a not in v or b not in v:
            continue
        if b == "vlb_importance" and active is None:
            checks.append({"claim": claim, "measured": "the loss-second-moment sampler never left its warm-up "
                           "(needs 10 losses of every t): identical to uniform; train longer", "verdict": "n/a"})
            continue
        start = active if b == "vlb_importance" else 0  # noise-scale probes once the sampler is active
        (na, ta), (nb, tb) = (median_noise_scale(v[n].get("noise_scale", []), start) for n in (a, b))
        la, lb = v[a]["loss_second_half"]["cv"], v[b]["loss_second_half"]["cv"]
        ga, gb = v[a]["grad_norm_second_half"]["cv"], v[b]["grad_norm_second_half"]["cv"]
        votes = [x > y for x, y in ((na, nb), (la, lb), (ga, gb))
                 if not (math.isnan(x) or math.isnan(y)) and not (math.isinf(x) and math.isinf(y))]
        verdict_txt = "n/a" if not votes else ("agrees" if all(votes) else "disagrees" if not any(votes) else "mixed")
        probes = f" (median of probes from step {start}, once the sampler is active)" if start else ""
        checks.append({"claim": claim, "measured": f"noise scale {ta} vs {tb}{probes}; loss cv "
                       f"{fmt(la)} vs {fmt(lb)}; grad-norm cv {fmt(ga)} vs {fmt(gb)}", "verdict": verdict_txt})
    return checks


def _fid_checks(sampling: list[dict], features, ref_stats, num_boot: int, seed: int) -> list[dict]:
    rows = {(r["sampler"], r["steps"]): r for r in sampling}
    steps = sorted({r["steps"] for r in sampling})
    few = [s for s in steps if s <= 100]
    claims = (
        ("with few steps (<= 100) learned sigmas (L_hybrid) sample better than fixed sigma^2=beta",
         "hybrid_ancestral", "simple_large_ancestral", few),
        ("with few steps (<= 100) learned sigmas (L_hybrid) sample better than fixed sigma^2=beta~",
         "hybrid_ancestral", "simple_small_ancestral", few),
        ("DDIM beats L_hybrid ancestral below 50 steps", "simple_ddim", "hybrid_ancestral",
         [s for s in steps if s < 50]),
        ("L_hybrid ancestral beats DDIM at 50 steps and more", "hybrid_ancestral", "simple_ddim",
         [s for s in steps if s >= 50]),
    )
    checks = []
    for claim, better, worse, at in claims:
        diffs = [_fid_diff(rows, better, worse, k, features, ref_stats, num_boot, seed) for k in at]
        diffs = [d for d in diffs if d is not None]
        if diffs:
            checks.append(_fid_claim(claim, diffs))
    return checks


def _fid_diff(rows, better, worse, k, features, ref_stats, num_boot, seed):
    """``(steps, fid_a, fid_b, diff, stderr)`` of two samplers at ``k`` steps, or None when either is missing."""
    a, b = rows.get((better, k)), rows.get((worse, k))
    if a is None or b is None or not (math.isfinite(a["fid"]) and math.isfinite(b["fid"])):
        return None
    if features and (better, k) in features and (worse, k) in features and ref_stats is not None:
        se = paired_fid_diff(features[(better, k)], features[(worse, k)], ref_stats, num_boot, seed + k)["stderr"]
    else:
        se = math.hypot(a.get("fid_bootstrap_se", float("nan")), b.get("fid_bootstrap_se", float("nan")))
    return k, a["fid"], b["fid"], a["fid"] - b["fid"], se


def _fid_claim(claim: str, rows: list[tuple]) -> dict:
    wins = [k for k, _, _, d, se in rows if d < -2 * se]
    losses = [k for k, _, _, d, se in rows if d > 2 * se]
    ties = [k for k, *_ in rows if k not in wins and k not in losses]
    tie_note = f" (within noise at {', '.join(map(str, ties))} steps)" if ties else ""
    if not wins and not losses:
        verdict_txt = "within noise"
    elif not losses:
        verdict_txt = "agrees" + tie_note
    elif not wins:
        verdict_txt = "disagrees" + tie_note
    else:
        verdict_txt = f"mixed (agrees at {', '.join(map(str, wins))}; disagrees at {', '.join(map(str, losses))})"
    txt = "; ".join(f"{k}: {a:.2f} vs {b:.2f} (diff {d:+.2f} +- {se:.2f})" for k, a, b, d, se in rows)
    return {"claim": claim, "measured": f"FID by steps {txt}", "verdict": verdict_txt}
