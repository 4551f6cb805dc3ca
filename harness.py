"""Does every path run, and survive what goes wrong? The harnesses behind `bench.py faults` and
`bench.py smoke`, each a markdown table:

  faults   SIGKILL at random moments and SIGTERM, then --resume: the checkpoints bitwise equal to an
           uninterrupted run; and a catalogue of bad inputs, each ending in one sentence, exit status 2
  smoke    every stage at the paper presets (and the GPU's AMP modes, DDP, resume with EMA, sampling,
           FVD) for a few steps on a device: time, peak memory and the check each row makes

They run the project's scripts as subprocesses (`run_script`, which bench.py's timings use too).
No other file imports this one except bench.py.
"""
import json
import math
import os
import pickle
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import fvd
from common import process_start_time


def machine():
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    return f"{dev}; torch {torch.__version__}, {torch.get_num_threads()} threads"


HERE = os.path.dirname(os.path.abspath(__file__))
PEAK = ("import resource, runpy, sys, torch\n"
        "sys.path.insert(0, {here!r})\n"
        "sys.argv = {argv!r}\n"
        "try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
        "finally:\n    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0\n"
        "    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, cuda, flush=True)\n")


def run_script(script, argv, nproc=1, timeout=3600, env=None):
    """Run a project script in a fresh process (under torchrun when nproc > 1); returns a dict: rc, wall (s),
    rss and cuda (peak MiB of the first process), out, err."""
    code = PEAK.format(argv=[script, *argv], script=os.path.join(HERE, script), here=HERE)
    cmd = [sys.executable, "-c", code]
    if nproc > 1:
        fd, path = tempfile.mkstemp(suffix=".py")
        with os.fdopen(fd, "w") as f:
            f.write(code)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", path]
    t = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=timeout, env=env)
    finally:
        if nproc > 1:
            os.remove(path)
    peak = [line.split() for line in res.stdout.splitlines() if line.startswith("PEAK")]
    rss, cuda = (int(peak[0][1]) / 1024, int(peak[0][2]) / 2 ** 20) if peak else (float("nan"), float("nan"))
    return {"rc": res.returncode, "wall": time.perf_counter() - t, "rss": rss, "cuda": cuda,
            "out": res.stdout, "err": res.stderr}




# ----------------------------------------------------------------------------- faults
TINY = ["--preset", "demo", "--size", "32", "--frames", "8", "--batch-size", "2", "--model", "hidden=8",
        "--model", "ch_mult=(1,1,1)", "--disc-start", "2", "--eval-clips", "2", "--log-every", "1",
        "--sample-every", "1000", "--ema", "0.9"]


def _same(a, b):
    """Bitwise equality of two checkpoints' training state."""
    ca, cb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))

    def eq(x, y):
        if torch.is_tensor(x):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return set(x) == set(y) and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y
    return all(eq(ca[k], cb[k]) for k in ("step", "model", "ema", "discriminator", "optimizer", "optimizer_d",
                                          "rng", "data_state"))


def _tiny_checkpoints(root):
    """A tiny vae, lvdm and pred run (a few steps each) for the catalogue's sample.py rows."""
    for stage in ("vae", "lvdm", "pred"):
        extra = ["--steps", "1"] if stage == "vae" else ["--steps", "1", "--batch-size", "1", "--latent-cache", "4",
                                                        "--model", "model_channels=32", "--timesteps", "100"]
        argv = ["--stage", stage, *(TINY if stage == "vae" else TINY[:6]), "--out", root, *extra]
        r = run_script("train.py", argv)
        if r["rc"] != 0:
            raise RuntimeError(f"making the tiny {stage} checkpoint failed:\n{r['err'][-2000:]}")


def catalogue(root):
    """(description, script, argv) of bad inputs; each must end in one `error:` sentence and exit status 2."""
    def write(name, content):
        path = os.path.join(root, name)
        with open(path, "wb") as f:
            f.write(content)
        return path
    os.makedirs(os.path.join(root, "empty", "train"), exist_ok=True)
    short = os.path.join(root, "short", "clip")
    os.makedirs(short, exist_ok=True)
    for k in range(3):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(os.path.join(short, f"{k}.png"))
    vae_pt, lvdm_pt, pred_pt = (os.path.join(root, f"{s}.pt") for s in ("vae", "lvdm", "pred"))
    good = open(vae_pt, "rb").read()
    evil = write("evil.pt", pickle.dumps({"stage": "vae", "model": _Evil()}))
    other = write("other_arch.pt", b"")
    torch.save({**torch.load(vae_pt, map_location="cpu", weights_only=True),
                "model": {"encoder.conv_in.conv.weight": torch.zeros(1)}, "ema": None}, other)
    bad_npz = os.path.join(root, "float.npz")
    np.savez(bad_npz, arr_0=np.zeros((2, 16, 8, 8, 3), np.float32))
    i3d_evil = write("i3d_evil.ckpt", pickle.dumps({"params": _Evil()}))
    i3d_random = os.path.join(root, "i3d_random.pt")  # the right shapes, random values
    torch.save(fvd.InceptionI3d().state_dict(), i3d_random)
    good_npz = os.path.join(root, "u8.npz")
    np.savez(good_npz, arr_0=np.zeros((2, 16, 32, 32, 3), np.uint8))
    lock_dir = os.path.join(root, "locked")
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, "vae.lock"), "w") as f:  # held by this (live) process
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "start": process_start_time(os.getpid())}, f)
    train = ["--stage", "vae", *TINY, "--steps", "1", "--out", os.path.join(root, "r")]
    lvdm = ["--stage", "lvdm", *TINY[:6], "--steps", "1", "--out", os.path.join(root, "r2")]
    return [
        ("train: --steps -5", "train.py", train + ["--steps", "-5"]),
        ("train: --batch-size 0", "train.py", train + ["--batch-size", "0"]),
        ("train: --lr -1", "train.py", train + ["--lr", "-1"]),
        ("train: --lr abc", "train.py", train + ["--lr", "abc"]),
        ("train: --model hidden=abc (wrong type)", "train.py", train + ["--model", "hidden=abc"]),
        ("train: --model nonsense=3 (unknown field)", "train.py", train + ["--model", "nonsense=3"]),
        ("train: --model hidden=0 (cannot build)", "train.py", train + ["--model", "hidden=0"]),
        ("train: --frames 10 (not divisible by ft)", "train.py", train + ["--frames", "10"]),
        ("train: --size 60 (not divisible by fs)", "train.py", train + ["--size", "60"]),
        ("train: --data of a missing folder", "train.py", train + ["--data", os.path.join(root, "missing")]),
        ("train: --data of an empty split folder", "train.py", train + ["--data", os.path.join(root, "empty")]),
        ("train: --data whose videos are all too short", "train.py", train + ["--data", os.path.join(root, "short")]),
        ("train: --preset sky without --data", "train.py", ["--stage", "vae", "--preset", "sky"]),
        ("train: --ema 1", "train.py", train + ["--ema", "1"]),
        ("train: --s-max above --timesteps", "train.py", lvdm + ["--timesteps", "100", "--s-max", "101"]),
        ("train: --betas 0.5 (one number)", "train.py", train + ["--betas", "0.5"]),
        ("train: --flip 2", "train.py", train + ["--flip", "2"]),
        ("train: --stage unknown", "train.py", ["--stage", "video"]),
        ("train: --resume without a checkpoint", "train.py", train + ["--out", os.path.join(root, "none"), "--resume"]),
        ("train: --vae an empty file", "train.py", lvdm + ["--vae", write("empty.pt", b"")]),
        ("train: --vae a truncated checkpoint", "train.py", lvdm + ["--vae", write("cut.pt", good[:len(good) // 2])]),
        ("train: --vae a pickle that runs code", "train.py", lvdm + ["--vae", evil]),
        ("train: --vae an lvdm checkpoint", "train.py", lvdm + ["--vae", lvdm_pt]),
        ("train: --vae another architecture's weights", "train.py", lvdm + ["--vae", other]),
        ("train: --init a vae checkpoint", "train.py", ["--stage", "pred", *TINY[:6], "--steps", "1", "--vae", vae_pt,
                                                        "--init", vae_pt, "--out", os.path.join(root, "r3")]),
        ("train: --lpips a missing file", "train.py", train + ["--lpips", os.path.join(root, "missing.ckpt")]),
        ("train: --lpips random bytes", "train.py", train + ["--lpips", write("noise.ckpt", os.urandom(4000))]),
        ("train: a run folder another live run holds", "train.py", train + ["--out", lock_dir]),
        ("sample: --ckpt missing", "sample.py", ["--ckpt", os.path.join(root, "missing.pt")]),
        ("sample: --ckpt a vae checkpoint", "sample.py", ["--ckpt", vae_pt]),
        ("sample: --ckpt truncated", "sample.py", ["--ckpt", write("cut2.pt", open(lvdm_pt, "rb").read()[:5000])]),
        ("sample: hierarchical without --interp", "sample.py", ["--ckpt", pred_pt, "--mode", "hierarchical"]),
        ("sample: autoregressive from a gap-4 model", "sample.py", ["--ckpt", pred_pt, "--mode", "autoregressive"]),
        ("sample: --n 0", "sample.py", ["--ckpt", lvdm_pt, "--n", "0"]),
        ("sample: --steps above T", "sample.py", ["--ckpt", lvdm_pt, "--steps", "5000", "--out",
                                                 os.path.join(root, "s")]),
        ("fvd: --fake missing", "fvd.py", ["--real", "synthetic", "--fake", os.path.join(root, "x.npz"), "--i3d",
                                          i3d_random]),
        ("fvd: --fake an npz of floats", "fvd.py", ["--real", "synthetic", "--fake", bad_npz, "--i3d", i3d_random]),
        ("fvd: --frames 4 (too short for I3D)", "fvd.py", ["--real", "synthetic", "--fake", good_npz, "--i3d",
                                                          i3d_random, "--frames", "4", "--n", "2", "--runs", "1",
                                                          "--cache-dir", ""]),
        ("fvd: --i3d a pickle that runs code", "fvd.py", ["--real", "synthetic", "--fake", bad_npz, "--i3d", i3d_evil]),
        ("fvd: --i3d missing", "fvd.py", ["--real", "synthetic", "--fake", bad_npz, "--i3d",
                                         os.path.join(root, "none.ckpt")]),
        ("data: prepare from a missing folder", "data.py", ["prepare", os.path.join(root, "missing"),
                                                            os.path.join(root, "out")]),
        ("balls: preview with an unknown split", "balls.py", ["preview", "synthetic", os.path.join(root, "p.gif"),
                                                              "--split", "bogus"]),
    ]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this-should-never-run",))


def faults(args):
    """SIGKILL at random moments + --resume, SIGTERM + --resume (each compared bitwise with a straight run),
    and a catalogue of bad inputs, each of which must end in one sentence and exit status 2."""
    root = tempfile.mkdtemp(prefix="lvdm-faults-")
    rng = np.random.default_rng(args.seed)
    base = ["train.py", "--stage", "vae", *TINY, "--steps", str(args.fault_steps), "--save-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight = os.path.join(root, "straight")
    t = time.perf_counter()
    subprocess.run([sys.executable, *base, "--out", straight], cwd=HERE, env=env, capture_output=True, check=True)
    duration = time.perf_counter() - t
    rows = ["| fault | what happened | result |", "|---|---|---|"]
    killed = os.path.join(root, "killed")
    kills = []
    for k in range(args.kills):  # each kill lands at a random moment of what is left of the run
        resume = ["--resume"] if os.path.exists(os.path.join(killed, "vae.pt")) else []
        p = subprocess.Popen([sys.executable, *base, "--out", killed, *resume], cwd=HERE, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.3, 0.9)) * duration)
        p.kill()
        p.wait()
        ck = os.path.join(killed, "vae.pt")
        kills.append(torch.load(ck, map_location="cpu", weights_only=True)["step"] if os.path.exists(ck) else 0)
    resume = ["--resume"] if os.path.exists(os.path.join(killed, "vae.pt")) else []
    subprocess.run([sys.executable, *base, "--out", killed, *resume], cwd=HERE, env=env, capture_output=True,
                   check=True)
    ok = _same(os.path.join(straight, "vae.pt"), os.path.join(killed, "vae.pt"))
    rows.append(f"| SIGKILL x{args.kills} at random moments, --resume after each | checkpoint steps on disk after "
                f"the kills: {kills}; final run compared with a straight {args.fault_steps}-step run | "
                f"{'pass (bitwise equal)' if ok else 'FAIL'} |")
    termed = os.path.join(root, "termed")
    p = subprocess.Popen([sys.executable, *base, "--out", termed], cwd=HERE, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    log = os.path.join(termed, "log-vae.jsonl")
    while p.poll() is None and not (os.path.exists(log) and len(open(log).readlines()) >= 3):
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate()
    step = torch.load(os.path.join(termed, "vae.pt"), map_location="cpu", weights_only=True)["step"]
    logged = json.loads(open(log).readlines()[-1])["step"]
    subprocess.run([sys.executable, *base, "--out", termed, "--resume"], cwd=HERE, env=env, capture_output=True,
                   check=True)
    ok = p.returncode == 128 + signal.SIGTERM and step == logged and _same(os.path.join(straight, "vae.pt"),
                                                                           os.path.join(termed, "vae.pt"))
    rows.append(f"| SIGTERM mid-run, then --resume | exit {p.returncode}, checkpoint at step {step} (last logged "
                f"{logged}), '{out.strip().splitlines()[-1][:60]}...' | {'pass (bitwise equal)' if ok else 'FAIL'} |")
    _tiny_checkpoints(root)
    failed, cases = 0, catalogue(root)
    for what, script, argv in cases:
        r = run_script(script, argv, timeout=600)
        last = (r["err"].strip().splitlines() or [""])[-1]
        ok = r["rc"] == 2 and last.startswith("error: ") and "Traceback" not in r["err"]
        failed += not ok
        said = last if ok else f"exit {r['rc']}: {r['err'].strip()[-300:]}"
        rows.append(f"| {what} | {said.replace('|', '/').replace(root, 'TMP')[:160]} | {'pass' if ok else 'FAIL'} |")
    rows.append("")
    rows.append(f"catalogue: {len(cases) - failed} of {len(cases)} bad inputs answered in one sentence, exit status 2")
    shutil.rmtree(root, ignore_errors=True)
    return f"Machine: {machine()}.\n\n" + "\n".join(rows)


# ----------------------------------------------------------------------------- smoke
def _last_log(folder, stage):
    """The records of RUN/log-<stage>.jsonl (empty if there is none)."""
    path = os.path.join(folder, f"log-{stage}.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _sigterm_row(argv, folder, env=None):
    """Start `train.py argv`, SIGTERM it once it has logged a step, then --resume it for one more step:
    -> (wall, result)."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "train.py", *argv], cwd=HERE, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    while p.poll() is None and not _last_log(folder, argv[1]):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    ck = os.path.join(folder, f"{argv[1]}.pt")
    step = torch.load(ck, map_location="cpu", weights_only=True)["step"] if os.path.exists(ck) else None
    logs = _last_log(folder, argv[1])
    logged = logs[-1]["step"] if logs else None
    if p.returncode != 128 + signal.SIGTERM or step is None or step != logged:
        return time.perf_counter() - t, f"FAIL: exit {p.returncode}, checkpoint step {step}, logged {logged}: " \
                                        f"{(err.strip().splitlines() or [''])[-1][:80]}"
    r = subprocess.run([sys.executable, "train.py", *argv, "--resume", "--steps", str(step + 1)], cwd=HERE, env=env,
                       capture_output=True, text=True)
    resumed = torch.load(ck, map_location="cpu", weights_only=True)["step"] if r.returncode == 0 else None
    if resumed != step + 1:
        return time.perf_counter() - t, f"FAIL on --resume: {(r.stderr.strip().splitlines() or [''])[-1][:80]}"
    return time.perf_counter() - t, f"ok: exit 143 after step {step} (its checkpoint), resumed for one more step"


def smoke(args):
    """Every path a GPU user meets, a few steps each, unattended, in one table: each stage at the paper presets
    with the device's AMP; the autoencoder with its GAN term under bf16 and fp16 (the adaptive weight must stay
    above 0); LVDM under fp16; --resume with EMA; SIGTERM mid-run, then --resume; two processes sharing one
    device over gloo; long sampling with its peak memory; FVD. On a CPU the autoencoder (--ae-hidden) and the
    U-Net (--width) are narrowed."""
    root = tempfile.mkdtemp(prefix="lvdm-smoke-")
    on_gpu = args.device.startswith("cuda")
    n = args.smoke_steps
    narrow = [] if on_gpu else ["--model", f"model_channels={args.width}"]  # U-Net
    narrow_ae = [] if on_gpu else ["--model", f"hidden={args.ae_hidden}"]  # one paper-size AE step: ~3 min here
    run = ["--preset", "sky", "--data", "synthetic", "--device", args.device, "--batch-size", "1",
           "--sample-every", "100000", "--eval-clips", "2", "--log-every", "1"]
    ae = ["--stage", "vae", *run, *narrow_ae, "--steps", str(2 * n), "--disc-start", "1"]  # the GAN from step 2 on
    dm = [*run, *narrow, "--vae", os.path.join(root, "vae.pt")]
    weights = args.i3d
    if not weights:  # random I3D weights: the FVD path runs, its numbers mean nothing
        weights = os.path.join(root, "i3d_random.pt")
        torch.save(fvd.InceptionI3d().state_dict(), weights)
    ck = {s: os.path.join(root, f"{s}.pt") for s in ("vae", "lvdm", "pred", "interp")}
    # fp16 convolutions have no fast CPU kernels (RESULTS.md): on a CPU the fp16 rows run at 64² (the fp16 GAN
    # weight's underflow has its own test, test_all.py)
    small = [] if on_gpu else ["--size", "64"]
    small_label = "" if on_gpu else ", 64² on a CPU"

    def gan_weight(folder):  # the adaptive GAN weight of the logged GAN steps: 0 would mean the GAN term vanished
        w = [r["d_weight"] for r in _last_log(folder, "vae") if "d_weight" in r]
        ok = w and all(math.isfinite(v) for v in w) and max(w) > 0
        return ("" if ok else "FAIL: ") + f"d_weight {', '.join(f'{v:.3g}' for v in w) or 'never logged'}"

    stages = [  # (what, script, argv, processes, extra check of the result or None)
        ("vae: autoencoder 256² x 16, GAN from step 2, --amp auto", "train.py", [*ae, "--out", root], 1,
         lambda: gan_weight(root)),
        ("vae: the same, --amp bf16", "train.py", [*ae, "--amp", "bf16", "--out", root + "-bf16"], 1,
         lambda: gan_weight(root + "-bf16")),
        (f"vae: the same, --amp fp16 (loss scale){small_label}", "train.py",
         [*ae, "--amp", "fp16", *small, "--out", root + "-fp16"], 1, lambda: gan_weight(root + "-fp16")),
        ("vae: 2 processes on one device over gloo (torchrun)", "train.py",
         [*ae, "--dist-backend", "gloo", "--out", root + "-gloo"], 2, None),
        ("lvdm: U-Net on 32² x 4 latents, EMA", "train.py", ["--stage", "lvdm", *dm, "--steps", str(n), "--out", root],
         1, None),
        ("lvdm: --resume with EMA, to twice the steps", "train.py",
         ["--stage", "lvdm", *dm, "--steps", str(2 * n), "--out", root, "--resume"], 1, None),
        (f"lvdm: --amp fp16 (loss scale){small_label}", "train.py",
         ["--stage", "lvdm", *dm, "--steps", str(n), "--amp", "fp16", *small,
          "--vae", os.path.join(root + "-fp16", "vae.pt"), "--out", root + "-fp16"], 1, None),
        ("pred: from lvdm.pt, 64-frame clips", "train.py", ["--stage", "pred", *dm, "--steps", str(n), "--out", root],
         1, None),
        ("interp: from lvdm.pt, 20-frame clips", "train.py",
         ["--stage", "interp", *dm, "--steps", str(n), "--out", root], 1, None),
        ("sample short: DDIM-4, 2 videos", "sample.py", ["--ckpt", ck["lvdm"], "--n", "2", "--steps", "4", "--npz",
                                                       "--device", args.device], 1, None),
        ("sample hierarchical: 2 x 128 frames, DDIM-2, 1 video decoded at a time", "sample.py",
         ["--ckpt", ck["pred"], "--interp", ck["interp"], "--mode", "hierarchical", "--frames", "128", "--n", "2",
          "--steps", "2", "--device", args.device], 1, None),
        ("fvd: 2 vs 2 clips", "fvd.py", ["--real", "synthetic", "--fake", os.path.join(root, "samples-short",
                                                                                    "samples.npz"),
                                          "--n", "2", "--runs", "1", "--i3d", weights, "--device", args.device,
                                          "--cache-dir", ""], 1, None),
    ]
    rows = [f"Machine: {machine()}. {'Full widths' if on_gpu else f'CPU, narrowed: autoencoder hidden={args.ae_hidden}, U-Net model_channels={args.width}'}; "
            f"I3D weights: {'given' if args.i3d else 'random (timing only)'}.", "",
            "| what | processes | wall (s) | peak RSS (MiB) | peak CUDA (MiB) | result |", "|---|---|---|---|---|---|"]
    for what, script, argv, nproc, check in stages:
        r = run_script(script, argv, nproc=nproc)
        result = "ok" if r["rc"] == 0 else f"FAIL: {(r['err'].strip().splitlines() or [''])[-1][:100]}"
        if r["rc"] == 0 and check is not None:
            result = check()
        rows.append(f"| {what} | {nproc} | {r['wall']:.1f} | {r['rss']:.0f} | {r['cuda']:.0f} | {result} |")
        print(rows[-1], flush=True)
    wall, result = _sigterm_row(["--stage", "lvdm", *dm, "--steps", "100000", "--save-every", "100000",
                                 "--out", root + "-term"], root + "-term")
    rows.append(f"| lvdm: SIGTERM after the first logged step, then --resume | 1 | {wall:.1f} | | | {result} |")
    print(rows[-1], flush=True)
    for suffix in ("", "-bf16", "-fp16", "-gloo", "-term"):
        shutil.rmtree(root + suffix, ignore_errors=True)
    return "\n".join(rows)


