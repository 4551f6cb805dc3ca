import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

import data as D
import diffusion as G
import sample
import train
import unet3d as U
from data import UserError


def _sample_fixture(tmp_path, stage="lvdm", gap=4):
    """A tiny VAE checkpoint and a tiny U-Net checkpoint in the format train.py writes."""
    import vae as V
    torch.manual_seed(0)
    vcfg = V.VAEConfig(hidden=8, ch_mult=(1, 1, 1))
    vae = V.VideoAutoencoder(vcfg)
    vae.set_latent_stats(2.0, 0.1)
    vae_path = str(tmp_path / "vae.pt")
    train.save_checkpoint(vae_path, {"stage": "vae", "step": 1, "model": vae.state_dict(), "ema": None,
                                     "model_args": asdict(vcfg)})
    cfg = U.UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                       attention_resolutions=(1,), num_heads=2, mask_channel=stage != "lvdm",
                       s_embedding=stage != "lvdm")
    net = U.UNet3D(cfg)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ema = {k: v + 0.01 for k, v in net.state_dict().items()}  # EMA weights differ from the raw ones
    args = train.parse_args(["--stage", stage, "--preset", "demo", "--size", "32", "--frames", "8",
                             "--timesteps", "100", "--gap", str(gap), "--vae", vae_path, "--init", "x"])
    path = str(tmp_path / f"{stage}.pt")
    train.save_checkpoint(path, {"stage": stage, "step": 1, "model": net.state_dict(), "ema": ema,
                                 "model_args": asdict(cfg), "train_args": vars(args), "vae_path": vae_path})
    return path, net, ema, vae


def test_checkpoint_round_trip_reproduces_the_model(tmp_path):
    path, net, ema, _ = _sample_fixture(tmp_path)
    loaded, diffusion, targs = sample.load_model(path, "cpu")
    ref = U.UNet3D(net.cfg)
    ref.load_state_dict(ema)  # sample.py uses the EMA weights by default
    x, t = torch.randn(2, 4, 2, 4, 4), torch.tensor([3, 70])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), ref.eval()(x, t))
    raw, _, _ = sample.load_model(path, "cpu", use_ema=False)
    with torch.no_grad():
        assert torch.equal(raw(x, t), net.eval()(x, t))
    assert diffusion.num_timesteps == 100 and targs["stage"] == "lvdm"


def test_sample_cli_equals_direct_ddim_and_decode(tmp_path):
    path, net, ema, vae = _sample_fixture(tmp_path)
    out = str(tmp_path / "s")
    sample.main(["--ckpt", path, "--n", "2", "--steps", "4", "--npz", "--out", out, "--seed", "3"])
    videos = D.load_npz(os.path.join(out, "samples.npz"))
    assert videos.shape == (2, 8, 32, 32, 3) and videos.dtype == np.uint8
    # the same sampling by hand: EMA U-Net, DDIM 4 steps eta 0 from the seeded generator, then decode
    ref = U.UNet3D(net.cfg)
    ref.load_state_dict(ema)
    ref.eval()
    diffusion = G.GaussianDiffusion(G.make_betas("linear", 100, 0.0015, 0.0155))
    g = torch.Generator("cpu").manual_seed(3)
    with torch.no_grad():
        z = diffusion.ddim_sample_loop(lambda z, t: ref(z, t), (2, 4, 2, 4, 4), 4, eta=0.0, generator=g)
        x = vae.eval().decode_latents(z)
    assert np.array_equal(videos, D.to_uint8(x))
    assert os.path.exists(os.path.join(out, "grid.png")) and os.path.exists(os.path.join(out, "video_001.gif"))


def test_sample_long_modes_need_the_right_checkpoints(tmp_path):
    path, *_ = _sample_fixture(tmp_path)
    with pytest.raises(UserError, match="prediction model"):
        sample.main(["--ckpt", path, "--mode", "hierarchical", "--frames", "32", "--out", str(tmp_path / "o")])
    pred, *_ = _sample_fixture(tmp_path, "pred", gap=4)
    with pytest.raises(UserError, match="--gap 1"):
        sample.main(["--ckpt", pred, "--mode", "autoregressive", "--frames", "32", "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--interp"):
        sample.main(["--ckpt", pred, "--mode", "hierarchical", "--frames", "32", "--out", str(tmp_path / "o")])


def test_sample_autoregressive_writes_exact_length(tmp_path):
    pred, *_ = _sample_fixture(tmp_path, "pred", gap=1)
    out = str(tmp_path / "ar")
    sample.main(["--ckpt", pred, "--mode", "autoregressive", "--frames", "36", "--n", "1", "--steps", "2",
                 "--out", out, "--chunk", "3"])
    long = np.load(os.path.join(out, "long.npy"))
    assert long.shape == (1, 36, 32, 32, 3)
    assert long[:, -4:].std() > 0  # the last frames were written, not left as zeros
