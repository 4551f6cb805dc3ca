"""Tests for diffusion.py (Eq. 2-7, DDPM/DDIM) and unet3d.py (§3.2 backbone).

    python -m pytest test_part_diffusion.py -q -p no:cacheprovider -o addopts=""

The diffusion checks compare against things computed another way: iterating the
forward chain step by step, Bayes' rule for the posterior, and the exact law of
each sampler on Gaussian data (a scalar mean/variance recursion in numpy, since
every step is affine when the data are Gaussian and ε is the exact posterior mean).
The U-Net checks are invariants: frame independence, order awareness, flags.
"""
import functools
import math

import numpy as np
import pytest
import torch

from data import UserError
from diffusion import GaussianDiffusion, make_betas
from unet3d import ResBlock, SelfAttention, UNet3D, UNetConfig, count_params, timestep_embedding, unet_presets


def _diffusion_single_thread(fn):
    """Run a test on one thread: these tensors are tiny, and on a shared 2-core box threads only contend."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)
    return wrapper


def _diffusion_ldm():
    return GaussianDiffusion(make_betas("linear", 1000, 0.0015, 0.0155))


def _diffusion_exact_eps(alphas_cumprod, mu, sd):
    """ε*(x_t, t) = E[ε | x_t] for data x_0 ~ N(mu, sd²) (per dimension):
    x_t ~ N(√ᾱ mu, ᾱ sd² + 1 - ᾱ) and Cov(ε, x_t) = √(1-ᾱ)."""
    abar = torch.from_numpy(alphas_cumprod)

    def eps(x, t):
        a = abar[t].to(x.dtype)[:, None]
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * mu) / (a * sd ** 2 + 1 - a)
    return eps


def _diffusion_law(betas, mu, sd, seq, eta=None):
    """Exact mean and std of a sampler's output with the exact ε on N(mu, sd²) data, from x_T ~ N(0, 1).
    eta=None: DDPM with Σ = β̃ over all steps; else DDIM over the increasing index list seq."""
    ab = np.cumprod(1 - betas)
    m, v = np.zeros_like(mu), np.ones_like(mu)
    for i in range(len(seq) - 1, -1, -1):
        t = seq[i]
        a = ab[t]
        k = np.sqrt(1 - a) / (a * sd ** 2 + 1 - a)             # ε = k (x - √a mu)
        p, q = (1 - np.sqrt(1 - a) * k) / np.sqrt(a), np.sqrt(1 - a) * k * mu   # x̂0 = p x + q
        if eta is None:
            a_prev = ab[t - 1] if t > 0 else 1.0
            c1, c2 = betas[t] * np.sqrt(a_prev) / (1 - a), (1 - a_prev) * np.sqrt(1 - betas[t]) / (1 - a)
            A, C = c1 * p + c2, c1 * q
            noise_var = betas[t] * (1 - a_prev) / (1 - a) if t > 0 else 0.0
        else:
            a_prev = ab[seq[i - 1]] if i > 0 else 1.0
            noise_var = eta ** 2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            d = np.sqrt(1 - a_prev - noise_var)
            A, C = np.sqrt(a_prev) * p + d * k, np.sqrt(a_prev) * q - d * k * np.sqrt(a) * mu
        m, v = A * m + C, A * A * v + noise_var
    return m, np.sqrt(v)


# ----------------------------------------------------------------------------- schedules
@_diffusion_single_thread
def test_diffusion_linear_schedule_is_squared_sqrt_linspace():
    T, s, e = 1000, 0.0015, 0.0155
    b = make_betas("linear", T, s, e)
    i = np.arange(T)
    expected = (math.sqrt(s) + i / (T - 1) * (math.sqrt(e) - math.sqrt(s))) ** 2
    np.testing.assert_allclose(b, expected, rtol=1e-12)
    assert b.dtype == np.float64 and abs(b[0] - s) < 1e-15 and abs(b[-1] - e) < 1e-15


@_diffusion_single_thread
def test_diffusion_cosine_schedule_matches_alpha_bar():
    T = 1000
    b = make_betas("cosine", T, 123.0, 456.0)  # start/end ignored
    f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = np.cumprod(1 - b)
    t = np.arange(900)  # well before the 0.999 clip
    np.testing.assert_allclose(abar[t], [f(k + 1) / f(0) for k in t], rtol=1e-9)
    assert b.max() <= 0.999 and b[-1] == 0.999


@_diffusion_single_thread
def test_diffusion_bad_arguments_raise_user_error():
    with pytest.raises(UserError):
        make_betas("quadratic", 10)
    with pytest.raises(UserError):
        GaussianDiffusion(make_betas("linear", 10), loss_type="huber")
    with pytest.raises(UserError):
        _diffusion_ldm().ddim_timesteps(2000)


# ----------------------------------------------------------------------------- forward process
@_diffusion_single_thread
def test_diffusion_q_sample_matches_iterated_chain():
    """Eq. (2)-(3): iterating q(z_t|z_{t-1}) t+1 times has the moments of one q_sample(z_0, t)."""
    d = _diffusion_ldm()
    g = torch.Generator().manual_seed(0)
    N = 20000
    x0 = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64).repeat(N, 1)  # (N,3)
    checkpoints = {0, 9, 299, 999}
    z = x0.clone()
    for step in range(1000):
        beta = d.betas[step]
        z = math.sqrt(1 - beta) * z + math.sqrt(beta) * torch.randn(z.shape, generator=g, dtype=torch.float64)
        if step in checkpoints:
            t = torch.full((N,), step, dtype=torch.long)
            zq = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
            for a, b in ((z, zq),):
                va, vb = a.var(0), b.var(0)
                se_mean = torch.sqrt((va + vb) / N)
                se_var = torch.sqrt(2 * (va ** 2 + vb ** 2) / (N - 1))
                assert ((a.mean(0) - b.mean(0)).abs() < 5 * se_mean).all(), step
                assert ((va - vb).abs() < 5 * se_var).all(), step


@_diffusion_single_thread
def test_diffusion_posterior_matches_bayes_rule():
    """q(z_{t-1}|z_t,z_0) ∝ q(z_t|z_{t-1}) q(z_{t-1}|z_0): precision α_t/β_t + 1/(1-ᾱ_{t-1})."""
    d = _diffusion_ldm()
    rng = np.random.default_rng(0)
    t = np.array([1, 2, 50, 500, 999])
    x0, xt = rng.normal(size=5), rng.normal(size=5)
    beta = d.betas[t]
    abar_prev = np.cumprod(1 - d.betas)[t - 1]
    prec = (1 - beta) / beta + 1 / (1 - abar_prev)
    mean = (np.sqrt(1 - beta) * xt / beta + np.sqrt(abar_prev) * x0 / (1 - abar_prev)) / prec
    m, v, logv = d.q_posterior_mean_variance(torch.from_numpy(x0), torch.from_numpy(xt), torch.from_numpy(t))
    np.testing.assert_allclose(m.numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(v.numpy().ravel(), 1 / prec, rtol=1e-10)
    np.testing.assert_allclose(logv.numpy().ravel(), np.log(1 / prec), rtol=1e-10)
    # first step: the posterior is a point mass at z_0
    m0, v0, _ = d.q_posterior_mean_variance(torch.from_numpy(x0), torch.from_numpy(xt), torch.zeros(5, dtype=torch.long))
    np.testing.assert_allclose(m0.numpy(), x0, atol=1e-12)
    assert float(v0.abs().max()) == 0.0


@_diffusion_single_thread
def test_diffusion_p_mean_variance_is_eq6():
    d = _diffusion_ldm()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 10, 400, 998, 999])
    model_fn = lambda x_t, tt: torch.sin(3 * x_t) + tt[:, None] / 1000.0
    out = d.p_mean_variance(model_fn, x, t)
    b = torch.from_numpy(d.betas)[t][:, None]
    abar = torch.from_numpy(np.cumprod(1 - d.betas))[t][:, None]
    eq6 = (x - b / torch.sqrt(1 - abar) * model_fn(x, t)) / torch.sqrt(1 - b)
    torch.testing.assert_close(out["mean"], eq6, rtol=1e-9, atol=1e-12)
    abar_prev = torch.from_numpy(np.append(1.0, np.cumprod(1 - d.betas)[:-1]))[t][:, None]
    torch.testing.assert_close(out["variance"], b * (1 - abar_prev) / (1 - abar))
    large = GaussianDiffusion(d.betas, var_type="fixed_large").p_mean_variance(model_fn, x, t)
    torch.testing.assert_close(large["variance"], b)
    torch.testing.assert_close(large["mean"], eq6, rtol=1e-9, atol=1e-12)


@_diffusion_single_thread
def test_diffusion_training_loss_eq7():
    d = _diffusion_ldm()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 2, 3, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 7, 500, 999])
    abar = torch.from_numpy(np.cumprod(1 - d.betas))[t].reshape(4, 1, 1, 1, 1)
    recover = lambda x_t, tt: (x_t - torch.sqrt(abar) * x0) / torch.sqrt(1 - abar)  # the true ε from z_t
    assert d.training_loss(recover, x0, t, noise).abs().max() < 1e-18
    zeros = lambda x_t, tt: torch.zeros_like(x_t)
    torch.testing.assert_close(d.training_loss(zeros, x0, t, noise), noise.pow(2).mean(dim=(1, 2, 3, 4)))
    l1 = GaussianDiffusion(d.betas, loss_type="l1")
    torch.testing.assert_close(l1.training_loss(zeros, x0, t, noise), noise.abs().mean(dim=(1, 2, 3, 4)))
    w = torch.zeros(1, 1, 3, 1, 1, dtype=torch.float64)
    w[:, :, 1:] = 1  # score frames 1 and 2 only
    torch.testing.assert_close(d.training_loss(zeros, x0, t, noise, weight=w), noise[:, :, 1:].pow(2).mean(dim=(1, 2, 3, 4)))
    # random t / noise come from the generator, reproducibly
    seen = []
    spy = lambda x_t, tt: seen.append(tt.clone()) or torch.zeros_like(x_t)
    a = d.training_loss(spy, x0, generator=torch.Generator().manual_seed(5))
    b = d.training_loss(spy, x0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert torch.equal(seen[0], seen[1]) and seen[0].dtype == torch.long
    assert 0 <= int(seen[0].min()) and int(seen[0].max()) < 1000


# ----------------------------------------------------------------------------- samplers
_DIFF_MU = np.array([-0.5, 0.0, 0.5, 1.0])
_DIFF_SD = np.array([0.5, 0.7, 1.0, 0.6])


def _diffusion_check_law(x, m, s):
    """Sample mean/std agree with the exact law (m, s) within 5 standard errors."""
    N = x.shape[0]
    mean, std = x.mean(0).numpy(), x.std(0).numpy()
    assert (np.abs(mean - m) < 5 * s / math.sqrt(N)).all(), (mean, m)
    assert (np.abs(std - s) < 5 * s / math.sqrt(2 * N)).all(), (std, s)


@_diffusion_single_thread
def test_diffusion_ddpm_and_ddim_sample_gaussian_data():
    d = _diffusion_ldm()
    mu, sd = torch.from_numpy(_DIFF_MU), torch.from_numpy(_DIFF_SD)
    eps = _diffusion_exact_eps(d.alphas_cumprod, mu, sd)
    N, T = 4096, d.num_timesteps
    g = torch.Generator().manual_seed(3)
    z_T = torch.randn(N, 4, generator=g, dtype=torch.float64)

    x = d.p_sample_loop(eps, (N, 4), noise=z_T, generator=g)
    m, s = _diffusion_law(d.betas, _DIFF_MU, _DIFF_SD, np.arange(T))
    _diffusion_check_law(x, m, s)
    # with 1000 steps the DDPM law is close to the data law (Σ = β̃ is slightly too small)
    assert np.abs(m - _DIFF_MU).max() < 2e-3 and np.abs(s / _DIFF_SD - 1).max() < 0.02

    x = d.ddim_sample_loop(eps, (N, 4), steps=T, eta=0.0, noise=z_T)
    m, s = _diffusion_law(d.betas, _DIFF_MU, _DIFF_SD, np.arange(T), eta=0.0)
    _diffusion_check_law(x, m, s)
    # the mean is off by σ·μ·√ᾱ_T: x_T ~ N(0, 1) ignores the √ᾱ_T μ left in q(z_T)
    assert np.abs(m - _DIFF_MU).max() < 0.02 and np.abs(s / _DIFF_SD - 1).max() < 0.01

    seq = np.round(np.linspace(0, T - 1, 50)).astype(int)  # uniform respacing, 50 steps
    for eta in (0.0, 1.0):
        x = d.ddim_sample_loop(eps, (N, 4), steps=50, eta=eta, noise=z_T, generator=g)
        m, s = _diffusion_law(d.betas, _DIFF_MU, _DIFF_SD, seq, eta=eta)
        _diffusion_check_law(x, m, s)


@_diffusion_single_thread
def test_diffusion_ddim_eta1_all_steps_is_ddpm_step():
    """DDIM σ² with η=1 and t_prev = t-1 is β̃_t: with the same z, both samplers take the same step."""
    d = _diffusion_ldm()
    g = torch.Generator().manual_seed(4)
    model_fn = lambda x_t, tt: torch.tanh(x_t) * (1 + tt[:, None] / 999.0)
    for step in (0, 1, 2, 100, 999):
        x = torch.randn(5, 3, generator=g, dtype=torch.float64)
        t = torch.full((5,), step, dtype=torch.long)
        for _ in range(2):
            z = torch.randn(5, 3, generator=g, dtype=torch.float64)
            ddpm = d.p_sample(model_fn, x, t, noise=z)["sample"]
            ddim = d.ddim_sample(model_fn, x, t, t - 1, eta=1.0, noise=z)["sample"]
            torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-12)


@_diffusion_single_thread
def test_diffusion_ddim_eta0_deterministic_and_ends_on_pred_x0():
    d = _diffusion_ldm()
    calls = []

    def model_fn(x_t, t):
        calls.append((x_t.clone(), t.clone()))
        return 0.3 * torch.sin(x_t) + 0.1

    z_T = torch.randn(3, 2, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a = d.ddim_sample_loop(model_fn, z_T.shape, steps=1000, eta=0.0, noise=z_T, generator=torch.Generator().manual_seed(1))
    last_x, last_t = calls[-1]
    assert int(last_t[0]) == 0 and [int(c[1][0]) for c in calls] == list(range(999, -1, -1))
    abar0 = 1 - d.betas[0]  # ᾱ of the first step; the step before it has ᾱ = 1
    pred_x0 = (last_x - math.sqrt(1 - abar0) * model_fn(last_x, last_t)) / math.sqrt(abar0)
    torch.testing.assert_close(a, pred_x0, rtol=1e-12, atol=1e-12)
    b = d.ddim_sample_loop(model_fn, z_T.shape, steps=1000, eta=0.0, noise=z_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    calls.clear()
    d.ddim_sample_loop(model_fn, z_T.shape, steps=7, noise=z_T)
    ts = [int(c[1][0]) for c in calls]
    assert len(ts) == 7 and ts[0] == 999 and ts[-1] == 0 and all(x > y for x, y in zip(ts, ts[1:]))


@_diffusion_single_thread
def test_diffusion_after_step_hook_and_generator():
    d = GaussianDiffusion(make_betas("linear", 50, 1e-3, 0.2))
    model_fn = lambda x_t, t: 0.5 * x_t
    seen = []

    def after_step(x, t):  # Eq. (8)-style: keep frame 0 fixed at 7
        seen.append(int(t[0]))
        x = x.clone()
        x[:, :, 0] = 7.0
        return x

    for loop in (lambda **k: d.p_sample_loop(model_fn, (2, 1, 3, 2, 2), **k),
                 lambda **k: d.ddim_sample_loop(model_fn, (2, 1, 3, 2, 2), steps=10, eta=1.0, **k)):
        seen.clear()
        x = loop(generator=torch.Generator().manual_seed(0), after_step=after_step)
        assert (x[:, :, 0] == 7.0).all() and seen[-1] == 0 and seen == sorted(seen, reverse=True)
        y = loop(generator=torch.Generator().manual_seed(0))
        z = loop(generator=torch.Generator().manual_seed(0))
        w = loop(generator=torch.Generator().manual_seed(1))
        assert torch.equal(y, z) and not torch.allclose(y, w)


# ----------------------------------------------------------------------------- U-Net
def _diffusion_tiny(**kw):
    args = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                num_heads=2, max_relative_position=3)
    args.update(kw)
    return UNet3D(UNetConfig(**args)).double()


def _diffusion_randomize(model, seed=0):
    """Give the zero-initialized weights (output convs and projections) random values, so outputs depend on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _diffusion_input(B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, T, 8, 8, generator=g, dtype=torch.float64), torch.tensor([3, 700])[:B]


@_diffusion_single_thread
def test_diffusion_unet_zero_init():
    torch.manual_seed(0)
    m = _diffusion_tiny(context_dim=8)
    x, t = _diffusion_input()
    assert m(x, t).abs().max() == 0  # final conv is zero-initialized
    zero_names = [n for n, p in m.named_parameters() if p.abs().max() == 0]
    assert any(n.endswith("out_layers.2.weight") for n in zero_names)  # res blocks' second conv
    assert any(n.endswith("attn_s.proj_out.weight") for n in zero_names)
    assert any(n.endswith("attn_t.proj_out.weight") for n in zero_names)
    assert any(n.endswith("cross.proj_out.weight") for n in zero_names)
    for n, p in m.named_parameters():  # every residual branch starts as the identity
        if n.endswith("out_layers.2.weight") or n.endswith("proj_out.weight"):
            assert p.abs().max() == 0, n


@_diffusion_single_thread
def test_diffusion_resblock_adagn_reference():
    """AdaGN: GroupNorm(32) per frame, then x·(1+scale)+shift with (scale, shift) = Linear(SiLU(emb))."""
    torch.manual_seed(0)
    blk = _diffusion_randomize(ResBlock(32, 16, 64).double())
    x = torch.randn(2, 32, 3, 4, 4, dtype=torch.float64)
    emb = torch.randn(2, 16, dtype=torch.float64)

    def gn_frames(z, norm):  # GroupNorm of each frame as an image, by hand
        B, C, T, H, W = z.shape
        g = z.permute(0, 2, 1, 3, 4).reshape(B * T, 32, C // 32 * H * W)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + norm.eps)
        g = g.reshape(B, T, C, H, W).permute(0, 2, 1, 3, 4)
        return g * norm.weight[:, None, None, None] + norm.bias[:, None, None, None]

    h = blk.in_layers[2](torch.nn.functional.silu(gn_frames(x, blk.in_layers[0])))
    scale, shift = blk.emb_layers[1](torch.nn.functional.silu(emb)).chunk(2, dim=1)
    h = gn_frames(h, blk.out_norm) * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]
    ref = blk.skip_connection(x) + blk.out_layers[2](torch.nn.functional.silu(h))
    torch.testing.assert_close(blk(x, emb), ref, rtol=1e-9, atol=1e-10)
    # sinusoidal timestep embedding: [cos(t·ω_i), sin(t·ω_i)], ω_i = 10000^(-i/half)
    t = torch.tensor([0, 1, 999])
    w = 10000.0 ** (-np.arange(4) / 4)
    ref_emb = np.concatenate([np.cos(t.numpy()[:, None] * w), np.sin(t.numpy()[:, None] * w)], axis=1)
    np.testing.assert_allclose(timestep_embedding(t, 8).numpy(), ref_emb, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("attention", ["spatial", "factorized", "joint"])
@_diffusion_single_thread
def test_diffusion_unet_frame_independence(attention):
    torch.manual_seed(0)
    m = _diffusion_randomize(_diffusion_tiny(attention=attention))
    x, t = _diffusion_input()
    y = m(x, t)
    x2 = x.clone()
    x2[:, :, 2] += torch.randn_like(x2[:, :, 2])  # change frame 2 only
    y2 = m(x2, t)
    others = [0, 1, 3, 4]
    diff_others = (y2[:, :, others] - y[:, :, others]).abs().max().item()
    assert (y2[:, :, 2] - y[:, :, 2]).abs().max() > 1e-3
    if attention == "spatial":
        assert diff_others < 1e-12  # no temporal mixing anywhere
    else:
        assert diff_others > 1e-4


@pytest.mark.parametrize("attention", ["factorized", "joint"])
@_diffusion_single_thread
def test_diffusion_unet_relative_position_makes_order_matter(attention):
    x, t = _diffusion_input()
    perm = [3, 0, 4, 1, 2]
    for rel in (True, False):
        torch.manual_seed(0)
        m = _diffusion_randomize(_diffusion_tiny(attention=attention, use_relative_position=rel))
        gap = (m(x[:, :, perm], t) - m(x, t)[:, :, perm]).abs().max().item()
        if rel:
            assert gap > 1e-4  # frame order is seen
        else:
            assert gap < 1e-10  # without positions attention is permutation-equivariant


@pytest.mark.parametrize("kind", ["temporal", "joint"])
@_diffusion_single_thread
def test_diffusion_attention_matches_naive_reference(kind):
    """softmax over tokens of (q·k + q·a_clip(f_j - f_i)) / √d, written with explicit loops over tokens."""
    torch.manual_seed(0)
    C, heads, M = 32, 2, 2
    att = SelfAttention(C, heads, kind, max_relative_position=M).double()
    _diffusion_randomize(att)
    B, T, H, W = 1, 4, 2, 3
    x = torch.randn(B, C, T, H, W, dtype=torch.float64)
    out = att(x)
    h = att.norm(x)
    d = C // heads
    ref = torch.zeros_like(x)
    if kind == "temporal":
        groups = [[(tt, i, j) for tt in range(T)] for i in range(H) for j in range(W)]
    else:
        groups = [[(tt, i, j) for tt in range(T) for i in range(H) for j in range(W)]]
    for b in range(B):
        for tokens in groups:
            feats = torch.stack([h[b, :, tt, i, j] for tt, i, j in tokens])  # (L,C)
            qkv = att.qkv(feats)
            outs = []
            for hd in range(heads):
                q = qkv[:, hd * d:(hd + 1) * d]
                k = qkv[:, C + hd * d:C + (hd + 1) * d]
                v = qkv[:, 2 * C + hd * d:2 * C + (hd + 1) * d]
                logits = torch.zeros(len(tokens), len(tokens), dtype=torch.float64)
                for a, ta in enumerate(tokens):
                    for c, tc in enumerate(tokens):
                        rel = att.rel_k[max(-M, min(M, tc[0] - ta[0])) + M]
                        logits[a, c] = (q[a] @ k[c] + q[a] @ rel) / math.sqrt(d)
                outs.append(torch.softmax(logits, dim=-1) @ v)
            o = att.proj_out(torch.cat(outs, dim=1))
            for a, (tt, i, j) in enumerate(tokens):
                ref[b, :, tt, i, j] = x[b, :, tt, i, j] + o[a]
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)


@_diffusion_single_thread
def test_diffusion_unet_optional_inputs():
    x, t = _diffusion_input()
    B, _, T, H, W = x.shape
    torch.manual_seed(0)
    plain = _diffusion_randomize(_diffusion_tiny())
    with pytest.raises(UserError):
        plain(x, t, mask=torch.zeros(B, 1, T, H, W, dtype=x.dtype))
    with pytest.raises(UserError):
        plain(x, t, s=torch.tensor([1, 2]))
    with pytest.raises(UserError):
        plain(x, t, context=torch.zeros(B, 3, 8, dtype=x.dtype))
    with pytest.raises(UserError):
        plain(x[..., :7], t)  # 7 is not divisible by 2

    torch.manual_seed(0)
    masked = _diffusion_randomize(_diffusion_tiny(mask_channel=True))
    ones = torch.ones(B, 1, T, H, W, dtype=x.dtype)
    assert torch.equal(masked(x, t), masked(x, t, mask=torch.zeros_like(ones)))
    assert (masked(x, t, mask=ones) - masked(x, t)).abs().max() > 1e-3
    with pytest.raises(UserError):
        masked(x, t, mask=ones[:, :, :2])

    torch.manual_seed(0)
    s_model = _diffusion_randomize(_diffusion_tiny(s_embedding=True))
    base = s_model(x, t)
    assert (s_model(x, t, s=torch.tensor([0, 0])) - base).abs().max() > 1e-3
    assert (s_model(x, t, s=torch.tensor([100, 100])) - s_model(x, t, s=torch.tensor([5, 5]))).abs().max() > 1e-3

    torch.manual_seed(0)
    c_model = _diffusion_randomize(_diffusion_tiny(context_dim=8))
    ctx = torch.randn(B, 3, 8, dtype=x.dtype)
    assert (c_model(x, t, context=ctx) - c_model(x, t)).abs().max() > 1e-3
    assert (c_model(x, t, context=ctx) - c_model(x, t, context=ctx.flip(0))).abs().max() > 1e-3
    with pytest.raises(UserError):
        c_model(x, t, context=torch.zeros(B, 3, 5, dtype=x.dtype))


@_diffusion_single_thread
def test_diffusion_unet_checkpointing_same_gradients():
    x, t = _diffusion_input()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = _diffusion_randomize(_diffusion_tiny(use_checkpoint=ckpt, mask_channel=True, s_embedding=True))
        m.train()
        out = m(x, t, mask=torch.ones(2, 1, 5, 8, 8, dtype=x.dtype), s=torch.tensor([4, 9]))
        (out.pow(2).mean()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-9, atol=1e-12, msg=n)


@_diffusion_single_thread
def test_diffusion_unet_presets_and_param_count():
    presets = unet_presets()
    with torch.device("meta"):
        paper = count_params(UNet3D(presets["paper"]))
    # the public LVDM release reports ≈549M parameters for its unconditional 256² U-Net
    assert abs(paper - 549e6) / 549e6 < 0.005, paper
    demo = UNet3D(presets["demo"])
    assert count_params(demo) < 5e6
    x = torch.randn(1, 4, 4, 8, 8)
    assert demo(x, torch.tensor([10])).shape == x.shape
    # a config survives the checkpoint round trip (asdict -> lists -> UNetConfig)
    from dataclasses import asdict
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(presets["paper"]).items()}
    assert UNetConfig(**d) == presets["paper"]
