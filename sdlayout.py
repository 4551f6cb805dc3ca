"""Stable Diffusion v1's diffusers folder, read and renamed to its original single-file (CompVis) names.

Stable Diffusion v1.x is published in two layouts holding the same tensors:
  * the original single file (CompVis/stable-diffusion, runwayml v1-5-*.ckpt / .safetensors): one state dict,
    `model.diffusion_model.*` (U-Net), `first_stage_model.*` (autoencoder), `cond_stage_model.transformer.*`
    (CLIP's text model), the names of LDM's modules, which the LVDM release keeps too;
  * a diffusers folder: unet/, vae/, text_encoder/, each a config.json and a .safetensors (or .bin) file,
    with diffusers' module names.
convert.py --sd maps the first onto this project's modules; this file turns the second into the first:

    sd, hints = read_folder("stable-diffusion-v1-5")   # CompVis names; hints: settings only configs show
    back = compvis_to_diffusers(sd)                    # the inverse (tests write diffusers folders with it)

The renaming is by block: each diffusers block (down_blocks.i.resnets.j, ...) is one CompVis block
(input_blocks.n.0, ...), found from the number of levels N and of residual blocks per level L:
  U-Net  down_blocks.i.resnets.j / attentions.j  -> input_blocks.(1 + (L+1)i + j).0 / .1
         down_blocks.i.downsamplers.0.conv       -> input_blocks.((L+1)(i+1)).0.op
         mid_block.resnets.0, attentions.0, resnets.1 -> middle_block.0, .1, .2
         up_blocks.i.resnets.j / attentions.j    -> output_blocks.((L+1)i + j).0 / .1       (j <= L)
         up_blocks.i.upsamplers.0.conv           -> output_blocks.((L+1)i + L).2.conv (.1 without attention)
  VAE    encoder.down_blocks.i.resnets.j         -> encoder.down.i.block.j
         decoder.up_blocks.i.resnets.j           -> decoder.up.(N-1-i).block.j           (levels reversed)
         *.mid_block.resnets.0 / attentions.0 / resnets.1 -> *.mid.block_1 / attn_1 / block_2
Inside a block a few names differ (RESNET_UNET, RESNET_VAE, ATTENTION_VAE); the transformer blocks' names are
the same in both. The VAE's attention projections are Linear in diffusers, 1x1 convs in CompVis.
"""
import json
import os
import re

import torch

from common import UserError
from text import read_safetensors

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
# (diffusers name, CompVis name) inside a block
RESNET_UNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
RESNET_VAE = (("conv_shortcut", "nin_shortcut"),)
ATTENTION_VAE = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
                 ("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out"))  # diffusers < 0.14
VAE_ATTENTION_WEIGHT = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def unet_table(levels, layers, up_attention):
    """(diffusers prefix, CompVis prefix, renames inside) of every U-Net block; up_attention[i]: whether
    up_blocks.i has attention (its upsampler then sits at index 2 of its CompVis block, else at 1)."""
    L = layers
    table = [("time_embedding.linear_1", "time_embed.0", ()), ("time_embedding.linear_2", "time_embed.2", ()),
             ("conv_in", "input_blocks.0.0", ()), ("conv_norm_out", "out.0", ()), ("conv_out", "out.2", ()),
             ("mid_block.resnets.0", "middle_block.0", RESNET_UNET), ("mid_block.attentions.0", "middle_block.1", ()),
             ("mid_block.resnets.1", "middle_block.2", RESNET_UNET)]
    for i in range(levels):
        for j in range(L):
            n = 1 + (L + 1) * i + j
            table += [(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", RESNET_UNET),
                      (f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", ())]
        for j in range(L + 1):
            n = (L + 1) * i + j
            table += [(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", RESNET_UNET),
                      (f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", ())]
        if i < levels - 1:
            table += [(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(L + 1) * (i + 1)}.0.op", ()),
                      (f"up_blocks.{i}.upsamplers.0.conv",
                       f"output_blocks.{(L + 1) * i + L}.{2 if up_attention[i] else 1}.conv", ())]
    return table


def vae_table(levels, layers):
    """(diffusers prefix, CompVis prefix, renames inside) of every autoencoder block."""
    table = [("quant_conv", "quant_conv", ()), ("post_quant_conv", "post_quant_conv", ())]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_in", f"{part}.conv_in", ()), (f"{part}.conv_out", f"{part}.conv_out", ()),
                  (f"{part}.conv_norm_out", f"{part}.norm_out", ()),
                  (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", RESNET_VAE),
                  (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", ATTENTION_VAE),
                  (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", RESNET_VAE)]
    for i in range(levels):
        table += [(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", RESNET_VAE)
                  for j in range(layers)]
        table += [(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{levels - 1 - i}.block.{j}", RESNET_VAE)
                  for j in range(layers + 1)]
        if i < levels - 1:
            table += [(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", ()),
                      (f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{levels - 1 - i}.upsample.conv", ())]
    return table


def rename(sd, table, to_compvis, what):
    """Every key's block prefix replaced by its partner in `table` (the longest matching prefix wins), and the
    first matching rename inside the block applied; a key no block holds is a UserError."""
    src, dst = (0, 1) if to_compvis else (1, 0)
    entries = sorted(table, key=lambda e: -len(e[src]))
    out = {}
    for k, v in sd.items():
        entry = next((e for e in entries if k.startswith(e[src] + ".")), None)
        if entry is None:
            raise UserError(f"the {what} has a weight {k!r} that Stable Diffusion v1's {what} does not have; pass "
                            f"Stable Diffusion v1.x weights (2.x and XL have other blocks).")
        rest = k[len(entry[src]) + 1:]
        for pair in entry[2]:
            old, new = pair[src], pair[dst]
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[f"{entry[dst]}.{rest}"] = v
    return out


def _count(keys, pattern):
    """1 + the largest number the pattern's group matches in `keys` (0 if none)."""
    found = [int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m]
    return 1 + max(found) if found else 0


def diffusers_to_compvis(unet, vae, clip):
    """The three diffusers state dicts -> one state dict in the original single file's names."""
    levels, layers = _count(unet, r"down_blocks\.(\d+)\."), _count(unet, r"down_blocks\.0\.resnets\.(\d+)\.")
    up_attention = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in unet) for i in range(levels)]
    sd = {UNET + k: v for k, v in rename(unet, unet_table(levels, layers, up_attention), True, "U-Net").items()}
    table = vae_table(_count(vae, r"encoder\.down_blocks\.(\d+)\."),
                      _count(vae, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    for k, v in rename(vae, table, True, "autoencoder").items():
        sd[VAE + k] = v[:, :, None, None] if VAE_ATTENTION_WEIGHT.search(k) and v.dim() == 2 else v
    sd.update({TEXT + k: v for k, v in clip.items()})
    return sd


def compvis_to_diffusers(sd):
    """The inverse of diffusers_to_compvis: a single-file state dict -> (unet, vae, text) in diffusers' names."""
    unet = {k[len(UNET):]: v for k, v in sd.items() if k.startswith(UNET)}
    vae = {k[len(VAE):]: v for k, v in sd.items() if k.startswith(VAE)}
    levels = 1 + sum(1 for k in unet if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    layers = (_count(unet, r"input_blocks\.(\d+)\.") - 1 - (levels - 1)) // levels
    up_attention = [f"output_blocks.{(layers + 1) * i}.1.proj_in.weight" in unet for i in range(levels)]
    unet = rename(unet, unet_table(levels, layers, up_attention), False, "U-Net")
    vae = {k: v.flatten(1) if VAE_ATTENTION_WEIGHT.search(k) else v for k, v in vae.items()}
    vae = rename(vae, vae_table(_count(vae, r"encoder\.down\.(\d+)\."), _count(vae, r"encoder\.down\.0\.block\.(\d+)\.")),
                 False, "autoencoder")
    return unet, vae, {k[len(TEXT):]: v for k, v in sd.items() if k.startswith(TEXT)}


# ----------------------------------------------------------------------------- reading a diffusers folder
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def read_weights(folder, part):
    """folder/part/<name>.safetensors (or .fp16.safetensors, .bin: a torch state dict, loaded weights_only)
    and its config.json ({} without one)."""
    base = os.path.join(folder, part, WEIGHT_FILES[part])
    path = next((p for p in (base + ".safetensors", base + ".fp16.safetensors", base + ".bin") if os.path.isfile(p)),
                None)
    if path is None:
        raise UserError(f"{folder} has no {part}/{WEIGHT_FILES[part]}.safetensors; pass the folder of a diffusers "
                        f"Stable Diffusion v1.x pipeline (unet/, vae/, text_encoder/) or a single .ckpt/.safetensors.")
    if path.endswith(".safetensors"):
        sd = read_safetensors(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle with more than tensors is refused here
            raise UserError(f"{path} is not a plain state dict ({type(e).__name__}); pass the .safetensors file.") \
                from None
    config, path = {}, os.path.join(folder, part, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    return sd, config


def read_folder(folder):
    """A diffusers Stable Diffusion folder -> (state dict in the single file's names, hints): hints are what
    only the configs say, num_heads of the U-Net, scale_factor of the latents and text_heads of CLIP."""
    (unet, ucfg), (vae, vcfg), (clip, tcfg) = (read_weights(folder, part) for part in ("unet", "vae", "text_encoder"))
    heads = ucfg.get("attention_head_dim", 8)   # diffusers' name for SD v1's number of heads (8)
    if ucfg.get("use_linear_projection") or not isinstance(heads, int) or tcfg.get("hidden_act", "quick_gelu") != \
            "quick_gelu":
        raise UserError(f"{folder} is not Stable Diffusion v1.x (linear projections, per-level head sizes or an "
                        f"OpenCLIP text encoder: 2.x); pass a v1.x pipeline such as stable-diffusion-v1-5.")
    hints = {"num_heads": heads, "scale_factor": vcfg.get("scaling_factor", 0.18215),
             "text_heads": tcfg.get("num_attention_heads")}
    return diffusers_to_compvis(unet, vae, clip), hints
