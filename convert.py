"""Run the public LVDM release's trained models through this code (like nanoGPT's from_pretrained).

The release (github YingqingHe/LVDM) published a 3D autoencoder per dataset (ae_sky.ckpt,
ae_taichi.ckpt) and short unconditional models (short_sky.ckpt, short_taichi.ckpt) as
PyTorch Lightning checkpoints. This file reads them without running code from the file,
maps their keys onto vae.py / unet3d.py, and writes ordinary project checkpoints:

    python convert.py --preset sky --ae ae_sky.ckpt --lvdm short_sky.ckpt --out runs/release-sky
    -> runs/release-sky/vae.pt   (stage vae: the autoencoder with the release's scale/shift)
       runs/release-sky/lvdm.pt  (stage lvdm: the U-Net, the release's schedule and DDIM spacing)
    python sample.py --ckpt runs/release-sky/lvdm.pt --n 4
    python train.py --stage pred --preset sky --data /data/sky_timelapse \\
        --init runs/release-sky/lvdm.pt --vae runs/release-sky/vae.pt         (§3.3, which the release lacks)

--ae is optional: an LVDM checkpoint holds its autoencoder too (first_stage_model.*).

§5's image model, Stable Diffusion v1.x, in either of its layouts (a single .ckpt / .safetensors file or a
diffusers folder, which sdlayout.py renames to the single file's names):

    python convert.py --sd v1-5-pruned-emaonly.safetensors --out runs/sd15      (or --sd stable-diffusion-v1-5/)
    -> runs/sd15/vae.pt           (stage vae: sdvae.py's per-frame KL-f8 autoencoder, latent scale 0.18215)
       runs/sd15/image.pt         (stage image: the U-Net as unet3d.py's block="sd", with CLIP's text model)
       runs/sd15/text_encoder.pt  (the CLIP text model alone, for train.py --text-encoder)
    python sample.py --ckpt runs/sd15/image.pt --prompt "a red car" --bpe bpe_simple_vocab_16e6.txt.gz  (images)

The release's text-to-video model (t2v.ckpt, configs/lvdm_short/text2video.yaml) is Stable Diffusion's layout
plus temporal attention inside every transformer block (unet3d.py's sd_temporal="inside"):

    python convert.py --preset t2v --lvdm t2v.ckpt --out runs/release-t2v
    -> runs/release-t2v/vae.pt, text_encoder.pt (as --sd's) and t2v.pt (stage t2v: the video U-Net with CLIP)
    python sample.py --ckpt runs/release-t2v/t2v.pt --prompt "clouds over a mountain lake" --text-guidance 14 \
        --bpe bpe_simple_vocab_16e6.txt.gz     (the release script: DDIM 50, eta 1, guidance scale 15 = 1 + w)

The architecture comes from the tensors' shapes (autoencoder width and stages, U-Net width,
multipliers, residual blocks, attention levels, relative-position table size). What shapes
cannot tell comes from --preset (the release's yaml configs: heads, latent scale and shift,
temporal factor, clip size) or from flags (--model KEY=VALUE for U-Net fields, --scale-factor,
--shift-factor, --ft, --size, --frames). The release diffuses z = scale·(E(x) + shift) and decodes
D(z/scale - shift); vae.py's encode_latents / decode_latents compute the same with
latent_scale = scale and latent_shift = -shift.

Converted models switch on the release's behaviour where it differs from this project's
(fields of VAEConfig / UNetConfig / the stored diffusion settings, each documented where it is
defined): GroupNorm over the whole clip (vae/unet3d `norm_over="clip"`), the quant_conv and
post_quant_conv 1x1x1 convs (`quant_conv=True`), the release's relative-position attention
(`relative_form="release"`), and its DDIM step spacing (`ddim_spacing="release"`).
"""
import argparse
import collections
import functools
import math
import os
import pickle
import re
import types
import zipfile
from dataclasses import asdict

import torch

import sdlayout
import sdvae
import text
import train
import unet3d
import vae as vae_lib
from common import (ArgumentParser, UserError, count_params, load_weights, main_guard, make_config,
                    parse_overrides, positive_float, positive_int, save_checkpoint)

# What the release's yaml configs say and the tensors cannot show (configs/lvdm_short/*.yaml,
# configs/videoae/*.yaml): latent scale and shift, heads, the autoencoder's temporal factor
# (downsample [4, 8, 8]), and the clip the models were trained on.
RELEASE_PRESETS = {
    "sky":    dict(scale_factor=0.33422927, shift_factor=1.4606637, num_heads=4, ft=4, size=256, frames=16),
    "taichi": dict(scale_factor=0.175733933, shift_factor=0.03291025, num_heads=4, ft=4, size=256, frames=16),
    "ucf101": dict(scale_factor=0.220142075, shift_factor=0.5837740898, num_heads=4, ft=4, size=256, frames=16),
    # text2video.yaml: 256² x 16 frames; its autoencoder, scale and heads are Stable Diffusion v1's (convert_sd)
    "t2v":    dict(size=256, frames=16),
}
# The release's diffusion (configs/lvdm_short/*.yaml): 1000 linear steps 0.0015 -> 0.0155, ε, l1 loss.
RELEASE_DIFFUSION = dict(timesteps=1000, schedule="linear", beta_start=0.0015, beta_end=0.0155, loss="l1",
                         prediction="eps", var_type="fixed_small", ddim_spacing="release")


# ----------------------------------------------------------------------------- reading release files
class Inert(dict):
    """Stands in for an allowed foreign object (a Lightning callback class, a hyper-parameter container):
    it records what the file said and runs nothing. A dict, so dict-like containers unpickle into it."""

    origin = "?"

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __reduce__(self):  # never written back out
        raise TypeError(f"{self.origin} is a placeholder")


# Globals a release checkpoint may name. Data: tensors, storages (handled by torch.load) and
# ordered dicts. Placeholders: the objects Lightning 1.4 adds next to the weights (ModelCheckpoint
# and EarlyStopping are the callback classes it keys their states by; AttributeDict holds saved
# hyper-parameters), turned into Inert classes, never imported.
DATA_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                ("collections", "OrderedDict"), ("torch", "Size")}
PLACEHOLDER_GLOBALS = {("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
                       ("pytorch_lightning.callbacks.early_stopping", "EarlyStopping"),
                       ("pytorch_lightning.utilities.parsing", "AttributeDict")}


class ReleaseUnpickler(pickle.Unpickler):
    """Admits the globals above and nothing else: any other name in the file (a function, a class that
    would run code when rebuilt) ends the load with a UserError naming it."""

    path, fix = "the checkpoint", "pass a checkpoint of the LVDM release"

    def find_class(self, module, name):
        if (module, name) in DATA_GLOBALS:
            if module == "collections":
                return collections.OrderedDict
            return getattr(torch._utils if module == "torch._utils" else torch, name)
        if (module, name) in PLACEHOLDER_GLOBALS:
            return type(name, (Inert,), {"origin": f"{module}.{name}", "__module__": "convert.placeholders"})
        raise UserError(f"{self.path} asks to run {module}.{name} while loading, which is refused (not a tensor "
                        f"or a known Lightning object); {self.fix}.")


def load_release(path, fix="pass a checkpoint of the LVDM release"):
    """A release (Lightning) checkpoint -> (state_dict of tensors, global_step), read with ReleaseUnpickler;
    `fix` ends the sentence refusing a file. (Stable Diffusion's .ckpt files are Lightning checkpoints too.)"""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; pass the release checkpoint's path (e.g. ae_sky.ckpt, short_sky.ckpt).")
    unpickler = type("PathUnpickler", (ReleaseUnpickler,), {"path": path, "fix": fix})
    module = types.SimpleNamespace(__name__="release_pickle", Unpickler=unpickler,
                                   load=lambda f, **kw: unpickler(f, **kw).load())
    try:
        ckpt = torch.load(path, map_location="cpu", pickle_module=module, weights_only=False,
                          mmap=zipfile.is_zipfile(path))  # mmap: the weights stay on disk until copied
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}); {fix}.") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        kind = "a checkpoint of this project (use it directly)" if isinstance(ckpt, dict) and "stage" in ckpt else \
            f"a {type(ckpt).__name__} without a 'state_dict'"
        raise UserError(f"{path} is {kind}, not a Lightning checkpoint; {fix}.")
    sd = ckpt["state_dict"]
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise UserError(f"{path} has non-tensor entries in its state_dict ({bad[0]!r}); {fix}.")
    step = ckpt.get("global_step")
    return sd, step if isinstance(step, int) else 0


# ----------------------------------------------------------------------------- key maps
@functools.lru_cache(maxsize=None)
def _template_regex(template):
    """'encoder.conv_blocks.{i}.res.{rest}' -> regex with named groups ({i}: digits, {p}: weight|bias,
    {blk}: a block path, {rest}: anything)."""
    parts = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "blk": r"(?P<blk>[\w.]+?)", "rest": r"(?P<rest>[\w.]+)"}
    return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", lambda m: parts[m.group(1)], re.escape(template)) + "$")


def _rename(key, pairs):
    """The first (src, dst) template pair whose src matches `key` renames it; None if none does."""
    for src, dst in pairs:
        m = _template_regex(src).match(key)
        if m:
            return dst.format(**m.groupdict())
    return None


# The release's autoencoder (lvdm/models/modules/aemodules3d.py, autoencoder3d.py) -> vae.py.
# Specific pairs first: the first match wins, in both directions.
AE_KEYS = [
    ("encoder.conv_first.conv.{p}", "encoder.conv_in.conv.{p}"),
    ("encoder.conv_blocks.{i}.down.conv.{p}", "encoder.down.{i}.downsample.conv.{p}"),
    ("encoder.conv_blocks.{i}.res.conv_shortcut.conv.{p}", "encoder.down.{i}.block.0.skip.conv.{p}"),
    ("encoder.conv_blocks.{i}.res.{rest}", "encoder.down.{i}.block.0.{rest}"),
    ("encoder.final_block.0.{p}", "encoder.norm_out.{p}"),
    ("encoder.final_block.2.conv.{p}", "encoder.conv_out.conv.{p}"),
    ("decoder.conv_blocks.{i}.up.convt.{p}", "decoder.up.{i}.upsample.convt.{p}"),
    ("decoder.conv_blocks.{i}.res1.conv_shortcut.conv.{p}", "decoder.up.{i}.block.0.skip.conv.{p}"),
    ("decoder.conv_blocks.{i}.res2.conv_shortcut.conv.{p}", "decoder.up.{i}.block.1.skip.conv.{p}"),
    ("decoder.conv_blocks.{i}.res1.{rest}", "decoder.up.{i}.block.0.{rest}"),
    ("decoder.conv_blocks.{i}.res2.{rest}", "decoder.up.{i}.block.1.{rest}"),
    ("decoder.conv_out.conv.{p}", "decoder.conv_out.conv.{p}"),
    ("quant_conv.conv.{p}", "quant_conv.conv.{p}"),
    ("post_quant_conv.conv.{p}", "post_quant_conv.conv.{p}"),
]
# The release's U-Net (openaimodel3d.py, attention_temporal.STAttentionBlock) -> unet3d.py. Keys not
# listed are the same in both (time_embed, convs, in_layers, emb_layers, skips, op, out).
UNET_KEYS = [
    ("{blk}.out_layers.0.{p}", "{blk}.out_norm.{p}"),
    ("{blk}.out_layers.3.{p}", "{blk}.out_layers.2.{p}"),
    ("{blk}.norm_s.{p}", "{blk}.attn_s.norm.{p}"),
    ("{blk}.qkv_s.{p}", "{blk}.attn_s.qkv.{p}"),
    ("{blk}.proj_out_s.{p}", "{blk}.attn_s.proj_out.{p}"),
    ("{blk}.norm_t.{p}", "{blk}.attn_t.norm.{p}"),
    ("{blk}.qkv_t.{p}", "{blk}.attn_t.qkv.{p}"),
    ("{blk}.proj_out_t.{p}", "{blk}.attn_t.proj_out.{p}"),
    ("{blk}.relative_position_k.embeddings_table", "{blk}.attn_t.rel_k"),
    ("{blk}.relative_position_v.embeddings_table", "{blk}.attn_t.rel_v"),
    ("{rest}", "{rest}"),
]
# The release's attention projections are 1-D convs (out, in, 1); unet3d.py's are Linear (out, in).
_CONV1D = re.compile(r"\.(qkv|proj_out)_[st]\.weight$")
_LINEAR = re.compile(r"\.attn_[st]\.(qkv|proj_out)\.weight$")


def drop_aliases(sd, path):
    """The release's SamePadConv3d also registers its conv weight as `X.weight` next to `X.conv.weight`
    (one tensor under two names); keep the second, after checking they are equal."""
    out = {}
    for k, v in sd.items():
        twin = k[: -len("weight")] + "conv.weight" if k.endswith(".weight") else None
        if twin in sd:
            if not torch.equal(v, sd[twin]):
                raise UserError(f"{path}: {k} and {twin} differ, but the release stores one tensor under both "
                                f"names; the file is damaged or not from the release.")
            continue
        out[k] = v
    return out


def release_to_project(sd, pairs, path, what):
    """Rename every key by `pairs`; an unknown key is a UserError (a file of another architecture)."""
    out = {}
    for k, v in sd.items():
        new = _rename(k, pairs)
        if new is None:
            raise UserError(f"{path} has an {what} key {k!r} the release's {what} does not have; pass a checkpoint "
                            f"of the LVDM release's 3D autoencoder or short-video U-Net.")
        out[new] = v.squeeze(-1) if _CONV1D.search(k) else v
    return out


def project_to_release(sd, pairs):
    """The inverse rename (tests check release -> project -> release gives back every key and tensor)."""
    inverse = [(dst, src) for src, dst in pairs]
    out = {}
    for k, v in sd.items():
        new = _rename(k, inverse)
        out[new] = v.unsqueeze(-1) if _LINEAR.search(k) else v
    return out


def with_prefix(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- architecture from shapes
def ae_config(sd, ft, path):
    """VAEConfig of a release autoencoder state dict (release keys, aliases dropped)."""
    try:
        hidden, in_channels = sd["encoder.conv_first.conv.weight"].shape[:2]
        n = sum(1 for k in sd if re.fullmatch(r"encoder\.conv_blocks\.\d+\.down\.conv\.weight", k))
        widths = [sd[f"encoder.conv_blocks.{i}.down.conv.weight"].shape[0] for i in range(n)]
        z2 = sd["encoder.final_block.2.conv.weight"].shape[0]
        quant = "quant_conv.conv.weight" in sd
        embed = sd["quant_conv.conv.weight"].shape[0] if quant else z2
    except KeyError as e:
        raise UserError(f"{path} lacks the autoencoder weight {e}; pass the release's ae_*.ckpt or a short_*.ckpt "
                        f"that holds first_stage_model.*.") from None
    if embed != z2:
        raise UserError(f"{path}: quant_conv maps {z2} to {embed} moment channels; only embed_dim == z_channels "
                        f"(every release config) is supported.")
    if n == 0 or any(w % hidden for w in widths):
        raise UserError(f"{path}: encoder widths {widths} are not multiples of its first width {hidden}; "
                        f"not a release autoencoder.")
    t_stages = int(math.log2(ft)) if ft >= 1 and (ft & (ft - 1)) == 0 else -1
    if not 0 <= t_stages <= n:
        raise UserError(f"--ft {ft} is not a power of two of at most 2^{n} (this autoencoder has {n} stages); "
                        f"pass --ft 4 as in every release config.")
    # The release halves time in the first log2(ft) stages (downsample [ft, fs, fs]), space in all of them.
    strides = tuple((2 if i < t_stages else 1, 2, 2) for i in range(n))
    return vae_lib.VAEConfig(in_channels=int(in_channels), hidden=int(hidden), z_channels=z2 // 2,
                             ch_mult=tuple(w // hidden for w in widths), strides=strides, num_res_blocks=1,
                             decoder_strides=strides, norm_groups=32, shortcut=False, norm_over="clip",
                             quant_conv=quant)


def unet_shape(sd, path, attention_key, fix):
    """Widths, levels, residual blocks and attention levels of an LDM-style U-Net state dict (input_blocks.n.0 a
    ResBlock or a downsampling `op`, input_blocks.n.1 its attention, found by `attention_key`)."""
    try:
        mc, cin = sd["input_blocks.0.0.weight"].shape[:2]
        cout = sd["out.2.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"{path} lacks the U-Net weight {e}; {fix}.") from None
    levels, i = [[]], 1
    while f"input_blocks.{i}.0.in_layers.2.weight" in sd or f"input_blocks.{i}.0.op.weight" in sd:
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
        else:
            width = sd[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0]
            levels[-1].append((width, f"input_blocks.{i}.1.{attention_key}" in sd))
        i += 1
    counts = {len(lv) for lv in levels}
    if len(counts) != 1 or 0 in counts or any(len({w for w, _ in lv}) != 1 for lv in levels):
        raise UserError(f"{path}: the U-Net's levels {levels} do not have equal residual blocks of one width each; "
                        f"{fix}.")
    return dict(in_channels=int(cin), out_channels=int(cout), model_channels=int(mc),
                channel_mult=tuple(lv[0][0] // mc for lv in levels), num_res_blocks=counts.pop(),
                attention_resolutions=tuple(2 ** n for n, lv in enumerate(levels) if lv[0][1]))


def unet_fields(sd, path):
    """UNetConfig fields a release U-Net state dict (release keys, prefix stripped) shows by its shapes."""
    if "label_emb.weight" in sd or any(k.startswith("time_embed_cond.") for k in sd):
        raise UserError(f"{path} holds one of the release's long-video U-Nets (frame mask channel, noise level s "
                        f"through a label embedding), which were never published and are not mapped here; "
                        f"convert a short model (short_sky.ckpt, short_taichi.ckpt), then train pred/interp here.")
    tables = [v for k, v in sd.items() if k.endswith("relative_position_k.embeddings_table")]
    fields = dict(unet_shape(sd, path, "norm_s.weight", "pass the release's short_*.ckpt"),
                  attention="factorized", use_relative_position=bool(tables), norm_over="clip",
                  relative_form="release" if any(k.endswith("relative_position_v.embeddings_table") for k in sd)
                  else "key")
    if tables:
        fields["max_relative_position"] = (tables[0].shape[0] - 1) // 2
    return fields


def ema_weights(sd, path):
    """The release's EMA copy (LitEma: 'model_ema.' + the parameter name without dots) under the
    U-Net's own names."""
    names = [k for k in sd if k.startswith("model.diffusion_model.")]
    out = {}
    for k in names:
        ema_key = "model_ema." + k[len("model."):].replace(".", "")
        if ema_key not in sd:
            raise UserError(f"{path} has no EMA weights ({ema_key} is missing); convert with --weights model.")
        out[k[len("model.diffusion_model."):]] = sd[ema_key]
    return out


# ----------------------------------------------------------------------------- conversion
def convert_autoencoder(sd, path, ft, scale, shift):
    """Release autoencoder state dict (keys without prefix) -> (VideoAutoencoder, config)."""
    sd = drop_aliases({k: v for k, v in sd.items() if not k.startswith("loss.")}, path)
    cfg = ae_config(sd, ft, path)
    model = vae_lib.VideoAutoencoder(cfg)
    state = release_to_project(sd, AE_KEYS, path, "autoencoder")
    state.update(latent_scale=torch.tensor(float(scale)), latent_shift=torch.tensor(-float(shift)))
    load_weights(model, {k: v.float() for k, v in state.items()}, path, "autoencoder")
    return model.eval(), cfg


def convert_unet(sd, path, num_heads, overrides, weights="model"):
    """Release LatentDiffusion state dict -> (UNet3D, config); weights "model" (what the release's short
    sampler uses) or "ema" (the model_ema copies, what its long-video sampler uses)."""
    unet_sd = ema_weights(sd, path) if weights == "ema" else with_prefix(sd, "model.diffusion_model.")
    if not unet_sd:
        raise UserError(f"{path} holds no U-Net (no model.diffusion_model.* keys); pass the release's short_*.ckpt "
                        f"as --lvdm (an ae_*.ckpt goes to --ae).")
    cfg = make_config(unet3d.UNetConfig, dict(unet_fields(unet_sd, path), num_heads=num_heads), overrides)
    model = unet3d.UNet3D(cfg)
    load_weights(model, {k: v.float() for k, v in release_to_project(unet_sd, UNET_KEYS, path, "U-Net").items()},
                 path, "U-Net")
    return model.eval(), cfg


def release_train_args(preset, size, frames, out, vae_path, source):
    """train.py's arguments for a --stage lvdm run of this preset, with the release's diffusion settings:
    sample.py and train.py --init read them like those of a run trained here."""
    args = train.parse_args(["--stage", "lvdm", "--preset", preset, "--data", source, "--out", out,
                             "--size", str(size), "--frames", str(frames), "--vae", vae_path])
    for k, v in RELEASE_DIFFUSION.items():
        setattr(args, k, v)
    return dict(vars(args), data=None, converted_from=source)  # trained on the release's data, not on --data


# ----------------------------------------------------------------------------- Stable Diffusion v1.x (§5)
# Stable Diffusion v1's diffusion (v1-inference.yaml): 1000 steps of LDM's linear schedule 0.00085 -> 0.012, ε,
# and LDM's DDIM step spacing (the release's; ddim_spacing="release").
SD_DIFFUSION = dict(timesteps=1000, schedule="linear", beta_start=0.00085, beta_end=0.012, loss="l2",
                    prediction="eps", var_type="fixed_small", ddim_spacing="release")
# Its U-Net's names -> unet3d.py's: only the ResBlock's second GroupNorm and conv differ (as the release's).
SD_UNET_KEYS = UNET_KEYS[:2] + [("{rest}", "{rest}")]


def read_sd(path):
    """Stable Diffusion v1.x in either layout -> (state dict in the single file's names, hints: settings only
    a diffusers folder's configs show, and the step of a .ckpt)."""
    if os.path.isdir(path):
        return sdlayout.read_folder(path)
    if not os.path.isfile(path):
        raise UserError(f"--sd {path} does not exist; check the path.")
    if path.endswith(".safetensors"):
        return text.read_safetensors(path), {}
    if path.endswith((".ckpt", ".pt", ".pth")):
        sd, step = load_release(path, "pass a Stable Diffusion v1.x .ckpt, .safetensors or diffusers folder")
        return sd, {"step": step}
    raise UserError(f"--sd {path} is not a layout of Stable Diffusion this converter reads; pass a single .ckpt or "
                    f".safetensors file, or a diffusers folder (with unet/, vae/ and text_encoder/).")


def sd_to_project(unet, ae):
    """Single-file U-Net and autoencoder state dicts (prefixes stripped) -> unet3d.py / sdvae.py names and
    shapes: U-Net convs gain a time axis of 1 ((O,I,k,k) -> (O,I,1,k,k)), the autoencoder's attention 1x1 convs
    become Linear weights ((C,C,1,1) -> (C,C))."""
    unet = {_rename(k, SD_UNET_KEYS): v.unsqueeze(2) if v.dim() == 4 else v for k, v in unet.items()}
    ae = {k: v.flatten(1) if sdlayout.VAE_ATTENTION_WEIGHT.search(k) else v for k, v in ae.items()}
    return unet, ae


def project_to_sd(unet, ae):
    """The inverse of sd_to_project (tests write Stable Diffusion files of their own models with it)."""
    inverse = [(dst, src) for src, dst in SD_UNET_KEYS]
    unet = {_rename(k, inverse): v.squeeze(2) if v.dim() == 5 else v for k, v in unet.items()}
    ae = {k: v[:, :, None, None] if sdlayout.VAE_ATTENTION_WEIGHT.search(k) else v for k, v in ae.items()
          if not k.startswith("latent_")}
    return unet, ae


def project_to_release_t2v(unet, ae, clip):
    """State dicts of this project's U-Net (sd_temporal="inside"), autoencoder and CLIP text model -> the release's
    t2v.ckpt state_dict: Stable Diffusion's names with the convs kept 5-D, under the single file's prefixes (tests
    and bench.py sd write release files with it)."""
    unet, ae = project_to_sd(unet, ae)
    return {**{sdlayout.UNET + k: v.unsqueeze(2) if v.dim() == 4 else v for k, v in unet.items()},
            **{sdlayout.VAE + k: v for k, v in ae.items()},
            **{sdlayout.TEXT + "text_model." + k: v for k, v in clip.items()}}


def has_inner_temporal(unet_sd):
    """Whether a Stable Diffusion-layout U-Net state dict holds the release's in-block temporal attention."""
    return any(".attn1_tmp." in k for k in unet_sd)


def sd_unet_fields(sd, path):
    """UNetConfig fields of a Stable Diffusion U-Net state dict (sd_to_project's names) shown by its shapes."""
    fix = "pass Stable Diffusion v1.x weights"
    proj = [v for k, v in sd.items() if k.endswith(".proj_in.weight")]
    if not proj or proj[0].dim() != 5:
        raise UserError(f"{path} has no Stable Diffusion v1 attention blocks (1x1 conv proj_in; 2.x has Linear "
                        f"ones); {fix}.")
    first = min(k for k in sd if k.endswith(".attn2.to_k.weight"))
    block = first.split(".transformer_blocks.")[0]
    depth = sum(1 for k in sd if k.startswith(block + ".transformer_blocks.") and k.endswith(".attn1.to_q.weight"))
    fields = dict(unet_shape(sd, path, "proj_in.weight", fix), context_dim=int(sd[first].shape[1]),
                  transformer_depth=depth, block="sd", resblock_scale_shift=False, attention="spatial")
    if has_inner_temporal(sd):  # the release's text-to-video U-Net: temporal attention in each block
        tables = [v for k, v in sd.items() if k.endswith(".relative_position_k.embeddings_table")]
        fields.update(attention="factorized", sd_temporal="inside", norm_over="clip", use_relative_position=bool(tables))
        if tables:
            fields["max_relative_position"] = (tables[0].shape[0] - 1) // 2
    return fields


def sd_vae_config(sd, path, scale):
    """SDVAEConfig of a Stable Diffusion autoencoder state dict (names of sdvae.py) from its shapes."""
    try:
        ch, cin = sd["encoder.conv_in.weight"].shape[:2]
        levels = sum(1 for k in sd if re.fullmatch(r"encoder\.down\.\d+\.block\.0\.conv1\.weight", k))
        layers = sum(1 for k in sd if re.fullmatch(r"encoder\.down\.0\.block\.\d+\.conv1\.weight", k))
        ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        z = sd["decoder.conv_in.weight"].shape[1]
        moments = sd["quant_conv.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"{path} lacks the autoencoder weight {e}; pass Stable Diffusion v1.x weights.") from None
    if moments != 2 * z or any(re.match(r"(en|de)coder\.(down|up)\.\d+\.attn\.", k) for k in sd):
        raise UserError(f"{path}'s autoencoder is not Stable Diffusion's KL-f8 (embedding width or attention "
                        f"levels differ); pass Stable Diffusion v1.x weights.")
    return sdvae.SDVAEConfig(in_channels=int(cin), ch=int(ch), ch_mult=ch_mult, num_res_blocks=layers,
                             z_channels=int(z), scale_factor=float(scale))


def convert_sd(path, weights="model", overrides=None, scale=None, video=False):
    """Stable Diffusion v1.x (either layout) -> (FrameAutoencoder, image model text.TextConditioned(UNet3D,
    CLIP text model), its UNetConfig, step). weights: "model" (model.diffusion_model.*: what the
    -emaonly files hold) or "ema" (model_ema.*, in the full .ckpt files). video=True: the release's
    text-to-video model (the same layout with temporal layers), whose network is then the video model."""
    sd, hints = read_sd(path)
    unet_sd = ema_weights(sd, path) if weights == "ema" else with_prefix(sd, sdlayout.UNET)
    ae_sd, clip_sd = with_prefix(sd, sdlayout.VAE), with_prefix(sd, sdlayout.TEXT)
    for what, part in (("U-Net (model.diffusion_model.*)", unet_sd), ("autoencoder (first_stage_model.*)", ae_sd),
                       ("text encoder (cond_stage_model.transformer.*)", clip_sd)):
        if not part:
            raise UserError(f"{path} holds no {what}; pass a whole Stable Diffusion v1.x checkpoint (.ckpt, "
                            f".safetensors) or diffusers folder.")
    unet_sd, ae_sd = sd_to_project(unet_sd, ae_sd)
    if video != has_inner_temporal(unet_sd):
        raise UserError(f"{path} holds the release's text-to-video model; convert it with --preset t2v --lvdm {path}."
                        if not video else f"{path} holds no temporal layers (Stable Diffusion itself?); convert an "
                        f"image model with --sd {path}, a text-to-video one with --preset t2v --lvdm t2v.ckpt.")
    autoencoder = sdvae.FrameAutoencoder(sd_vae_config(ae_sd, path, scale or hints.get("scale_factor", 0.18215)))
    load_weights(autoencoder, {**{k: v.float() for k, v in ae_sd.items()}, "latent_scale": autoencoder.latent_scale,
                               "latent_shift": autoencoder.latent_shift}, path, "Stable Diffusion autoencoder")
    ucfg = make_config(unet3d.UNetConfig, dict(sd_unet_fields(unet_sd, path), num_heads=hints.get("num_heads", 8)),
                       overrides or {})   # SD v1: 8 heads at every level (v1-inference.yaml)
    image = text.TextConditioned(unet3d.UNet3D(ucfg), text.clip_text_from_state(clip_sd, path, hints.get("text_heads")))
    load_weights(image.net, {k: v.float() for k, v in unet_sd.items()}, path, "U-Net")
    return autoencoder.eval(), image.eval(), ucfg, hints.get("step", 0)


def write_sd(args, video=False):
    """convert.py --sd: RUN/vae.pt, RUN/image.pt (with train.py's arguments of an image run, Stable Diffusion's
    diffusion settings) and RUN/text_encoder.pt (a CLIPTextModel state dict, text.load_clip_text reads it).
    video=True (--preset t2v --lvdm t2v.ckpt): the release's text-to-video model as RUN/t2v.pt (stage t2v)."""
    path = args.lvdm if video else args.sd
    autoencoder, net, ucfg, step = convert_sd(path, args.weights, parse_overrides(args.model), args.scale_factor, video)
    source, size = os.path.abspath(path), args.size or 512   # SD v1.5 was trained on 512² images
    frames, stage = (args.frames, "t2v") if video else (1, "image")
    if size % (autoencoder.fs * 2 ** (len(ucfg.channel_mult) - 1)):
        raise UserError(f"--size {size} gives a latent this U-Net cannot take; pass a multiple of "
                        f"{autoencoder.fs * 2 ** (len(ucfg.channel_mult) - 1)}.")
    os.makedirs(args.out, exist_ok=True)
    vae_path, model_path, text_path = (os.path.abspath(os.path.join(args.out, name))
                                       for name in ("vae.pt", f"{stage}.pt", "text_encoder.pt"))
    save_checkpoint(vae_path, sdvae.autoencoder_checkpoint(autoencoder, source, step))
    save_checkpoint(text_path, {"state_dict": {"text_model." + k: v for k, v in net.text.state_dict().items()}})
    # a run's arguments (a paper-size preset; sample.py reads size, frames and the diffusion settings)
    targs = train.parse_args(["--stage", stage, "--preset", "ucf101", "--data", source, "--out", args.out,
                              "--size", str(size), "--frames", str(frames), "--vae", vae_path,
                              "--text-encoder", text_path, "--init", "none"])
    for k, v in SD_DIFFUSION.items():
        setattr(targs, k, v)
    save_checkpoint(model_path, {"stage": stage, "step": step, "model": net.state_dict(), "ema": None,
                                 "model_args": asdict(ucfg), "text_args": asdict(net.text.cfg),
                                 "train_args": dict(vars(targs), data=None, converted_from=source),
                                 "vae_path": vae_path})
    print(f"{vae_path}: Stable Diffusion's autoencoder, fs={autoencoder.fs}, applied per frame, scale "
          f"{float(autoencoder.latent_scale):g}")
    print(f"{model_path}: U-Net {count_params(net.net) / 1e6:.1f}M params, channels {ucfg.model_channels} x "
          f"{ucfg.channel_mult}, heads {ucfg.num_heads}"
          f"{f', temporal attention in every block (±{ucfg.max_relative_position} frames)' if video else ''}; "
          f"CLIP text model {count_params(net.text) / 1e6:.1f}M params (also {text_path}); {args.weights} weights "
          f"of {source}")
    bpe = "--bpe bpe_simple_vocab_16e6.txt.gz"
    if video:   # the release's sampling script: DDIM 50, eta 1, guidance scale 15 (1 + w here: w = 14)
        print(f"next: python sample.py --ckpt {model_path} --prompt \"clouds over a mountain lake\" "
              f"--text-guidance 14 {bpe}")
        return
    print(f"next: python sample.py --ckpt {model_path} --prompt \"a red car\" {bpe}\n"
          f"      python train.py --stage t2v --preset ucf101 --data VIDEOS --init {model_path} --vae {vae_path} "
          f"--text-encoder {text_path}")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(RELEASE_PRESETS),
                   help="the release config the files were trained with (scale/shift, heads, clip size)")
    p.add_argument("--sd", metavar="FILE_OR_FOLDER", help="Stable Diffusion v1.x, §5's image model: a single .ckpt "
                   "or .safetensors file, or a diffusers folder (unet/, vae/, text_encoder/); no --preset")
    p.add_argument("--ae", help="the release's autoencoder checkpoint (ae_sky.ckpt); default: the one inside --lvdm")
    p.add_argument("--lvdm", help="the release's short unconditional model (short_sky.ckpt), or with --preset t2v "
                   "its text-to-video model (t2v.ckpt)")
    p.add_argument("--out", required=True, help="run folder for vae.pt and lvdm.pt (--sd: image.pt, --preset t2v: "
                   "t2v.pt, with text_encoder.pt)")
    p.add_argument("--weights", default="model", choices=["model", "ema"],
                   help="which U-Net weights: model.diffusion_model.* (the release's short sampler, Stable "
                        "Diffusion's -emaonly files) or model_ema.*")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="override a U-Net field shapes cannot show, e.g. --model num_heads=2")
    p.add_argument("--scale-factor", type=positive_float, help="latent scale (default: the preset's yaml value; "
                   "--sd: 0.18215 or the diffusers config's)")
    p.add_argument("--shift-factor", type=float, help="latent shift (default: the preset's yaml value)")
    p.add_argument("--ft", type=positive_int, help="the autoencoder's temporal factor (release: 4)")
    p.add_argument("--size", type=positive_int, help="frame size to sample at (release: 256; --sd: 512)")
    p.add_argument("--frames", type=positive_int, help="frames per clip to sample (release: 16)")
    args = p.parse_args(argv)
    if args.preset == "t2v":
        if args.sd or args.ae or not args.lvdm:
            raise UserError("--preset t2v converts the release's text-to-video model alone: pass --lvdm t2v.ckpt "
                            "(it holds its autoencoder and text encoder), without --ae or --sd.")
        for k in ("size", "frames"):
            if getattr(args, k) is None:
                setattr(args, k, RELEASE_PRESETS["t2v"][k])
        return args
    if args.sd:
        if args.ae or args.lvdm or args.preset:
            raise UserError("--sd converts Stable Diffusion on its own; drop --ae, --lvdm and --preset.")
        return args
    if not args.ae and not args.lvdm:
        raise UserError("nothing to convert: pass --ae ae_<preset>.ckpt and/or --lvdm short_<preset>.ckpt (or --sd).")
    if not args.preset:
        raise UserError("pass --preset sky, taichi or ucf101: the release config the files were trained with.")
    preset = RELEASE_PRESETS[args.preset]
    for k in ("scale_factor", "shift_factor", "ft", "size", "frames"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    args.num_heads = preset["num_heads"]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.sd or args.preset == "t2v":
        return write_sd(args, video=args.preset == "t2v")
    lvdm_sd, step = load_release(args.lvdm) if args.lvdm else (None, 0)
    if lvdm_sd is not None and any(".transformer_blocks." in k for k in lvdm_sd):
        raise UserError(f"{args.lvdm} holds a U-Net with Stable Diffusion's transformer blocks: convert the release's "
                        f"text-to-video model with --preset t2v --lvdm {args.lvdm}, Stable Diffusion with --sd.")
    if args.ae:
        ae_sd, ae_step = load_release(args.ae)
        ae_source = args.ae
    else:
        ae_sd, ae_step, ae_source = with_prefix(lvdm_sd, "first_stage_model."), step, args.lvdm
        if not ae_sd:
            raise UserError(f"{args.lvdm} holds no autoencoder (first_stage_model.*); pass --ae ae_{args.preset}.ckpt.")
    autoencoder, vcfg = convert_autoencoder(ae_sd, ae_source, args.ft, args.scale_factor, args.shift_factor)
    os.makedirs(args.out, exist_ok=True)
    vae_path = os.path.join(args.out, "vae.pt")
    save_checkpoint(vae_path, {"stage": "vae", "step": ae_step, "model": autoencoder.state_dict(), "ema": None,
                               "model_args": asdict(vcfg),
                               "train_args": {"preset": args.preset, "size": args.size, "frames": args.frames,
                                              "converted_from": os.path.abspath(ae_source)}})
    print(f"{vae_path}: autoencoder fs={autoencoder.fs} ft={autoencoder.ft} hidden={vcfg.hidden} "
          f"ch_mult={vcfg.ch_mult}, scale {args.scale_factor:g}, shift {args.shift_factor:g} (from {ae_source})")
    if lvdm_sd is None:
        return
    unet, ucfg = convert_unet(lvdm_sd, args.lvdm, args.num_heads, parse_overrides(args.model), args.weights)
    latent = args.size // autoencoder.fs
    if latent % 2 ** (len(ucfg.channel_mult) - 1) or args.frames % autoencoder.ft:
        raise UserError(f"--size {args.size} / --frames {args.frames} give a latent this U-Net cannot take; pass a "
                        f"size divisible by {autoencoder.fs * 2 ** (len(ucfg.channel_mult) - 1)} and frames by "
                        f"{autoencoder.ft}.")
    targs = release_train_args(args.preset, args.size, args.frames, args.out, os.path.abspath(vae_path),
                               os.path.abspath(args.lvdm))
    lvdm_path = os.path.join(args.out, "lvdm.pt")
    save_checkpoint(lvdm_path, {"stage": "lvdm", "step": step, "model": unet.state_dict(), "ema": None,
                                "model_args": asdict(ucfg), "train_args": targs,
                                "vae_path": os.path.abspath(vae_path)})
    print(f"{lvdm_path}: U-Net {count_params(unet) / 1e6:.1f}M params "
          f"({args.weights} weights), channels {ucfg.model_channels} x {ucfg.channel_mult}, "
          f"{ucfg.num_res_blocks} res blocks, attention at {ucfg.attention_resolutions}, heads {ucfg.num_heads}; "
          f"DDIM with the release's spacing")
    print(f"next: python sample.py --ckpt {lvdm_path} --n 4")


if __name__ == "__main__":
    main_guard(main)
