#!/usr/bin/env python3
"""Generate diffusers reference trajectories for `tests/schedulers.rs`.

Run with the project's Python environment (torch + diffusers 0.42.1, made with
`python3 -m venv .venv && .venv/bin/pip install -r tools/requirements.txt`):

    .venv/bin/python tools/make_scheduler_refs.py

For every case it builds the scheduler exactly as a diffusers pipeline would,
`Class.from_config(BASE_CONFIG, **overrides)` followed by `set_timesteps(steps)`,
then runs a full denoising loop on a small [2, 4, 3, 5] float32 sample with a
deterministic synthetic "model":

    model(x, t) = 0.3 * x + (0.05 * cos(t / 97)) * x.flip(-1)

where `x` is the output of `scale_model_input` and `t` the scheduler timestep.
The Rust test recomputes that model with the same float32 operations. The grid
cases use a [2, 4, 3, 5] sample; the extra configurations use its first image only
([1, 4, 3, 5]) to keep the fixture near 1 MB.

Writes
  tests/fixtures/references/schedulers.safetensors  (float32 tensors)
  tests/fixtures/references/schedulers.json         (case list)

Tensors (all float32):
  latents                    initial unit-variance noise, [2, 4, 3, 5] (torch seed 0)
  table.<name>               alphas_cumprod tables for a few beta configs
  <case>.timesteps           scheduler.timesteps
  <case>.sigmas              scheduler.sigmas (Euler, Euler ancestral, DPM-Solver)
  <case>.init_noise_sigma    [1]
  <case>.scaled              [n, 2, 4, 3, 5] scale_model_input outputs (Euler kinds only;
                             the other schedulers return their input unchanged)
  <case>.prev                [n, 2, 4, 3, 5] prev_sample after every step
  <case>.noise               [n, 2, 4, 3, 5] noise drawn by EulerAncestral's step (LCMScheduler's: n - 1)
  add_noise_original         a second unit-variance tensor, [2, 4, 3, 5] (torch seed 1)
  <case>.add_noise           [k, 2, 4, 3, 5] add_noise(add_noise_original, latents,
                             timesteps[i:i+1]) after set_begin_index(i), for the step
                             indices i listed in the case's "add_noise_steps" (first,
                             middle, last): what image-to-image does for its first step
  sweep.<kind>.<spacing>.timesteps / .sigmas
                             timesteps (and sigmas) for many step counts, concatenated
                             in the order of `sweep_steps`
"""

import json
import math
import os
import pathlib

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
import diffusers.schedulers.scheduling_lcm as lcm_module
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

diffusers.utils.logging.set_verbosity_error()

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests" / "fixtures" / "references"

# stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler/scheduler_config.json
BASE_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# name used by sdserve's SchedulerKind -> (diffusers class, overrides the kind implies)
KINDS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "pndm": (PNDMScheduler, {}),
    "lcm": (LCMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
# Schedulers whose step draws noise: the module whose randn_tensor is recorded, and how
# many draws a loop of n steps makes (LCMScheduler draws none at its last step).
NOISY = {"euler_a": (euler_a_module, lambda n: n), "lcm": (lcm_module, lambda n: max(n - 1, 0))}
# Per-kind sweep overrides: LCM's schedule is a subset of its `original_inference_steps`
# (50 by default), fewer than the longest sweep.
SWEEP_OVERRIDES = {"lcm": {"original_inference_steps": 100}}
SCALES_INPUT = {"euler", "euler_a", "lms"}
HAS_SIGMAS = {"euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "unipc"}

SHAPE = (2, 4, 3, 5)
SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["epsilon", "v_prediction"]
GRID_STEPS = [1, 4, 25]

TRAINED_BETAS = [round(float(b), 8) for b in np.linspace(1e-3, 0.05, 100) ** 1.5 / 0.05**0.5]

EXTRAS = [
    # beta schedules
    ("ddim", {"beta_schedule": "squaredcos_cap_v2"}, [8]),
    ("euler", {"beta_schedule": "squaredcos_cap_v2"}, [8]),
    ("euler_a", {"beta_schedule": "squaredcos_cap_v2"}, [8]),
    ("dpmpp_2m_karras", {"beta_schedule": "squaredcos_cap_v2"}, [8]),
    ("pndm", {"beta_schedule": "squaredcos_cap_v2"}, [8]),
    ("ddim", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, [8]),
    ("euler_a", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, [8]),
    ("dpmpp_2m", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, [8]),
    ("ddim", {"num_train_timesteps": 100, "trained_betas": TRAINED_BETAS}, [8]),
    ("euler", {"num_train_timesteps": 100, "trained_betas": TRAINED_BETAS}, [8]),
    ("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
              "prediction_type": "v_prediction"}, [8]),
    ("euler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
               "prediction_type": "v_prediction"}, [8]),
    ("euler_a", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                 "prediction_type": "v_prediction"}, [8]),
    ("dpmpp_2m", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                  "prediction_type": "v_prediction"}, [8]),
    # DDIM / PNDM options
    ("ddim", {"set_alpha_to_one": True}, [8]),
    ("pndm", {"set_alpha_to_one": True}, [8]),
    ("ddim", {"steps_offset": 0}, [8]),
    ("pndm", {"steps_offset": 0}, [8]),
    ("euler", {"steps_offset": 0, "timestep_spacing": "leading"}, [8]),
    ("ddim", {"prediction_type": "sample", "clip_sample": True}, [8]),
    ("ddim", {"clip_sample": True, "clip_sample_range": 0.5}, [8]),
    ("pndm", {"skip_prk_steps": False}, [4, 5, 10]),
    ("pndm", {"skip_prk_steps": False, "timestep_spacing": "trailing",
              "prediction_type": "v_prediction"}, [8]),
    ("pndm", {"skip_prk_steps": False, "timestep_spacing": "linspace"}, [7]),
    # odd step counts (rounding of the spacings)
    ("ddim", {"timestep_spacing": "trailing"}, [3, 7]),
    ("pndm", {"timestep_spacing": "linspace"}, [3, 7]),
    ("dpmpp_2m", {"timestep_spacing": "trailing"}, [3, 7]),
    ("euler", {"timestep_spacing": "trailing"}, [3, 7]),
    # DPM-Solver options
    ("dpmpp_2m", {"solver_order": 1}, [8]),
    ("dpmpp_2m", {"solver_order": 3}, [8, 25]),
    ("dpmpp_2m", {"lower_order_final": False}, [8]),
    ("dpmpp_2m", {"euler_at_final": True}, [25]),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, [8, 25]),
    ("dpmpp_2m_karras", {"final_sigmas_type": "sigma_min"}, [25]),
    ("dpmpp_2m", {"solver_type": "heun"}, [8]),
    ("dpmpp_2m", {"lambda_min_clipped": -2.5}, [8]),
    ("dpmpp_2m", {"prediction_type": "sample"}, [8]),
    ("dpmpp_2m", {"algorithm_type": "deis", "final_sigmas_type": "sigma_min"}, [4]),
    # Euler options
    ("euler", {"final_sigmas_type": "sigma_min"}, [8]),
    ("euler", {"use_karras_sigmas": True}, [1, 8, 25]),
    ("euler", {"use_karras_sigmas": True, "timestep_spacing": "leading"}, [8]),
    ("euler", {"use_karras_sigmas": True, "timestep_spacing": "trailing",
               "prediction_type": "v_prediction"}, [8]),
    ("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, [8]),
    ("euler", {"prediction_type": "sample"}, [8]),
    ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, [8]),
    # LMS options
    ("lms", {"use_karras_sigmas": True}, [1, 8, 25]),
    ("lms", {"use_karras_sigmas": True, "prediction_type": "v_prediction",
             "timestep_spacing": "trailing"}, [8]),
    ("lms", {"prediction_type": "sample"}, [8]),
    ("lms", {"beta_schedule": "squaredcos_cap_v2"}, [8]),
    ("lms", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, [8]),
    # LCM options
    ("lcm", {"original_inference_steps": 100}, [8, 64]),
    ("lcm", {"prediction_type": "sample", "clip_sample": True}, [4]),
    ("lcm", {"timestep_scaling": 5.0, "set_alpha_to_one": True}, [4]),
    # UniPC options
    ("unipc", {"solver_order": 1}, [8]),
    ("unipc", {"solver_order": 3}, [8, 25]),
    # bh1 and the noise-prediction form divide by zero at a final sigma of 0 (diffusers
    # returns NaN there; sdserve refuses the combination): these end at sigma_min.
    ("unipc", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, [8]),
    ("unipc", {"predict_x0": False, "final_sigmas_type": "sigma_min"}, [8]),
    ("unipc", {"predict_x0": False, "prediction_type": "v_prediction", "solver_order": 3,
               "final_sigmas_type": "sigma_min"}, [8]),
    ("unipc", {"use_karras_sigmas": True}, [8, 25]),
    ("unipc", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, [8]),
    ("unipc", {"final_sigmas_type": "sigma_min", "lower_order_final": False}, [8]),
    ("unipc", {"disable_corrector": [0, 2]}, [8]),
    ("unipc", {"prediction_type": "sample"}, [8]),
    ("unipc", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
               "prediction_type": "v_prediction"}, [8]),
    ("unipc", {"beta_schedule": "squaredcos_cap_v2"}, [8]),
]

SWEEP_STEPS = list(range(1, 31)) + [37, 50, 64, 100]


def synthetic_model(x: torch.Tensor, t) -> torch.Tensor:
    c = 0.05 * math.cos(float(t) / 97.0)
    return x * 0.3 + x.flip(-1) * c


class NoiseRecorder:
    """Stands in for `randn_tensor` in a scheduler module (NOISY) and keeps what it drew."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        noise = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        if dtype is not None:
            noise = noise.to(dtype)
        self.drawn.append(noise.clone())
        return noise


def build(kind: str, overrides: dict, steps: int):
    cls, implied = KINDS[kind]
    scheduler = cls.from_config(BASE_CONFIG, **{**implied, **overrides})
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):
        # Step `i` of the loop uses sigma `i`, as in sdserve. Without this diffusers
        # finds the first step's index by value and, when the first timestep is
        # repeated (Karras sigmas with squaredcos_cap_v2), starts at index 1 and
        # runs off the end of `sigmas`.
        scheduler.set_begin_index(0)
    return scheduler


def f32(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32)).contiguous()


def run_case(name: str, kind: str, overrides: dict, steps: int, latents: torch.Tensor, tensors: dict):
    scheduler = build(kind, overrides, steps)
    recorder = None
    if kind in NOISY:
        recorder = NoiseRecorder(seed=1234 + steps)
        NOISY[kind][0].randn_tensor = recorder

    timesteps = scheduler.timesteps
    init_noise_sigma = float(scheduler.init_noise_sigma)
    x = latents * scheduler.init_noise_sigma
    scaled, prevs = [], []
    for t in timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = synthetic_model(x_in, t)
        x = scheduler.step(out, t, x).prev_sample
        scaled.append(x_in)
        prevs.append(x)

    keys = {}

    def put(suffix, value):
        key = f"{name}.{suffix}"
        tensors[key] = value
        keys[suffix] = key

    assert all(torch.isfinite(p).all() for p in prevs), f"{name}: diffusers' loop is not finite"
    put("timesteps", f32(timesteps.to(torch.float64).numpy()))
    if kind in HAS_SIGMAS:
        put("sigmas", f32(scheduler.sigmas.numpy()))
    put("init_noise_sigma", f32([init_noise_sigma]))
    if len(prevs) > 0:
        if kind in SCALES_INPUT:
            put("scaled", torch.stack(scaled).to(torch.float32).contiguous())
        put("prev", torch.stack(prevs).to(torch.float32).contiguous())
    if recorder is not None:
        assert len(recorder.drawn) == NOISY[kind][1](len(prevs))
        if recorder.drawn:
            put("noise", torch.stack(recorder.drawn).to(torch.float32).contiguous())

    original = tensors["add_noise_original"][: latents.shape[0]]
    noise_steps = sorted({0, len(timesteps) // 2, len(timesteps) - 1})
    noised = []
    for i in noise_steps:
        s = build(kind, overrides, steps)
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(i)
        noised.append(s.add_noise(original, latents, s.timesteps[i : i + 1]))
    put("add_noise", torch.stack(noised).to(torch.float32).contiguous())
    return {
        "name": name,
        "kind": kind,
        "class": type(scheduler).__name__,
        "overrides": {**KINDS[kind][1], **overrides},
        "steps": steps,
        "num_timesteps": len(timesteps),
        "add_noise_steps": noise_steps,
        "keys": keys,
    }


def main():
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tensors = {}
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    tensors["latents"] = latents.contiguous()
    original = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    tensors["add_noise_original"] = original.contiguous()

    tables = []
    for tname, cls, ov in [
        ("scaled_linear", DDIMScheduler, {}),
        ("linear", DDIMScheduler, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
        ("squaredcos_cap_v2", DDIMScheduler, {"beta_schedule": "squaredcos_cap_v2"}),
        ("rescaled_zero_snr", DDIMScheduler, {"rescale_betas_zero_snr": True}),
    ]:
        s = cls.from_config(BASE_CONFIG, **ov)
        key = f"table.{tname}"
        tensors[key] = f32(s.alphas_cumprod.numpy())
        tables.append({"name": tname, "overrides": ov, "key": key})

    cases = []
    for kind in KINDS:
        for spacing in SPACINGS:
            for prediction in PREDICTIONS:
                for steps in GRID_STEPS:
                    ov = {"timestep_spacing": spacing, "prediction_type": prediction}
                    name = f"{kind}.{spacing}.{prediction}.{steps}"
                    cases.append(run_case(name, kind, ov, steps, latents, tensors))
    for i, (kind, ov, step_list) in enumerate(EXTRAS):
        for steps in step_list:
            name = f"extra{i:02}.{kind}.{steps}"
            # A single image keeps the fixture small.
            cases.append(run_case(name, kind, ov, steps, latents[:1], tensors))

    sweeps = []
    for kind in KINDS:
        for spacing in SPACINGS:
            ts, sig = [], []
            for steps in SWEEP_STEPS:
                s = build(kind, {**SWEEP_OVERRIDES.get(kind, {}), "timestep_spacing": spacing},
                          steps)
                ts.append(s.timesteps.to(torch.float64).numpy())
                if kind in HAS_SIGMAS:
                    sig.append(s.sigmas.numpy())
            entry = {"kind": kind, "overrides": {**KINDS[kind][1], **SWEEP_OVERRIDES.get(kind, {}),
                                                 "timestep_spacing": spacing}}
            key = f"sweep.{kind}.{spacing}"
            tensors[key + ".timesteps"] = f32(np.concatenate(ts))
            entry["timesteps"] = key + ".timesteps"
            if sig:
                tensors[key + ".sigmas"] = f32(np.concatenate(sig))
                entry["sigmas"] = key + ".sigmas"
            sweeps.append(entry)

    save_file(tensors, str(OUT_DIR / "schedulers.safetensors"))
    os.chmod(OUT_DIR / "schedulers.safetensors", 0o644)
    meta = {
        "generated_by": "tools/make_scheduler_refs.py",
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "base_config": BASE_CONFIG,
        "sample_shape": list(SHAPE),
        "model": "0.3 * x + (0.05 * cos(t / 97)) * x.flip(-1), x = scale_model_input output",
        "latents": "latents",
        "tables": tables,
        "cases": cases,
        "sweep_steps": SWEEP_STEPS,
        "sweeps": sweeps,
    }
    (OUT_DIR / "schedulers.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = (OUT_DIR / "schedulers.safetensors").stat().st_size
    print(f"{len(cases)} cases, {len(tensors)} tensors, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
