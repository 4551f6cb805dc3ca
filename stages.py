"""What each training stage trains, and on what (paper §3.1-§3.3, §5): the model, optimizer and frozen
parts of a stage (build_vae_stage, build_diffusion_stage, build_text_stage -> Stage), its data (the
latent cache; ClipStream, batches that resume exactly), and its held-out views (visualize, report_psnr,
the latent statistics the vae stage stores).

Stages, in the order the paper trains them (§4.1, "Implementation Details"):
    vae     the 3D autoencoder of §3.1, Eq. (1)            -> RUN/vae.pt
    lvdm    the unconditional latent diffusion model, §3.2 -> RUN/lvdm.pt
    pred    the prediction model of §3.3, resumed from lvdm -> RUN/pred.pt
    interp  the interpolation model of §3.3, from lvdm      -> RUN/interp.pt
    image   §5's text-to-image model: the U-Net with spatial attention only and cross-attention to a
            text encoder, on captioned latent frames       -> RUN/image.pt
    t2v     §5's text-to-video model: spatial layers from image.pt, temporal attention added as the
            identity (zero output projections), on captioned clips -> RUN/t2v.pt

Its own file because train.py's loop is the same for every stage: what differs between the stages,
except the one micro-batch step, is built here, so train.py reads as the CLI, the loop and its checkpoints.
"""
import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import balls
import data
import diffusion
import hierarchical
import sdvae
import text
import unet3d
import vae
from common import (UserError, build_model, checkpoint_weights, count_params, load_checkpoint, load_weights,
                    make_config, parse_overrides, save_checkpoint, torch_version)


# ----------------------------------------------------------------------------- stages: model, optimizer, frozen parts
def fused(device):
    """Adam's `fused` flag: one kernel per step, which also takes the scaler's skip decision on the device (no
    host sync); on the CPU (torch 2.4 on) it replaces a Python loop over the parameters (its gain: RESULTS.md,
    2026-12-06); elsewhere (MPS, the CPU under torch 2.3) torch's default."""
    return True if device.type == "cuda" or (device.type == "cpu" and torch_version() >= (2, 4)) else None


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


def unet_base(args, channels, init=None):
    """The U-Net config's fields before the user's --model: the preset's, or for pred/interp those of the
    unconditional model they start from (init, its checkpoint), with the mask channel and s embedding on."""
    base = asdict(unet3d.unet_presets()[args.model_preset])
    if init is not None:
        base = dict(init.get("model_args") or base)
    conditional = args.stage in ("pred", "interp")
    base.update(in_channels=channels, out_channels=channels, mask_channel=conditional, s_embedding=conditional)
    return base


def unet_config(args, channels, init=None):
    """The UNetConfig a diffusion stage with these settings builds (unet_base, then --model)."""
    return make_config(unet3d.UNetConfig, unet_base(args, channels, init), parse_overrides(args.model))


def build_diffusion_stage(args, device, master_process):
    """Stages lvdm / pred / interp (§3.2, §3.3): a U-Net on frozen-autoencoder latents (or pixels)."""
    autoencoder = None
    if args.space == "latent":
        if not args.vae:
            raise UserError("latent diffusion needs the frozen autoencoder: pass --vae RUN/vae.pt "
                            "(train it with --stage vae), or --space pixel.")
        autoencoder = sdvae.load_autoencoder(args.vae, device).eval().requires_grad_(False)  # vae.py's or SD's
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
    init = None
    if conditional:  # pred/interp take the U-Net of the model they start from (a converted release one too)
        if not args.init:
            raise UserError(f"--stage {args.stage} is resumed from the unconditional model (§4.1): "
                            f"pass --init RUN/lvdm.pt.")
        init = load_checkpoint(args.init, "lvdm")
    if args.stage in ("image", "t2v"):
        return build_text_stage(args, device, master_process, unet_base(args, channels), autoencoder, clip_frames)
    cfg = unet_config(args, channels, init)
    if cfg.far_anchor:  # pred's far anchor: keyframe 0 of a clip twice as long, before the clip's last half
        if args.stage != "pred":
            raise UserError(f"--model far_anchor=True is the prediction model's long-range anchor; drop it from "
                            f"--stage {args.stage}.")
        clip_frames *= 2
    if cfg.position_stride not in (1, args.gap if args.stage == "pred" else 1):
        raise UserError(f"--model position_stride={cfg.position_stride} places a prediction model's keyframes at their "
                        f"latent times: use it with --stage pred and position_stride = --gap ({args.gap}).")
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


# ----------------------------------------------------------------------------- data: latent cache, batches
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


# ----------------------------------------------------------------------------- held-out views
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
