"""Writes tests/fixtures/real-configs/<model>/layout.json: every weight tensor (name -> shape)
of the real SD 1.5, SD 2.1, SD-Turbo, SDXL base 1.0 and SDXL-Turbo checkpoints, from
diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel (and, for
SDXL's text_encoder_2, CLIPTextModelWithProjection) built from the configs in that folder on
the meta device (no memory, no download). tests/real_models.rs checks sdserve requests exactly
these tensors.

    HF_HUB_OFFLINE=1 python tools/dump_real_layouts.py
"""

import json
import pathlib

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/real-configs"


def shapes(module, prefix=""):
    out = {}
    for name, t in module.state_dict().items():
        if name.endswith("position_ids"):  # a buffer, not a weight
            continue
        out[prefix + name] = list(t.shape)
    return out


def text_layout(d, sub, cls):
    with torch.device("meta"):
        text = cls(CLIPTextConfig.from_pretrained(d / sub))
    # The hub's text_encoder/model.safetensors (saved by transformers 4.x) name every
    # encoder tensor `text_model.…`; current transformers' state_dict may not.
    # CLIPTextModelWithProjection's `text_projection` sits beside `text_model`.
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in shapes(text).items()}


def main():
    for model in ["sd15", "sd21", "sd-turbo", "sdxl-base", "sdxl-turbo"]:
        d = ROOT / model
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(json.loads((d / "unet/config.json").read_text()))
            vae = AutoencoderKL.from_config(json.loads((d / "vae/config.json").read_text()))
        layout = {"unet": shapes(unet), "vae": shapes(vae),
                  "text_encoder": text_layout(d, "text_encoder", CLIPTextModel)}
        if (d / "text_encoder_2").is_dir():
            layout["text_encoder_2"] = text_layout(d, "text_encoder_2", CLIPTextModelWithProjection)
        (d / "layout.json").write_text(json.dumps(layout, separators=(",", ":"), sort_keys=True) + "\n")
        print(model, {k: len(v) for k, v in layout.items()},
              {k: sum(int(torch.tensor(s).prod()) for s in v.values()) for k, v in layout.items()})


if __name__ == "__main__":
    main()
