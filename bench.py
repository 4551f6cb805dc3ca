"""Speed and memory benchmarks, Table 2 of §4.2, and the fault and GPU smoke harnesses, measured on the
machine at hand and printed as markdown tables. The quality studies (§4.4's long videos, the demo's
diagnostics, §5 on the built-in data) are in study.py.

    python bench.py table2                 # Table 2 of §4.2: latent vs pixel space, same U-Net width/depth
    python bench.py loader [ROOT --make]   # data loader clips/s at 256² from frame folders
    python bench.py i3d --i3d PATH         # I3D clips/s at 16x224², and FVD16 time for 256 vs 256 clips
    python bench.py long --pred runs/demo/pred.pt --interp runs/demo/interp.pt   # 1024/4096-frame sampling
    python bench.py faults                 # SIGKILL / SIGTERM + --resume, bitwise; 42 bad inputs, one sentence each
    python bench.py smoke [--device cuda]  # every stage at the paper presets, a few steps: time and peak memory
    python bench.py contention             # the demo's training step next to a busy process: threads, wait policy
    python bench.py updates                # per-step costs the GPU path removed: EMA, guidance, schedule lookups
    python bench.py levers [--compile]     # the demo's AE and LVDM training steps per speed lever, share of fp32 peak
    python bench.py release [--ae A --lvdm L]   # convert + sample the release's paper-size Sky models: time, memory
    python bench.py sd [--lvdm t2v.ckpt]   # the release's text-to-video model at SD's shape: convert, DDIM, training
    python bench.py all --i3d PATH

Every number is a wall-clock measurement in this process (after a warm-up); ratios are taken
between rows measured in the same run. Nothing here is asserted in the tests. No other file
imports this one.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import balls
import convert
import data
import diffusion
import fvd
import harness
import hierarchical
import sdvae
import stages
import text
import train
import unet3d
import vae
from common import auto_amp, count_params, current_umask, main_guard


def timeit(fn, repeat=3, warmup=1):
    """Median seconds of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def matmul_peak(device, n=2048):
    """FLOP/s of a large float32 matmul: the reference 'peak' of this machine."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / timeit(lambda: a @ b, repeat=5)


def table2(args):
    """Same U-Net width and depth, same 16 frames at 256²: latent space (4x4x32x32) vs pixel space."""
    device = torch.device(args.device)
    cfg = unet3d.unet_presets()["paper"]
    cfg.model_channels, cfg.num_heads = args.width, args.heads
    cfg.num_res_blocks = args.res_blocks
    gd = diffusion.GaussianDiffusion(diffusion.make_betas("linear", 1000, 0.0015, 0.0155))
    rows = [("LVDM (latent, fs=8, ft=4)", (4, 16 // 4, 256 // 8, 256 // 8)),
            ("pixel, 64² (VDM base)", (3, 16, 64, 64))]
    if args.pixel256:
        rows.append(("pixel, 256²", (3, 16, 256, 256)))
    peak = matmul_peak(device)
    out = [f"Machine: {harness.machine()}. U-Net: model_channels={cfg.model_channels}, mult={cfg.channel_mult}, "
           f"res_blocks={cfg.num_res_blocks}, attention at {cfg.attention_resolutions}, heads={cfg.num_heads}, "
           f"batch {args.batch}; fp32. Matmul peak {peak / 1e9:.1f} GFLOP/s.", "",
           "| model | #dims | #params | train step (s) | per sampling step (s) | DDIM-50 video (s) | step FLOP/s / peak |",
           "|---|---|---|---|---|---|---|"]
    results = []
    for name, shape in rows:
        c = shape[0]
        net = unet3d.UNet3D(unet3d.UNetConfig(**{**cfg.__dict__, "in_channels": c, "out_channels": c})).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x0 = torch.randn(args.batch, *shape, device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            gd.training_loss(lambda z, t: net(z, t), x0).mean().backward()
            opt.step()

        def sample_step():
            with torch.no_grad():
                net(x0[:1], torch.full((1,), 500, device=device))

        with FlopCounterMode(display=False) as fc:
            opt.zero_grad(set_to_none=True)
            gd.training_loss(lambda z, t: net(z, t), x0).mean().backward()
        flops = fc.get_total_flops()
        t_step = timeit(step, repeat=args.repeat)
        t_sample = timeit(sample_step, repeat=args.repeat)
        n_dims = shape[0] * shape[1] * shape[2] * shape[3]
        results.append((name, n_dims, t_step, t_sample))
        out.append(f"| {name} | {n_dims / 1e3:.0f}k | {count_params(net) / 1e6:.1f}M | {t_step:.3f} | "
                   f"{t_sample:.3f} | {50 * t_sample:.1f} | {flops / t_step / peak:.2f} |")
        del net, opt
    out.append("")
    base = results[0]
    for name, _, ts, tsa in results[1:]:
        out.append(f"{name} / latent: train step {ts / base[2]:.1f}x, sampling step {tsa / base[3]:.1f}x slower.")
    return "\n".join(out)


def measure_loader(dataset, batch_size=8, workers=2, n_batches=20):
    """Clips per second through a shuffling DataLoader, timed after the first batch (worker start)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)
    t0, clips = time.perf_counter(), 0
    for _ in range(n_batches):
        try:
            clips += next(it).shape[0]
        except StopIteration:
            it = iter(loader)
            clips += next(it).shape[0]
    return clips / (time.perf_counter() - t0)


def make_frame_folders(dst, n=32, frames=64, width=320, height=256, seed=0):
    """n synthetic videos as width x height JPEG frame folders under dst (for throughput checks)."""
    ds = balls.SyntheticVideos(n=n, frames=frames, size=width, seed=seed)
    for i in range(n):
        folder = os.path.join(dst, f"video{i:03d}")
        if os.path.isdir(folder):
            continue
        video = ds.render(i)[:, (width - height) // 2:(width - height) // 2 + height]  # (T,W,W,3) -> (T,H,W,3)
        tmp = tempfile.mkdtemp(prefix=".tmp", dir=dst)
        for k, f in enumerate(video):
            Image.fromarray(f).save(os.path.join(tmp, f"frame{k}.jpg"), quality=95)
        os.chmod(tmp, 0o777 & ~current_umask())
        os.replace(tmp, folder)


def loader(args):
    """Loader clips/s from JPEG frame folders (made under ROOT with --make, or a temporary folder)."""
    root = args.root or tempfile.mkdtemp(prefix="lvdm-bench-")
    if args.make or not args.root:
        os.makedirs(root, exist_ok=True)
        make_frame_folders(root, n=32, frames=64, width=320, height=256)
    rows = [f"| workers | clips/s ({args.frames}x{args.size}², batch {args.batch_size}, from JPEG frame folders) |",
            "|---|---|"]
    for w in sorted({0, args.workers}):
        ds = data.VideoDataset(root, args.frames, args.size)
        rows.append(f"| {w} | {measure_loader(ds, batch_size=args.batch_size, workers=w, n_batches=args.batches):.1f} |")
    return f"Machine: {harness.machine()}.\n\n" + "\n".join(rows)


def bench_i3d(model, batch=4, frames=16, size=fvd.I3D_SIZE, repeats=3):
    """I3D forward throughput in clips/s on the model's device (one warm-up batch first)."""
    device = next(model.parameters()).device
    x = torch.rand(batch, 3, frames, size, size, device=device) * 2 - 1
    with torch.no_grad():
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def i3d(args):
    """I3D forward clips/s (random weights without --i3d), and the time of FVD16 on 256 vs 256 clips."""
    model = fvd.load_i3d(args.i3d, args.device) if args.i3d else fvd.InceptionI3d().to(args.device).eval()
    clips_s = bench_i3d(model, batch=args.batch_i3d, frames=args.frames)
    rows = [f"| I3D forward, {args.frames}x224² clips/s (batch {args.batch_i3d}) | {clips_s:.2f} |",
            f"| FVD16 2048 vs 2048 clips, I3D only (estimated from the line above) | {4096 / clips_s / 60:.1f} min |"]
    if args.i3d:
        videos = np.random.default_rng(0).integers(0, 256, (256, 16, 64, 64, 3), dtype=np.uint8)
        t = time.perf_counter()
        a = fvd.i3d_features(videos, model)
        b = fvd.i3d_features(videos[::-1].copy(), model)
        fvd.frechet_distance(a, b)
        rows.append(f"| FVD16 256 vs 256 clips (features of both sides + distance) | {(time.perf_counter() - t) / 60:.1f} min |")
    return f"Machine: {harness.machine()}.\n\n| measure | value |\n|---|---|\n" + "\n".join(rows)


def long(args):
    """Wall time and peak resident memory of sample.py long modes, each in a fresh process."""
    rows = ["| mode | frames | wall (s) | peak RSS (MiB) |", "|---|---|---|---|"]
    peaks = {}
    for frames in (1024, 4096):
        r = harness.run_script("sample.py", ["--ckpt", args.pred, "--interp", args.interp, "--mode", "hierarchical",
                                     "--frames", str(frames), "--n", "1", "--steps", str(args.steps),
                                     "--out", tempfile.mkdtemp(prefix="lvdm-long-")])
        if r["rc"] != 0:
            return f"long: sample.py failed:\n{r['err'][-2000:]}"
        peaks[frames] = r["rss"]
        rows.append(f"| hierarchical DDIM-{args.steps} | {frames} | {r['wall']:.0f} | {r['rss']:.0f} |")
    rows.append("")
    rows.append(f"peak(4096) / peak(1024) = {peaks[4096] / peaks[1024]:.3f}")
    return f"Machine: {harness.machine()}.\n\n" + "\n".join(rows)


# ----------------------------------------------------------------------------- the release's models
RELEASE_SAMPLE = """import json, statistics, sys, time, torch
import sample, vae
net, gd, targs = sample.load_model(sys.argv[1], sys.argv[3])
ae = vae.load_vae(targs["vae_path"], sys.argv[3])
shape = (1, net.cfg.in_channels, targs["frames"] // ae.ft, targs["size"] // ae.fs, targs["size"] // ae.fs)
times = []
def model_fn(x, t):
    start = time.perf_counter(); out = net(x, t); times.append(time.perf_counter() - start); return out
with torch.no_grad():
    z = gd.ddim_sample_loop(model_fn, shape, int(sys.argv[2]), generator=torch.Generator(sys.argv[3]).manual_seed(0))
    start = time.perf_counter(); x = ae.decode_latents(z); decode = time.perf_counter() - start
print("RESULT", json.dumps(dict(steps=len(times), first=times[0], step=statistics.median(times[1:]), decode=decode,
                                shape=list(x.shape))))
"""


def release_files(root):
    """Random-weight stand-ins for ae_sky.ckpt and short_sky.ckpt at the release's paper sizes, in its
    Lightning layout (alias keys, loss.* keys, LitEma copies, a callback state): shapes and names only."""
    torch.manual_seed(0)
    ae = vae.VideoAutoencoder(vae.VAEConfig(**{**vae.vae_presets()["paper"], "norm_over": "clip", "quant_conv": True}))
    ae_sd = convert.project_to_release({k: v for k, v in ae.state_dict().items() if not k.startswith("latent_")},
                                       convert.AE_KEYS)
    ae_sd.update({k[: -len("conv.weight")] + "weight": v for k, v in list(ae_sd.items()) if k.endswith(".conv.weight")})
    net = unet3d.UNet3D(unet3d.UNetConfig(**{**vars(unet3d.unet_presets()["paper"]), "max_relative_position": 4,
                                            "norm_over": "clip", "relative_form": "release"}))
    unet_sd = convert.project_to_release(net.state_dict(), convert.UNET_KEYS)
    extra = {"epoch": 1, "global_step": 1, "pytorch-lightning_version": "1.4.2", "optimizer_states": [],
             "lr_schedulers": []}
    paths = os.path.join(root, "ae_sky.ckpt"), os.path.join(root, "short_sky.ckpt")
    torch.save({**extra, "state_dict": {**ae_sd, "loss.logvar": torch.zeros(())}}, paths[0])
    torch.save({**extra, "state_dict": {**{"model.diffusion_model." + k: v for k, v in unet_sd.items()},
                                        **{"model_ema.diffusion_model" + k.replace(".", ""): v for k, v in unet_sd.items()},
                                        **{"first_stage_model." + k: v for k, v in ae_sd.items()}}}, paths[1])
    return paths


def release(args):
    """convert.py on the release's Sky models at their real sizes (given files, or random stand-ins of the
    same shapes), then one DDIM sample at 256² x 16 frames, batch 1: convert time and peak memory,
    seconds per DDIM step, decode time."""
    root = tempfile.mkdtemp(prefix="lvdm-release-")
    try:
        ae, lvdm = (args.ae, args.lvdm) if args.lvdm else release_files(root)
        sizes = f"{os.path.getsize(ae) / 2 ** 20:.0f} MiB + {os.path.getsize(lvdm) / 2 ** 20:.0f} MiB"
        out = os.path.join(root, "run")
        conv = harness.run_script("convert.py", ["--preset", "sky", "--ae", ae, "--lvdm", lvdm, "--out", out])
        if conv["rc"]:
            raise RuntimeError(conv["err"][-2000:])
        script = os.path.join(root, "time_sample.py")
        with open(script, "w") as f:
            f.write(RELEASE_SAMPLE)
        samp = harness.run_script(script, [os.path.join(out, "lvdm.pt"), str(args.steps), args.device])
        if samp["rc"]:
            raise RuntimeError(samp["err"][-2000:])
        res = json.loads(next(line for line in samp["out"].splitlines() if line.startswith("RESULT"))[7:])
        rows = [f"Machine: {harness.machine()}. Files: {'given' if args.lvdm else 'random weights of the release shapes'} "
                f"({sizes}).", "", "| what | wall (s) | peak RSS (MiB) |", "|---|---|---|",
                f"| convert.py --preset sky (autoencoder + U-Net) | {conv['wall']:.1f} | {conv['rss']:.0f} |",
                f"| sample: load, DDIM-{args.steps} ({res['steps']} steps, release spacing), decode | {samp['wall']:.1f} "
                f"| {samp['rss']:.0f} |",
                f"| one DDIM step, U-Net on 1 x 4 x 4 x 32 x 32 latents (median after the first) | {res['step']:.2f} | |",
                f"| first DDIM step | {res['first']:.2f} | |",
                f"| decode to {res['shape']} | {res['decode']:.2f} | |"]
        return "\n".join(rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- text-to-video at SD's shape (§5)
# The release's text-to-video U-Net (text2video.yaml): Stable Diffusion v1's with temporal attention in every block.
T2V_UNET = dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(1, 2, 4),
                num_heads=8, context_dim=768, block="sd", resblock_scale_shift=False, attention="factorized",
                sd_temporal="inside", norm_over="clip", max_relative_position=16)
SD_CHILD = """import json, sys, time, torch
sys.path.insert(0, {here!r})
import hierarchical, sample, sdvae, unet3d
torch.manual_seed(0)
net, gd, targs = sample.load_model({ckpt!r}, "cpu")
z = torch.randn(1, 4, {frames}, 32, 32)            # 256² x frames: SD's f8 latents (16 frames: the release's clip)
class Enough(Exception):
    pass
if {what!r} == "sample":
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    with torch.no_grad():
        ctx, empty = net.text(ids), net.text(torch.tensor([[49406] + [49407] * 76]))
    res = {{}}
    for amp in ("float32", "bfloat16"):
        times = []
        def fn(x, t, f=hierarchical.text_guided_fn(net, ctx, empty, 14.0)):   # the release's guidance scale 15
            if len(times) == {steps}:
                raise Enough                         # enough steps of DDIM-50 timed
            start = time.perf_counter(); out = f(x, t); times.append(time.perf_counter() - start); return out
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp == "bfloat16"):
            try:
                gd.ddim_sample_loop(fn, z.shape, 50, noise=z)
            except Enough:
                pass
        res[amp] = times
    start = time.perf_counter()
    with torch.no_grad():
        x = sdvae.load_autoencoder(targs["vae_path"]).decode_latents(z)
    res["decode"], res["shape"] = time.perf_counter() - start, list(x.shape)
else:                                                # one training step's forward and backward, batch 1
    cfg = unet3d.UNetConfig(**{{**vars(net.cfg), "use_checkpoint": {what!r} == "train-ckpt"}})
    unet = unet3d.UNet3D(cfg)
    unet.load_state_dict(net.net.state_dict())
    del net
    saved = [0]
    def pack(x):
        saved[0] += x.numel() * x.element_size(); return x
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = gd.training_loss(lambda x, t: unet(x, t, context=torch.randn(1, 77, cfg.context_dim)), z).mean()
    fwd = time.perf_counter() - start
    loss.backward()
    res = dict(forward=fwd, step=time.perf_counter() - start, saved=saved[0] / 2 ** 30)
print("RESULT", json.dumps(res))
"""


def t2v_release_file(path):
    """A random-weight stand-in for the release's t2v.ckpt at its real shapes and names (Lightning layout:
    model.diffusion_model.* with 5-D convs, first_stage_model.*, cond_stage_model.transformer.*)."""
    torch.manual_seed(0)
    net = unet3d.UNet3D(unet3d.UNetConfig(**T2V_UNET))
    ae, clip = sdvae.FrameAutoencoder(sdvae.SDVAEConfig()), text.TextTransformer(text.TextConfig())
    state = convert.project_to_release_t2v(net.state_dict(), ae.state_dict(), clip.state_dict())
    torch.save({"state_dict": state, "global_step": 1, "epoch": 1}, path)
    return count_params(net)


def sd(args):
    """The release's text-to-video model at its real shape (given, or random weights): convert.py's time and peak
    memory; one DDIM step with guidance (two U-Net passes) at 256² x 16 frames in float32 and under bf16 autocast;
    decoding; one training step's forward and backward (batch 1), with and without activation checkpointing
    (--model use_checkpoint=true): time, peak memory, and the activations autograd keeps for the backward."""
    root = tempfile.mkdtemp(prefix="lvdm-t2v-")
    try:
        ckpt = args.lvdm or os.path.join(root, "t2v.ckpt")
        params = None if args.lvdm else t2v_release_file(ckpt)
        out = os.path.join(root, "run")
        conv = harness.run_script("convert.py", ["--preset", "t2v", "--lvdm", ckpt, "--out", out])
        if conv["rc"]:
            raise RuntimeError(conv["err"][-2000:])
        rows = [f"Machine: {harness.machine()}. File: {'given' if args.lvdm else 'random weights of the release shapes'}"
                f" ({os.path.getsize(ckpt) / 2 ** 30:.2f} GiB{f'; U-Net {params / 1e6:.0f}M params' if params else ''}).",
                "", "| what | wall (s) | peak RSS (GiB) | note |", "|---|---|---|---|",
                f"| convert.py --preset t2v | {conv['wall']:.1f} | {conv['rss'] / 1024:.1f} | |"]
        # without checkpointing, 16 frames keep more activations than this machine's memory: fewer frames show the
        # per-frame cost (activations grow with the frames; the temporal attention's T x T maps are small)
        for what, frames in (("sample", 16), ("train", 2), ("train", 4), ("train-ckpt", 4), ("train-ckpt", 16)):
            script = os.path.join(root, "child.py")
            with open(script, "w") as f:
                f.write(SD_CHILD.format(here=harness.HERE, ckpt=os.path.join(out, "t2v.pt"), what=what, steps=args.steps,
                                        frames=frames))
            res = harness.run_script(script, [])
            if res["rc"]:
                raise RuntimeError(res["err"][-2000:])
            r = json.loads(next(line for line in res["out"].splitlines() if line.startswith("RESULT"))[7:])
            rss = f"{res['rss'] / 1024:.1f}"
            if what == "sample":
                for amp in ("float32", "bfloat16"):
                    rows.append(f"| one DDIM step with guidance, {amp} (median of {len(r[amp]) - 1} after the first) "
                                f"| {np.median(r[amp][1:]):.1f} | {rss} | first {r[amp][0]:.1f} s |")
                rows.append(f"| decode to {r['shape']} (per frame) | {r['decode']:.1f} | {rss} | |")
            else:
                ckpt_note = ", activation checkpointing" if what == "train-ckpt" else ""
                rows.append(f"| training step, {frames} frames, float32{ckpt_note} | {r['step']:.1f} | {rss} | forward "
                            f"{r['forward']:.1f} s; {r['saved']:.2f} GiB saved for the backward |")
        return "\n".join(rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- sharing the CPU
STEP = """import os, sys, time, torch
sys.path.insert(0, {here!r})
import diffusion, unet3d
torch.set_num_threads({threads})
torch.manual_seed(0)
net = unet3d.UNet3D(unet3d.unet_presets()["demo"])
gd = diffusion.GaussianDiffusion(diffusion.make_betas("linear", 1000), prediction="v")
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
z = torch.randn(8, 4, 4, 8, 8)
def step():
    opt.zero_grad(); gd.training_loss(lambda x, t: net(x, t), z).mean().backward(); opt.step()
for _ in range(5): step()
t = time.perf_counter()
for _ in range({n}): step()
print((time.perf_counter() - t) / {n})
"""
BUSY = "import torch\ntorch.set_num_threads(2)\na = torch.randn(256, 256)\nwhile True:\n    a = (a @ a).tanh()\n"


def contention(args):
    """The demo U-Net's training step (batch 8, 8x8x4 latents), alone and next to another process doing 2-thread
    matmuls, for torch's thread count and OpenMP wait policy: why a busy neighbour slows the demo."""
    rows = ["| neighbour | threads | OMP_WAIT_POLICY | s/step |", "|---|---|---|---|"]
    for neighbour in (False, True):
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if neighbour else None
        time.sleep(2 if neighbour else 0)
        for threads, policy in ((2, None), (1, None), (2, "PASSIVE")):
            env = dict(os.environ, **({"OMP_WAIT_POLICY": policy} if policy else {}))
            times = [float(subprocess.run([sys.executable, "-c", STEP.format(here=harness.HERE, threads=threads, n=40)],
                                          env=env, capture_output=True, text=True, check=True).stdout)
                     for _ in range(args.repeat)]
            rows.append(f"| {'a 2-thread torch process' if neighbour else 'none'} | {threads} | {policy or 'default'} "
                        f"| {np.median(times):.3f} |")
        if busy is not None:
            busy.kill()
            busy.wait()
    return f"Machine: {harness.machine()}. Median of {args.repeat} runs of 40 steps each.\n\n" + "\n".join(rows)


def updates(args):
    """Per-step costs the GPU path removed, timed on the device at hand (median of --repeat): the EMA update of
    the paper U-Net per tensor (the loop train.py had) against train.EMA's one _foreach update; unconditional
    guidance at the demo size in two forwards against one batched forward (hierarchical.guided_model_fn); and
    a schedule lookup copied from numpy at every call against the copy kept on the device."""
    device = torch.device(args.device)
    net = unet3d.UNet3D(unet3d.unet_presets()["paper"]).to(device)
    ema = train.EMA(net, 0.9999)
    shadow = {k: v.clone() for k, v in ema.shadow.items()}

    def per_tensor():  # the previous update: one lerp_ per entry of a fresh state dict
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                shadow[k].lerp_(v.float(), 1e-4)
            else:
                shadow[k].copy_(v)
    rows = ["| what | before (ms) | after (ms) | before / after |", "|---|---|---|---|"]
    before, after = timeit(per_tensor, args.repeat), timeit(lambda: ema.update(net), args.repeat)
    rows.append(f"| EMA update, paper U-Net ({count_params(net) / 1e6:.0f}M parameters, {len(shadow)} tensors) | "
                f"{1e3 * before:.1f} | {1e3 * after:.1f} | {before / after:.2f} |")
    del net, ema, shadow
    cfg = replace(unet3d.unet_presets()["demo"], in_channels=4, out_channels=4, mask_channel=True, s_embedding=True)
    small = unet3d.UNet3D(cfg).to(device).eval()
    gd = diffusion.GaussianDiffusion(diffusion.make_betas("linear", 1000), prediction="v")
    for B in (2, 8):  # the main job's long videos are sampled 2 at a time
        z, t = torch.randn(B, 4, 4, 16, 16, device=device), torch.full((B,), 500, device=device)
        m = hierarchical.frame_mask(B, 4, [0], device)
        fn = hierarchical.guided_model_fn(small, z, m, s=100, w=0.1, diffusion=gd)
        mask, s_vec = hierarchical.full_mask(m, z), torch.full((B,), 100, device=device)

        def two_passes():
            out_c = small(hierarchical.replace_given(z, z, m), t, mask=mask, s=s_vec)
            out_u = small(z, t, mask=torch.zeros_like(mask), s=torch.zeros_like(s_vec))
            return hierarchical.guided(out_c, out_u, 0.1)
        with torch.no_grad():  # interleaved, so both see the same load
            pairs = [(timeit(two_passes, 1), timeit(lambda: fn(z, t), 1)) for _ in range(args.repeat)]
        before, after = (float(np.median(x)) for x in zip(*pairs))
        rows.append(f"| guided U-Net call, demo U-Net, batch {B} of 4 x 16² latents | {1e3 * before:.1f} | "
                    f"{1e3 * after:.1f} | {before / after:.2f} |")
    t8 = torch.randint(0, 1000, (8,), device=device)
    x = torch.randn(8, 4, 4, 16, 16, device=device)
    before = timeit(lambda: torch.from_numpy(gd.sqrt_alphas_cumprod).to(device)[t8].to(x.dtype), args.repeat)
    after = timeit(lambda: gd._extract("sqrt_alphas_cumprod", t8, x), args.repeat)
    rows.append(f"| one schedule lookup (q_sample reads two, a DDIM step seven) | {1e3 * before:.3f} | "
                f"{1e3 * after:.3f} | {before / after:.2f} |")
    return f"Machine: {harness.machine()}. Median of {args.repeat} runs after a warm-up.\n\n" + "\n".join(rows)


# ----------------------------------------------------------------------------- levers of the demo's training step
def demo_steps(variant, batch):
    """(step, flops_of_one_step) of the demo's training step as train.py runs it (model, loss, backward, clip,
    optimizer, EMA), for `variant` (a set of lever names, see levers) at `batch` clips; ae for the autoencoder
    (random 32x32 crops of 16-frame 64x64 clips, no GAN term), else the LVDM (4x16x16 latents of 4 channels)."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    bf16 = "bf16" in variant
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    scaler = train.make_scaler(cpu, "none")
    if "ae" in variant:
        args = train.parse_args(["--stage", "vae", "--out", tempfile.gettempdir(), "--batch-size", str(batch)])
        stage = stages.build_vae_stage(args, cpu, False)
        clips = balls.make_dataset("synthetic", 16, 64, split="train", seed=0)
        x = torch.stack([clips[i] for i in range(batch)])
        scalers = {"optimizer": scaler, "optimizer_d": scaler}
        net, ema = stage.model, None
        loss = lambda: train.vae_step(stage, net, x, 0, False, args, autocast(), scalers)  # noqa: E731
        opt = stage.optimizer
        if "unfused Adam" in variant:  # torch's CPU default before stages.fused: a Python loop over the tensors
            opt = torch.optim.Adam(opt.param_groups[0]["params"], lr=args.lr, betas=args.betas)
    else:
        cfg = replace(unet3d.unet_presets()["demo"], in_channels=4, out_channels=4,
                      attention="joint" if "joint" in variant else "factorized")  # joint: the prediction stage's
        net = unet3d.UNet3D(cfg)
        gd = diffusion.GaussianDiffusion(diffusion.make_betas("linear", 1000), prediction="v")
        how = ({"foreach": True} if "foreach" in variant else {} if "unfused Adam" in variant  # torch's CPU default
               else {"fused": stages.fused(cpu)})                                                # train.py's
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, **how)
        ema = None if "no EMA" in variant else train.EMA(net, 0.999)
        z = torch.randn(batch, 4, 4, 16, 16)
        if "channels-last" in variant:
            net, z = net.to(memory_format=torch.channels_last_3d), z.contiguous(memory_format=torch.channels_last_3d)
        fwd = torch.compile(net) if "compile" in variant else net

        def loss():
            with autocast():
                value = gd.training_loss(lambda zt, t: fwd(zt, t), z).mean()
            scaler.scale(value).backward()  # as train.diffusion_step (a scale of 1.0)

    def one_step():
        opt.zero_grad(set_to_none=True)
        loss()
        train.optimizer_step(opt, scaler, 1.0)  # clip at 1.0 and step, as train.py
        if ema is not None:
            ema.update(net)

    def step():  # "1 thread": how the step scales with cores (--threads 1 against the default)
        if "1 thread" not in variant:
            return one_step()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one_step()
        finally:
            torch.set_num_threads(threads)

    with FlopCounterMode(display=False) as fc:
        opt.zero_grad(set_to_none=True)
        loss()
    return step, fc.get_total_flops()


def levers(args):
    """The demo's two training steps per speed lever, each a variant measured in rounds interleaved with the
    others in this process (so all see the same load): ms per step and per clip, clips/s against the fp32 row
    of its model (the "1 thread" rows show how the step scales with cores), and the step's conv/matmul FLOP/s
    as a share of the fp32 matmul peak; then the profiler's top ops of the LVDM step. --compile adds
    torch.compile rows (inductor needs a C compiler; its compile time is reported and would be paid once per
    stage)."""
    rows = [("LVDM", {"lvdm"}, 8), ("LVDM", {"lvdm", "bf16"}, 8), ("LVDM", {"lvdm", "channels-last"}, 8),
            ("LVDM", {"lvdm", "unfused Adam"}, 8), ("LVDM", {"lvdm", "foreach"}, 8), ("LVDM", {"lvdm", "no EMA"}, 8),
            ("LVDM", {"lvdm"}, 4),
            ("LVDM", {"lvdm"}, 16), ("LVDM", {"lvdm", "bf16"}, 16),
            ("LVDM", {"lvdm", "1 thread"}, 8), ("LVDM", {"lvdm", "joint"}, 8),
            ("LVDM", {"lvdm", "bf16", "1 thread"}, 8), ("LVDM", {"lvdm", "bf16", "joint"}, 8),
            ("autoencoder", {"ae"}, 4), ("autoencoder", {"ae", "unfused Adam"}, 4), ("autoencoder", {"ae", "bf16"}, 4),
            ("autoencoder", {"ae", "1 thread"}, 4), ("autoencoder", {"ae", "bf16", "1 thread"}, 4)]
    if args.compile:
        rows += [("LVDM", {"lvdm", "compile"}, 8), ("LVDM", {"lvdm", "compile", "bf16"}, 8)]
    note = ""
    if auto_amp("cpu") != "bf16":  # emulated bf16 runs many times slower: rows that would take minutes to say so
        rows = [r for r in rows if "bf16" not in r[1]]
        note = " bf16 rows left out: this CPU has no bf16 instructions, so --amp auto trains in float32 here."
    peak = matmul_peak(torch.device("cpu"))
    built, compile_s = [], {}
    for name, variant, batch in rows:
        t = time.perf_counter()
        step, flops = demo_steps(variant, batch)
        step()  # warm-up (and compilation)
        if "compile" in variant:
            compile_s[len(built)] = time.perf_counter() - t
        built.append((step, flops))
    times = [[] for _ in rows]
    for _ in range(args.repeat):
        for i, (step, _) in enumerate(built):
            t = time.perf_counter()
            for _ in range(3):
                step()
            times[i].append((time.perf_counter() - t) / 3)
    out = [f"Machine: {harness.machine()}. fp32 matmul peak {peak / 1e9:.0f} GFLOP/s. Median of {args.repeat} rounds "
           f"of 3 steps per row, the rows interleaved.{note}", "",
           "| model | levers | batch | ms / step | ms / clip | clips/s vs its model's first row | share of fp32 peak |",
           "|---|---|---|---|---|---|---|"]
    base = {}
    for i, ((name, variant, batch), (_, flops)) in enumerate(zip(rows, built)):
        t = float(np.median(times[i]))
        base.setdefault(name, t / batch)
        levers_ = ", ".join(sorted(variant - {"ae", "lvdm"})) or "fp32 (default)"
        extra = f" (compile {compile_s[i]:.0f} s)" if i in compile_s else ""
        out.append(f"| {name} | {levers_}{extra} | {batch} | {1e3 * t:.1f} | {1e3 * t / batch:.2f} | "
                   f"{base[name] / (t / batch):.2f} | {flops / t / peak:.2f} |")
    step, _ = demo_steps({"lvdm"}, 8)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return "\n".join(out) + "\n\nThe LVDM step (fp32, batch 8), top ops by own time over 5 steps:\n\n```\n" + table + "```"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="table2",
                   choices=["table2", "loader", "i3d", "long", "faults", "smoke", "contention", "updates", "levers",
                            "release", "sd", "all"])
    p.add_argument("root", nargs="?", help="loader: folder of frame folders (default: a temporary one, made)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=64, help="U-Net model_channels (paper: 256; reduced on CPU)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--res-blocks", type=int, default=1, help="paper: 3")
    p.add_argument("--batch", type=int, default=1, help="table2: batch size")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pixel256", action="store_true", help="also time pixel space at the full 256² (slow on CPU)")
    p.add_argument("--i3d", default=os.environ.get("LVDM_I3D"))
    p.add_argument("--batch-i3d", type=int, default=4, help="i3d: clips per forward")
    p.add_argument("--frames", type=int, default=16); p.add_argument("--size", type=int, default=256)
    p.add_argument("--make", action="store_true", help="loader: first write 32 test videos under ROOT")
    p.add_argument("--batch-size", type=int, default=8); p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--pred"); p.add_argument("--interp"); p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ae", help="release: ae_sky.ckpt")
    p.add_argument("--lvdm", help="release: short_sky.ckpt; sd: t2v.ckpt")
    p.add_argument("--seed", type=int, default=0, help="faults: seeds the kill moments")
    p.add_argument("--kills", type=int, default=5); p.add_argument("--fault-steps", type=int, default=12)
    p.add_argument("--smoke-steps", type=int, default=2)
    p.add_argument("--ae-hidden", type=int, default=8, help="smoke on a CPU: autoencoder width (paper: 32)")
    p.add_argument("--compile", action="store_true", help="levers: add torch.compile rows (minutes to compile)")
    if argv is None:
        argv = sys.argv[1:]
    args = p.parse_args(argv)
    todo = ["table2", "loader", "i3d"] if args.what == "all" else [args.what]
    for what in todo:
        print(f"\n## {what}\n")
        print({"faults": harness.faults, "smoke": harness.smoke}.get(what, globals().get(what))(args), flush=True)


if __name__ == "__main__":
    main_guard(main)
