#!/usr/bin/env python3
"""Build the inpainting fixtures (a tiny 9-channel inpainting model and diffusers' references).

A companion of tools/make_edit_fixtures.py (whose picture, tapes and case helpers it reuses):
same environment and rules (CPU only, no network, fixed seeds, byte-identical output on re-runs
with the pinned versions). Run make_fixtures.py and make_edit_fixtures.py first.

    .venv/bin/python tools/make_inpaint_fixtures.py            # writes into tests/fixtures/
    .venv/bin/python tools/make_inpaint_fixtures.py --out DIR

What it writes
--------------
tests/fixtures/tiny-sd1-inpaint/   An unmodified diffusers folder of a StableDiffusionInpaintPipeline:
                                   tiny-sd1's text encoder, tokenizer, VAE and scheduler, and a UNet of
                                   tiny-sd1's shape taking 9 channels (latents, mask, masked-image
                                   latents: stable-diffusion-inpainting's layout), random weights.
tests/fixtures/edit/mask-96.png    A deterministic 96 x 96 grayscale mask (white repaints): a disc and
                                   a bar with soft edges, so that grays on both sides of 0.5 occur and
                                   the shapes are not aligned to the 8-pixel latent grid.
tests/fixtures/references/inpaint.safetensors + inpaint.json
    - mask/*: `mask_processor.preprocess` of the mask (binarised), the masked picture
      (`image * (mask < 0.5)`) and the mask at latent size (`F.interpolate`, nearest).
    - case/<c>/*: `StableDiffusionInpaintPipeline.__call__` on tiny-sd1-inpaint (9 channels) and on
      tiny-sd1 (4 channels: the blend), every random draw recorded: `latents` (the noise
      `prepare_latents` draws), `vae_noise` (the picture's posterior sample, where one is drawn),
      `masked_image_vae_noise` (the masked picture's), `noise` (Euler ancestral's steps), the
      latents after each step and the image.
    - drift: some cases again in float64 on the same draws, for tolerances.
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
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module  # noqa: E402,E501
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel  # noqa: E402

SIZE = ef.SIZE
MODEL = "tiny-sd1-inpaint"


def test_mask(size: int) -> PIL.Image.Image:
    """A soft-edged disc and a bar: grays from 0 to 255 along the edges."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    disc = 1.0 - np.clip((np.hypot(x - 0.35, y - 0.4) - 0.2) * 25.0, 0.0, 1.0)
    bar = np.clip(1.0 - np.abs(y - 0.78) * 14.0, 0.0, 1.0) * (x > 0.3)
    return PIL.Image.fromarray(np.round(np.maximum(disc, bar) * 255).astype(np.uint8), "L")


def case(name, scheduler, strength, steps, model, **kw):
    spec = ef.case(name, scheduler, strength, steps, **kw)
    spec["model"] = model
    return spec


NINE, FOUR = MODEL, "tiny-sd1"
CASES = [
    # 9 channels: the model's own scheduler (PNDM) at the pipeline's default strength 1
    case("default", "default", 1.0, 6, NINE),
    case("ddim", "ddim", 0.6, 10, NINE),  # from the picture noised to step 4
    case("euler_a", "euler_a", 1.0, 5, NINE, num_images=2),
    case("no_cfg", "dpmpp_2m", 0.75, 4, NINE, guidance_scale=1.0),
    # 4 channels: the blend after every step
    case("blend_ddim", "ddim", 1.0, 6, FOUR),
    case("blend_euler", "euler", 0.7, 8, FOUR),
    case("blend_dpmpp_2m", "dpmpp_2m", 0.5, 6, FOUR),
    case("blend_euler_a", "euler_a", 1.0, 4, FOUR),
]
DRIFT_CASES = ["ddim", "euler_a", "blend_euler", "blend_dpmpp_2m"]


def build_model(out_dir: pathlib.Path) -> pathlib.Path:
    """tiny-sd1 with a 9-channel UNet, saved as diffusers saves an inpainting pipeline."""
    base = mf.ROOT / "tests" / "fixtures" / "tiny-sd1"
    folder = out_dir / MODEL
    if folder.exists():
        shutil.rmtree(folder)
    config = dict(UNet2DConditionModel.load_config(base / "unet"))
    config["in_channels"] = 9
    torch.manual_seed(30)
    unet = UNet2DConditionModel.from_config(config)
    mf.perturb_constant_params(unet, 130)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(base, unet=unet, dtype=torch.float32,
                                                          safety_checker=None,
                                                          requires_safety_checker=False)
    built = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    pipe.save_pretrained(folder, safe_serialization=True)
    # The other parts exactly as tiny-sd1 has them (transformers 5 would rewrite the tokenizer).
    for part in ("tokenizer", "text_encoder", "vae", "scheduler"):
        shutil.rmtree(folder / part)
        shutil.copytree(base / part, folder / part)
    # save_pretrained records the folder it loaded from: a path of this machine.
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index.pop("_name_or_path", None)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    loaded = load_pipeline(folder, torch.float32)
    assert loaded.unet.config.in_channels == 9
    got = loaded.unet.state_dict()
    assert got.keys() == built.keys()
    for k, v in built.items():
        assert torch.equal(got[k], v), f"unet.{k} differs after reload"
    assert index["_class_name"] == "StableDiffusionInpaintPipeline", index
    return folder


def load_pipeline(folder, dtype) -> StableDiffusionInpaintPipeline:
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Tapes(ef.Tapes):
    """The edit tapes with the inpainting pipeline's own `randn_tensor` as `latents`. The VAE's
    tape records the picture's posterior draw (where the pipeline encodes it) and then the
    masked picture's."""

    @contextlib.contextmanager
    def patched(self):
        saved = inpaint_module.randn_tensor
        inpaint_module.randn_tensor = self.tapes["latents"]
        try:
            with super().patched():
                yield
        finally:
            inpaint_module.randn_tensor = saved


def run_case(pipe, base_config, spec, picture, mask, seed, replay=None, tapes_class=None):
    pipe.scheduler = mf.make_scheduler(base_config, spec["scheduler"], spec["overrides"])
    captured = {"latents": [], "t": []}

    def on_step_end(_pipe, i, t, kw):
        captured["latents"].append(kw["latents"].detach().clone())
        captured["t"].append(float(t))
        return {}

    tapes = (tapes_class or Tapes)(seed, replay)
    with tapes.patched(), torch.no_grad():
        images = pipe(
            prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], image=picture,
            mask_image=mask, strength=spec["strength"], guidance_scale=spec["guidance_scale"],
            num_inference_steps=spec["num_inference_steps"],
            num_images_per_prompt=spec["num_images"], output_type="np",
            callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
        ).images
    steps = spec["num_inference_steps"]
    t_start = steps - min(int(steps * spec["strength"]), steps)
    all_t = [float(t) for t in pipe.scheduler.timesteps]
    assert captured["t"] == all_t[t_start:], (captured["t"], all_t)
    # The picture is encoded unless a 9-channel UNet starts from pure noise.
    encodes_picture = pipe.unet.config.in_channels == 4 or spec["strength"] < 1.0
    vae_draws = tapes.drawn("vae_noise")
    assert len(vae_draws) == 1 + encodes_picture and len(tapes.drawn("latents")) == 1
    result = {
        "latents": tapes.drawn("latents")[0],
        "masked_image_vae_noise": vae_draws[-1],
        "step_latents": torch.stack(captured["latents"]),
        "image": torch.from_numpy(np.asarray(images)),
        "timesteps": captured["t"],
        "all_timesteps": all_t,
        "start": t_start,
        "scheduler_class": type(pipe.scheduler).__name__,
        "unet_in_channels": pipe.unet.config.in_channels,
    }
    if encodes_picture:
        result["vae_noise"] = vae_draws[0]
    if tapes.drawn("noise"):
        result["noise"] = torch.stack(tapes.drawn("noise"))
    return result


def replay_of(result):
    vae = ([result["vae_noise"].double()] if "vae_noise" in result else []) + \
        [result["masked_image_vae_noise"].double()]
    replay = {"vae_noise": vae, "latents": [result["latents"].double()]}
    if "noise" in result:
        replay["noise"] = [x.double() for x in result["noise"]]
    return replay


@torch.no_grad()
def mask_refs(pipe, picture, mask):
    """What the pipeline makes of the mask before its loop (its steps 5 and 7)."""
    image = pipe.image_processor.preprocess(picture, height=SIZE, width=SIZE).to(torch.float32)
    condition = pipe.mask_processor.preprocess(mask, height=SIZE, width=SIZE)
    masked = image * (condition < 0.5)
    latent = torch.nn.functional.interpolate(condition, size=(SIZE // 8, SIZE // 8))
    return {"condition": condition, "masked_image": masked, "latent": latent}


TENSOR_KEYS = ("latents", "vae_noise", "masked_image_vae_noise", "noise", "step_latents", "image")

SCHEMA = {
    "mask/*": "condition [1,1,96,96] of 0/1 (mask_processor.preprocess of edit/mask-96.png), "
              "masked_image [1,3,96,96] (image * (condition < 0.5)), latent [1,1,12,12] "
              "(F.interpolate(condition, size=(12, 12)), nearest)",
    "case/<c>/*": "latents [n,4,12,12] (prepare_latents' noise), vae_noise [1,4,12,12] (the "
                  "picture's posterior draw; absent when a 9-channel UNet starts at strength 1), "
                  "masked_image_vae_noise [1,4,12,12], step_latents [T,n,4,12,12], image "
                  "[n,96,96,3], noise [T,n,4,12,12] (Euler ancestral's draws; absent otherwise)",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=mf.ROOT / "tests" / "fixtures")
    args = parser.parse_args()
    out_dir = args.out.resolve()
    torch.set_grad_enabled(False)

    folder = build_model(out_dir)
    edit_dir = out_dir / "edit"
    edit_dir.mkdir(parents=True, exist_ok=True)
    mask_path = edit_dir / f"mask-{SIZE}.png"
    test_mask(SIZE).save(mask_path)
    mask = PIL.Image.open(mask_path)  # what every reader gets back
    picture = PIL.Image.open(mf.ROOT / "tests" / "fixtures" / "edit" / f"input-{SIZE}.png")
    picture = picture.convert("RGB")

    tensors, meta = {}, {"generated_by": "tools/make_inpaint_fixtures.py",
                         "input": f"tests/fixtures/edit/input-{SIZE}.png",
                         "mask": f"tests/fixtures/edit/mask-{SIZE}.png",
                         "versions": {"torch": torch.__version__,
                                      "diffusers": diffusers.__version__},
                         "schema": SCHEMA}
    pipes = {NINE: load_pipeline(folder, torch.float32),
             FOUR: load_pipeline(mf.ROOT / "tests" / "fixtures" / FOUR, torch.float32)}
    for k, v in mask_refs(pipes[NINE], picture, mask).items():
        tensors[f"mask/{k}"] = mf.f32(v)
    condition = tensors["mask/condition"]
    meta["mask_share"] = float(condition.mean())

    entries, raw = [], {}
    for index, spec in enumerate(CASES):
        pipe = pipes[spec["model"]]
        base_config = dict(pipe.scheduler.config)
        result = run_case(pipe, base_config, spec, picture, mask, seed=5000 + 10 * index)
        raw[spec["name"]] = result
        for k in TENSOR_KEYS:
            if k in result:
                tensors[f"case/{spec['name']}/{k}"] = mf.f32(result[k])
        entries.append({**spec, "model_dir": f"tests/fixtures/{spec['model']}",
                        **{k: result[k] for k in ("timesteps", "all_timesteps", "start",
                                                   "scheduler_class", "unet_in_channels")},
                        "do_classifier_free_guidance": pipe.do_classifier_free_guidance})
    meta["cases"] = entries

    drift = {}
    pipes64 = {}
    by_name = {c["name"]: c for c in CASES}
    for name in DRIFT_CASES:
        spec = by_name[name]
        model = spec["model"]
        if model not in pipes64:
            pipes64[model] = load_pipeline(
                folder if model == NINE else mf.ROOT / "tests" / "fixtures" / FOUR, torch.float64)
        pipe64 = pipes64[model]
        r32 = raw[name]
        r64 = run_case(pipe64, dict(pipe64.scheduler.config), spec, picture, mask, 0,
                       replay_of(r32))
        for k in ("step_latents", "image"):
            drift[f"case/{name}/{k}"] = mf.diff(r32[k], r64[k])
    drift["note"] = "max |f32 - f64| (max_abs_diff) and max |f64| (max_abs), same draws"
    meta["drift"] = drift

    refs = out_dir / "references"
    refs.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(refs / "inpaint.safetensors"))
    (refs / "inpaint.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    mf.make_readable([folder, mask_path, refs / "inpaint.safetensors", refs / "inpaint.json"])
    print(f"{MODEL}: {mf.folder_size(folder) / 1e6:.2f} MB; mask covers {meta['mask_share']:.3f}")
    print(json.dumps({k: v for k, v in drift.items() if k != "note"}, indent=1))


if __name__ == "__main__":
    main()
