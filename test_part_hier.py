import math

import numpy as np
import pytest
import torch

import diffusion as G
import hierarchical as Hr
import unet3d as U


def _hier_diffusion(T=1000):
    return G.GaussianDiffusion(G.make_betas("linear", T, 0.0015, 0.0155))


class _HierSpy(torch.nn.Module):
    """Records every call; returns a fixed function of the inputs so formulas can be checked."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, mask=None, s=None):
        self.calls.append((x.clone(), t.clone(), None if mask is None else mask.clone(),
                           None if s is None else s.clone()))
        m = torch.zeros_like(x[:, :1]) if mask is None else mask
        return 0.1 * x + 2.0 * m + 0.01 * t.view(-1, 1, 1, 1, 1).float()


def _hier_unet():
    torch.manual_seed(0)
    net = U.UNet3D(U.UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,),
                                num_res_blocks=1, attention_resolutions=(1,), num_heads=2,
                                mask_channel=True, s_embedding=True))
    for p in net.parameters():  # randomize the zero-initialized layers so outputs are non-trivial
        torch.nn.init.normal_(p, std=0.02)
    return net.eval()


@pytest.mark.parametrize("stage, p, given", [("pred", 0.5, [0]), ("interp", 0.9, [0, 4])])
def test_mask_sampler_frequencies_and_patterns(stage, p, given):
    n = 20000
    g = torch.Generator().manual_seed(0)
    m = Hr.sample_train_masks(stage, n, 5, generator=g)[:, 0, :, 0, 0]  # (n,5)
    conditioned = m.amax(1) > 0
    freq = conditioned.float().mean().item()
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n)
    expect = torch.zeros(5)
    expect[given] = 1
    assert torch.equal(m[conditioned], expect.expand(int(conditioned.sum()), 5))
    assert m[~conditioned].abs().sum() == 0


def test_training_loss_conditions_enter_unchanged_at_s0_and_carry_no_loss():
    diff = _hier_diffusion()
    z0 = torch.randn(6, 4, 5, 4, 4)
    spy = _HierSpy()
    g = torch.Generator().manual_seed(1)
    Hr.training_loss(diff, spy, z0, "interp", s_max=0, p_cond=1.0, generator=g)
    x, t, mask, s = spy.calls[0]
    assert torch.equal(x[:, :, [0, 4]], z0[:, :, [0, 4]])       # Eq. (8) at s = 0: the given latents, exactly
    assert not torch.allclose(x[:, :, 2], z0[:, :, 2])          # the others are noisy
    assert torch.equal(mask[:, 0, :, 0, 0], torch.tensor([1., 0, 0, 0, 1]).expand(6, 5))
    assert torch.equal(s, torch.zeros(6, dtype=torch.long))

    # A model that is wrong only on the given latents has exactly the loss of one that is right there.
    class Wrong(torch.nn.Module):
        def forward(self, x, t, mask=None, s=None):
            return torch.zeros_like(x) + 1e3 * mask
    a = Hr.training_loss(diff, Wrong(), z0, "interp", p_cond=1.0, generator=torch.Generator().manual_seed(2))
    b = Hr.training_loss(diff, lambda x, t, mask=None, s=None: torch.zeros_like(x), z0, "interp", p_cond=1.0,
                         generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and (a > 0.5).all() and (a < 2).all()  # E[ε²] = 1 over the 3 middle latents


def test_training_loss_perturbation_level_matches_s():
    """With z0 = 0 the given latents enter as sqrt(1 - ᾱ_s) ε: their spread must match the s fed in."""
    diff = _hier_diffusion()
    z0 = torch.zeros(400, 4, 4, 8, 8)
    spy = _HierSpy()
    Hr.training_loss(diff, spy, z0, "pred", s_max=250, p_cond=1.0, generator=torch.Generator().manual_seed(3))
    x, t, mask, s = spy.calls[0]
    assert s.max() <= 250 and s.min() >= 0 and len(s.unique()) > 50
    std = x[:, :, 0].flatten(1).std(1)                             # (B,) spread of the given latent
    sd = np.append(0.0, diff.sqrt_one_minus_alphas_cumprod)  # s = 0: clean, s >= 1: index s - 1
    expect = torch.from_numpy(sd[s.numpy()]).float()
    assert torch.allclose(std, expect, rtol=0.15, atol=0.02)
    # unconditional samples get s = 0
    spy.calls.clear()
    Hr.training_loss(diff, spy, z0[:8], "pred", p_cond=0.0, generator=torch.Generator().manual_seed(4))
    assert spy.calls[0][3].abs().sum() == 0 and spy.calls[0][2].abs().sum() == 0


def test_guidance_formula_and_w0():
    diff = _hier_diffusion()
    cond = torch.randn(2, 4, 4, 4, 4)
    m = Hr.frame_mask(2, 4, [0])
    spy = _HierSpy()
    z = torch.randn_like(cond)
    t = torch.tensor([10, 500])
    c_only = Hr.guided_model_fn(spy, cond, m, s=0, w=0.0, diffusion=diff)(z, t)
    assert len(spy.calls) == 1                                     # w = 0: the conditional score alone
    zin = Hr.replace_given(z, cond, m)
    assert torch.equal(spy.calls[0][0][:, :, 0], cond[:, :, 0])
    eps_c = 0.1 * zin + 2.0 * Hr.full_mask(m, z) + 0.01 * t.view(-1, 1, 1, 1, 1)
    eps_u = 0.1 * z + 0.01 * t.view(-1, 1, 1, 1, 1)
    assert torch.allclose(c_only, eps_c)
    w = 0.7
    guided = Hr.guided_model_fn(spy, cond, m, s=0, w=w, diffusion=diff)(z, t)
    assert torch.allclose(guided, (1 + w) * eps_c - w * eps_u, atol=1e-6)  # Eq. (9)


def test_guided_perturbation_is_fixed_over_steps():
    diff = _hier_diffusion()
    cond = torch.randn(2, 4, 4, 4, 4)
    spy = _HierSpy()
    fn = Hr.guided_model_fn(spy, cond, Hr.frame_mask(2, 4, [0]), s=100, diffusion=diff,
                            generator=torch.Generator().manual_seed(0))
    fn(torch.randn_like(cond), torch.tensor([900, 900]))
    fn(torch.randn_like(cond), torch.tensor([10, 10]))
    a, b = spy.calls[0][0][:, :, 0], spy.calls[1][0][:, :, 0]
    assert torch.equal(a, b) and not torch.allclose(a, cond[:, :, 0])
    assert torch.equal(spy.calls[0][3], torch.tensor([100, 100]))


@pytest.mark.parametrize("n_latents", [3, 4, 9, 10])
def test_autoregressive_length_and_continuity(n_latents):
    diff = _hier_diffusion(100)
    net = _hier_unet()
    spy_inputs = []
    orig = net.forward

    def recording(x, t, mask=None, s=None):
        spy_inputs.append((x.clone(), mask.clone()))
        return orig(x, t, mask=mask, s=s)
    net.forward = recording
    chunks = list(Hr.autoregressive(net, diff, (1, 4, 4, 4, 4), n_latents, k=2, s=0, steps=3,
                                    generator=torch.Generator().manual_seed(0)))
    video = torch.cat(chunks, 2)
    assert video.shape[2] == n_latents
    # every conditional clip was given (mask 1) exactly the last 2 latents made before it
    steps_per_clip = 3
    clips = [spy_inputs[i] for i in range(0, len(spy_inputs), steps_per_clip)]
    made = 4
    for x, mask in clips[1:]:
        assert torch.equal(mask[0, 0, :, 0, 0], torch.tensor([1., 1, 0, 0]))
        assert torch.equal(x[:, :, :2], video[:, :, made - 2:made])
        made += 2


@pytest.mark.parametrize("n_latents, gap", [(9, 4), (11, 4), (7, 3)])
def test_hierarchical_length_keyframes_and_every_pair_infilled(n_latents, gap):
    diff = _hier_diffusion(100)
    pred, interp = _hier_unet(), _hier_unet()
    torch.nn.init.normal_(interp.out[-1].weight, std=0.05)  # a different network for the infill
    calls = []
    orig = interp.forward

    def recording(x, t, mask=None, s=None):
        calls.append(mask[0, 0, :, 0, 0].clone())
        return orig(x, t, mask=mask, s=s)
    interp.forward = recording
    shape = (1, 4, 4, 4, 4)
    video = torch.cat(list(Hr.hierarchical(pred, interp, diff, shape, n_latents, gap=gap, s=0, steps=2,
                                           generator=torch.Generator().manual_seed(0))), 2)
    assert video.shape[2] == n_latents
    n_key = -(-(n_latents - 1) // gap) + 1
    assert len(calls) == 2 * (n_key - 1)                           # 2 DDIM steps for every pair
    expect = torch.zeros(gap + 1)
    expect[[0, gap]] = 1
    assert all(torch.equal(c, expect) for c in calls)
    keys = torch.cat(list(Hr.autoregressive(pred, diff, shape, n_key, s=0, steps=2,
                                            generator=torch.Generator().manual_seed(0))), 2)
    for i in range(n_key):
        if i * gap < n_latents:
            assert torch.equal(video[:, :, i * gap], keys[:, :, i])


def test_stream_decode_matches_one_shot_decode():
    import vae as V
    torch.manual_seed(0)
    model = V.VideoAutoencoder(V.VAEConfig(hidden=8, ch_mult=(1, 1, 1))).eval().double()
    reach = Hr.temporal_reach(model)
    assert 2 <= reach <= 16
    z = torch.randn(1, 4, 3 * reach + 5, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        full = model.decode_latents(z)
    chunks = [z[:, :, i:i + 3] for i in range(0, z.shape[2], 3)]
    streamed = torch.cat(list(Hr.stream_decode(model, iter(chunks))), 2)
    assert streamed.shape == full.shape
    assert torch.allclose(streamed, full, atol=1e-9)
    # too little context shows at the seams: the check above can fail
    short = torch.cat(list(Hr.stream_decode(model, iter(chunks), context=reach // 2)), 2)
    assert not torch.allclose(short, full, atol=1e-4)
