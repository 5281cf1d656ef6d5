#!/usr/bin/env python3
"""Build the tiny random-weight SDXL fixture and its diffusers references.

The SDXL companion of tools/make_fixtures.py (whose tokenizer files, seeds and helpers it
reuses; that script stays the one for SD 1.x/2.x). Same environment, same rules: CPU only,
no network, fixed seeds, byte-identical output on re-runs with the pinned versions.

    .venv/bin/python tools/make_sdxl_fixtures.py            # writes into tests/fixtures/
    .venv/bin/python tools/make_sdxl_fixtures.py --out DIR

What it writes
--------------
tests/fixtures/tiny-sdxl/   An unmodified diffusers folder saved by
                            `StableDiffusionXLPipeline.save_pretrained` (safetensors, f16)
                            with the block structure of stable-diffusion-xl-base-1.0:
                            DownBlock2D + CrossAttnDownBlock2D x2, transformer_layers_per_block
                            [1, 2, 2] (the mid block uses the last), linear projection,
                            `addition_embed_type: "text_time"` (time ids through add_time_proj,
                            concatenated with the pooled text embedding, add_embedding MLP),
                            two text encoders (CLIPTextModel, quick_gelu, pad "<|endoftext|>";
                            CLIPTextModelWithProjection, gelu, pad "!", projection_dim 12 !=
                            hidden 16), force_zeros_for_empty_prompt, EulerDiscreteScheduler
                            configured like the SDXL base repo, VAE scaling 0.13025 with
                            force_upcast.
tests/fixtures/references/sdxl.safetensors + sdxl.json
    f32 references from diffusers after loading the folder back from disk (schema in the
    JSON's "schema" entry), plus a "drift" entry (f32 against f64 on the same inputs).
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
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION, TIME_EMBED = 8, 16, 12, 8

PROMPT_2 = "an oil painting of a harbour in the rain"
NEGATIVE_2 = "oversaturated"


def case(name, scheduler, overrides=None, **kw):
    spec = mf.case(name, scheduler, overrides, **kw)
    spec.setdefault("prompt_2", None)
    spec.setdefault("negative_prompt_2", None)
    spec.setdefault("micro", {})
    return spec


CASES = [
    case("default", "default"),
    case("ddim", "ddim"),
    case("euler_a", "euler_a"),
    case("dpmpp_2m", "dpmpp_2m"),
    case("dpmpp_2m_karras", "dpmpp_2m_karras"),
    case("pndm", "pndm"),
    case("nocfg", "default", guidance_scale=1.0),
    # force_zeros_for_empty_prompt: no negative prompt at all -> zero embeddings
    case("null_negative", "default", negative_prompt=None),
    # an explicit "" is encoded like any text
    case("empty_negative", "default", negative_prompt=""),
    case("prompt_2", "dpmpp_2m", prompt_2=PROMPT_2, negative_prompt_2=NEGATIVE_2),
    case("nonsquare", "euler", width=128, height=96, num_images=2),
    case("longprompt", "default", prompt=mf.LONG_PROMPT),
    case("unicode", "default", prompt=mf.UNICODE_PROMPT),
    case("micro", "default", micro={
        "original_size": [64, 80], "crops_coords_top_left": [4, 8], "target_size": [96, 96],
        "negative_original_size": [48, 56], "negative_crops_coords_top_left": [0, 2],
        "negative_target_size": [96, 88]}),
    # SDXL-Turbo's recipe: Euler ancestral, trailing spacing, no guidance, one step
    case("turbo", "euler_a", {"timestep_spacing": "trailing"}, guidance_scale=0.0,
         num_inference_steps=1, negative_prompt=None),
    # UniPCMultistepScheduler (bh2), the scheduler several SDXL folders ship with
    case("unipc", "unipc"),
]
DRIFT_CASES = ["default", "euler_a", "dpmpp_2m", "null_negative"]


def build_pipeline(vocab, merges, out_dir: pathlib.Path) -> StableDiffusionXLPipeline:
    torch.manual_seed(30)
    unet = UNet2DConditionModel(
        sample_size=12,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        norm_num_groups=32,
        # SDXL stores per-block head counts under attention_head_dim, as SD 2.x does
        attention_head_dim=(2, 2, 4),
        cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,
        transformer_layers_per_block=(1, 2, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TE2_PROJECTION + 6 * TIME_EMBED,
    )
    mf.perturb_constant_params(unet, 130)

    torch.manual_seed(31)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        norm_num_groups=8,
        latent_channels=4,
        layers_per_block=1,
        sample_size=96,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    mf.perturb_constant_params(vae, 131)

    def clip_config(hidden, layers, act):
        return CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
            hidden_act=act, projection_dim=TE2_PROJECTION,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)

    torch.manual_seed(32)
    text_encoder = CLIPTextModel(clip_config(TE1_HIDDEN, 2, "quick_gelu"))
    mf.perturb_constant_params(text_encoder, 132)
    torch.manual_seed(33)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(TE2_HIDDEN, 3, "gelu"))
    mf.perturb_constant_params(text_encoder_2, 133)

    tok_dirs = [out_dir / ".tokenizer-sdxl", out_dir / ".tokenizer_2-sdxl"]
    mf.write_tokenizer(tok_dirs[0], vocab, merges, "<|endoftext|>", "tiny-sdxl/tokenizer")
    mf.write_tokenizer(tok_dirs[1], vocab, merges, "!", "tiny-sdxl/tokenizer_2")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(tok_dirs[0]),
        tokenizer_2=CLIPTokenizer.from_pretrained(tok_dirs[1]),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
    )
    return pipe, tok_dirs


def load_pipeline(folder, dtype) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_model(out_dir: pathlib.Path, vocab, merges) -> pathlib.Path:
    folder = out_dir / "tiny-sdxl"
    if folder.exists():
        shutil.rmtree(folder)
    pipe, tok_dirs = build_pipeline(vocab, merges, out_dir)
    # Stored as float16 (as the SDXL repos' fp16 files); the references load them as float32.
    pipe.to(torch.float16)
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    built = {n: {k: v.detach().clone() for k, v in getattr(pipe, n).state_dict().items()}
             for n in names}
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub, staged in zip(("tokenizer", "tokenizer_2"), tok_dirs):
        shutil.rmtree(folder / sub)
        shutil.move(str(staged), str(folder / sub))
    loaded = load_pipeline(folder, torch.float32)
    for n, state in built.items():
        got = getattr(loaded, n).state_dict()
        assert got.keys() == state.keys(), f"{n}: keys differ after reload"
        for k, v in state.items():
            assert torch.equal(got[k], v.to(torch.float32)), f"{n}.{k} differs after reload"
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.pad_token == "<|endoftext|>"
    return folder


def tokenize(tokenizer, prompt):
    # StableDiffusionXLPipeline.encode_prompt's call, for each tokenizer
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode(pipe, ids1, ids2):
    """encode_prompt with clip_skip=None: both encoders' hidden_states[-2], concatenated on
    the feature axis; the pooled embedding is text_encoder_2's text_embeds."""
    o1 = pipe.text_encoder(ids1, output_hidden_states=True)
    o2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
    return o1.hidden_states[-2], o2.hidden_states[-2], o2.text_embeds


def text_refs(pipe, tensors, meta):
    entries = []
    for name, prompt in mf.PROMPTS.items():
        ids1, ids2 = tokenize(pipe.tokenizer, prompt), tokenize(pipe.tokenizer_2, prompt)
        h1, h2, pooled = encode(pipe, ids1, ids2)
        tensors[f"tok/{name}"] = ids1.to(torch.int64).contiguous()
        tensors[f"tok2/{name}"] = ids2.to(torch.int64).contiguous()
        tensors[f"hidden/{name}"] = mf.f32(h1)
        tensors[f"hidden2/{name}"] = mf.f32(h2)
        tensors[f"pooled/{name}"] = mf.f32(pooled)
        entries.append({"name": name, "prompt": prompt,
                        "truncated": len(pipe.tokenizer(prompt).input_ids) > 77})
    meta["prompts"] = entries


def time_ids(rows):
    return torch.tensor(rows, dtype=torch.float32)


@torch.no_grad()
def unet_refs(pipe, tensors, meta):
    ctx = lambda n: torch.cat([tensors[f"hidden/{n}"], tensors[f"hidden2/{n}"]], dim=-1)  # noqa: E731
    hidden = torch.cat([ctx("empty"), ctx("short")])
    pooled = torch.cat([tensors["pooled/empty"], tensors["pooled/short"]])
    for prefix, (h, w), timestep, seed, ids in [
        ("unet", (12, 12), 501, 7, [[96, 96, 0, 0, 96, 96], [128, 112, 8, 16, 96, 96]]),
        ("unet_ns", (12, 16), 901, 8, [[96, 128, 0, 0, 96, 128], [96, 128, 0, 0, 96, 128]]),
    ]:
        sample = mf.seeded_randn((2, 4, h, w), seed)
        ids = time_ids(ids)
        out = pipe.unet(sample, timestep, encoder_hidden_states=hidden,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        for k, v in [("sample", sample), ("encoder_hidden_states", hidden),
                     ("text_embeds", pooled), ("time_ids", ids), ("out", out)]:
            tensors[f"{prefix}/{k}"] = mf.f32(v)
        meta[prefix] = {"timestep": timestep}


@torch.no_grad()
def vae_refs(pipe, tensors, meta):
    latents = mf.seeded_randn((1, 4, 12, 12), 9) / pipe.vae.config.scaling_factor
    tensors["vae/latents"] = mf.f32(latents)
    tensors["vae/image"] = mf.f32(pipe.vae.decode(latents).sample)


def run_pipeline(pipe, base_config, spec, latents, noise_seed, replay=None):
    pipe.scheduler = mf.make_scheduler(base_config, spec["scheduler"], spec["overrides"])
    captured = {"latents": [], "t": []}

    def on_step_end(_pipe, i, t, kw):
        captured["latents"].append(kw["latents"].detach().clone())
        captured["t"].append(float(t))
        if i == 0:
            for k in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
                captured[k] = kw[k].detach().clone()
        return {}

    micro = {k: tuple(v) for k, v in spec["micro"].items()}
    tape = mf.NoiseTape(noise_seed, replay) if spec["scheduler"] == "euler_a" else None
    with mf.patched_noise(tape) if tape else contextlib.nullcontext():
        with torch.no_grad():
            images = pipe(
                prompt=spec["prompt"],
                prompt_2=spec["prompt_2"],
                negative_prompt=spec["negative_prompt"],
                negative_prompt_2=spec["negative_prompt_2"],
                guidance_scale=spec["guidance_scale"],
                num_inference_steps=spec["num_inference_steps"],
                width=spec["width"],
                height=spec["height"],
                num_images_per_prompt=spec["num_images"],
                latents=latents.to(pipe.unet.dtype),
                output_type="np",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents", "prompt_embeds",
                                                    "add_text_embeds", "add_time_ids"],
                **micro,
            ).images
    assert captured["t"] == [float(t) for t in pipe.scheduler.timesteps]
    result = {
        "prompt_embeds": captured["prompt_embeds"],
        "add_text_embeds": captured["add_text_embeds"],
        "add_time_ids": captured["add_time_ids"],
        "step_latents": torch.stack(captured["latents"]),
        "image": torch.from_numpy(np.asarray(images)),
        "timesteps": captured["t"],
        "scheduler_class": type(pipe.scheduler).__name__,
        "do_classifier_free_guidance": pipe.do_classifier_free_guidance,
    }
    if tape is not None:
        result["noise"] = torch.stack(tape.drawn)
    return result


def case_refs(pipe, base_config, tensors, meta):
    entries, raw = [], {}
    for index, spec in enumerate(CASES):
        n, h, w = spec["num_images"], spec["height"] // 8, spec["width"] // 8
        latents = mf.seeded_randn((n, 4, h, w), 3000 + index)
        result = run_pipeline(pipe, base_config, spec, latents, noise_seed=4000 + index)
        raw[spec["name"]] = (latents, result)
        prefix = f"case/{spec['name']}"
        tensors[f"{prefix}/latents"] = mf.f32(latents)
        for k in ("prompt_embeds", "add_text_embeds", "add_time_ids", "step_latents", "image",
                  "noise"):
            if k in result:
                tensors[f"{prefix}/{k}"] = mf.f32(result[k])
        entries.append({**spec, "scheduler_class": result["scheduler_class"],
                        "do_classifier_free_guidance": result["do_classifier_free_guidance"],
                        "timesteps": result["timesteps"]})
    meta["cases"] = entries
    return raw


@torch.no_grad()
def drift_refs(folder, base_config, tensors, raw):
    pipe = load_pipeline(folder, torch.float64)
    out = {}
    for name in mf.PROMPTS:
        h1, h2, pooled = encode(pipe, tensors[f"tok/{name}"], tensors[f"tok2/{name}"])
        out[f"hidden/{name}"] = mf.diff(tensors[f"hidden/{name}"], h1)
        out[f"hidden2/{name}"] = mf.diff(tensors[f"hidden2/{name}"], h2)
        out[f"pooled/{name}"] = mf.diff(tensors[f"pooled/{name}"], pooled)
    for prefix in ("unet", "unet_ns"):
        t = lambda k: tensors[f"{prefix}/{k}"].double()  # noqa: E731
        o = pipe.unet(t("sample"), 501 if prefix == "unet" else 901,
                      encoder_hidden_states=t("encoder_hidden_states"),
                      added_cond_kwargs={"text_embeds": t("text_embeds"),
                                         "time_ids": t("time_ids")}).sample
        out[f"{prefix}/out"] = mf.diff(tensors[f"{prefix}/out"], o)
    out["vae/image"] = mf.diff(tensors["vae/image"],
                               pipe.vae.decode(tensors["vae/latents"].double()).sample)
    by_name = {c["name"]: c for c in CASES}
    for name in DRIFT_CASES:
        latents, r32 = raw[name]
        replay = [x.double() for x in r32["noise"]] if "noise" in r32 else None
        r64 = run_pipeline(pipe, base_config, by_name[name], latents.double(), 0, replay)
        p = f"case/{name}"
        for k in ("prompt_embeds", "add_text_embeds", "step_latents", "image"):
            out[f"{p}/{k}"] = mf.diff(r32[k], r64[k])
    out["note"] = "max |f32 - f64| (max_abs_diff) and max |f64| (max_abs); the f64 run loads " \
                  "the same weights upcast and reuses the f32 run's latents and noise"
    return out


SCHEMA = {
    "tok/<p>, tok2/<p>": "int64 [1,77] ids of tokenizer / tokenizer_2 for prompts[] <p>",
    "hidden/<p>, hidden2/<p>": "f32 [1,77,hidden] hidden_states[-2] of text_encoder / _2",
    "pooled/<p>": "f32 [1,projection_dim] text_encoder_2 text_embeds",
    "unet/*, unet_ns/*": "sample [2,4,h,w], encoder_hidden_states [2,77,24] (empty, short), "
                         "text_embeds [2,12], time_ids [2,6], out [2,4,h,w]; timestep in JSON",
    "vae/latents, vae/image": "vae.decode input (already / scaling_factor) and raw output",
    "case/<c>/*": "latents [n,4,h,w] (unit variance), prompt_embeds [2n or n,77,24], "
                  "add_text_embeds [2n or n,12], add_time_ids [2n or n,6] (uncond rows first), "
                  "step_latents [T,n,4,h,w], image [n,H,W,3], noise [T,n,4,h,w] (euler_a)",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=mf.ROOT / "tests" / "fixtures")
    args = parser.parse_args()
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    vocab, merges = mf.clip_vocab_and_merges()
    folder = save_model(out_dir, vocab, merges)
    pipe = load_pipeline(folder, torch.float32)
    base_config = dict(pipe.scheduler.config)
    tensors = {}
    meta = {
        "generated_by": "tools/make_sdxl_fixtures.py",
        "model_dir": "tests/fixtures/tiny-sdxl",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__,
                     "safetensors": safetensors.__version__, "numpy": np.__version__},
        "schema": SCHEMA,
    }
    text_refs(pipe, tensors, meta)
    unet_refs(pipe, tensors, meta)
    vae_refs(pipe, tensors, meta)
    raw = case_refs(pipe, base_config, tensors, meta)
    meta["drift"] = drift_refs(folder, base_config, tensors, raw)
    for key, t in tensors.items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), key
        if key.startswith("case/") and key.endswith("/image"):
            assert float(t.std()) > 0.02, f"{key} is nearly constant"
    refs = out_dir / "references"
    refs.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(refs / "sdxl.safetensors"))
    (refs / "sdxl.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    mf.make_readable([folder, refs / "sdxl.safetensors"])
    print(f"sdxl: model {mf.folder_size(folder) / 1e6:.2f} MB, references "
          f"{(refs / 'sdxl.safetensors').stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
