#!/usr/bin/env python3
"""Build the tiny random-weight Stable Diffusion fixtures and their diffusers references.

Run with the project's Python environment (versions pinned in tools/requirements.txt):

    python -m venv venv && venv/bin/pip install -r tools/requirements.txt
    venv/bin/python tools/make_fixtures.py            # writes into tests/fixtures/
    venv/bin/python tools/make_fixtures.py --out DIR  # writes into DIR instead

Everything runs on the CPU (about 20 s on two cores) and needs no network (the Hugging Face
hub is never contacted: HF_HUB_OFFLINE=1). All randomness comes from fixed torch seeds, so
re-running the script with the same versions on the same machine rewrites byte-identical
files (weights and references).

What it writes
--------------
tests/fixtures/tiny-sd1/    An unmodified diffusers folder saved by
                            `StableDiffusionPipeline.save_pretrained` (safetensors, float32):
                            SD1.x layout (CrossAttnDownBlock2D x3 + DownBlock2D, int
                            attention_head_dim, quick_gelu CLIP, PNDM scheduler configured like
                            stable-diffusion-v1-5, tokenizer pad token "<|endoftext|>").
                            text_encoder/model.safetensors keys are written as current
                            transformers writes them (no `text_model.` prefix).
tests/fixtures/tiny-sd2/    SD2.x layout: v_prediction, use_linear_projection, list
                            attention_head_dim, layers_per_block 2, gelu CLIP with 3 layers,
                            DDIM scheduler configured like stable-diffusion-2-1, pad token "!".
                            All weights stored as float16; text_encoder keys rewritten with the
                            old `text_model.` prefix that older transformers versions saved.
    Both tokenizer/ folders hold the real CLIP BPE files (vocab.json, merges.txt,
    special_tokens_map.json, tokenizer_config.json as the SD repos publish them, no
    tokenizer.json), rebuilt from clip-anytorch's bpe_simple_vocab_16e6.txt.gz exactly as
    OpenAI CLIP's SimpleTokenizer builds its vocabulary.

tests/fixtures/references/sd1.safetensors + sd1.json,  sd2.safetensors + sd2.json
    Reference outputs computed in float32 on the CPU by diffusers/transformers after loading
    the model folder back from disk (`StableDiffusionPipeline.from_pretrained`). The JSON
    file describes every case and names the tensors (see `SCHEMA` below, copied into the
    "schema" entry of the JSON). Token ids are int64, everything else float32.

    tok/<p>, emb/<p>            tokenizer ids [1,77] and text_encoder(ids)[0] [1,77,hidden]
    unet/*, unet_ns/*           one UNet call on 8x8 latents, one on 8x12 latents
    vae/latents, vae/image      one vae.decode call
    sched/<kind>/<spacing>/<steps>/{timesteps,sigmas}
                                scheduler tables for 5 and 20 steps
    case/<c>/{latents,prompt_embeds,step_latents,image[,noise]}
                                full StableDiffusionPipeline runs
    plus a "drift" entry in the JSON: the same computations repeated in float64 and the max
    abs difference to the float32 outputs, to choose test tolerances from measured numbers.

Tokenizer note: transformers 5 only has the `tokenizers`-backed CLIPTokenizer (normalizer
NFC + `\s+` -> " " + lowercase; no ftfy, no HTML unescaping, so "&amp;" stays 3 tokens and
curly quotes are not straightened, unlike OpenAI CLIP). With SD2's pad token "!" that
token becomes a special added token, so every "!" in a prompt encodes as id 0 ("!"
without "</w>") instead of the BPE result. Each prompt's JSON entry records whether the
ids equal OpenAI CLIP's SimpleTokenizer ones.
"""

import argparse
import contextlib
import gzip
import importlib.util
import json
import os
import shutil
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

import diffusers  # noqa: E402
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
    UNet2DConditionModel,
)

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = pathlib.Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------

# stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD1_SCHEDULER = (PNDMScheduler, {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
})

# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json. Its leftover
# "skip_prk_steps" is no DDIMScheduler argument, but diffusers keeps it in the config
# (PNDMScheduler is a compatible class), saves it, and PNDMScheduler.from_config picks it up.
SD2_SCHEDULER = (DDIMScheduler, {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
})

# sdserve's --scheduler names -> (diffusers class, overrides the name implies). Every
# scheduler is built as users do: `Class.from_config(pipe.scheduler.config, **overrides)`.
KINDS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
HAS_SIGMAS = {"euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "unipc"}
SPACINGS = ["leading", "trailing", "linspace"]
TABLE_STEPS = [5, 20]

LONG_PROMPT = (
    "an enormous ancient library carved into the side of a snowy mountain at sunrise, "
    "thousands of leather bound books on endless wooden shelves, warm golden light streaming "
    "through tall gothic windows, tiny robed scholars climbing rolling ladders, floating "
    "lanterns, dust in the air, intricate stone arches, ivy covered columns, a sleeping cat "
    "on a velvet armchair, a brass telescope pointed at the sky, maps and globes everywhere, "
    "highly detailed digital painting, trending on artstation, volumetric lighting, 8k"
)
UNICODE_PROMPT = (
    "Café crème brûle\u0301e à Zürich, naïve Ünïcödé — “smart quotes” "
    "東京の夜景 🌃🐱 Ελληνικά"
)
PUNCT_PROMPT = "  A RED Fox!!  jumps over 3 lazy DOGS...\t(4K, HDR) &amp; it's 10:30pm -- NOW?!  "

# Prompts whose tokenization and embeddings are stored (tok/<name>, emb/<name>).
PROMPTS = {
    "short": "a photo of an astronaut riding a horse",
    "empty": "",
    "long": LONG_PROMPT,
    "unicode": UNICODE_PROMPT,
    "punct": PUNCT_PROMPT,
}

CASE_PROMPT = "a watercolor painting of a lighthouse at dusk, dramatic clouds"
CASE_NEGATIVE = "blurry, low quality"


def case(name, scheduler, overrides=None, **kw):
    spec = {
        "name": name,
        "prompt": CASE_PROMPT,
        "negative_prompt": CASE_NEGATIVE,
        "guidance_scale": 7.5,
        "num_inference_steps": 5,
        "scheduler": scheduler,
        "overrides": dict(overrides or {}),
        "width": 96,
        "height": 96,
        "num_images": 1,
    }
    spec.update(kw)
    return spec


SD1_CASES = [
    case("default", "default"),
    case("ddim", "ddim"),
    case("euler", "euler"),
    case("euler_a", "euler_a"),
    case("dpmpp_2m", "dpmpp_2m"),
    case("dpmpp_2m_karras", "dpmpp_2m_karras"),
    case("pndm", "pndm"),
    case("nocfg", "ddim", guidance_scale=1.0),
    case("nonsquare", "euler", width=128, height=96, num_images=2),
    case("longprompt", "dpmpp_2m", prompt=LONG_PROMPT),
    case("unicode", "euler", prompt=UNICODE_PROMPT),
    case("lms", "lms"),
    case("unipc", "unipc"),
]
SD2_CASES = [
    case("default", "default"),
    case("euler_trailing", "euler", {"timestep_spacing": "trailing"}),
    case("euler_a", "euler_a"),
    case("dpmpp_2m_linspace", "dpmpp_2m", {"timestep_spacing": "linspace"}),
    case("dpmpp_2m_karras", "dpmpp_2m_karras"),
    case("ddim_trailing", "ddim", {"timestep_spacing": "trailing"}),
    case("lms", "lms"),
    case("unipc", "unipc"),
]
# Cases repeated in float64 for the "drift" entry.
SD1_DRIFT_CASES = ["euler", "dpmpp_2m", "euler_a"]
SD2_DRIFT_CASES = ["default", "euler_trailing", "dpmpp_2m_linspace"]


# ---------------------------------------------------------------------------------------
# CLIP tokenizer files
# ---------------------------------------------------------------------------------------

def clip_package_dir() -> pathlib.Path:
    # `import clip` pulls in torchvision and pkg_resources; only the data file is needed.
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("clip-anytorch is not installed (pip install -r tools/requirements.txt)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def bytes_to_unicode() -> dict:
    """The byte -> printable character table of GPT-2 / CLIP byte-level BPE."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_and_merges():
    """Vocabulary and merges exactly as OpenAI CLIP's `SimpleTokenizer.__init__` builds them
    (clip/simple_tokenizer.py), which is also what openai/clip-vit-large-patch14 publishes."""
    lines = gzip.open(clip_package_dir() / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8")
    lines = lines.split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408, len(vocab)
    return vocab, merges


def openai_clip_tokenizer():
    """OpenAI's own tokenizer (ftfy + html.unescape + BPE), loaded from the clip-anytorch
    file without importing the `clip` package. Used only to document differences."""
    spec = importlib.util.spec_from_file_location(
        "clip_simple_tokenizer", clip_package_dir() / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def _added(content, with_type):
    token = {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
             "single_word": False}
    return {"__type": "AddedToken", **token} if with_type else token


def write_tokenizer(folder: pathlib.Path, vocab, merges, pad_token: str, name: str):
    """The four files of the tokenizer/ folder of stable-diffusion-v1-5 (pad "<|endoftext|>")
    and stable-diffusion-2-1 (pad "!"). Whatever transformers' save_pretrained wrote there
    (transformers 5 writes tokenizer.json) is removed first."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")
    special = {
        "bos_token": _added("<|startoftext|>", False),
        "eos_token": _added("<|endoftext|>", False),
        "pad_token": pad_token,
        "unk_token": _added("<|endoftext|>", False),
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "add_prefix_space": False,
        "bos_token": _added("<|startoftext|>", True),
        "do_lower_case": True,
        "eos_token": _added("<|endoftext|>", True),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": name,
        "pad_token": pad_token,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added("<|endoftext|>", True),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def perturb_constant_params(model: torch.nn.Module, seed: int):
    """Default init leaves norm weights at 1 and many biases at 0; a Rust port that swapped
    or dropped them would still match. Give every constant parameter some spread."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        flat = p.detach().flatten()
        if flat.numel() > 0 and bool((flat == flat[0]).all()):
            std = 0.1 if float(flat[0]) != 0.0 else 0.05
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


def build_pipeline(kind: str, vocab, merges, tok_dir: pathlib.Path) -> StableDiffusionPipeline:
    sd2 = kind == "sd2"
    lpb = 2 if sd2 else 1

    torch.manual_seed(1 if sd2 else 0)
    unet = UNet2DConditionModel(
        # 96 px: with 32 groups on 32 channels the innermost 12/8 -> 2x2 latents keep
        # GroupNorm at >1 value per group (torch refuses 1x1 there).
        sample_size=12,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        # 32 groups as every real SD UNet has: candle 0.11's up blocks ignore the
        # configured norm_num_groups and always use 32 (sdserve refuses other values).
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=lpb,
        norm_num_groups=32,
        # SD1.5 stores an int here, SD2.x a per-block list; diffusers uses either as the
        # number of heads (UNet2DConditionModel.__init__: num_attention_heads = attention_head_dim)
        attention_head_dim=[2, 2, 4, 4] if sd2 else 2,
        cross_attention_dim=8,
        use_linear_projection=sd2,
        # as in stable-diffusion-2-1's unet/config.json (a no-op in float32)
        upcast_attention=sd2,
    )
    perturb_constant_params(unet, 100 + sd2)

    torch.manual_seed(10 + sd2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        norm_num_groups=8,
        latent_channels=4,
        layers_per_block=lpb,
        sample_size=96,
        scaling_factor=0.18215,
    )
    perturb_constant_params(vae, 110 + sd2)

    torch.manual_seed(20 + sd2)
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=3 if sd2 else 2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=8,
        # the ids the SD repos' text_encoder/config.json carry (from the original CLIP configs)
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    text_encoder = CLIPTextModel(text_config)
    perturb_constant_params(text_encoder, 120 + sd2)

    write_tokenizer(tok_dir, vocab, merges, "!" if sd2 else "<|endoftext|>",
                    f"tiny-{kind}/tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    cls, config = SD2_SCHEDULER if sd2 else SD1_SCHEDULER
    scheduler = cls.from_config(config)

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def add_text_model_prefix(path: pathlib.Path):
    """Rename `embeddings.*` -> `text_model.embeddings.*` etc., the layout transformers < 5
    saved (and the one the SD 1.x/2.x repos on the hub have)."""
    tensors = load_file(path)
    assert not any(k.startswith("text_model.") for k in tensors), "already prefixed"
    renamed = {f"text_model.{k}": v.contiguous() for k, v in sorted(tensors.items())}
    save_file(renamed, path, metadata={"format": "pt"})


def save_model(kind: str, out_dir: pathlib.Path, vocab, merges) -> dict:
    folder = out_dir / f"tiny-{kind}"
    if folder.exists():
        shutil.rmtree(folder)
    staging_tok = out_dir / f".tokenizer-{kind}"
    pipe = build_pipeline(kind, vocab, merges, staging_tok)
    info = {}
    if kind == "sd2":
        # All weights stored as float16; the references load them back as float32.
        pipe.to(torch.float16)
    built = {name: {k: v.detach().clone() for k, v in getattr(pipe, name).state_dict().items()}
             for name in ("unet", "vae", "text_encoder")}
    pipe.save_pretrained(folder, safe_serialization=True)
    info["transformers_wrote_tokenizer_files"] = sorted(p.name for p in (folder / "tokenizer").iterdir())
    # Replace what transformers 5 writes (tokenizer.json + a v5 tokenizer_config.json) with
    # the files the SD repos ship.
    shutil.rmtree(folder / "tokenizer")
    shutil.move(str(staging_tok), str(folder / "tokenizer"))

    te_path = folder / "text_encoder" / "model.safetensors"
    with safetensors.safe_open(te_path, "pt") as f:
        info["text_encoder_keys_as_saved"] = sorted(f.keys())[:3]
    if kind == "sd2":
        before = {k: v.clone() for k, v in CLIPTextModel.from_pretrained(
            folder / "text_encoder", dtype=torch.float32).state_dict().items()}
        add_text_model_prefix(te_path)
        after = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).state_dict()
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), f"prefixed text encoder differs at {k}"
        info["text_encoder_key_prefix"] = "text_model."
    else:
        info["text_encoder_key_prefix"] = ""
    with safetensors.safe_open(te_path, "pt") as f:
        info["text_encoder_keys_in_fixture"] = sorted(f.keys())[:3]

    # The folder must load back through diffusers with exactly the weights built above
    # (no missing/renamed keys silently re-initialised), and the tokenizer folder must load.
    loaded = load_pipeline(folder, torch.float32)
    for name, state in built.items():
        got = getattr(loaded, name).state_dict()
        assert got.keys() == state.keys(), f"{kind} {name}: keys differ after reload"
        for k, v in state.items():
            assert torch.equal(got[k], v.to(torch.float32)), f"{kind} {name}.{k} differs after reload"
    assert type(loaded.tokenizer).__name__ == "CLIPTokenizer" and len(loaded.tokenizer) == 49408
    return info


def load_pipeline(folder: pathlib.Path, dtype) -> StableDiffusionPipeline:
    # The path users take: diffusers reads model_index.json and each component folder.
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    return pipe


# ---------------------------------------------------------------------------------------
# Reference computations
# ---------------------------------------------------------------------------------------

def f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().clone()


def seeded_randn(shape, seed) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def make_scheduler(base_config, name: str, overrides: dict):
    if name == "default":
        # the model's own scheduler class (scheduler/scheduler_config.json "_class_name")
        cls, implied = getattr(diffusers, base_config["_class_name"]), {}
    else:
        cls, implied = KINDS[name]
    return cls.from_config(base_config, **{**implied, **overrides})


def tokenize(pipe, prompt: str) -> torch.Tensor:
    # StableDiffusionPipeline.encode_prompt's call
    return pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode(pipe, ids: torch.Tensor) -> torch.Tensor:
    # encode_prompt: text_encoder(ids, attention_mask=None)[0], i.e. last_hidden_state
    # (final_layer_norm applied; clip_skip is None)
    return pipe.text_encoder(ids)[0]


def openai_ids(st, prompt: str, pad_id: int):
    ids = st.encode(prompt)[:75]
    ids = [49406] + ids + [49407]
    return ids + [pad_id] * (77 - len(ids))


def tokenization_refs(pipe, tensors, meta):
    st = openai_clip_tokenizer()
    entries = []
    for name, prompt in PROMPTS.items():
        ids = tokenize(pipe, prompt)
        untruncated = pipe.tokenizer(prompt).input_ids
        tensors[f"tok/{name}"] = ids.to(torch.int64).contiguous()
        tensors[f"emb/{name}"] = f32(encode(pipe, ids))
        reference = openai_ids(st, prompt, pipe.tokenizer.pad_token_id)
        entry = {
            "name": name,
            "prompt": prompt,
            "tokens": f"tok/{name}",
            "embeddings": f"emb/{name}",
            "input_ids": ids[0].tolist(),
            "untruncated_length": len(untruncated),
            "truncated": len(untruncated) > 77,
            "tokens_text": pipe.tokenizer.convert_ids_to_tokens(ids[0].tolist()),
            "matches_openai_clip": reference == ids[0].tolist(),
        }
        if not entry["matches_openai_clip"]:
            entry["openai_clip_input_ids"] = reference
        entries.append(entry)
    meta["prompts"] = entries


@torch.no_grad()
def unet_refs(pipe, tensors, meta):
    cond = tensors["emb/short"]
    uncond = tensors["emb/empty"]
    hidden = torch.cat([uncond, cond])
    for prefix, (h, w), timestep, seed in [("unet", (12, 12), 501, 7), ("unet_ns", (12, 16), 901, 8)]:
        sample = seeded_randn((2, 4, h, w), seed)
        # UNet2DConditionModel.forward; 12x16 latents are not a multiple of 2**3, which takes
        # the `forward_upsample_size` path (upsamplers get the skip connection's size).
        out = pipe.unet(sample, timestep, encoder_hidden_states=hidden).sample
        tensors[f"{prefix}/sample"] = f32(sample)
        tensors[f"{prefix}/timestep"] = torch.tensor([float(timestep)], dtype=torch.float32)
        tensors[f"{prefix}/encoder_hidden_states"] = f32(hidden)
        tensors[f"{prefix}/out"] = f32(out)
        meta[prefix] = {
            "timestep": timestep,
            "sample": f"{prefix}/sample",
            "timestep_key": f"{prefix}/timestep",
            "encoder_hidden_states": f"{prefix}/encoder_hidden_states",
            "encoder_hidden_states_from": ["emb/empty", "emb/short"],
            "out": f"{prefix}/out",
        }


@torch.no_grad()
def vae_refs(pipe, tensors, meta):
    sf = pipe.vae.config.scaling_factor
    # what StableDiffusionPipeline passes to vae.decode: final latents / scaling_factor
    latents = seeded_randn((1, 4, 12, 12), 9) / sf
    image = pipe.vae.decode(latents).sample
    tensors["vae/latents"] = f32(latents)
    tensors["vae/image"] = f32(image)
    meta["vae"] = {
        "latents": "vae/latents",
        "image": "vae/image",
        "note": "latents = randn(seed 9) / scaling_factor, passed as-is to vae.decode; "
                "image is decode(...).sample before the (x/2+0.5).clamp(0,1) postprocessing",
    }


def scheduler_tables(pipe, base_config, tensors, meta):
    entries = []
    for kind in KINDS:
        for spacing in SPACINGS:
            for steps in TABLE_STEPS:
                s = make_scheduler(base_config, kind, {"timestep_spacing": spacing})
                s.set_timesteps(steps)
                key = f"sched/{kind}/{spacing}/{steps}"
                tensors[key + "/timesteps"] = f32(s.timesteps.to(torch.float64))
                entry = {
                    "name": kind,
                    "class": type(s).__name__,
                    "timestep_spacing": spacing,
                    "steps": steps,
                    "overrides": {**KINDS[kind][1], "timestep_spacing": spacing},
                    "init_noise_sigma": float(s.init_noise_sigma),
                    "order": s.order,
                    "num_timesteps": len(s.timesteps),
                    "timesteps": key + "/timesteps",
                    "sigmas": None,
                }
                if kind in HAS_SIGMAS:
                    tensors[key + "/sigmas"] = f32(s.sigmas)
                    entry["sigmas"] = key + "/sigmas"
                entries.append(entry)
    meta["schedulers"] = entries


class NoiseTape:
    """Stands in for `randn_tensor` inside scheduling_euler_ancestral_discrete. Records the
    noise EulerAncestralDiscreteScheduler.step draws, or replays a recording (float64 rerun)."""

    def __init__(self, seed, replay=None):
        self.generator = torch.Generator().manual_seed(seed)
        self.replay = replay
        self.drawn = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        if self.replay is not None:
            noise = self.replay[len(self.drawn)]
        else:
            noise = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        self.drawn.append(noise.clone())
        return noise.to(dtype or torch.float32)


@contextlib.contextmanager
def patched_noise(tape):
    original = euler_a_module.randn_tensor
    euler_a_module.randn_tensor = tape
    try:
        yield
    finally:
        euler_a_module.randn_tensor = original


def run_pipeline(pipe, base_config, spec, latents, noise_seed, replay=None):
    """One StableDiffusionPipeline.__call__ with the given initial latents. Returns the
    tensors the Rust tests compare, captured through `callback_on_step_end` (which the
    pipeline calls after `scheduler.step`, with the post-step latents)."""
    pipe.scheduler = make_scheduler(base_config, spec["scheduler"], spec["overrides"])
    captured = {"latents": [], "t": [], "prompt_embeds": None}

    def on_step_end(_pipe, i, t, kw):
        captured["latents"].append(kw["latents"].detach().clone())
        captured["t"].append(float(t))
        if i == 0:
            # torch.cat([negative_prompt_embeds, prompt_embeds]) as the UNet sees it
            captured["prompt_embeds"] = kw["prompt_embeds"].detach().clone()
        return {}

    tape = NoiseTape(noise_seed, replay) if spec["scheduler"] == "euler_a" else None
    with patched_noise(tape) if tape else contextlib.nullcontext():
        with torch.no_grad():
            images = pipe(
                prompt=spec["prompt"],
                negative_prompt=spec["negative_prompt"],
                guidance_scale=spec["guidance_scale"],
                num_inference_steps=spec["num_inference_steps"],
                width=spec["width"],
                height=spec["height"],
                num_images_per_prompt=spec["num_images"],
                latents=latents.to(pipe.unet.dtype),
                output_type="np",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
            ).images
    scheduler_timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert captured["t"] == scheduler_timesteps, (captured["t"], scheduler_timesteps)
    result = {
        "prompt_embeds": captured["prompt_embeds"],
        "step_latents": torch.stack(captured["latents"]),
        "image": torch.from_numpy(np.asarray(images)),
        "timesteps": scheduler_timesteps,
        "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
        "scheduler_class": type(pipe.scheduler).__name__,
        "do_classifier_free_guidance": pipe.do_classifier_free_guidance,
    }
    if tape is not None:
        assert len(tape.drawn) == len(captured["latents"])
        result["noise"] = torch.stack(tape.drawn)
    return result


def case_refs(pipe, base_config, cases, tensors, meta):
    entries, raw = [], {}
    for index, spec in enumerate(cases):
        n, h, w = spec["num_images"], spec["height"] // 8, spec["width"] // 8
        latents_seed = 1000 + index
        latents = seeded_randn((n, 4, h, w), latents_seed)
        result = run_pipeline(pipe, base_config, spec, latents, noise_seed=2000 + index)
        raw[spec["name"]] = (latents, result)
        prefix = f"case/{spec['name']}"
        keys = {
            "latents": f"{prefix}/latents",
            "prompt_embeds": f"{prefix}/prompt_embeds",
            "step_latents": f"{prefix}/step_latents",
            "image": f"{prefix}/image",
        }
        tensors[keys["latents"]] = f32(latents)
        tensors[keys["prompt_embeds"]] = f32(result["prompt_embeds"])
        tensors[keys["step_latents"]] = f32(result["step_latents"])
        tensors[keys["image"]] = f32(result["image"])
        if "noise" in result:
            keys["noise"] = f"{prefix}/noise"
            tensors[keys["noise"]] = f32(result["noise"])
        entries.append({
            **spec,
            "scheduler_class": result["scheduler_class"],
            "do_classifier_free_guidance": result["do_classifier_free_guidance"],
            "latents_seed": latents_seed,
            "timesteps": result["timesteps"],
            "init_noise_sigma": result["init_noise_sigma"],
            "keys": keys,
        })
    meta["cases"] = entries
    return raw


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return {"max_abs_diff": float((a64 - b64).abs().max()), "max_abs": float(b64.abs().max())}


@torch.no_grad()
def drift_refs(folder, base_config, cases, drift_cases, tensors, raw_cases):
    """Repeat computations in float64 (same stored weights, upcast; same inputs and noise)."""
    pipe = load_pipeline(folder, torch.float64)
    out = {}
    for name in PROMPTS:
        emb64 = encode(pipe, tensors[f"tok/{name}"])
        out[f"emb/{name}"] = diff(tensors[f"emb/{name}"], emb64)
    for prefix in ["unet", "unet_ns"]:
        o = pipe.unet(tensors[f"{prefix}/sample"].double(), int(tensors[f"{prefix}/timestep"][0]),
                      encoder_hidden_states=tensors[f"{prefix}/encoder_hidden_states"].double()).sample
        out[f"{prefix}/out"] = diff(tensors[f"{prefix}/out"], o)
    img = pipe.vae.decode(tensors["vae/latents"].double()).sample
    out["vae/image"] = diff(tensors["vae/image"], img)
    by_name = {c["name"]: c for c in cases}
    for name in drift_cases:
        latents, r32 = raw_cases[name]
        replay = [n.double() for n in r32["noise"]] if "noise" in r32 else None
        r64 = run_pipeline(pipe, base_config, by_name[name], latents.double(), 0, replay)
        p = f"case/{name}"
        out[f"{p}/prompt_embeds"] = diff(r32["prompt_embeds"], r64["prompt_embeds"])
        out[f"{p}/step_latents"] = diff(r32["step_latents"], r64["step_latents"])
        out[f"{p}/final_latents"] = diff(r32["step_latents"][-1], r64["step_latents"][-1])
        out[f"{p}/image"] = diff(r32["image"], r64["image"])
    out["note"] = (
        "max_abs_diff = max |f32 - f64| over the tensor, max_abs = max |f64 value|. The f64 run "
        "loads the same stored weights upcast and reuses the f32 run's latents (and euler_a "
        "noise). diffusers' Euler, Euler-ancestral and DPM-Solver step() round the sample to "
        "f32 internally and all scheduler tables (sigmas, alphas_cumprod) are f32 even in the "
        "f64 run; the image is converted to f32 by VaeImageProcessor.postprocess."
    )
    return out


@torch.no_grad()
def tanh_gelu_refs(folder, base_config, cases, tensors, raw_cases):
    """How far diffusers moves when GEGLU uses the tanh-approximate GELU instead of
    the exact erf GELU (diffusers.models.activations.GEGLU.gelu). candle 0.11's
    stable_diffusion UNet, which sdserve runs, makes exactly that approximation; the
    Rust tests add this measured deviation to their tolerance."""
    import diffusers.models.activations as activations

    pipe = load_pipeline(folder, torch.float32)
    exact = activations.GEGLU.gelu
    activations.GEGLU.gelu = lambda self, gate: torch.nn.functional.gelu(gate, approximate="tanh")
    try:
        out = {}
        for prefix in ["unet", "unet_ns"]:
            o = pipe.unet(tensors[f"{prefix}/sample"], int(tensors[f"{prefix}/timestep"][0]),
                          encoder_hidden_states=tensors[f"{prefix}/encoder_hidden_states"]).sample
            out[f"{prefix}/out"] = diff(tensors[f"{prefix}/out"], o)
        for spec in cases:
            name = spec["name"]
            latents, r32 = raw_cases[name]
            replay = list(r32["noise"]) if "noise" in r32 else None
            rt = run_pipeline(pipe, base_config, spec, latents, 0, replay)
            p = f"case/{name}"
            out[f"{p}/step_latents"] = diff(r32["step_latents"], rt["step_latents"])
            out[f"{p}/image"] = diff(r32["image"], rt["image"])
    finally:
        activations.GEGLU.gelu = exact
    out["note"] = "max |exact-GELU GEGLU - tanh-GELU GEGLU| per tensor, both float32"
    return out


def check_sane(tensors):
    for key, t in tensors.items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{key} has NaN/inf"
    for key, t in tensors.items():
        if key.endswith("/image") and key.startswith("case/"):
            assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0, key
            for img in t:
                # not flat, not saturated
                assert float(img.std()) > 0.02, f"{key} is nearly constant"
                saturated = float(((img <= 0.0) | (img >= 1.0)).float().mean())
                assert saturated < 0.5, f"{key} is {saturated:.0%} clamped"
    assert float(tensors["vae/image"].std()) > 0.05


SCHEMA = {
    "prompts[]": "name, prompt, tokens (key tok/<name>, int64 [1,77]), embeddings (key emb/<name>, "
                 "f32 [1,77,hidden]), input_ids (list), untruncated_length (tokens incl. BOS/EOS), "
                 "truncated, tokens_text, matches_openai_clip, openai_clip_input_ids (only if not)",
    "unet / unet_ns": "timestep (int), sample [2,4,h,w], timestep_key ([1] f32), "
                      "encoder_hidden_states [2,77,hidden] (= cat(emb/empty, emb/short)), out [2,4,h,w]",
    "vae": "latents [1,4,12,12] (already / scaling_factor), image [1,3,96,96] (decoder output, "
           "not post-processed)",
    "schedulers[]": "name, class, timestep_spacing, steps, overrides, init_noise_sigma, order, "
                    "num_timesteps, timesteps (key, f32 [num_timesteps]), sigmas (key f32 or null)",
    "cases[]": "name, prompt, negative_prompt, guidance_scale, num_inference_steps, scheduler, "
               "overrides, width, height, num_images, scheduler_class, do_classifier_free_guidance, "
               "latents_seed, timesteps (list, len T), init_noise_sigma, keys{latents [n,4,h/8,w/8] "
               "(before * init_noise_sigma), prompt_embeds ([2n,77,hidden] = [uncond x n, cond x n], "
               "or [n,77,hidden] without CFG), step_latents [T,n,4,h/8,w/8] (after each "
               "scheduler.step), image [n,H,W,3] in [0,1], noise [T,n,4,h/8,w/8] (euler_a only)}",
    "drift": "<tensor key> -> {max_abs_diff, max_abs}; plus case/<c>/final_latents",
}


def write_references(kind, folder, out_dir, cases, drift_cases, save_info):
    pipe = load_pipeline(folder, torch.float32)
    base_config = dict(pipe.scheduler.config)
    tensors, meta = {}, {}
    meta["generated_by"] = "tools/make_fixtures.py"
    meta["model"] = f"tiny-{kind}"
    meta["model_dir"] = f"tests/fixtures/tiny-{kind}"
    meta["versions"] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }
    meta["weights_dtype"] = "float16" if kind == "sd2" else "float32"
    meta["compute_dtype"] = "float32"
    meta["text_encoder_key_prefix"] = save_info["text_encoder_key_prefix"]
    meta["prediction_type"] = pipe.scheduler.config.prediction_type
    meta["vae_scaling_factor"] = pipe.vae.config.scaling_factor
    meta["hidden_size"] = pipe.text_encoder.config.hidden_size
    meta["scheduler_config"] = {k: v for k, v in base_config.items() if not k.startswith("_")}
    meta["scheduler_class"] = type(pipe.scheduler).__name__
    tok = pipe.tokenizer
    meta["tokenizer"] = {
        "class": type(tok).__name__,
        "is_fast": bool(tok.is_fast),
        "uses_ftfy": False,  # transformers 5's CLIPTokenizer is tokenizers-only: NFC, \s+ -> " ", lowercase
        "model_max_length": tok.model_max_length,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "vocab_size": len(tok),
    }
    meta["schema"] = SCHEMA

    tokenization_refs(pipe, tensors, meta)
    unet_refs(pipe, tensors, meta)
    vae_refs(pipe, tensors, meta)
    scheduler_tables(pipe, base_config, tensors, meta)
    raw = case_refs(pipe, base_config, cases, tensors, meta)
    meta["drift"] = drift_refs(folder, base_config, meta["cases"], drift_cases, tensors, raw)
    meta["tanh_gelu"] = tanh_gelu_refs(folder, base_config, meta["cases"], tensors, raw)
    check_sane(tensors)

    refs = out_dir / "references"
    refs.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(refs / f"{kind}.safetensors"))
    (refs / f"{kind}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    return meta


def make_readable(paths):
    # safetensors creates files with mode 0600; give the fixtures ordinary permissions.
    for path in paths:
        for p in [path] if path.is_file() else path.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)


def folder_size(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "tests" / "fixtures",
                        help="fixture directory (default: tests/fixtures)")
    args = parser.parse_args()
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)

    vocab, merges = clip_vocab_and_merges()
    for kind, cases, drift_cases in [("sd1", SD1_CASES, SD1_DRIFT_CASES),
                                     ("sd2", SD2_CASES, SD2_DRIFT_CASES)]:
        info = save_model(kind, out_dir, vocab, merges)
        folder = out_dir / f"tiny-{kind}"
        meta = write_references(kind, folder, out_dir, cases, drift_cases, info)
        make_readable([folder, out_dir / "references" / f"{kind}.safetensors"])
        print(f"{kind}: model {folder_size(folder) / 1e6:.2f} MB, "
              f"references {(out_dir / 'references' / f'{kind}.safetensors').stat().st_size / 1e6:.2f} MB, "
              f"tokenizer {meta['tokenizer']['class']} fast={meta['tokenizer']['is_fast']}, "
              f"transformers wrote {info['transformers_wrote_tokenizer_files']}, "
              f"text encoder keys as saved {info['text_encoder_keys_as_saved'][:1]}, "
              f"in fixture {info['text_encoder_keys_in_fixture'][:1]}")


if __name__ == "__main__":
    main()
