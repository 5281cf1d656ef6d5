#!/usr/bin/env python3
"""Build the SDXL image-editing references (image to image, inpainting) from diffusers.

A companion of tools/make_edit_fixtures.py and tools/make_inpaint_fixtures.py (whose picture,
mask, tapes and case runners it reuses, with SDXL's pipelines): same environment and rules (CPU
only, no network, fixed seeds, byte-identical output on re-runs with the pinned versions). Run
make_sdxl_fixtures.py, make_edit_fixtures.py and make_inpaint_fixtures.py first.

    .venv/bin/python tools/make_sdxl_edit_fixtures.py            # writes into tests/fixtures/
    .venv/bin/python tools/make_sdxl_edit_fixtures.py --out DIR

What it writes
--------------
tests/fixtures/references/img2img-sdxl.safetensors + .json
    case/<c>/*: `StableDiffusionXLImg2ImgPipeline.__call__` on tiny-sdxl (both text encoders,
    the size conditioning from the picture's size), every draw recorded as in img2img.json.
tests/fixtures/references/inpaint-sdxl.safetensors + .json
    case/<c>/*: `StableDiffusionXLInpaintPipeline.__call__` on tiny-sdxl (an ordinary 4-channel
    UNet: the blend after each step), every draw recorded as in inpaint.json; the default
    strength 0.9999 included.
tests/fixtures/tiny-sdxl-refiner/   An unmodified diffusers folder laid out as
    stable-diffusion-xl-refiner-1.0's: a StableDiffusionXLImg2ImgPipeline with only
    `text_encoder_2` / `tokenizer_2` (tiny-sdxl's), `requires_aesthetics_score`, no
    `force_zeros_for_empty_prompt`, and a UNet conditioned on text_encoder_2 alone (its
    cross-attention width; 5 time ids: sizes, crop, aesthetic score), random weights.
tests/fixtures/references/refiner.safetensors + .json
    case/<c>/*: `StableDiffusionXLImg2ImgPipeline.__call__` on tiny-sdxl-refiner, with the
    default and explicit `aesthetic_score` / `negative_aesthetic_score`.
All: drift, some cases again in float64 on the same draws, for tolerances.
"""

import argparse
import contextlib
import json
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import make_edit_fixtures as ef  # noqa: E402
import make_fixtures as mf  # noqa: E402  (sets HF_HUB_OFFLINE before importing diffusers)
import make_inpaint_fixtures as ip  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as xl_img2img  # noqa: E402,E501
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as xl_inpaint  # noqa: E402,E501
from diffusers import (  # noqa: E402
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)

SIZE = ef.SIZE
MODEL = "tiny-sdxl"

IMG2IMG_CASES = [
    # the model's own scheduler (Euler, as SDXL base ships) at the pipeline's default 0.3
    ef.case("default", "default", 0.3, 10),
    ef.case("ddim", "ddim", 0.6, 8),
    ef.case("euler_a", "euler_a", 0.8, 5),
    # no negative prompt: force_zeros_for_empty_prompt's zero embeddings
    ef.case("dpmpp_2m_no_negative", "dpmpp_2m", 0.5, 6, negative_prompt=None),
    ef.case("no_cfg", "euler", 0.7, 4, guidance_scale=1.0),
]
IMG2IMG_DRIFT = ["default", "euler_a", "dpmpp_2m_no_negative"]

INPAINT_CASES = [
    ip.case("default", "default", 0.9999, 6, MODEL),  # the pipeline's default strength
    ip.case("ddim", "ddim", 0.6, 8, MODEL),
    ip.case("euler_a", "euler_a", 1.0, 5, MODEL),
    ip.case("dpmpp_2m_no_cfg", "dpmpp_2m", 1.0, 4, MODEL, guidance_scale=1.0),
]
INPAINT_DRIFT = ["default", "euler_a"]

REFINER = "tiny-sdxl-refiner"
REFINER_CASES = [
    ef.case("default", "default", 0.3, 10),  # aesthetic scores 6.0 / 2.5 by default
    ef.case("scored", "ddim", 0.5, 6, aesthetic_score=8.0, negative_aesthetic_score=1.0),
    ef.case("euler_a", "euler_a", 0.8, 5, negative_prompt=None),
]
REFINER_DRIFT = ["default", "scored"]


def tapes_patching(module):
    """The edit tapes with `module`'s own `randn_tensor` as the `latents` tape."""

    class XlTapes(ef.Tapes):
        @contextlib.contextmanager
        def patched(self):
            saved = module.randn_tensor
            module.randn_tensor = self.tapes["latents"]
            try:
                with super().patched():
                    yield
            finally:
                module.randn_tensor = saved

    return XlTapes


def load(cls, dtype, model=MODEL):
    pipe = cls.from_pretrained(mf.ROOT / "tests" / "fixtures" / model, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_refiner(out_dir: pathlib.Path) -> pathlib.Path:
    """tiny-sdxl's VAE, scheduler and second text encoder with a refiner-shaped UNet."""
    base = mf.ROOT / "tests" / "fixtures" / MODEL
    folder = out_dir / REFINER
    if folder.exists():
        shutil.rmtree(folder)
    config = dict(UNet2DConditionModel.load_config(base / "unet"))
    te2 = json.loads((base / "text_encoder_2" / "config.json").read_text())
    config.update({
        # the refiner's blocks: attention in the middle ones only, layers as one number
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": 2,
        "cross_attention_dim": te2["hidden_size"],
        # pooled text_embeds + 5 time ids (original size, crop, aesthetic score)
        "projection_class_embeddings_input_dim":
            te2["projection_dim"] + 5 * config["addition_time_embed_dim"],
    })
    torch.manual_seed(40)
    unet = UNet2DConditionModel.from_config(config)
    mf.perturb_constant_params(unet, 140)
    parts = StableDiffusionXLImg2ImgPipeline.from_pretrained(base, dtype=torch.float32)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=parts.vae, text_encoder=None, text_encoder_2=parts.text_encoder_2, tokenizer=None,
        tokenizer_2=parts.tokenizer_2, unet=unet, scheduler=parts.scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    built = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    pipe.save_pretrained(folder, safe_serialization=True)
    for part in ("tokenizer_2", "text_encoder_2", "vae", "scheduler"):
        shutil.rmtree(folder / part)
        shutil.copytree(base / part, folder / part)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index.pop("_name_or_path", None)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline", index
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"], index
    got = load(StableDiffusionXLImg2ImgPipeline, torch.float32, REFINER).unet.state_dict()
    for k, v in built.items():
        assert torch.equal(got[k], v), f"unet.{k} differs after reload"
    return folder


def run_refiner_case(pipe, base, spec, picture, seed, replay=None):
    """`ef.run_case` with the aesthetic scores passed where a case sets them."""
    scores = {k: spec[k] for k in ("aesthetic_score", "negative_aesthetic_score") if k in spec}
    return ef.run_case(pipe, base, spec, picture, seed, replay,
                       tapes_class=tapes_patching(xl_img2img), call_args=scores)


def img2img_refs(picture, model=MODEL, cases=IMG2IMG_CASES, drift_cases=IMG2IMG_DRIFT,
                 seed=7000):
    refiner = model == REFINER
    tapes = tapes_patching(xl_img2img)
    pipe = load(StableDiffusionXLImg2ImgPipeline, torch.float32, model)
    base = dict(pipe.scheduler.config)
    tensors, entries, raw = {}, [], {}

    def run(p, spec, picture, seed, replay=None):
        if refiner:
            return run_refiner_case(p, base, spec, picture, seed, replay)
        return ef.run_case(p, base, spec, picture, seed, replay, tapes_class=tapes)

    for index, spec in enumerate(cases):
        result = run(pipe, spec, picture, seed + 10 * index)
        raw[spec["name"]] = result
        for k in ("vae_noise", "latents", "step_latents", "image", "noise"):
            if k in result:
                tensors[f"case/{spec['name']}/{k}"] = mf.f32(result[k])
        entries.append({**spec, **{k: result[k] for k in
                                   ("timesteps", "all_timesteps", "start", "scheduler_class")},
                        "do_classifier_free_guidance": pipe.do_classifier_free_guidance})
    pipe64 = load(StableDiffusionXLImg2ImgPipeline, torch.float64, model)
    drift = {}
    by_name = {c["name"]: c for c in cases}
    for name in drift_cases:
        r32 = raw[name]
        replay = {k: [r32[k].double()] for k in ("vae_noise", "latents")}
        if "noise" in r32:
            replay["noise"] = [x.double() for x in r32["noise"]]
        r64 = run(pipe64, by_name[name], picture, 0, replay)
        for k in ("step_latents", "image"):
            drift[f"case/{name}/{k}"] = mf.diff(r32[k], r64[k])
    meta = {"cases": entries, "vae_scaling_factor": pipe.vae.config.scaling_factor,
            "model_dir": f"tests/fixtures/{model}",
            "schema": {"case/<c>/*": ef.SCHEMA["case/<c>/*"]}}
    return tensors, meta, drift


def inpaint_refs(picture, mask):
    tapes = tapes_patching(xl_inpaint)
    pipe = load(StableDiffusionXLInpaintPipeline, torch.float32)
    base = dict(pipe.scheduler.config)
    tensors, entries, raw = {}, [], {}
    for k, v in ip.mask_refs(pipe, picture, mask).items():
        tensors[f"mask/{k}"] = mf.f32(v)
    for index, spec in enumerate(INPAINT_CASES):
        result = ip.run_case(pipe, base, spec, picture, mask, 8000 + 10 * index,
                             tapes_class=tapes)
        raw[spec["name"]] = result
        for k in ip.TENSOR_KEYS:
            if k in result:
                tensors[f"case/{spec['name']}/{k}"] = mf.f32(result[k])
        entries.append({**spec, "model_dir": f"tests/fixtures/{MODEL}",
                        **{k: result[k] for k in ("timesteps", "all_timesteps", "start",
                                                   "scheduler_class", "unet_in_channels")},
                        "do_classifier_free_guidance": pipe.do_classifier_free_guidance})
    pipe64 = load(StableDiffusionXLInpaintPipeline, torch.float64)
    drift = {}
    by_name = {c["name"]: c for c in INPAINT_CASES}
    for name in INPAINT_DRIFT:
        r64 = ip.run_case(pipe64, base, by_name[name], picture, mask, 0, ip.replay_of(raw[name]),
                          tapes_class=tapes)
        for k in ("step_latents", "image"):
            drift[f"case/{name}/{k}"] = mf.diff(raw[name][k], r64[k])
    meta = {"cases": entries, "mask": f"tests/fixtures/edit/mask-{SIZE}.png",
            "schema": ip.SCHEMA}
    return tensors, meta, drift


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=mf.ROOT / "tests" / "fixtures")
    args = parser.parse_args()
    out_dir = args.out.resolve()
    torch.set_grad_enabled(False)
    edit = mf.ROOT / "tests" / "fixtures" / "edit"
    picture = PIL.Image.open(edit / f"input-{SIZE}.png").convert("RGB")
    mask = PIL.Image.open(edit / f"mask-{SIZE}.png")

    refiner = build_refiner(out_dir)
    refs = out_dir / "references"
    refs.mkdir(parents=True, exist_ok=True)
    written = [refiner]
    for name, (tensors, meta, drift) in [
        ("img2img-sdxl", img2img_refs(picture)),
        ("inpaint-sdxl", inpaint_refs(picture, mask)),
        ("refiner", img2img_refs(picture, REFINER, REFINER_CASES, REFINER_DRIFT, 9000)),
    ]:
        drift["note"] = "max |f32 - f64| (max_abs_diff) and max |f64| (max_abs), same draws"
        meta = {"generated_by": "tools/make_sdxl_edit_fixtures.py",
                "model_dir": f"tests/fixtures/{MODEL}",
                "input": f"tests/fixtures/edit/input-{SIZE}.png",
                "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
                **meta, "drift": drift}
        save_file(tensors, str(refs / f"{name}.safetensors"))
        (refs / f"{name}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        written += [refs / f"{name}.safetensors", refs / f"{name}.json"]
        print(name, json.dumps({k: v for k, v in drift.items() if k != "note"}, indent=1))
    mf.make_readable(written)


if __name__ == "__main__":
    main()
