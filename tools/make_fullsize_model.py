#!/usr/bin/env python3
"""Build a full-size random-weight Stable Diffusion 1.5 or SDXL base 1.0 in the real diffusers layout.

For benchmarks and the side-by-side comparison with diffusers (benches/README.md,
tools/compare_diffusers.py): every tensor has exactly the name, shape and dtype of
stable-diffusion-v1-5/stable-diffusion-v1-5, so speed and memory are those of the real
model, but the weights are torch's default random init (seeded), so pictures are noise.
Nothing is downloaded: the configs come from tests/fixtures/real-configs/{sd15,sdxl-base}/
and the CLIP vocabulary (full 49,408 tokens) from tests/fixtures/tiny-sd1/tokenizer/.

    .venv/bin/python tools/make_fullsize_model.py              # -> models/sd15-random/ (f32, ~4.3 GB)
    .venv/bin/python tools/make_fullsize_model.py --family sdxl  # -> models/sdxl-random/ (f32, ~13.9 GB)
    .venv/bin/python tools/make_fullsize_model.py --fp16       # also *.fp16.safetensors variants (~2.2 GB more)
    .venv/bin/python tools/make_fullsize_model.py --out DIR --seed 1

Python environment: tools/requirements.txt (torch, diffusers, transformers). models/* is
ignored by git: never commit the weights.

What it writes (the layout `sdserve` and `StableDiffusionPipeline.from_pretrained` read):
    model_index.json                      StableDiffusionPipeline, no safety checker
    unet/config.json + diffusion_pytorch_model.safetensors        859,520,964 parameters
    vae/config.json + diffusion_pytorch_model.safetensors          83,653,863 parameters
    text_encoder/config.json + model.safetensors                  123,060,480 parameters
    tokenizer/{vocab.json,merges.txt,special_tokens_map.json,tokenizer_config.json}
    scheduler/scheduler_config.json       PNDMScheduler as stable-diffusion-v1-5 ships it
With --family sdxl, stable-diffusion-xl-base-1.0's: StableDiffusionXLPipeline, a
2,567,463,684-parameter UNet (diffusers saves it in two shards with an index), the same
VAE (scaling 0.13025, force_upcast), text_encoder (CLIP ViT-L) and text_encoder_2
(CLIPTextModelWithProjection, OpenCLIP bigG: 694,659,840), tokenizer and tokenizer_2,
EulerDiscreteScheduler.
"""

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests/fixtures/tiny-sd1/tokenizer"

# Per family: the real configs, the text encoders (folder, tokenizer folder, class), and
# the published parameter counts (tests/real_models.rs checks sdserve requests exactly
# these tensors).
FAMILIES = {
    "sd15": {
        "configs": ROOT / "tests/fixtures/real-configs/sd15",
        "out": "sd15-random",
        "text": [("text_encoder", "tokenizer", CLIPTextModel)],
        "params": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    },
    "sdxl": {
        "configs": ROOT / "tests/fixtures/real-configs/sdxl-base",
        "out": "sdxl-random",
        "text": [("text_encoder", "tokenizer", CLIPTextModel),
                 ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)],
        "params": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                   "text_encoder_2": 694_659_840},
    },
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": None,  # filled in below
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_tokenizer(folder: pathlib.Path):
    vocab = read_json(folder / "vocab.json")
    if len(vocab) != 49408:
        raise SystemExit(f"{folder}/vocab.json has {len(vocab)} tokens, expected CLIP's 49408")
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    if len(merges) - 1 != 48894:  # first line is "#version: 0.2"
        raise SystemExit(f"{folder}/merges.txt has {len(merges) - 1} merges, expected 48894")


def save(model, folder: pathlib.Path, fp16: bool, timings: dict, name: str):
    t = time.perf_counter()
    model.save_pretrained(folder, safe_serialization=True)
    if fp16:
        model.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
    timings[f"{name}_save_s"] = time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
    ap.add_argument("--out", type=pathlib.Path, help="default: models/<family>-random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp16", action="store_true", help="also write *.fp16.safetensors variants")
    ap.add_argument("--force", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    family = FAMILIES[args.family]
    configs = family["configs"]
    out: pathlib.Path = (args.out or ROOT / "models" / family["out"]).resolve()
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists (use --force to rebuild it)")
    check_tokenizer(TOKENIZER)
    import diffusers

    t_all = time.perf_counter()
    timings = {}
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    torch.manual_seed(args.seed)
    models = {}
    with torch.no_grad():
        t = time.perf_counter()
        models["unet"] = UNet2DConditionModel.from_config(read_json(configs / "unet/config.json")).eval()
        timings["unet_init_s"] = time.perf_counter() - t
        t = time.perf_counter()
        models["vae"] = AutoencoderKL.from_config(read_json(configs / "vae/config.json")).eval()
        timings["vae_init_s"] = time.perf_counter() - t
        for sub, _, cls in family["text"]:
            t = time.perf_counter()
            te_cfg = read_json(configs / sub / "config.json")
            for k in ("_name_or_path", "architectures", "model_type", "torch_dtype", "transformers_version"):
                te_cfg.pop(k, None)
            models[sub] = cls(CLIPTextConfig(**te_cfg)).eval()
            timings[f"{sub}_init_s"] = time.perf_counter() - t

    counts = {name: n_params(m) for name, m in models.items()}
    for name, n in counts.items():
        if n != family["params"][name]:
            raise SystemExit(f"{name}: {n:,} parameters, expected {family['params'][name]:,}")
    for name, m in models.items():
        bad = [k for k, p in m.state_dict().items() if not torch.isfinite(p).all()]
        if bad:
            raise SystemExit(f"{name}: non-finite initial weights in {bad[:3]}")

    for name in list(models):
        save(models.pop(name), staging / name, args.fp16, timings, name)

    for _, tok, _ in family["text"]:
        # The real vocabulary with each tokenizer's own config (pad token).
        (staging / tok).mkdir()
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(TOKENIZER / f, staging / tok / f)
        for f in ("special_tokens_map.json", "tokenizer_config.json"):
            shutil.copy(configs / tok / f, staging / tok / f)
    (staging / "scheduler").mkdir()
    shutil.copy(configs / "scheduler/scheduler_config.json", staging / "scheduler/scheduler_config.json")
    if args.family == "sd15":
        index = dict(MODEL_INDEX, _diffusers_version=diffusers.__version__)
    else:
        index = dict(read_json(configs / "model_index.json"), _diffusers_version=diffusers.__version__)
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (staging / "README.md").write_text(
        f"Random-weight {args.family} stand-in built by tools/make_fullsize_model.py "
        f"(seed {args.seed}, torch {torch.__version__}, diffusers {diffusers.__version__}). "
        "Real shapes, random weights: for benchmarks only.\n")

    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    timings["total_s"] = time.perf_counter() - t_all
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*.safetensors"))}
    print(json.dumps({"out": str(out), "seed": args.seed, "params": counts, "bytes": sizes,
                      "timings": {k: round(v, 2) for k, v in timings.items()}}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
