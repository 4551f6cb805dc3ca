"""Stable Diffusion's per-frame autoencoder: the first stage of §5's image model.

§5 builds the text-to-video model on Stable Diffusion, whose latent space is that of LDM's "KL-f8"
autoencoder (Rombach et al. 2022): a 2D encoder/decoder with a diagonal-Gaussian posterior, 8x smaller
in height and width, 4 channels. The release's text-to-video model applies it to every frame of a clip
on its own, as this file does:

    x (B,3,T,H,W) --(B*T frames)--> Encoder --> posterior over z (B,4,T,H/8,W/8) --> Decoder --> x~

FrameAutoencoder has vae.VideoAutoencoder's interface (encode -> posterior, decode, encode_latents /
decode_latents with the latent scale, fs, ft = 1, cfg, check_input), so train.py and sample.py use either;
load_autoencoder reads the checkpoints of both. Its weights come from Stable Diffusion (convert.py --sd); it
is not trained here. Stable Diffusion scales latents by 0.18215 and does not shift them.

Parameter names follow Stable Diffusion's original (CompVis) files, where mid-block attention projections
are 1x1 convolutions; here they are Linear layers (the same numbers, reshaped by convert.py).
"""
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import vae
from common import UserError, checkpoint_weights, count_params, load_checkpoint, load_weights

KIND = "sdvae"   # the checkpoint's "kind": load_autoencoder builds a FrameAutoencoder for it


@dataclass
class SDVAEConfig:
    in_channels: int = 3
    ch: int = 128                        # width of the first level
    ch_mult: tuple = (1, 2, 4, 4)        # level i works at ch * ch_mult[i]; every level but the last halves H, W
    num_res_blocks: int = 2              # per encoder level; the decoder has one more (LDM)
    z_channels: int = 4
    scale_factor: float = 0.18215        # Stable Diffusion v1's latent scale (latents z = 0.18215 * E(x))
    norm_over: str = "frame"             # GroupNorm statistics: always per frame (hierarchical.stream_decode reads it)

    def __post_init__(self):  # checkpoints store tuples as lists
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if self.norm_over != "frame":
            raise UserError(f"Stable Diffusion's autoencoder normalizes each frame; norm_over={self.norm_over!r} "
                            f"is not one of its settings.")

    @property
    def fs(self):
        return 2 ** (len(self.ch_mult) - 1)


def Normalize(channels):
    """GroupNorm(32, eps 1e-6) on a batch of frames (B*T,C,H,W): statistics per frame."""
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 conv on the skip where the width changes."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Normalize(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a frame, plus the input."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v = (nn.Linear(channels, channels) for _ in range(3))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)                       # (N,C,H,W) -> (N,H*W,C)
        q, k, v = self.q(h)[:, None], self.k(h)[:, None], self.v(h)[:, None]  # (N,H*W,C) -> (N,1,H*W,C): one head
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]                    # scale 1/sqrt(C)
        return x + self.proj_out(h).transpose(1, 2).reshape(N, C, H, W)   # (N,H*W,C) -> (N,C,H,W)


class Downsample(nn.Module):
    """Halve H and W: zero-pad one row at the bottom and one column at the right, then a stride-2 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest neighbour, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels):
    """Residual block, attention, residual block: the middle of the encoder and of the decoder."""
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), \
        ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    """Frames (N,3,H,W) -> moments (N,2z,H/fs,W/fs), mean and log-variance stacked."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1])
                                        for j in range(cfg.num_res_blocks))
            level.downsample = Downsample(widths[i + 1]) if i < len(cfg.ch_mult) - 1 else nn.Identity()
            self.down.append(level)
        self.mid = mid_block(widths[-1])
        self.norm_out = Normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent frames (N,z,h,w) -> frames (N,3,h*fs,w*fs). Level i (0 = finest) has num_res_blocks + 1 blocks;
    the levels run from the coarsest, each but the finest ending in an upsampling."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = mid_block(widths[-1])
        self.up = nn.ModuleList()
        for i in range(len(widths)):
            level = nn.Module()
            cin = widths[i + 1] if i + 1 < len(widths) else widths[-1]   # the coarser level's width comes in
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else widths[i], widths[i])
                                        for j in range(cfg.num_res_blocks + 1))
            level.upsample = Upsample(widths[i]) if i > 0 else nn.Identity()
            self.up.append(level)
        self.norm_out = Normalize(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def per_frame(fn, x, frame_batch):
    """fn on the frames of a clip, frame_batch frames at a time: (B,C,T,H,W) -> (B,C',T,H',W')."""
    B, C, T, H, W = x.shape
    frames = x.transpose(1, 2).reshape(B * T, C, H, W)                    # (B,C,T,H,W) -> (B*T,C,H,W)
    out = torch.cat([fn(frames[i:i + frame_batch]) for i in range(0, B * T, frame_batch)])
    return out.reshape(B, T, *out.shape[1:]).transpose(1, 2)              # (B*T,C',H',W') -> (B,C',T,H',W')


class FrameAutoencoder(nn.Module):
    """Stable Diffusion's AutoencoderKL on every frame: E and D, the 1x1 quant_conv on the moments and
    post_quant_conv on z, and vae.VideoAutoencoder's latent scale/shift buffers (0.18215 and 0)."""

    frame_batch = 16   # frames through the networks at a time (memory; the result changes by rounding only)

    def __init__(self, cfg: SDVAEConfig):
        super().__init__()
        self.cfg, self.fs, self.ft = cfg, cfg.fs, 1
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.register_buffer("latent_scale", torch.tensor(float(cfg.scale_factor)))
        self.register_buffer("latent_shift", torch.tensor(0.0))

    def check_input(self, x):
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise UserError(f"the autoencoder takes clips shaped (B,{self.cfg.in_channels},T,H,W) but got "
                            f"{tuple(x.shape)}; pass {self.cfg.in_channels}-channel videos.")
        if x.shape[3] % self.fs or x.shape[4] % self.fs:
            raise UserError(f"frame size {x.shape[3]}x{x.shape[4]} is not divisible by the spatial factor "
                            f"fs={self.fs}; use a resolution that is a multiple of {self.fs}.")

    def encode(self, x):
        """x (B,3,T,H,W) -> vae.DiagonalGaussian over z (B,z,T,H/fs,W/fs)."""
        self.check_input(x)
        return vae.DiagonalGaussian(per_frame(lambda f: self.quant_conv(self.encoder(f)), x, self.frame_batch))

    def decode(self, z):
        return per_frame(lambda f: self.decoder(self.post_quant_conv(f)), z, self.frame_batch)

    def forward(self, x, sample_posterior=True):
        posterior = self.encode(x)
        return self.decode(posterior.sample() if sample_posterior else posterior.mode()), posterior

    def encode_latents(self, x):
        """x in [-1,1] -> z0 = (mode - shift) * scale, as vae.VideoAutoencoder (the release samples the posterior)."""
        return (self.encode(x).mode() - self.latent_shift) * self.latent_scale

    def decode_latents(self, z):
        return self.decode(z / self.latent_scale + self.latent_shift)


def load_autoencoder(path, device="cpu"):
    """The frozen autoencoder of any autoencoder checkpoint, in eval mode: a FrameAutoencoder for one of
    kind "sdvae" (convert.py --sd), else vae.load_vae's VideoAutoencoder (train.py --stage vae)."""
    if not os.path.isfile(path):
        raise UserError(f"VAE checkpoint {path} does not exist; train one (train.py --stage vae), convert one "
                        f"(convert.py), or fix --vae.")
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != KIND:
        return vae.load_vae(path, device)
    try:
        model = FrameAutoencoder(SDVAEConfig(**ckpt["model_args"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} has no settings this sdvae.py can use ({type(e).__name__}: {e}); convert the "
                        f"Stable Diffusion weights again with convert.py --sd.") from None
    load_weights(model, checkpoint_weights(ckpt), path, "Stable Diffusion autoencoder")
    return model.to(device).eval().requires_grad_(False)


def autoencoder_checkpoint(model, source, step=0):
    """The checkpoint dict of a FrameAutoencoder (stage vae, kind "sdvae"), as convert.py writes it."""
    return {"stage": "vae", "kind": KIND, "step": step, "model": model.state_dict(), "ema": None,
            "model_args": asdict(model.cfg), "train_args": {"converted_from": source}}


if __name__ == "__main__":
    m = FrameAutoencoder(SDVAEConfig())
    print(f"Stable Diffusion v1 autoencoder: fs={m.fs}, encoder {count_params(m.encoder) / 1e6:.1f}M, "
          f"decoder {count_params(m.decoder) / 1e6:.1f}M params")
