"""Few-step solvers (iddpm.diffusion.solvers) against closed forms, DDIM and their contracts; float64 throughout.

The toy models are exact: for data whose values are i.i.d. from a Gaussian mixture sum_k w_k N(mu_k, s_k^2),
E[x_0 | x_t] is known in closed form, and each toy evaluates it at the real time it receives (undoing the
rescale and the log-sigma interpolation), so only the solvers' discretisation error remains.  For one Gaussian
the probability-flow ODE keeps ``(x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)`` constant, which gives the exact
solution from x_T.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iddpm.diffusion import (
    DEFAULT_SCHEDULE,
    SCHEDULES,
    SOLVERS,
    GaussianDiffusion,
    ModelMeanType,
    SolveResult,
    create_gaussian_diffusion,
    solve,
)

F64 = torch.float64


class ExactMixture:
    """``model(x, t)`` predicting eps (or x_0) exactly for values i.i.d. from sum_k w_k N(mu_k, s_k^2).

    :param learned_var: append C junk variance channels (a learn_sigma model's output layout).
    Records every model time received in ``self.times``.
    """

    def __init__(self, diffusion, w=(1.0,), mu=(0.0,), s=(1.0,), *, predict_x0=False, learned_var=False, junk=0.0):
        self.num_timesteps, self.rescale = diffusion.num_timesteps, diffusion.rescale_timesteps
        abar = diffusion.alphas_cumprod
        self.log_sigma_table = 0.5 * np.log((1 - abar) / abar)
        self.w, self.mu, self.s = (torch.tensor(v, dtype=F64) for v in (w, mu, s))
        self.predict_x0, self.learned_var, self.junk = predict_x0, learned_var, junk
        self.times: list[torch.Tensor] = []

    def coefficients(self, t_model: torch.Tensor):
        t = t_model.to(F64).numpy() * (self.num_timesteps / 1000.0 if self.rescale else 1.0)
        log_sigma = np.interp(t, np.arange(self.num_timesteps), self.log_sigma_table)
        abar = 1.0 / (1.0 + np.exp(2.0 * log_sigma))
        return torch.from_numpy(np.sqrt(abar)), torch.from_numpy(np.sqrt(1.0 - abar))

    def x0(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        a = alpha.view(-1, *[1] * x.ndim)  # trailing axis: mixture components
        sg = sigma.view(-1, *[1] * x.ndim)
        var = a**2 * self.s**2 + sg**2
        xe = x[..., None]
        logp = torch.log(self.w) - 0.5 * torch.log(var) - 0.5 * (xe - a * self.mu) ** 2 / var
        posterior_means = self.mu + a * self.s**2 / var * (xe - a * self.mu)
        return (torch.softmax(logp, dim=-1) * posterior_means).sum(-1)

    def __call__(self, x, t):
        self.times.append(t.clone())
        alpha, sigma = self.coefficients(t)
        x0 = self.x0(x, alpha, sigma)
        a, sg = alpha.view(-1, *[1] * (x.ndim - 1)), sigma.view(-1, *[1] * (x.ndim - 1))
        out = x0 if self.predict_x0 else (x - a * x0) / sg
        if self.learned_var:
            out = torch.cat([out, torch.full_like(out, self.junk)], dim=1)
        return out


def gaussian_exact(diffusion, x_T, mu, s):
    """The exact solver output for N(mu, s^2) data: the ODE solution from t = T-1 to t = 0, then its exact data
    prediction there (the solvers' final output)."""
    abar = diffusion.alphas_cumprod
    (a_T, a_0), (s_T, s_0) = np.sqrt(abar[[-1, 0]]), np.sqrt(1 - abar[[-1, 0]])
    invariant = (x_T - a_T * mu) / np.sqrt(a_T**2 * s**2 + s_T**2)
    x_0 = a_0 * mu + np.sqrt(a_0**2 * s**2 + s_0**2) * invariant
    return mu + a_0 * s**2 / (a_0**2 * s**2 + s_0**2) * (x_0 - a_0 * mu)


def noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------ convergence order
# Step pairs chosen in each solver's asymptotic range (measured ratios in the comments, linear / cosine).
ORDER_CASES = [
    ("ddim-ode", 40, (1.8, 2.2)),  # order 1
    ("dpm++2m", 80, (3.0, 5.5)),  # order 2
    ("dpm++3m", 320, (6.5, 11.0)),  # order 3
    ("unipc", 80, (6.0, 11.0)),  # UniP-2 + UniC: order 3
]


def assert_error_ratio(model, d, x_T, target, sampler, steps, ratio_range, label):
    """Error (max abs vs ``target``) at ``steps`` over that at ``2 * steps`` lies in ``ratio_range``."""
    errs = [
        max_err(solve(model, d, x_T, sampler=sampler, steps=n, schedule="logsnr", clip_denoised=False).sample, target)
        for n in (steps, 2 * steps)
    ]
    ratio = errs[0] / errs[1]
    print(f"{label} {sampler} {steps}->{2 * steps}: errors {errs[0]:.3e} {errs[1]:.3e} ratio {ratio:.2f}")
    assert ratio_range[0] <= ratio <= ratio_range[1], (errs, ratio)


@pytest.mark.parametrize("noise_schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,steps,ratio_range", ORDER_CASES)
def test_gaussian_error_falls_at_the_solver_order(sampler, steps, ratio_range, noise_schedule):
    d = create_gaussian_diffusion(steps=1000, noise_schedule=noise_schedule)
    mu, s = -0.5, 0.05
    x_T = noise((8, 1, 2, 2))
    exact = gaussian_exact(d, x_T, mu, s)
    assert_error_ratio(ExactMixture(d, mu=(mu,), s=(s,)), d, x_T, exact, sampler, steps, ratio_range, noise_schedule)


@pytest.mark.parametrize(
    "sampler,steps,ratio_range",
    [("dpm++2m", 160, (3.0, 5.5)), ("dpm++3m", 320, (6.5, 11.0)), ("unipc", 80, (6.0, 11.0))],
)
def test_mixture_error_falls_at_the_solver_order(sampler, steps, ratio_range):
    # No closed form: the reference is 3M with 8x the steps of the finer run (its error is >= 500x smaller).
    d = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    model = ExactMixture(d, w=(0.6, 0.4), mu=(-0.7, 0.5), s=(0.1, 0.25))
    x_T = noise((64, 1, 1, 1), seed=1)
    ref = solve(model, d, x_T, sampler="dpm++3m", steps=16 * steps, schedule="logsnr", clip_denoised=False).sample
    assert_error_ratio(model, d, x_T, ref, sampler, steps, ratio_range, "mixture")


# ------------------------------------------------------------------ equivalence with the original's DDIM
@pytest.mark.parametrize(
    "T,K,noise_schedule,rescale,predict_x0",
    [(1000, 10, "linear", False, False), (4000, 32, "cosine", True, True)],
)
def test_first_order_solver_equals_ddim_eta0(T, K, noise_schedule, rescale, predict_x0):
    kw = dict(steps=T, noise_schedule=noise_schedule, rescale_timesteps=rescale, predict_xstart=predict_x0)
    full, spaced = create_gaussian_diffusion(**kw), create_gaussian_diffusion(**kw, timestep_respacing=str(K))
    grid = solve(lambda x, t: x, full, noise((1, 1, 1, 1)), sampler="ddim-ode", steps=K, schedule="uniform")
    np.testing.assert_array_equal(grid.timesteps[::-1], spaced.timestep_map)  # the same integer timesteps
    # Data partly outside [-1, 1], so that clip_denoised engages.
    model = ExactMixture(full, w=(0.5, 0.5), mu=(-1.2, 0.9), s=(0.3, 0.2), predict_x0=predict_x0)
    x_T = noise((4, 2, 3, 3), seed=2)
    seen = []
    res = solve(model, full, x_T, sampler="ddim-ode", steps=K, schedule="uniform", callback=seen.append)
    ddim = list(spaced.ddim_sample_loop_progressive(model, x_T.shape, noise=x_T, clip_denoised=True, eta=0.0))
    assert len(seen) == len(ddim) == res.nfe == K
    inputs = [x_T] + [out["sample"] for out in ddim[:-1]]
    for info, x_in, out in zip(seen, inputs, ddim):
        assert max_err(info["x"], x_in) < 1e-12
        assert max_err(info["denoised"], out["pred_xstart"]) < 1e-12
    assert (ddim[-1]["pred_xstart"].abs() == 1).any()  # clipping was active
    assert max_err(res.sample, ddim[-1]["sample"]) < 1e-12


# ------------------------------------------------------------------ the model seam
@pytest.mark.parametrize("rescale,upper", [(True, 1000.0), (False, 4000.0)])
def test_model_receives_rescaled_real_times(rescale, upper):
    d = create_gaussian_diffusion(steps=4000, rescale_timesteps=rescale)
    model = ExactMixture(d, mu=(0.1,), s=(0.4,))
    x_T = noise((3, 1, 2, 2))
    res = solve(model, d, x_T, sampler="dpm++2m", steps=7, schedule="karras")
    times = torch.stack(model.times)  # (steps, N)
    assert times.dtype == F64 and (times == times[:, :1]).all()
    np.testing.assert_allclose(times[:, 0].numpy(), res.timesteps * upper / 4000, rtol=1e-15, atol=0)
    assert times.min() == 0 and times.max() == 3999 * upper / 4000 < upper
    # The toy undoes the rescale, so both conventions solve the same ODE.
    other = create_gaussian_diffusion(steps=4000, rescale_timesteps=not rescale)
    again = solve(ExactMixture(other, mu=(0.1,), s=(0.4,)), other, x_T, sampler="dpm++2m", steps=7, schedule="karras")
    assert max_err(res.sample, again.sample) < 1e-13


def test_float32_input_gives_float32_times_and_sample():
    d = create_gaussian_diffusion(steps=1000)
    seen = []

    def model(x, t):
        seen.append(t.dtype)
        return torch.zeros_like(x)

    res = solve(model, d, torch.randn(2, 3, 4, 4), sampler="unipc", steps=5)
    assert res.sample.dtype == torch.float32 and set(seen) == {torch.float32}
    assert isinstance(res, SolveResult) and res.timesteps.dtype == np.float64


@pytest.mark.parametrize("sampler", SOLVERS)
def test_one_channel_learned_sigma_model_ignores_the_variance_half(sampler):
    learned = create_gaussian_diffusion(steps=1000, learn_sigma=True)
    fixed = create_gaussian_diffusion(steps=1000)
    x_T = noise((3, 1, 4, 4))
    kw = dict(sampler=sampler, steps=6, generator=None)
    outs = []
    for junk in (0.0, -1e3):
        torch.manual_seed(0)
        model = ExactMixture(learned, mu=(0.2,), s=(0.3,), learned_var=True, junk=junk)
        outs.append(solve(model, learned, x_T, **kw).sample)
    torch.manual_seed(0)
    plain = solve(ExactMixture(fixed, mu=(0.2,), s=(0.3,)), fixed, x_T, **kw).sample
    assert outs[0].shape == (3, 1, 4, 4)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], plain)
    with pytest.raises(ValueError, match=r"expected \(3, 2, 4, 4\)"):
        solve(ExactMixture(learned), learned, x_T, **kw)
    with pytest.raises(ValueError, match=r"expected \(3, 1, 4, 4\)"):
        solve(ExactMixture(fixed, learned_var=True), fixed, x_T, **kw)


@pytest.mark.parametrize("sampler", SOLVERS)
def test_nfe_counts_model_calls_and_callback_sees_each(sampler):
    d = create_gaussian_diffusion(steps=1000)
    model = ExactMixture(d, mu=(0.2,), s=(0.3,))
    seen = []
    res = solve(model, d, noise((2, 1, 2, 2)), sampler=sampler, steps=9, callback=seen.append)
    assert res.nfe == len(model.times) == len(seen) == len(res.timesteps) == 9
    assert [info["i"] for info in seen] == list(range(9))
    np.testing.assert_array_equal([info["t"] for info in seen], res.timesteps)
    assert torch.equal(res.sample, seen[-1]["denoised"])  # the output is the final data prediction
    assert res.timesteps[0] == 999 and res.timesteps[-1] == 0


# ------------------------------------------------------------------ SDE sampler
def test_sde_sample_moments_match_the_data():
    mu, s = 0.3, 0.5
    d = create_gaussian_diffusion(steps=1000)
    x_T = noise((5000, 1, 2, 2), seed=3)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        model = ExactMixture(d, mu=(mu,), s=(s,))
        return solve(model, d, x_T, sampler="dpm++2m-sde", steps=160, clip_denoised=False, generator=g).sample

    x = sample(4).flatten()
    n = x.numel()
    # 4 standard errors: s / sqrt(n) for the mean, s^2 sqrt(2 / (n - 1)) for the variance (n = 20000; the
    # discretisation bias of the variance at 160 steps, 0.12% of s^2 (exact, below), is an eighth of one error).
    assert abs(x.mean().item() - mu) < 4 * s / np.sqrt(n)
    assert abs(x.var().item() - s**2) < 4 * s**2 * np.sqrt(2 / (n - 1))
    # And it is not the ODE: the sample depends on the noise.
    assert max_err(x, sample(5).flatten()) > 0.1


def _sde_exact_moments(d, mu, s, steps):
    """Mean and variance of the SDE sampler's output for x_T ~ N(0, 1), exactly: for Gaussian data every update
    is affine, output = c + a x_T + sum_j b_j z_j, read off from unit inputs."""
    x_T = torch.zeros(steps + 1, 1, 1, 1, dtype=F64)
    x_T[1] = 1.0
    draws = []

    def unit_noise(x):  # draw j is 1 on batch row 2 + j only
        z = torch.zeros_like(x)
        z[2 + len(draws)] = 1.0
        draws.append(1)
        return z

    out = solve(
        ExactMixture(d, mu=(mu,), s=(s,)),
        d,
        x_T,
        sampler="dpm++2m-sde",
        steps=steps,
        clip_denoised=False,
        noise_like=unit_noise,
    ).sample.flatten()
    assert len(draws) == steps - 1
    c, a, b = out[0], out[1] - out[0], out[2:] - out[0]
    return c.item(), (a**2 + (b**2).sum()).item()


def test_sde_weak_error_falls_at_second_order():
    mu, s = 0.3, 0.5
    d = create_gaussian_diffusion(steps=1000)
    a0, s0 = np.sqrt(d.alphas_cumprod[0]), np.sqrt(1 - d.alphas_cumprod[0])
    # The exact output law: x at t = 0 ~ N(a0 mu, a0^2 s^2 + s0^2), then the exact data prediction there.
    var_exact = a0**2 * s**4 / (a0**2 * s**2 + s0**2)
    errs = []
    for steps in (40, 80, 160):
        mean, var = _sde_exact_moments(d, mu, s, steps)
        assert abs(mean - mu) < 1e-5
        errs.append(abs(var - var_exact))
    print("SDE variance errors at 40/80/160 steps:", errs)
    assert all(3.0 <= errs[i] / errs[i + 1] <= 6.0 for i in range(2)), errs


def test_sde_noise_like_gives_batch_size_invariant_samples():
    d = create_gaussian_diffusion(steps=1000)
    model = ExactMixture(d, w=(0.5, 0.5), mu=(-0.5, 0.5), s=(0.2, 0.2))
    x_T = noise((4, 1, 3, 3))

    def per_sample(seeds):
        gens = [torch.Generator().manual_seed(k) for k in seeds]
        return lambda x: torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens])

    big = solve(model, d, x_T, sampler="dpm++2m-sde", steps=12, noise_like=per_sample([10, 11, 12, 13])).sample
    small = solve(model, d, x_T[2:], sampler="dpm++2m-sde", steps=12, noise_like=per_sample([12, 13])).sample
    assert max_err(big[2:], small) < 1e-14
    g1 = solve(model, d, x_T, sampler="dpm++2m-sde", steps=12, generator=torch.Generator().manual_seed(7)).sample
    g2 = solve(model, d, x_T, sampler="dpm++2m-sde", steps=12, generator=torch.Generator().manual_seed(7)).sample
    assert torch.equal(g1, g2)


# ------------------------------------------------------------------ data-prediction processing
def test_clip_denoised_and_denoised_fn_act_on_every_data_prediction():
    d = create_gaussian_diffusion(steps=1000)
    model = ExactMixture(d, mu=(1.5,), s=(0.2,))  # data outside [-1, 1]
    x_T = noise((4, 1, 2, 2))
    clipped = solve(model, d, x_T, sampler="dpm++2m", steps=10).sample
    free = solve(model, d, x_T, sampler="dpm++2m", steps=10, clip_denoised=False).sample
    assert clipped.abs().max() <= 1 and free.max() > 1.2
    seen = []
    res = solve(
        model,
        d,
        x_T,
        sampler="unipc",
        steps=10,
        callback=seen.append,
        denoised_fn=lambda x0: torch.full_like(x0, 2.0) + 0 * x0,
    )
    assert all(torch.equal(info["denoised"], torch.ones_like(x_T)) for info in seen)  # fn first, then clip
    assert torch.equal(res.sample, torch.ones_like(x_T))


def test_dynamic_thresholding_scales_by_the_995th_percentile():
    d = create_gaussian_diffusion(steps=1000, predict_xstart=True)
    target = torch.linspace(-3, 2, 2 * 1 * 20 * 20, dtype=F64).reshape(2, 1, 20, 20)
    target[1] *= 0.3  # second sample inside [-1, 1]: s = 1, unchanged

    res = solve(lambda x, t: target, d, noise(target.shape), sampler="dpm++3m", steps=5, thresholding=True)
    s = torch.quantile(target.abs().reshape(2, -1), 0.995, dim=1).clamp(min=1).view(2, 1, 1, 1)
    expected = torch.maximum(torch.minimum(target, s), -s) / s
    assert s[0].item() > 2.9 and s[1].item() == 1.0
    assert torch.equal(res.sample, expected)


def test_plain_gaussian_diffusion_and_identity_spaced_diffusion_agree():
    spaced = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    plain = GaussianDiffusion(
        betas=spaced.betas, model_mean_type="EPSILON", model_var_type="FIXED_LARGE", loss_type="MSE"
    )
    x_T = noise((2, 1, 2, 2))
    a = solve(ExactMixture(spaced, mu=(0.2,)), spaced, x_T, sampler="dpm++3m", steps=8).sample
    b = solve(ExactMixture(plain, mu=(0.2,)), plain, x_T, sampler="dpm++3m", steps=8).sample
    assert torch.equal(a, b)


# ------------------------------------------------------------------ bad input
def test_bad_input_raises_one_line_errors():
    d = create_gaussian_diffusion(steps=1000)
    x_T, model = noise((1, 1, 1, 1)), ExactMixture(d)
    cases = [
        (dict(sampler="euler", steps=5), "sampler='euler' is not known; choose one of " + ", ".join(SOLVERS)),
        (dict(sampler="dpm++2m", steps=5, schedule="cosine"), "choose one of " + ", ".join(SCHEDULES)),
        (dict(sampler="dpm++2m", steps=0), "steps=0"),
        (dict(sampler="dpm++2m", steps=2.5), "steps=2.5"),
        (dict(sampler="dpm++2m", steps=True), "steps=True"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            solve(model, d, x_T, **kwargs)
        assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="respaced to 10 of 1000 steps"):
        solve(model, create_gaussian_diffusion(steps=1000, timestep_respacing="10"), x_T, sampler="unipc", steps=5)
    prev_x = GaussianDiffusion(
        betas=d.betas, model_mean_type=ModelMeanType.PREVIOUS_X, model_var_type="FIXED_SMALL", loss_type="MSE"
    )
    with pytest.raises(ValueError, match="PREVIOUS_X is not supported"):
        solve(model, prev_x, x_T, sampler="unipc", steps=5)


# ------------------------------------------------------------------ default schedules
def test_default_schedules_measured():
    """The measurement behind DEFAULT_SCHEDULE: on two mixtures x two beta schedules at 10 and 20 NFE, the
    default grid has the smallest geometric-mean RMS error (vs a 2000-step 3M reference) of the three."""
    mixtures = [((0.6, 0.4), (-0.7, 0.5), (0.1, 0.25)), ((0.3, 0.3, 0.4), (-0.8, 0.0, 0.8), (0.02, 0.02, 0.02))]
    cases = []
    for noise_schedule in ("linear", "cosine"):
        d = create_gaussian_diffusion(steps=1000, noise_schedule=noise_schedule)
        for w, mu, s in mixtures:
            model, x_T = ExactMixture(d, w=w, mu=mu, s=s), noise((256, 1, 1, 1), seed=5)
            ref = solve(model, d, x_T, sampler="dpm++3m", steps=2000, schedule="logsnr", clip_denoised=False).sample
            cases.append((d, model, x_T, ref))
    for sampler in ("ddim-ode", "dpm++2m", "dpm++3m", "unipc"):
        log_err = {}
        for schedule in SCHEDULES:
            errs = [
                ((solve(m, d, x_T, sampler=sampler, steps=n, schedule=schedule, clip_denoised=False).sample - ref) ** 2)
                .mean()
                .sqrt()
                .item()
                for d, m, x_T, ref in cases
                for n in (10, 20)
            ]
            log_err[schedule] = float(np.mean(np.log(errs)))
        print(sampler, {k: round(float(np.exp(v)), 4) for k, v in log_err.items()})
        assert min(log_err, key=log_err.get) == DEFAULT_SCHEDULE[sampler], (sampler, log_err)
    assert DEFAULT_SCHEDULE["dpm++2m-sde"] == DEFAULT_SCHEDULE["dpm++2m"]  # same drift discretisation


# ------------------------------------------------------------------ internals pinned
def test_taylor_weights_match_quadrature_on_both_sides_of_the_series_switch():
    from iddpm.diffusion.solvers import _taylor_weights

    for h in (1e-3, 0.3, 0.999, 1.0, 2.5, 8.0):
        u = np.linspace(0.0, h, 200001)
        for k, got in enumerate(_taylor_weights(h, 3)):
            f = np.exp(u - h) * u**k / math.factorial(k)
            want = np.sum((f[1:] + f[:-1]) / 2 * np.diff(u))  # trapezoid, error ~1e-11 relative
            assert abs(got - want) <= 1e-9 * abs(want), (h, k, got, want)


def test_lower_order_final_caps_only_the_3m_step_into_t0_below_15_steps():
    d = create_gaussian_diffusion(steps=1000)
    model = ExactMixture(d, w=(0.5, 0.5), mu=(-0.5, 0.5), s=(0.2, 0.2))
    x_T = noise((4, 1, 2, 2))

    def run(sampler, steps, lower):
        return solve(model, d, x_T, sampler=sampler, steps=steps, lower_order_final=lower).sample

    assert not torch.equal(run("dpm++3m", 10, True), run("dpm++3m", 10, False))
    assert torch.equal(run("dpm++3m", 15, True), run("dpm++3m", 15, False))
    for sampler in ("dpm++2m", "unipc"):  # order 2: the final step (to the clean end) is first order anyway
        assert torch.equal(run(sampler, 10, True), run(sampler, 10, False))


def test_model_kwargs_reach_the_model():
    d = create_gaussian_diffusion(steps=1000)
    y = torch.tensor([3, 5])

    def model(x, t, y=None, low_res=None):
        assert torch.equal(y, torch.tensor([3, 5])) and low_res.shape == (2, 1, 2, 2)
        return torch.zeros_like(x)

    res = solve(
        model, d, noise((2, 1, 4, 4)), sampler="dpm++2m", steps=4, model_kwargs={"y": y, "low_res": noise((2, 1, 2, 2))}
    )
    assert res.nfe == 4
