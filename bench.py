"""Benchmarks measured on the machine at hand, printed as markdown tables.

    python bench.py table2                 # Table 2 of §4.2: latent vs pixel space, same U-Net width/depth
    python bench.py loader                 # data loader clips/s at 256² from frame folders
    python bench.py i3d --i3d PATH         # I3D clips/s at 16x224², and FVD16 time for 256 vs 256 clips
    python bench.py long --pred runs/demo/pred.pt --interp runs/demo/interp.pt   # 1024/4096-frame sampling
    python bench.py all --i3d PATH

Every number is a wall-clock measurement in this process (after a warm-up); ratios are taken
between rows measured in the same run. Nothing here is asserted in the tests.
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch


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
    import diffusion as G
    import unet3d as U
    from torch.utils.flop_counter import FlopCounterMode
    device = torch.device(args.device)
    cfg = U.unet_presets()["paper"]
    cfg.model_channels, cfg.num_heads = args.width, args.heads
    cfg.num_res_blocks = args.res_blocks
    diff = G.GaussianDiffusion(G.make_betas("linear", 1000, 0.0015, 0.0155))
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
        net = U.UNet3D(U.UNetConfig(**{**cfg.__dict__, "in_channels": c, "out_channels": c})).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x0 = torch.randn(args.batch, *shape, device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            diff.training_loss(lambda z, t: net(z, t), x0).mean().backward()
            opt.step()

        def sample_step():
            with torch.no_grad():
                net(x0[:1], torch.full((1,), 500, device=device))

        with FlopCounterMode(display=False) as fc:
            opt.zero_grad(set_to_none=True)
            diff.training_loss(lambda z, t: net(z, t), x0).mean().backward()
        flops = fc.get_total_flops()
        t_step = timeit(step, repeat=args.repeat)
        t_sample = timeit(sample_step, repeat=args.repeat)
        n_dims = shape[0] * shape[1] * shape[2] * shape[3]
        results.append((name, n_dims, t_step, t_sample))
        out.append(f"| {name} | {n_dims / 1e3:.0f}k | {U.count_params(net) / 1e6:.1f}M | {t_step:.3f} | "
                   f"{t_sample:.3f} | {50 * t_sample:.1f} | {flops / t_step / peak:.2f} |")
        del net, opt
    out.append("")
    base = results[0]
    for name, _, ts, tsa in results[1:]:
        out.append(f"{name} / latent: train step {ts / base[2]:.1f}x, sampling step {tsa / base[3]:.1f}x slower.")
    return "\n".join(out)


def loader(args):
    import data as D
    root = tempfile.mkdtemp(prefix="lvdm-bench-")
    D.make_frame_folders(root, n=32, frames=64, width=320, height=256)
    rows = ["| workers | clips/s (16x256², batch 8, from 320x256 JPEG frame folders) |", "|---|---|"]
    for w in (0, 2):
        ds = D.VideoDataset(root, 16, 256)
        rows.append(f"| {w} | {D.measure_loader(ds, batch_size=8, workers=w, n_batches=8):.1f} |")
    return f"Machine: {machine()}.\n\n" + "\n".join(rows)


def i3d(args):
    import numpy as np
    import fvd as F
    if not args.i3d:
        return "i3d: skipped (pass --i3d PATH or set LVDM_I3D)"
    model = F.load_i3d(args.i3d).to(args.device)
    clips_s = F.bench_i3d(model, batch=4, frames=16)
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (256, 16, 64, 64, 3), dtype=np.uint8)
    t = time.perf_counter()
    a = F.i3d_features(videos, model)
    b = F.i3d_features(videos[::-1].copy(), model)
    F.frechet_distance(a, b)
    t = time.perf_counter() - t
    return (f"Machine: {machine()}.\n\n| measure | value |\n|---|---|\n| I3D forward, 16x224² clips/s | {clips_s:.2f} |\n"
            f"| FVD16 256 vs 256 clips (features of both sides + distance) | {t / 60:.1f} min |")


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="table2", choices=["table2", "loader", "i3d", "long", "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=64, help="U-Net model_channels (paper: 256; reduced on CPU)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--res-blocks", type=int, default=1, help="paper: 3")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pixel256", action="store_true", help="also time pixel space at the full 256² (slow on CPU)")
    p.add_argument("--i3d", default=os.environ.get("LVDM_I3D"))
    p.add_argument("--pred"); p.add_argument("--interp"); p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    todo = ["table2", "loader", "i3d"] if args.what == "all" else [args.what]
    for what in todo:
        print(f"\n## {what}\n")
        print(globals()[what](args), flush=True)


if __name__ == "__main__":
    main()
