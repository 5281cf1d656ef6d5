#!/usr/bin/env python3
"""Write single-file (original CompVis / A1111 layout) checkpoints of the tiny SD 1.x models.

diffusers' wheel reads single files (`from_single_file`, `loaders/single_file_utils.py`) but has
no writer, so this script lays the diffusers folders' tensors out under the original names
itself, and proves the layout with diffusers' own readers: `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint` and `convert_ldm_clip_checkpoint` must give back every tensor of
the folder bit for bit, `infer_diffusers_model_type` must name the family, and
`from_single_file` (configs from the folder) must load the folder's very weights. Same environment
and rules as tools/make_fixtures.py (CPU, no network, byte-identical re-runs); run that one
(and make_inpaint_fixtures.py, for the inpainting model) first.

    .venv/bin/python tools/make_single_file_fixtures.py            # writes into tests/fixtures/
    .venv/bin/python tools/make_single_file_fixtures.py --out DIR

What it writes
--------------
tests/fixtures/single-file/tiny-sd1.safetensors          tiny-sd1 as one checkpoint
tests/fixtures/single-file/tiny-sd1-inpaint.safetensors  tiny-sd1-inpaint (9-channel UNet)
    The UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` (its attention
    projections as 1x1 convolutions, as LDM stores them), the text encoder under
    `cond_stage_model.transformer.`, plus what real checkpoints carry beside the weights and a
    reader must ignore: the noise schedule (`betas`, `alphas_cumprod`, ...), a `model_ema.`
    entry and the text encoder's `position_ids`. The tensors keep the folders' dtypes.
"""

import argparse
import json
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402  (sets HF_HUB_OFFLINE before importing diffusers)
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

MODELS = ["tiny-sd1", "tiny-sd1-inpaint"]

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
          ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
          ("conv_shortcut", "skip_connection")]


def resnet_to_ldm(rest: str) -> str:
    head, _, tail = rest.partition(".")
    for new, old in RESNET:
        if head == new:
            return f"{old}.{tail}"
    raise ValueError(f"unknown resnet part {rest}")


def unet_to_ldm(key: str, config: dict) -> str:
    """The original name of a diffusers UNet key (the inverse of `convert_ldm_unet_checkpoint`)."""
    per = config["layers_per_block"] + 1
    fixed = sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in fixed:
        return fixed[key]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b * per + layer
        return f"input_blocks.{i}.0.{resnet_to_ldm(rest)}" if kind == "resnets" \
            else f"input_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet_to_ldm(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = b * per + layer
        return f"output_blocks.{i}.0.{resnet_to_ldm(rest)}" if kind == "resnets" \
            else f"output_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        with_attention = "CrossAttn" in config["up_block_types"][b]
        return f"output_blocks.{b * per + per - 1}.{2 if with_attention else 1}.conv.{m[2]}"
    raise ValueError(f"no original name for unet.{key}")


VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                 ("to_out.0", "proj_out")]


def vae_to_ldm(key: str, config: dict) -> str:
    """The original name of a diffusers VAE key (the inverse of `convert_ldm_vae_checkpoint`)."""
    fixed = sfu.DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in fixed:
        return fixed[key]
    n = len(config["up_block_types"])
    side, _, rest = key.partition(".")
    rest = rest.replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{side}.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{side}.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.mid.block_{int(m[1]) + 1}.{m[2]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        part = dict(VAE_ATTENTION)[m[1]]
        return f"{side}.mid.attn_1.{part}.{m[2]}"
    raise ValueError(f"no original name for vae.{key}")


def read_component(folder: pathlib.Path, part: str, weights: str):
    config = json.loads((folder / part / "config.json").read_text())
    return load_file(folder / part / weights), config


def single_file(folder: pathlib.Path) -> dict:
    unet, unet_cfg = read_component(folder, "unet", "diffusion_pytorch_model.safetensors")
    vae, vae_cfg = read_component(folder, "vae", "diffusion_pytorch_model.safetensors")
    clip, _ = read_component(folder, "text_encoder", "model.safetensors")
    out = {}
    for k, v in unet.items():
        out[sfu.LDM_UNET_KEY + unet_to_ldm(k, unet_cfg)] = v
    for k, v in vae.items():
        name = vae_to_ldm(k, vae_cfg)
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out["first_stage_model." + name] = v
    for k, v in clip.items():
        # transformers >= 5.6 saves CLIPTextModel without its `text_model.` level;
        # checkpoints have it.
        k = k if k.startswith("text_model.") else "text_model." + k
        out["cond_stage_model.transformer." + k] = v
    # What real checkpoints carry beside the weights (readers ignore it).
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    out["betas"] = betas.float()
    out["alphas_cumprod"] = torch.cumprod(1.0 - betas, 0).float()
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(77, dtype=torch.int64)[None]
    # Prove the layout with diffusers' readers: every tensor back, bit for bit.
    for name, got, want in [
        ("unet", sfu.convert_ldm_unet_checkpoint(out, unet_cfg), unet),
        ("vae", sfu.convert_ldm_vae_checkpoint(out, vae_cfg), vae),
        ("text_encoder", sfu.convert_ldm_clip_checkpoint(out), clip),
    ]:
        if name == "text_encoder":
            got = {k.removeprefix("text_model."): v for k, v in got.items()
                   if not k.endswith("position_ids")}
            want = {k.removeprefix("text_model."): v for k, v in want.items()}
        assert got.keys() == want.keys(), (name, sorted(got.keys() ^ want.keys())[:8])
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{name}.{k}"
    return out


def check_from_single_file(path: pathlib.Path, folder: pathlib.Path):
    """diffusers' own `from_single_file` (configs from the folder) loads the very weights."""
    cls = StableDiffusionInpaintPipeline if "inpaint" in folder.name else StableDiffusionPipeline
    single = cls.from_single_file(str(path), config=str(folder), local_files_only=True,
                                  safety_checker=None, requires_safety_checker=False)
    ref = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(single, part).state_dict(), getattr(ref, part).state_dict()
        assert got.keys() == want.keys(), part
        for k, v in want.items():
            assert torch.equal(got[k], v), f"from_single_file: {part}.{k}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=mf.ROOT / "tests" / "fixtures")
    args = parser.parse_args()
    fixtures = mf.ROOT / "tests" / "fixtures"
    target = args.out / "single-file"
    target.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        tensors = single_file(fixtures / model)
        kind = sfu.infer_diffusers_model_type(tensors)
        want = "inpainting" if "inpaint" in model else "v1"
        assert kind == want, (model, kind)
        path = target / f"{model}.safetensors"
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, path,
                  metadata={"written_by": "tools/make_single_file_fixtures.py", "from": model})
        check_from_single_file(path, fixtures / model)
        print(f"{path}: {len(tensors)} tensors, diffusers reads it as {kind}")


if __name__ == "__main__":
    main()
