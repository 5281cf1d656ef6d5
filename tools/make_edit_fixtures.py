#!/usr/bin/env python3
"""Build the image-editing references (VAE encoder, image to image) from diffusers.

A companion of tools/make_fixtures.py (whose helpers, prompts and schedulers it reuses):
same environment, same rules (CPU only, no network, fixed seeds, byte-identical output on
re-runs with the pinned versions). Run make_fixtures.py first: the cases run on tiny-sd1.

    .venv/bin/python tools/make_edit_fixtures.py            # writes into tests/fixtures/
    .venv/bin/python tools/make_edit_fixtures.py --out DIR

What it writes
--------------
tests/fixtures/edit/input-96.png    A deterministic 96 x 96 RGB test picture (gradients, a
                                    disc and stripes), the image every case edits.
tests/fixtures/references/img2img.safetensors + img2img.json (tiny-sd1), img2img-sd2.* (tiny-sd2:
v-prediction, DDIM by default)
    - vae/*: `AutoencoderKL.encode` of the picture as `VaeImageProcessor.preprocess` makes it
      ([-1, 1]): the posterior's mean and (clamped) logvar, the unit-variance noise its
      `sample()` drew and the sample; `decode` of the mode (a round trip).
    - case/<c>/*: `StableDiffusionImg2ImgPipeline.__call__` with every random draw recorded:
      `vae_noise` (the posterior sample's), `latents` (the noise `prepare_latents` adds with
      `scheduler.add_noise` at the first kept timestep), `noise` (what an ancestral
      scheduler's steps drew), the latents after each step and the image.
    - drift: the same in float64 on the same draws (f32 against f64), for tolerances.
"""

import argparse
import contextlib
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402  (sets HF_HUB_OFFLINE before importing diffusers)
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import diffusers.models.autoencoders.vae as vae_module  # noqa: E402
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module  # noqa: E402,E501
from diffusers import StableDiffusionImg2ImgPipeline  # noqa: E402

SIZE = 96


def test_picture(size: int) -> PIL.Image.Image:
    """Smooth gradients, a disc and diagonal stripes: structure at several scales."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    r = 0.5 + 0.5 * np.sin(6.0 * x + 1.0)
    g = y
    b = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(np.float64)
    b = np.maximum(b, (np.floor((x + y) * 8) % 2) * 0.35)
    rgb = np.stack([r, g, b], axis=-1)
    return PIL.Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB")


def case(name, scheduler, strength, steps, **kw):
    spec = mf.case(name, scheduler, kw.pop("overrides", None), num_inference_steps=steps,
                   width=SIZE, height=SIZE)
    spec["strength"] = strength
    spec.update(kw)
    return spec


CASES = [
    # the model's own scheduler (PNDM): 8 steps at 0.75 -> the last 6
    case("default", "default", 0.75, 8),
    case("ddim", "ddim", 0.6, 10),
    case("euler", "euler", 1.0, 4),  # strength 1: every step, from the image noised to sigma_max
    case("euler_a", "euler_a", 0.5, 6),
    case("dpmpp_2m", "dpmpp_2m", 0.8, 5),
    case("no_cfg", "dpmpp_2m", 0.7, 4, guidance_scale=1.0),
]
DRIFT_CASES = ["ddim", "euler_a", "dpmpp_2m"]
# tiny-sd2: v-prediction, DDIMScheduler by default (stable-diffusion-2-1's layout)
SD2_CASES = [
    case("default", "default", 0.6, 10),
    case("euler", "euler", 0.8, 5),
    case("dpmpp_2m", "dpmpp_2m", 0.5, 6),
]
SD2_DRIFT_CASES = ["default", "euler", "dpmpp_2m"]


class Tapes:
    """Stands in for `randn_tensor` in the VAE's posterior sample, the img2img pipeline's
    `prepare_latents` noise and Euler ancestral's step noise: records each draw under its
    own seed, or replays a recording (the float64 rerun)."""

    def __init__(self, seed, replay=None):
        self.tapes = {k: mf.NoiseTape(seed + i, (replay or {}).get(k))
                      for i, k in enumerate(("vae_noise", "latents", "noise"))}

    @contextlib.contextmanager
    def patched(self):
        modules = {"vae_noise": vae_module, "latents": img2img_module,
                   "noise": mf.euler_a_module}
        saved = {k: m.randn_tensor for k, m in modules.items()}
        try:
            for k, m in modules.items():
                m.randn_tensor = self.tapes[k]
            yield
        finally:
            for k, m in modules.items():
                m.randn_tensor = saved[k]

    def drawn(self, key):
        return self.tapes[key].drawn


def load_pipeline(folder, dtype) -> StableDiffusionImg2ImgPipeline:
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_case(pipe, base_config, spec, picture, seed, replay=None, tapes_class=None,
             call_args=None):
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
            strength=spec["strength"], guidance_scale=spec["guidance_scale"],
            num_inference_steps=spec["num_inference_steps"],
            num_images_per_prompt=spec["num_images"], output_type="np",
            callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
            **(call_args or {}),
        ).images
    init_timestep = min(int(spec["num_inference_steps"] * spec["strength"]),
                        spec["num_inference_steps"])
    t_start = spec["num_inference_steps"] - init_timestep
    all_t = [float(t) for t in pipe.scheduler.timesteps]
    assert captured["t"] == all_t[t_start * pipe.scheduler.order:], (captured["t"], all_t)
    assert len(tapes.drawn("vae_noise")) == 1 and len(tapes.drawn("latents")) == 1
    result = {
        "vae_noise": tapes.drawn("vae_noise")[0],
        "latents": tapes.drawn("latents")[0],
        "step_latents": torch.stack(captured["latents"]),
        "image": torch.from_numpy(np.asarray(images)),
        "timesteps": captured["t"],
        "all_timesteps": all_t,
        "start": t_start * pipe.scheduler.order,
        "scheduler_class": type(pipe.scheduler).__name__,
    }
    if tapes.drawn("noise"):
        result["noise"] = torch.stack(tapes.drawn("noise"))
    return result


@torch.no_grad()
def vae_refs(pipe, picture, tensors, seed=11):
    # what the img2img pipeline hands the VAE: VaeImageProcessor.preprocess -> [-1, 1]
    image = pipe.image_processor.preprocess(picture).to(pipe.vae.dtype)
    posterior = pipe.vae.encode(image).latent_dist
    noise = mf.seeded_randn(posterior.mean.shape, seed).to(pipe.vae.dtype)
    sample = posterior.mean + posterior.std * noise  # DiagonalGaussianDistribution.sample
    decoded = pipe.vae.decode(posterior.mode()).sample
    return {"image": image, "mean": posterior.mean, "logvar": posterior.logvar,
            "noise": noise, "sample": sample, "roundtrip": decoded}


SCHEMA = {
    "vae/*": "image [1,3,96,96] in [-1,1] (VaeImageProcessor.preprocess of edit/input-96.png), "
             "mean and logvar [1,4,12,12] (AutoencoderKL.encode(image).latent_dist; logvar "
             "clamped to [-30, 20]), noise [1,4,12,12] (unit variance), sample = mean + "
             "exp(logvar / 2) * noise, roundtrip [1,3,96,96] = decode(mean).sample",
    "case/<c>/*": "vae_noise [1,4,12,12] (the posterior sample's draw), latents [n,4,12,12] "
                  "(the noise add_noise mixes in at timesteps[start]), step_latents "
                  "[T,n,4,12,12] (after each step run), image [n,96,96,3], noise [T,n,4,12,12] "
                  "(Euler ancestral's step draws; absent otherwise)",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=mf.ROOT / "tests" / "fixtures")
    args = parser.parse_args()
    out_dir = args.out.resolve()
    torch.set_grad_enabled(False)

    picture = test_picture(SIZE)
    edit_dir = out_dir / "edit"
    edit_dir.mkdir(parents=True, exist_ok=True)
    picture_path = edit_dir / f"input-{SIZE}.png"
    picture.save(picture_path)
    picture = PIL.Image.open(picture_path).convert("RGB")  # what every reader gets back

    for kind, name, cases, drift_cases in [("sd1", "img2img", CASES, DRIFT_CASES),
                                           ("sd2", "img2img-sd2", SD2_CASES, SD2_DRIFT_CASES)]:
        drift = write_refs(kind, name, cases, drift_cases, picture, out_dir)
        print(name, json.dumps({k: v for k, v in drift.items() if k != "note"}, indent=1))
    mf.make_readable([picture_path])


def write_refs(kind, name, cases, drift_cases, picture, out_dir):
    folder = mf.ROOT / "tests" / "fixtures" / f"tiny-{kind}"
    tensors, meta = {}, {"generated_by": "tools/make_edit_fixtures.py",
                         "model_dir": f"tests/fixtures/tiny-{kind}",
                         "input": f"tests/fixtures/edit/input-{SIZE}.png",
                         "versions": {"torch": torch.__version__,
                                      "diffusers": diffusers.__version__},
                         "schema": SCHEMA}
    pipe = load_pipeline(folder, torch.float32)
    base_config = dict(pipe.scheduler.config)
    meta["vae_scaling_factor"] = pipe.vae.config.scaling_factor
    meta["prediction_type"] = base_config["prediction_type"]

    vae32 = vae_refs(pipe, picture, tensors)
    for k, v in vae32.items():
        tensors[f"vae/{k}"] = mf.f32(v)

    entries, raw = [], {}
    for index, spec in enumerate(cases):
        result = run_case(pipe, base_config, spec, picture, seed=3000 + 10 * index)
        raw[spec["name"]] = result
        for k in ("vae_noise", "latents", "step_latents", "image", "noise"):
            if k in result:
                tensors[f"case/{spec['name']}/{k}"] = mf.f32(result[k])
        entries.append({**spec, **{k: result[k] for k in
                                   ("timesteps", "all_timesteps", "start", "scheduler_class")},
                        "do_classifier_free_guidance": pipe.do_classifier_free_guidance})
    meta["cases"] = entries

    # f32 against f64 on the same draws
    pipe64 = load_pipeline(folder, torch.float64)
    drift = {}
    vae64 = vae_refs(pipe64, picture, {})
    for k in ("mean", "logvar", "sample", "roundtrip"):
        drift[f"vae/{k}"] = mf.diff(vae32[k], vae64[k])
    by_name = {c["name"]: c for c in cases}
    for case_name in drift_cases:
        r32 = raw[case_name]
        replay = {k: [r32[k].double()] for k in ("vae_noise", "latents")}
        if "noise" in r32:
            replay["noise"] = [x.double() for x in r32["noise"]]
        r64 = run_case(pipe64, base_config, by_name[case_name], picture, 0, replay)
        for k in ("step_latents", "image"):
            drift[f"case/{case_name}/{k}"] = mf.diff(r32[k], r64[k])
    drift["note"] = "max |f32 - f64| (max_abs_diff) and max |f64| (max_abs), same draws"
    meta["drift"] = drift

    refs = out_dir / "references"
    refs.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(refs / f"{name}.safetensors"))
    (refs / f"{name}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    mf.make_readable([refs / f"{name}.safetensors", refs / f"{name}.json"])
    return drift


if __name__ == "__main__":
    main()
