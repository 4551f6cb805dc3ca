"""How train.py runs as processes: `--stage all`, the main job in one command, as a chain of one
`python train.py --stage S` process per stage, then sample.py's samples, two 1024-frame videos and
RUN/index.html (run_all); and one stage as torchrun's N processes or plain python's one (setup_processes).

Its own file because starting processes is not training: the chain only builds command lines (it is
handed train.py's parse_args, so nothing here imports train.py), and train.py keeps the loop, its DDP
wrapping, gradient sync and checkpoints.
"""
import datetime
import os
import signal
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

import hierarchical
import stages
from common import UserError, auto_amp, cpu_busy_elsewhere, load_checkpoint, setup_cuda

# --stage all, demo preset: after the vae stage, its decoder trains on alone (encoder, its latents and
# their statistics frozen), for sharper reconstructions and samples; without the GAN term, which did
# no better there (RESULTS.md, 2026-11-30: the decoder trained on alone).
DEMO_DECODER = ["--decoder-only", "--steps", "2000", "--lr", "5e-4", "--warmup", "0", "--disc-start", "2000"]


def check_finished(path, ckpt, args):
    """A finished checkpoint of another architecture must not stand in for the one this chain would train.
    A U-Net stage's is compared by the config it was built with against the one these settings build (so a
    `--model attention=factorized` that undoes a stage default matches a model trained before that default);
    other stages', and checkpoints without a config, by their --model lists."""
    had = ckpt.get("train_args") or {}
    keys = ["model_preset", "gap", "prediction", "size", "frames"]
    built = ckpt.get("model_args") or {}
    starts_from = args.stage == "lvdm" or os.path.isfile(args.init or "")  # pred/interp: its config comes from there
    if args.stage in ("lvdm", "pred", "interp") and "in_channels" in built and starts_from:
        init = load_checkpoint(args.init) if args.stage != "lvdm" else None
        cfg = stages.unet_config(args, built["in_channels"], init)
        want = asdict(cfg)
        built = {**asdict(type(cfg)()), **built}  # fields newer than the checkpoint: their defaults
        diff = sorted(k for k in want if built[k] != want[k])
        if diff:
            raise UserError(f"{path} is complete but its U-Net has {', '.join(f'{k} = {built[k]!r}' for k in diff)} "
                            f"where this chain builds {', '.join(f'{k} = {want[k]!r}' for k in diff)}; move it away "
                            f"to train it again, or run the chain with the --model flags it was trained with.")
    else:
        keys.append("model")
    for key in keys:
        if key in had and had[key] != getattr(args, key):
            raise UserError(f"{path} is complete but was trained with {key} = {had[key]!r} where this "
                            f"chain asks for {getattr(args, key)!r}; move it away to train it again, or "
                            f"run the chain with the flags it was trained with.")


def run_stage(cmd):
    """subprocess.run for one process of the chain, except when this process is stopped: a SIGTERM to it
    (SystemExit from common.main_guard) is passed on, and Ctrl-C (which the stage receives itself) waits,
    so the stage finishes its step and saves (train.py's StopSignals) before the chain exits too; without
    this, subprocess.run would SIGKILL the stage."""
    p = subprocess.Popen(cmd)
    try:
        p.wait()
    except (SystemExit, KeyboardInterrupt) as e:
        if isinstance(e, SystemExit):
            p.send_signal(signal.SIGTERM)
        p.wait()
        raise
    return p  # its returncode, as subprocess.run's result has


def run_all(argv, parse_args, run=run_stage):
    """--stage all, the main job in one command: the four stages in order, each its own `python train.py
    --stage S` process with the other flags passed on (for the demo, the decoder step after the vae stage,
    DEMO_DECODER). A stage whose checkpoint reached its last step is skipped, one that stopped part way is
    resumed (--resume). Then sample.py makes short samples, two 1024-frame hierarchical videos and
    RUN/index.html (each skipped when its output is already there). parse_args: train.py's, to read each
    stage's settings (its --out, steps, model) as its process will."""
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
            check_finished(path, ckpt, args)
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
              "--mode", "hierarchical", "--frames", "1024", "--n", "2", "--steps", str(hierarchical.LONG_VIDEO_STEPS),
              *threads])
    step([sample_py, "--report", run_dir])


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
    busy = cpu_busy_elsewhere() if device.type == "cpu" and rank == 0 and not args.threads else None
    if busy is not None and busy > 0.5:
        print(f"note: other processes keep {busy:.1f} of {os.cpu_count()} cores busy; torch's "
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
