"""Sample videos from trained LVDM checkpoints: short clips (§3.2) and long videos (§3.3).

    python sample.py --ckpt runs/demo/lvdm.pt --n 16 --steps 50              # DDIM, 50 steps, eta 1
    python sample.py --ckpt runs/demo/lvdm.pt --n 16 --sampler ddpm          # ancestral, all T steps
    python sample.py --ckpt runs/demo/lvdm.pt --n 2048 --npz                 # uint8 (N,T,H,W,3) for fvd.py
    python sample.py --ckpt runs/demo/pred.pt --mode autoregressive --frames 1024 --cond-noise 100 --guidance 0.1
    python sample.py --ckpt runs/demo/pred.pt --interp runs/demo/interp.pt --mode hierarchical --frames 1024
    python sample.py --ckpt runs/demo-t2v/t2v.pt --prompt "a red ball bounces fast over a blue background" --n 4

Outputs go to --out (default: RUN/samples-<mode>): one gif per video (mp4 too when PyAV is
installed), grid.png (rows = videos, columns = frames) and, with --npz, samples.npz. Long videos
are decoded and written chunk by chunk (hierarchical.stream_decode) into long.npy, a uint8
(N,T,H,W,3) array on disk, so memory does not grow with --frames.
"""
import argparse
import html
import json
import math
import os

import numpy as np
import torch
from tqdm import tqdm

import balls
import data
import diffusion as diffusion_lib
import drift
import hierarchical
import sdvae
import text as text_lib
import unet3d
from common import (ArgumentParser, UserError, add_threads_flag, atomic_path, auto_amp, checkpoint_weights,
                    load_checkpoint, load_weights, main_guard, natural_float, natural_int, plot_lines, positive_int,
                    setup_cuda)


def load_model(path, device, use_ema=True):
    """A diffusion checkpoint (stage lvdm, pred, interp, image or t2v) -> (unet, GaussianDiffusion,
    train_args); for image/t2v (§5) the network is text.TextConditioned (U-Net + text encoder)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("stage") not in ("lvdm", "pred", "interp", "image", "t2v"):
        raise UserError(f"{path} is a '{ckpt.get('stage')}' checkpoint; sample.py needs one from --stage lvdm, "
                        f"pred, interp, image or t2v.")
    try:
        net = unet3d.UNet3D(unet3d.UNetConfig(**ckpt["model_args"]))
        if ckpt["stage"] in ("image", "t2v"):
            net = text_lib.TextConditioned(net, text_lib.TextTransformer(text_lib.TextConfig(**ckpt["text_args"])))
        a = ckpt["train_args"]
        gd = diffusion_lib.from_train_args(a)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} lacks the model or training settings train.py stores ({type(e).__name__}: {e}); "
                        f"pass a checkpoint written by train.py.") from None
    load_weights(net, checkpoint_weights(ckpt, use_ema), path, "U-Net")
    return net.to(device).eval(), gd, dict(a, stage=ckpt["stage"], vae_path=ckpt.get("vae_path"))


def load_decoder(args_of_ckpt, override, device):
    """The frozen autoencoder the model was trained on (None for --space pixel)."""
    if args_of_ckpt["space"] == "pixel":
        return None
    path = override or args_of_ckpt.get("vae_path")
    if not path or not os.path.isfile(path):
        raise UserError(f"the autoencoder {path} the model was trained with is not there; pass --vae PATH.")
    return sdvae.load_autoencoder(path, device).eval()  # a trained vae.py one or Stable Diffusion's


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="lvdm.pt (short) or pred.pt (long modes)")
    p.add_argument("--report", metavar="RUN", help="write RUN/index.html from what the run folder holds, and stop")
    p.add_argument("--interp", help="interp.pt, for --mode hierarchical")
    p.add_argument("--vae", help="override the autoencoder path stored in the checkpoint")
    p.add_argument("--mode", default="short", choices=["short", "autoregressive", "hierarchical"])
    p.add_argument("--n", type=positive_int, default=8, help="number of videos")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--length", "--frames", dest="length", type=positive_int,
                   help="frames per video (long modes; default: the training clip length)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=natural_float, default=hierarchical.DDIM_ETA,
                   help="DDIM eta: 1 (default) draws fresh noise every step with DDPM's variance, 0 is deterministic")
    p.add_argument("--cond-noise", type=natural_int, default=100, help="conditional latent perturbation level s (§3.3)")
    p.add_argument("--guidance", type=natural_float, default=0.1, help="unconditional guidance strength w, Eq. (9) (0 = off)")
    p.add_argument("--k", type=positive_int, default=1, help="latents each autoregressive step conditions on")
    p.add_argument("--keep-first", type=positive_int, help="latents (keyframes, in --mode hierarchical) kept of the "
                   "unconditional first clip, from k to a clip; the rest are predicted (default: k in --mode "
                   "hierarchical, the whole clip in --mode autoregressive)")
    p.add_argument("--chunk", type=positive_int, default=16, help="latents decoded at a time in long modes")
    p.add_argument("--decode-batch", type=positive_int, default=1, help="videos decoded at a time in long modes: "
                   "the decoder's activations grow with it (README, 'GPUs and clusters')")
    p.add_argument("--out"); p.add_argument("--npz", action="store_true")
    p.add_argument("--fps", type=positive_int, default=8); p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast of the networks: auto = bf16 on GPUs that have it natively, fp16 on older ones, "
                        "bf16 on CPUs with bf16 instructions (AVX512-BF16, AMX), else none (float32)")
    add_threads_flag(p)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    # text-to-video (§5)
    p.add_argument("--prompt", action="append", default=[], help="caption to sample (image/t2v checkpoints; "
                   "repeat for several: video i gets prompt i mod their number)")
    p.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one per line")
    p.add_argument("--text-guidance", type=natural_float, default=hierarchical.TEXT_GUIDANCE,
                   help="classifier-free guidance w of the text, Eq. (9)'s formula (0 = conditional model alone)")
    p.add_argument("--bpe", help="CLIP's vocabulary (default: the one the model was trained with)")
    args = p.parse_args(argv)
    if not args.ckpt and not args.report:
        raise UserError("pass --ckpt RUN/lvdm.pt (or pred.pt for long modes), or --report RUN.")
    return args


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return write_report(args.report)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setup_cuda(device, benchmark=True)  # TF32 and cuDNN's autotuner on a GPU (every step has the same shapes)
    net, diffusion, targs = load_model(args.ckpt, device, not args.no_ema)
    vae = load_decoder(targs, args.vae, device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"samples-{args.mode}")
    os.makedirs(out, exist_ok=True)
    steps = None if args.sampler == "ddpm" else args.steps            # None: DDPM over all T steps
    g = torch.Generator(device).manual_seed(args.seed)
    amp = auto_amp(device) if args.amp == "auto" else args.amp
    print(f"sample.py: {args.mode}, {args.n} videos, {args.sampler}"
          f"{'' if steps is None else f' {steps} steps eta {args.eta}'}, amp {amp} -> {out}")
    if targs["stage"] in ("image", "t2v") and args.mode != "short":
        raise UserError(f"a text-to-video model samples short clips; drop --mode {args.mode}.")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):  # the networks; the sampler's sums
        if targs["stage"] in ("image", "t2v"):                                # stay float32 (diffusion.py)
            return sample_short(args, net, diffusion, targs, vae, steps, g, device, out, prompts=read_prompts(args))
        if args.mode == "short":
            return sample_short(args, net, diffusion, targs, vae, steps, g, device, out)
        out = sample_long(args, net, diffusion, targs, vae, steps, g, device, out)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
        print(f"peak GPU memory {peak:.2f} GiB ({min(args.n, args.batch_size)} videos sampled and "
              f"{args.decode_batch} decoded at a time)")
    return out


def latent_shape(net, targs, vae):
    """(channels, frames per latent ft, latent height = width) of a model's samples."""
    fs, ft = (vae.fs, vae.ft) if vae is not None else (1, 1)
    return net.cfg.out_channels, ft, targs["size"] // fs


def read_prompts(args):
    """The prompts of --prompt and --prompts FILE, in that order."""
    prompts = list(args.prompt)
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise UserError(f"--prompts {args.prompts} does not exist; pass a text file with one prompt per line.")
        with open(args.prompts, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserError("this is a text-to-video model: pass --prompt \"a red ball bounces fast over a blue "
                        "background\" (or --prompts FILE).")
    return prompts


def sample_short(args, net, diffusion, targs, vae, steps, g, device, out, prompts=None):
    """One clip per video (§3.2): unconditional samples of the model's training length; with prompts
    (§5), video i follows prompts[i mod len(prompts)] with text guidance --text-guidance."""
    c, ft, hw = latent_shape(net, targs, vae)
    clip_len = (targs["gap"] + 1) if targs["stage"] == "interp" else targs["frames"] // ft  # in latents
    videos = []
    if prompts is not None:
        prompts = [prompts[i % len(prompts)] for i in range(args.n)]
        context, empty = net.prompt_states(text_lib.Tokenizer(args.bpe or targs.get("bpe")), prompts)
        with open(os.path.join(out, "prompts.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(prompts) + "\n")
    for b in range(0, args.n, args.batch_size):
        shape = (min(args.batch_size, args.n - b), c, clip_len, hw, hw)
        fn = hierarchical.unconditional_fn(net) if prompts is None else \
            hierarchical.text_guided_fn(net, context[b:b + shape[0]], empty, args.text_guidance)
        z = diffusion.sample_loop(fn, shape, steps, eta=args.eta, generator=g, device=device, progress=True)
        x = vae.decode_latents(z) if vae is not None else z
        videos.append(data.to_uint8(x))                                    # (B,3,T,H,W) -> (B,T,H,W,3)
    videos = np.concatenate(videos)                                        # (N,T,H,W,3)
    for i, v in enumerate(videos):
        write_one(os.path.join(out, f"video_{i:03d}"), v, args.fps)
    data.write_grid(os.path.join(out, "grid.png"), videos[:16])
    if args.npz:
        data.save_npz(os.path.join(out, "samples.npz"), videos)
    print(f"wrote {len(videos)} videos of {videos.shape[1]} frames to {out}")
    return out


def sample_long(args, net, diffusion, targs, vae, steps, g, device, out):
    """Long videos (§3.3): latents come from a generator and are decoded and written chunk by chunk."""
    if targs["stage"] != "pred":
        raise UserError(f"--mode {args.mode} needs the prediction model (--stage pred) as --ckpt, "
                        f"not a '{targs['stage']}' checkpoint.")
    if args.mode == "autoregressive" and targs["gap"] != 1:
        raise UserError(f"this prediction model was trained on latents {targs['gap']} apart (keyframes for "
                        f"--mode hierarchical); for --mode autoregressive train one with --stage pred --gap 1.")
    c, ft, hw = latent_shape(net, targs, vae)
    length = args.length or targs["frames"]                             # frames per output video
    n_latents = math.ceil(length / ft)
    clip_len = targs["frames"] // ft                                     # latents per sampled clip
    interp = None
    if args.mode == "hierarchical":
        if not args.interp:
            raise UserError("--mode hierarchical needs the interpolation model too: pass --interp RUN/interp.pt.")
        interp, _, iargs = load_model(args.interp, device, not args.no_ema)
        if iargs["stage"] != "interp" or iargs["gap"] != targs["gap"]:
            raise UserError(f"--interp must be an interp checkpoint with the prediction model's gap "
                            f"({targs['gap']}); got stage {iargs['stage']} gap {iargs['gap']}.")
    path = os.path.join(out, "long.npy")
    with atomic_path(path) as tmp:  # long.npy appears only once every video is complete
        # The file at its final size; chunks are written below, each through a short-lived map (one map
        # held for the whole run would keep every written page resident, so memory would grow with length).
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                  shape=(args.n, length, targs["size"], targs["size"], 3))
        bar = tqdm(total=args.n * length, desc=f"{args.mode} frames", unit="frame")
        for b in range(0, args.n, args.batch_size):
            B = min(args.batch_size, args.n - b)
            kw = dict(k=args.k, s=args.cond_noise, w=args.guidance, steps=steps, eta=args.eta, generator=g,
                      keep_first=args.keep_first)
            if args.mode == "autoregressive":
                latents = hierarchical.autoregressive(net, diffusion, (B, c, clip_len, hw, hw), n_latents, **kw)
            else:
                latents = hierarchical.hierarchical(net, interp, diffusion, (B, c, clip_len, hw, hw), n_latents,
                                                    gap=targs["gap"], **kw)
            t = 0
            chunks = hierarchical.stream_decode(vae, rechunk(latents, args.chunk), batch=args.decode_batch) \
                if vae is not None else latents
            for x in chunks:                                                 # (B,3,n,H,W)
                u8 = data.to_uint8(x)[:, : length - t]                       # (B,3,n,H,W) -> (B,n,H,W,3)
                arr = np.load(tmp, mmap_mode="r+")
                arr[b:b + B, t:t + u8.shape[1]] = u8
                arr.flush()
                del arr
                t += u8.shape[1]
                bar.update(B * u8.shape[1])
        bar.close()
    videos = np.load(path, mmap_mode="r")
    for i in range(args.n):
        write_one(os.path.join(out, f"long_{i:03d}"), NpyFrames(path, i), args.fps, long=True)
    every = max(16, -(-length // 32))  # at most 32 columns that reach the end of the video
    data.write_grid(os.path.join(out, "grid.png"), videos[:8, ::every])  # (8, <=32, H, W, 3)
    if args.npz:
        data.save_npz(os.path.join(out, "samples.npz"), np.asarray(videos))
    print(f"wrote {args.n} videos of {length} frames to {path}")
    return out


def rechunk(chunks, n):
    """Regroup a stream of latent chunks (B,c,*,h,w) into chunks of n latents (the last may be shorter)."""
    buf = None
    for z in chunks:
        buf = z if buf is None else torch.cat([buf, z], 2)  # (B,c,n1+n2,h,w)
        while buf.shape[2] >= n:
            yield buf[:, :, :n]                               # (B,c,n,h,w)
            buf = buf[:, :, n:]
    if buf is not None and buf.shape[2] > 0:
        yield buf


class NpyFrames:
    """Video i of a uint8 (N,T,H,W,3) .npy, iterated a block of frames at a time through a
    short-lived memory map, so encoding a long video does not keep all of it resident."""

    def __init__(self, path, i, block=64):
        m = np.load(path, mmap_mode="r")
        self.path, self.i, self.block, self.shape, self.dtype = path, i, block, m.shape[1:], m.dtype
        del m

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, sl):  # a slice of frames, read into memory
        return np.array(np.load(self.path, mmap_mode="r")[self.i, sl])

    def __iter__(self):
        for t in range(0, self.shape[0], self.block):
            yield from self[t:t + self.block]


def write_one(stem, video, fps, long=False):
    """A video as mp4 when PyAV is installed, else gif (long videos: their first 256 frames)."""
    try:
        import av  # noqa: F401
        data.write_video(stem + ".mp4", video, fps)
        if not long:
            data.write_video(stem + ".gif", video, fps)
    except ImportError:
        data.write_video(stem + ".gif", np.asarray(video[:256] if long else video), fps)


# ----------------------------------------------------------------------------- the run's page
def _latest(folder, prefix, suffix=".png"):
    names = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(suffix)) \
        if os.path.isdir(folder) else []
    return os.path.join(folder, names[-1]) if names else None


def html_figure(run, path, caption, width=None):
    """<figure> for an image or video file of the run (relative link), or '' when the file is missing."""
    if not path or not os.path.isfile(path):
        return ""
    rel = html.escape(os.path.relpath(path, run))
    size = f' width="{width}"' if width else ""
    tag = (f'<video src="{rel}" controls loop muted{size}></video>' if path.endswith(".mp4")
           else f'<img src="{rel}" alt="{html.escape(caption)}"{size}>')
    return f"<figure>{tag}<figcaption>{html.escape(caption)}</figcaption></figure>\n"


def write_report(run):
    """RUN/index.html: one page with what the main job made (plain HTML, relative links, no scripts):
    the numbers with the commands behind them, real clips next to reconstructions, every stage's
    samples, the long video with a strip of frames every 128, and loss curves (PNG, drawn here)."""
    if not os.path.isdir(run):
        raise UserError(f"run folder {run} does not exist; train first (python train.py --stage all --preset demo).")
    rows, body = [], []
    decoder = os.path.join(run, "decoder")  # the demo's decoder step (launch.DEMO_DECODER), when it ran
    for folder, what, cmd in ((run, "autoencoder", "python train.py --stage vae (end of the stage)"),
                              (decoder, "its decoder trained on alone", "python train.py --stage vae --init RUN/vae.pt "
                               "--decoder-only --out RUN/decoder (the main job's decoder step)")):
        vae_log = os.path.join(folder, "log-vae.jsonl")
        evals = [json.loads(line) for line in open(vae_log) if '"eval_psnr"' in line] if os.path.isfile(vae_log) else []
        if evals:
            rows.append((f"{what}: held-out reconstruction PSNR", f"{evals[-1]['eval_psnr']:.2f} dB over "
                         f"{evals[-1]['eval_clips']} clips", cmd))
    short = os.path.join(run, "samples-short", "samples.npz")
    if os.path.isfile(short):
        samples = data.load_npz(short)
        score, _ = balls.synthetic_score(samples)
        real = balls.SyntheticVideos(n=32, frames=16, size=samples.shape[2], split="test")
        real_score, _ = balls.synthetic_score(np.stack([real.render(i) for i in range(len(real))]))
        rows.append(("synthetic score of the short samples (balls.ball_check)", f"{100 * score:.0f}% "
                     f"(real held-out clips: {100 * real_score:.0f}% of 32)",
                     "python sample.py --ckpt RUN/lvdm.pt --n 8 --npz"))
    long_path = os.path.join(run, "samples-hierarchical", "long.npy")
    if os.path.isfile(long_path):
        videos = np.load(long_path, mmap_mode="r")                          # (N,T,H,W,3)
        T = videos.shape[1]
        if T >= 256:
            first, last = (balls.clip_score(videos, a, b) for a, b in ((0, 128), (T - 128, T)))
            rows.append((f"synthetic score of the {T}-frame videos, first / last 128 frames (per 16-frame clip)",
                         f"{100 * first:.0f}% / {100 * last:.0f}%",
                         f"python sample.py --ckpt RUN/pred.pt --interp RUN/interp.pt --mode hierarchical --frames {T} "
                         f"--steps {hierarchical.LONG_VIDEO_STEPS} (the main job's DDIM steps)"))
        curve = None
        if T >= 2 * drift.CLIP:  # whole-video persistence (drift.py), next to real videos of the same length
            attrs, mean = {}, {}
            for name, vids in (("these videos", videos), ("real videos", drift.real_videos(len(videos), T,
                                                                                          videos.shape[2]))):
                attrs[name] = [drift.clip_attributes(np.asarray(v)) for v in vids]
                mean[name] = drift.mean_persistence(vids, attrs[name])
            p, r = mean["these videos"], mean["real videos"]
            if T >= drift.WINDOW:
                curve = os.path.join(run, "samples-hierarchical", "drift.png")
                plot_lines(curve, {name: drift.keeps_first_curve(a, T) for name, a in attrs.items()},
                           "share of clips showing the first clip's balls, per 128 frames", y_key="keeps_first",
                           x_label="frame (end of each 128-frame window)", y_label="share")
            rows.append((f"the {T}-frame videos as whole videos: same balls in the next 16-frame clip / the first "
                         f"clip's balls / background change, first vs last 128 frames",
                         f"{100 * p['same_next']:.0f}% / {100 * p['keeps_first']:.0f}% / {p['background_change']:.1f}"
                         f" of 255 (real videos: {100 * r['same_next']:.0f}% / {100 * r['keeps_first']:.0f}% / "
                         f"{r['background_change']:.1f})", "python drift.py RUN/samples-hierarchical/long.npy"))
        strip = os.path.join(run, "samples-hierarchical", "strip.png")
        data.write_grid(strip, np.asarray(videos[:, list(range(0, T, 128)) + [T - 1]]))  # (N, frames every 128, H, W, 3)
        body.append(f"<h2>The {T}-frame video (§3.3, hierarchical)</h2>\n"
                    + html_figure(run, os.path.join(run, "samples-hierarchical", "long_000.mp4"), "the first long video",
                            width=256)
                    + html_figure(run, strip, f"frames 0, 128, 256, ... and {T - 1} of each long video (one row each)")
                    + (html_figure(run, curve, "do the videos keep their scene? (drift.py; real videos for reference)",
                               width=480) if curve else ""))
    for folder, stage, title in (
            (run, "vae", "Autoencoder (§3.1): real clips (odd rows) over their reconstructions (even rows)"),
            (decoder, "vae", "The same, its decoder trained on alone (the decoder step)"),
            (run, "lvdm", "Unconditional samples during training (§3.2)"),
            (run, "pred", "Prediction model samples (§3.3)"), (run, "interp", "Interpolation model samples (§3.3)")):
        png = _latest(os.path.join(folder, "samples"), stage + "-")
        if png:
            body.append(f"<h2>{html.escape(title)}</h2>\n" + html_figure(run, png, os.path.basename(png))
                        + html_figure(run, png[:-4] + ".gif", "the first four, as a video"))
    body.append("<h2>Short samples (DDIM-50)</h2>\n"
                + html_figure(run, os.path.join(run, "samples-short", "grid.png"), "every sample, frames left to right")
                + html_figure(run, os.path.join(run, "samples-short", "video_000.gif"), "the first sample"))
    curves = ""
    for folder, stage in ((run, "vae"), (decoder, "vae"), (run, "lvdm"), (run, "pred"), (run, "interp")):
        log = os.path.join(folder, f"log-{stage}.jsonl")
        points = [json.loads(line) for line in open(log)] if os.path.isfile(log) else []
        points = [p for p in points if "step" in p and "loss" in p]
        if points:
            png = os.path.join(folder, f"loss-{stage}.png")
            name = os.path.relpath(log, run)
            plot_lines(png, points, f"{name}: training loss", x_key="step", y_key="loss", x_label="step",
                       y_label="loss")
            curves += html_figure(run, png, f"training loss ({name})", width=480)
    body.append("<h2>Training losses</h2>\n" + curves)
    table = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td><code>{html.escape(c)}</code></td></tr>"
                    for a, b, c in rows)
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>LVDM run {html.escape(run)}</title>\n"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img,video{max-width:100%;"
            "image-rendering:pixelated}figure{display:inline-block;margin:6px}td{padding:2px 10px}</style>"
            f"</head><body>\n<h1>LVDM run: {html.escape(os.path.abspath(run))}</h1>\n"
            f"<table><tr><th>what</th><th>value</th><th>command</th></tr>{table}</table>\n" + "".join(body)
            + "</body></html>\n")
    path = os.path.join(run, "index.html")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(page)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main_guard(main)
