#!/usr/bin/env python3
"""Build the tiny latent-consistency (LCM) fixture and its diffusers references.

A companion of tools/make_fixtures.py (whose helpers, prompts and seeds it reuses): same
environment, same rules (CPU only, no network, fixed seeds, byte-identical output on
re-runs with the pinned versions). Run make_fixtures.py first: tiny-lcm is tiny-sd1 with
an LCM-distilled UNet.

    .venv/bin/python tools/make_lcm_fixtures.py            # writes into tests/fixtures/
    .venv/bin/python tools/make_lcm_fixtures.py --out DIR

What it writes
--------------
tests/fixtures/tiny-lcm/    An unmodified diffusers folder saved by
                            `LatentConsistencyModelPipeline.save_pretrained`, laid out as
                            SimianLuo/LCM_Dreamshaper_v7 is: tiny-sd1's UNet with
                            `time_cond_proj_dim` (the guidance scale enters as an embedding
                            through `time_embedding.cond_proj`; its weights random, the rest
                            tiny-sd1's), LCMScheduler with that repo's config. text_encoder/,
                            tokenizer/ and vae/ are tiny-sd1's files byte for byte.
tests/fixtures/references/lcm.safetensors + lcm.json
    f32 references from diffusers after loading the folder back (schema in the JSON), and
    a "drift" entry (f32 against f64 on the same inputs and noise).
tests/fixtures/tiny-lcm-sdxl/   tiny-sdxl with an LCM-distilled UNet (as latent-consistency/
                            lcm-sdxl is used: StableDiffusionXLPipeline, its UNet swapped,
                            LCMScheduler.from_config(the base's scheduler config)); every other
                            component tiny-sdxl's byte for byte; the UNet stored as f16 too.
tests/fixtures/references/lcm-sdxl.safetensors + lcm-sdxl.json
    StableDiffusionXLPipeline cases on it (guidance embedded, no unconditional pass).
"""

import argparse
import contextlib
import json
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402  (sets HF_HUB_OFFLINE before importing diffusers)
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import diffusers.schedulers.scheduling_lcm as lcm_module  # noqa: E402
from diffusers import (  # noqa: E402
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

# SimianLuo/LCM_Dreamshaper_v7 scheduler/scheduler_config.json
LCM_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
TIME_COND_PROJ_DIM = 32  # LCM_Dreamshaper_v7: 256


def case(name, **kw):
    # LatentConsistencyModelPipeline has no negative prompt: one conditional pass per step.
    spec = mf.case(name, "default", kw.pop("overrides", None), negative_prompt=None,
                   guidance_scale=8.5, num_inference_steps=4)
    spec.update(kw)
    return spec


CASES = [
    case("default"),  # the pipeline's own defaults: 4 steps, guidance 8.5
    case("one_step", num_inference_steps=1),
    case("two_steps_batch", num_inference_steps=2, guidance_scale=2.0, width=128, height=96,
         num_images=2),
    # w = guidance - 1 = 0: the embedding is sin(0), cos(0), not nothing
    case("w_zero", num_inference_steps=3, guidance_scale=1.0),
    case("original_100", overrides={"original_inference_steps": 100}, guidance_scale=5.0),
    case("unicode", prompt=mf.UNICODE_PROMPT, num_inference_steps=2),
]
DRIFT_CASES = ["default", "two_steps_batch"]


def save_model(fixtures: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    base_dir = fixtures / "tiny-sd1"
    base = StableDiffusionPipeline.from_pretrained(base_dir, dtype=torch.float32)
    config = {k: v for k, v in base.unet.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = TIME_COND_PROJ_DIM
    torch.manual_seed(40)
    unet = UNet2DConditionModel.from_config(config)
    missing, unexpected = unet.load_state_dict(base.unet.state_dict(), strict=False)
    assert list(missing) == ["time_embedding.cond_proj.weight"] and not unexpected, \
        (missing, unexpected)
    built = {k: v.detach().clone() for k, v in unet.state_dict().items()}

    folder = out_dir / "tiny-lcm"
    if folder.exists():
        shutil.rmtree(folder)
    pipe = LatentConsistencyModelPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        scheduler=LCMScheduler.from_config(LCM_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("text_encoder", "tokenizer", "vae"):
        shutil.rmtree(folder / sub)
        shutil.copytree(base_dir / sub, folder / sub)

    loaded = load_pipeline(folder, torch.float32)
    got = loaded.unet.state_dict()
    assert got.keys() == built.keys()
    for k, v in built.items():
        assert torch.equal(got[k], v), f"unet.{k} differs after reload"
    assert type(loaded.scheduler).__name__ == "LCMScheduler"
    return folder


def load_pipeline(folder, dtype) -> LatentConsistencyModelPipeline:
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def patched_noise(tape):
    original = lcm_module.randn_tensor
    lcm_module.randn_tensor = tape
    try:
        yield
    finally:
        lcm_module.randn_tensor = original


def run_pipeline(pipe, base_config, spec, latents, noise_seed, replay=None):
    """One LatentConsistencyModelPipeline.__call__ with the given initial latents and the
    noise LCMScheduler.step draws recorded (or replayed)."""
    pipe.scheduler = LCMScheduler.from_config(base_config, **spec["overrides"])
    captured = {"latents": [], "denoised": [], "t": []}

    def on_step_end(_pipe, i, t, kw):
        captured["latents"].append(kw["latents"].detach().clone())
        captured["denoised"].append(kw["denoised"].detach().clone())
        captured["t"].append(float(t))
        if i == 0:
            captured["prompt_embeds"] = kw["prompt_embeds"].detach().clone()
            captured["w_embedding"] = kw["w_embedding"].detach().clone()
        return {}

    tape = mf.NoiseTape(noise_seed, replay)
    with patched_noise(tape), torch.no_grad():
        images = pipe(
            prompt=spec["prompt"],
            guidance_scale=spec["guidance_scale"],
            num_inference_steps=spec["num_inference_steps"],
            width=spec["width"],
            height=spec["height"],
            num_images_per_prompt=spec["num_images"],
            latents=latents.to(pipe.unet.dtype),
            output_type="np",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents", "denoised", "prompt_embeds",
                                                "w_embedding"],
        ).images
    assert captured["t"] == [float(t) for t in pipe.scheduler.timesteps]
    # every step but the last draws noise
    assert len(tape.drawn) == spec["num_inference_steps"] - 1
    # the final latents are the last step's denoised estimate, which the VAE decodes
    assert torch.equal(captured["latents"][-1], captured["denoised"][-1])
    result = {
        "prompt_embeds": captured["prompt_embeds"],
        "w_embedding": captured["w_embedding"],
        "step_latents": torch.stack(captured["latents"]),
        "image": torch.from_numpy(np.asarray(images)),
        "timesteps": captured["t"],
    }
    if tape.drawn:
        result["noise"] = torch.stack(tape.drawn)
    return result


def same_through_stable_diffusion_pipeline(folder, spec, latents, result):
    """StableDiffusionPipeline with this folder (what LCM UNets also run through) gives the
    same image: guidance embedded, no unconditional pass."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    replay = list(result["noise"]) if "noise" in result else []
    with patched_noise(mf.NoiseTape(0, replay)), torch.no_grad():
        images = pipe(prompt=spec["prompt"], guidance_scale=spec["guidance_scale"],
                      num_inference_steps=spec["num_inference_steps"], width=spec["width"],
                      height=spec["height"], num_images_per_prompt=spec["num_images"],
                      latents=latents, output_type="np").images
    assert not pipe.do_classifier_free_guidance
    d = float((torch.from_numpy(np.asarray(images)) - result["image"]).abs().max())
    assert d < 1e-5, d
    return d


def case_refs(pipe, base_config, tensors, meta):
    entries, raw = [], {}
    for index, spec in enumerate(CASES):
        n, h, w = spec["num_images"], spec["height"] // 8, spec["width"] // 8
        latents = mf.seeded_randn((n, 4, h, w), 5000 + index)
        result = run_pipeline(pipe, base_config, spec, latents, noise_seed=6000 + index)
        raw[spec["name"]] = (latents, result)
        prefix = f"case/{spec['name']}"
        tensors[f"{prefix}/latents"] = mf.f32(latents)
        for k in ("prompt_embeds", "w_embedding", "step_latents", "image", "noise"):
            if k in result:
                tensors[f"{prefix}/{k}"] = mf.f32(result[k])
        entries.append({**spec, "scheduler_class": "LCMScheduler",
                        "do_classifier_free_guidance": False,
                        "timesteps": result["timesteps"]})
    meta["cases"] = entries
    return raw


@torch.no_grad()
def unet_refs(pipe, tensors, meta):
    hidden = torch.cat([mf.encode(pipe, mf.tokenize(pipe, p)) for p in ("", mf.CASE_PROMPT)])
    w = torch.tensor([7.5 - 1, 2.0 - 1])
    cond = pipe.get_guidance_scale_embedding(w, embedding_dim=TIME_COND_PROJ_DIM)
    sample = mf.seeded_randn((2, 4, 12, 12), 7)
    out = pipe.unet(sample, 499, encoder_hidden_states=hidden, timestep_cond=cond).sample
    for k, v in [("sample", sample), ("encoder_hidden_states", hidden),
                 ("timestep_cond", cond), ("out", out)]:
        tensors[f"unet/{k}"] = mf.f32(v)
    meta["unet"] = {"timestep": 499, "guidance_scale": [7.5, 2.0]}


@torch.no_grad()
def drift_refs(folder, base_config, tensors, raw):
    pipe = load_pipeline(folder, torch.float64)
    t = lambda k: tensors[f"unet/{k}"].double()  # noqa: E731
    out = {"unet/out": mf.diff(tensors["unet/out"], pipe.unet(
        t("sample"), 499, encoder_hidden_states=t("encoder_hidden_states"),
        timestep_cond=t("timestep_cond")).sample)}
    by_name = {c["name"]: c for c in CASES}
    for name in DRIFT_CASES:
        latents, r32 = raw[name]
        replay = [x.double() for x in r32["noise"]] if "noise" in r32 else None
        r64 = run_pipeline(pipe, base_config, by_name[name], latents.double(), 0, replay)
        for k in ("step_latents", "image"):
            out[f"case/{name}/{k}"] = mf.diff(r32[k], r64[k])
    out["note"] = "max |f32 - f64| (max_abs_diff) and max |f64| (max_abs); the f64 run loads " \
                  "the same weights upcast and reuses the f32 run's latents and noise"
    return out


SCHEMA = {
    "unet/*": "sample [2,4,12,12], encoder_hidden_states [2,77,8] (\"\", case prompt), "
              "timestep_cond [2,32] (get_guidance_scale_embedding of guidance - 1), out; "
              "timestep and guidance scales in JSON",
    "case/<c>/*": "latents [n,4,h,w] (unit variance), prompt_embeds [n,77,8], w_embedding "
                  "[n,32], step_latents [T,n,4,h,w] (after each step), image [n,H,W,3], "
                  "noise [T-1,n,4,h,w] (what LCMScheduler.step drew; absent for one step)",
}


XL_CASES = [
    case("xl_default", prompt_2=None, micro={}),
    case("xl_two_steps", num_inference_steps=2, guidance_scale=3.0, prompt_2="a harbour at night",
         micro={"original_size": (64, 80), "crops_coords_top_left": (4, 8)}),
]


def save_sdxl_model(fixtures: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    base_dir = fixtures / "tiny-sdxl"
    base = StableDiffusionXLPipeline.from_pretrained(base_dir, dtype=torch.float32)
    config = {k: v for k, v in base.unet.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = TIME_COND_PROJ_DIM
    torch.manual_seed(41)
    unet = UNet2DConditionModel.from_config(config)
    missing, unexpected = unet.load_state_dict(base.unet.state_dict(), strict=False)
    assert list(missing) == ["time_embedding.cond_proj.weight"] and not unexpected, \
        (missing, unexpected)
    unet.to(torch.float16)  # stored as tiny-sdxl's weights are
    built = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    folder = out_dir / "tiny-lcm-sdxl"
    if folder.exists():
        shutil.rmtree(folder)
    pipe = StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet,
        scheduler=LCMScheduler.from_config(base.scheduler.config),
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        shutil.rmtree(folder / sub)
        shutil.copytree(base_dir / sub, folder / sub)
    loaded = load_sdxl(folder, torch.float32)
    for k, v in built.items():
        assert torch.equal(loaded.unet.state_dict()[k], v.to(torch.float32)), k
    assert type(loaded.scheduler).__name__ == "LCMScheduler"
    return folder


def load_sdxl(folder, dtype) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_sdxl(pipe, base_config, spec, latents, noise_seed, replay=None):
    pipe.scheduler = LCMScheduler.from_config(base_config, **spec["overrides"])
    captured = {"latents": [], "t": []}

    def on_step_end(_pipe, i, t, kw):
        captured["latents"].append(kw["latents"].detach().clone())
        captured["t"].append(float(t))
        if i == 0:
            for k in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
                captured[k] = kw[k].detach().clone()
        return {}

    tape = mf.NoiseTape(noise_seed, replay)
    with patched_noise(tape), torch.no_grad():
        images = pipe(
            prompt=spec["prompt"], prompt_2=spec["prompt_2"],
            guidance_scale=spec["guidance_scale"], num_inference_steps=spec["num_inference_steps"],
            width=spec["width"], height=spec["height"], num_images_per_prompt=spec["num_images"],
            latents=latents.to(pipe.unet.dtype), output_type="np",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "add_text_embeds",
                                                "add_time_ids"],
            **{k: tuple(v) for k, v in spec["micro"].items()},
        ).images
    assert not pipe.do_classifier_free_guidance
    assert captured["t"] == [float(t) for t in pipe.scheduler.timesteps]
    assert len(tape.drawn) == spec["num_inference_steps"] - 1
    w = torch.tensor(spec["guidance_scale"] - 1).repeat(spec["num_images"])
    result = {k: captured[k] for k in ("prompt_embeds", "add_text_embeds", "add_time_ids")}
    result.update({
        "w_embedding": pipe.get_guidance_scale_embedding(w, embedding_dim=TIME_COND_PROJ_DIM),
        "step_latents": torch.stack(captured["latents"]),
        "image": torch.from_numpy(np.asarray(images)),
        "timesteps": captured["t"],
    })
    if tape.drawn:
        result["noise"] = torch.stack(tape.drawn)
    return result


def sdxl_refs(out_dir: pathlib.Path, refs: pathlib.Path, versions: dict):
    folder = save_sdxl_model(mf.ROOT / "tests" / "fixtures", out_dir)
    pipe = load_sdxl(folder, torch.float32)
    base_config = dict(pipe.scheduler.config)
    tensors, entries, raw = {}, [], {}
    for index, spec in enumerate(XL_CASES):
        n, h, w = spec["num_images"], spec["height"] // 8, spec["width"] // 8
        latents = mf.seeded_randn((n, 4, h, w), 7000 + index)
        result = run_sdxl(pipe, base_config, spec, latents, noise_seed=8000 + index)
        raw[spec["name"]] = (latents, result)
        tensors[f"case/{spec['name']}/latents"] = mf.f32(latents)
        for k in ("prompt_embeds", "add_text_embeds", "add_time_ids", "w_embedding",
                  "step_latents", "image", "noise"):
            if k in result:
                tensors[f"case/{spec['name']}/{k}"] = mf.f32(result[k])
        entries.append({**spec, "timesteps": result["timesteps"],
                        "do_classifier_free_guidance": False})
    pipe64 = load_sdxl(folder, torch.float64)
    drift = {}
    for spec in XL_CASES:
        latents, r32 = raw[spec["name"]]
        replay = [x.double() for x in r32["noise"]] if "noise" in r32 else None
        r64 = run_sdxl(pipe64, base_config, spec, latents.double(), 0, replay)
        for k in ("step_latents", "image"):
            drift[f"case/{spec['name']}/{k}"] = mf.diff(r32[k], r64[k])
    meta = {"generated_by": "tools/make_lcm_fixtures.py", "model_dir": "tests/fixtures/tiny-lcm-sdxl",
            "versions": versions, "cases": entries, "drift": drift,
            "schema": {"case/<c>/*": "as lcm.json's, plus add_text_embeds [n,12] and "
                                     "add_time_ids [n,6] (no unconditional rows)"}}
    for key, v in tensors.items():
        assert torch.isfinite(v).all(), key
    save_file(tensors, str(refs / "lcm-sdxl.safetensors"))
    (refs / "lcm-sdxl.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n",
                                        encoding="utf-8")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=mf.ROOT / "tests" / "fixtures")
    args = parser.parse_args()
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    folder = save_model(mf.ROOT / "tests" / "fixtures", out_dir)
    pipe = load_pipeline(folder, torch.float32)
    base_config = dict(pipe.scheduler.config)
    tensors = {}
    meta = {
        "generated_by": "tools/make_lcm_fixtures.py",
        "model_dir": "tests/fixtures/tiny-lcm",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__,
                     "safetensors": safetensors.__version__, "numpy": np.__version__},
        "schema": SCHEMA,
    }
    unet_refs(pipe, tensors, meta)
    raw = case_refs(pipe, base_config, tensors, meta)
    latents, result = raw["default"]
    meta["stable_diffusion_pipeline_image_diff"] = same_through_stable_diffusion_pipeline(
        folder, CASES[0], latents, result)
    meta["drift"] = drift_refs(folder, base_config, tensors, raw)
    for key, v in tensors.items():
        assert torch.isfinite(v).all(), key
    refs = out_dir / "references"
    refs.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(refs / "lcm.safetensors"))
    (refs / "lcm.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    sdxl_refs(out_dir, refs, meta["versions"])
    print("wrote", folder, out_dir / "tiny-lcm-sdxl", "and", refs / "lcm*.{safetensors,json}")


if __name__ == "__main__":
    main()
