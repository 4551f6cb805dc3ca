"""Benchmarks and paper reproductions measured on the machine at hand, printed as markdown tables.

    python bench.py table2                 # Table 2 of §4.2: latent vs pixel space, same U-Net width/depth
    python bench.py loader [ROOT --make]   # data loader clips/s at 256² from frame folders
    python bench.py i3d --i3d PATH         # I3D clips/s at 16x224², and FVD16 time for 256 vs 256 clips
    python bench.py long --pred runs/demo/pred.pt --interp runs/demo/interp.pt   # 1024/4096-frame sampling
    python bench.py study --pred runs/demo/pred.pt --interp runs/demo/interp.pt --ar-pred runs/demo-ar/pred.pt \
        --i3d PATH --frames 256 --n 16 --pool 4   # §4.4, Fig. 6-7: FVD along long videos, per setting
    python bench.py all --i3d PATH

Every number is a wall-clock measurement in this process (after a warm-up); ratios are taken
between rows measured in the same run. Nothing here is asserted in the tests. No other file
imports this one.
"""
import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import data
import diffusion
import fvd
import sample
import unet3d
from common import atomic_path, count_params, current_umask, main_guard, plot_lines


def machine():
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    return f"{dev}; torch {torch.__version__}, {torch.get_num_threads()} threads"


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
    out = [f"Machine: {machine()}. U-Net: model_channels={cfg.model_channels}, mult={cfg.channel_mult}, "
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
    ds = data.SyntheticVideos(n=n, frames=frames, size=width, seed=seed)
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


def loader_throughput(root, frames=16, size=256, batch_size=8, workers=2, n_batches=20):
    """Clips/s of VideoDataset(root) at size x size, `frames` frames, through `workers` workers."""
    return measure_loader(data.VideoDataset(root, frames, size), batch_size, workers, n_batches)


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
    return f"Machine: {machine()}.\n\n" + "\n".join(rows)


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
    return f"Machine: {machine()}.\n\n| measure | value |\n|---|---|\n" + "\n".join(rows)


def long(args):
    """Wall time and peak resident memory of sample.py long modes, each in a fresh process."""
    rows = ["| mode | frames | wall (s) | peak RSS (MiB) |", "|---|---|---|---|"]
    peaks = {}
    for mode in ("hierarchical",):
        for frames in (1024, 4096):
            out = tempfile.mkdtemp(prefix="lvdm-long-")
            code = ("import resource, sample; sample.main({argv!r}); "
                    "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
            argv = ["--ckpt", args.pred, "--interp", args.interp, "--mode", mode, "--frames", str(frames),
                    "--n", "1", "--steps", str(args.steps), "--out", out]
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", code.format(argv=argv)], capture_output=True, text=True)
            wall = time.perf_counter() - t
            if res.returncode != 0:
                return f"long: sample.py failed:\n{res.stderr[-2000:]}"
            peak = int(res.stdout.strip().split("PEAK")[-1]) / 1024
            peaks[frames] = peak
            rows.append(f"| {mode} DDIM-{args.steps} | {frames} | {wall:.0f} | {peak:.0f} |")
    rows.append("")
    rows.append(f"peak(4096) / peak(1024) = {peaks[4096] / peaks[1024]:.3f}")
    return f"Machine: {machine()}.\n\n" + "\n".join(rows)


STUDY = {  # name -> (mode, cond-noise s, guidance w); Fig. 6-7 of the paper
    "hierarchical": ("hierarchical", 100, 0.1),
    "autoregressive": ("autoregressive", 100, 0.1),
    "autoregressive, no perturbation": ("autoregressive", 0, 0.1),
    "autoregressive, no guidance": ("autoregressive", 100, 0.0),
}


def study(argv):
    """FVD of every 16-frame clip across long videos, for the long-video settings of §4.4.

    python bench.py study --pred runs/demo/pred.pt --interp runs/demo/interp.pt \\
        --ar-pred runs/demo-ar/pred.pt --i3d i3d-kinetics-400.ckpt --frames 256 --n 16 --pool 4
    Writes OUT/study.csv and OUT/study.png (one curve per setting)."""
    p = argparse.ArgumentParser(prog="bench.py study", description=study.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, help="prediction model on sparse latents (--gap 4)")
    p.add_argument("--interp", required=True)
    p.add_argument("--ar-pred", required=True, help="prediction model on consecutive latents (--gap 1)")
    p.add_argument("--i3d", default=os.environ.get("LVDM_I3D"))
    p.add_argument("--frames", type=int, default=1024); p.add_argument("--n", type=int, default=16)
    p.add_argument("--real-n", type=int, default=256, help="real synthetic clips for the reference statistics")
    p.add_argument("--steps", type=int, default=50); p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=1, help="score this many consecutive 16-frame clips of every "
                   "video together (n*pool clips per point; fvd.fvd_curve)")
    p.add_argument("--only", action="append", help="run only these settings (repeatable)")
    p.add_argument("--out", default="runs/study")
    args = p.parse_args(argv)
    model = fvd.load_i3d(args.i3d)
    os.makedirs(args.out, exist_ok=True)
    size = sample.load_model(args.pred, "cpu")[2]["size"]
    real_ds = data.SyntheticVideos(n=args.real_n, frames=16, size=size, split="test")
    real = np.stack([data.to_uint8(real_ds[i][None])[0] for i in range(len(real_ds))])  # N x (16,H,W,3) -> (N,16,H,W,3)
    real_feats = fvd.i3d_features(real, model, progress=True, desc="real clips")
    curves = {}
    for name, (mode, s, w) in STUDY.items():
        if args.only and name not in args.only:
            continue
        out = os.path.join(args.out, name.replace(", ", "-").replace(" ", "-"))
        ckpt = args.pred if mode == "hierarchical" else args.ar_pred
        sample.main(["--ckpt", ckpt, "--interp", args.interp, "--mode", mode, "--frames", str(args.frames),
                     "--n", str(args.n), "--batch-size", str(args.n), "--steps", str(args.steps),
                     "--cond-noise", str(s), "--guidance", str(w), "--seed", str(args.seed), "--out", out])
        videos = np.load(os.path.join(out, "long.npy"), mmap_mode="r")
        curves[f"{name} (s={s}, w={w})"] = fvd.fvd_curve(real_feats, videos, model, pool=args.pool)
        print(name, " ".join(f"{c['fvd']:.0f}" for c in curves[f"{name} (s={s}, w={w})"]), flush=True)
    with atomic_path(os.path.join(args.out, "study.csv")) as tmp, open(tmp, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["setting", "clip", "start", "end", "fvd", "kvd"])
        for name, pts in curves.items():
            for c in pts:
                wr.writerow([name, c["clip"], c["start"], c["end"], f"{c['fvd']:.3f}", f"{c['kvd']:.5f}"])
    plot_lines(os.path.join(args.out, "study.png"), curves,
                 f"FVD of {args.n * args.pool} 16-frame clips per point ({args.n} videos x {args.frames} frames) "
                 f"vs {args.real_n} real clips")
    print(f"wrote {args.out}/study.csv and study.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="table2", choices=["table2", "loader", "i3d", "long", "study", "all"])
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
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["study"]:  # its own flags
        return study(argv[1:])
    args = p.parse_args(argv)
    todo = ["table2", "loader", "i3d"] if args.what == "all" else [args.what]
    for what in todo:
        print(f"\n## {what}\n")
        print(globals()[what](args), flush=True)


if __name__ == "__main__":
    main_guard(main)
