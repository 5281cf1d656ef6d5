#!/usr/bin/env python3
"""Side by side: sdserve against diffusers (PyTorch on the CPU, f32 or bf16) on the same model.

Same model folder, size, steps, scheduler, guidance, prompts and starting latents, with both
computing on the same number of threads (torch.set_num_threads(N) for diffusers,
RAYON_NUM_THREADS=N for candle; default: all cores). Each side runs in its own child process,
one after the other, so its peak RSS is its own (os.wait4's ru_maxrss). Prints a table:
seconds per guided denoising step, VAE decode, text encoder, end to end (text encoder +
denoise + decode, the scope of sdserve's `generate`), model load, process wall time, peak
RSS, and the ratio sdserve/diffusers; then how far the two images are apart.

With --dtype bf16, sdserve runs its mixed precision (bf16 matmuls, f32 in between) and
diffusers runs the pipeline in torch.bfloat16; a third process runs diffusers in f32, and
the last lines give each side's distance (PSNR, mean and max |diff|) from that f32 image:
the quality cost of bf16.

    cargo build --release                                     # target/release/sdserve
    .venv/bin/python tools/make_fullsize_model.py     # models/sd15-random (once)
    .venv/bin/python tools/compare_diffusers.py --size 256 --steps 4
    .venv/bin/python tools/compare_diffusers.py --size 256 --size 512 --steps 4 --json results.json
    .venv/bin/python tools/compare_diffusers.py --size 512 --steps 4 --dtype bf16
    .venv/bin/python tools/compare_diffusers.py --size 512 --steps 4 --repeat 3   # medians
    .venv/bin/python tools/make_fullsize_model.py --family sdxl                     # models/sdxl-random
    .venv/bin/python tools/compare_diffusers.py --model models/sdxl-random --size 512 --steps 2

Timings on the sdserve side come from the `generate` log line (text_encoder_s, denoise_s,
vae_decode_s; RUST_LOG=info, JSON log format). On the diffusers side: the pipeline runs with
output_type="latent"; forward hooks on the UNet time every UNet call, callback_on_step_end
marks the end of each step (denoise = first UNet call start .. last step end, the same span
sdserve's denoise_s covers), then `vae.decode(latents / scaling_factor)` + denormalise is timed
separately. Both sides are cold (one generation per process), as `sdserve generate` is.

Random weights make pictures noise, but the two should still agree closely: the last table
lines give the max and mean absolute difference of the 8-bit images (and how many pixels
are saturated at 0 or 255, where differences are clamped away).
"""

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

PROMPT = "a watercolor painting of a lighthouse at dusk, dramatic clouds"
NEGATIVE = "blurry, low quality"

# sdserve scheduler names -> diffusers class and implied config (as tools/make_fixtures.py).
# Ancestral sampling (euler_a) draws torch noise each step and is left out.
KINDS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {}),
}


# ---------------------------------------------------------------------------------------
# diffusers side (child process: `compare_diffusers.py --worker diffusers ...`)
# ---------------------------------------------------------------------------------------

TORCH_DTYPES = {}


def diffusers_worker(args):
    import numpy as np
    import torch
    from safetensors.torch import load_file

    import diffusers

    TORCH_DTYPES.update(f32=torch.float32, bf16=torch.bfloat16)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    # The folder's own pipeline class (model_index.json): StableDiffusionPipeline or
    # StableDiffusionXLPipeline; the SD folders here ship no safety checker.
    pipe = diffusers.DiffusionPipeline.from_pretrained(args.model, dtype=TORCH_DTYPES[args.dtype])
    pipe.set_progress_bar_config(disable=True)
    cls, implied = KINDS[args.scheduler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **implied)
    load_s = time.perf_counter() - t0

    latents = load_file(args.latents)["latents"].to(TORCH_DTYPES[args.dtype])
    unet_calls = []
    step_ends = []

    def pre(_m, _a, _kw=None):
        unet_calls.append([time.perf_counter(), None])

    def post(_m, _a, _kw, _out=None):
        unet_calls[-1][1] = time.perf_counter()

    pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)
    pipe.unet.register_forward_hook(post, with_kwargs=True)

    def on_step_end(_pipe, i, t, kw):
        step_ends.append(time.perf_counter())
        return {}

    with torch.no_grad():
        t_call = time.perf_counter()
        out = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            guidance_scale=args.guidance,
            num_inference_steps=args.steps,
            width=args.size,
            height=args.size,
            latents=latents,
            output_type="latent",
            callback_on_step_end=on_step_end,
        ).images
        t_loop_end = time.perf_counter()
        text_s = unet_calls[0][0] - t_call  # encode_prompt + timesteps + prepare_latents
        denoise_s = step_ends[-1] - unet_calls[0][0]
        t = time.perf_counter()
        image = pipe.vae.decode(out / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)
        decode_s = time.perf_counter() - t
    unet_s = [b - a for a, b in unet_calls]
    arr = image[0].permute(1, 2, 0).float().numpy()
    np.save(args.image, (arr * 255).round().astype("uint8"))  # VaeImageProcessor.numpy_to_pil
    result = {
        "load_s": load_s,
        "text_encoder_s": text_s,
        "denoise_s": denoise_s,
        "steps": len(step_ends),
        "unet_s_per_call": unet_s,
        "vae_decode_s": decode_s,
        "generate_s": (t_loop_end - t_call) + decode_s,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "pipeline": type(pipe).__name__,
        "torch_threads": torch.get_num_threads(),
    }
    pathlib.Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------

def run_child(cmd, env, log_path):
    """Runs cmd; returns (wall seconds, peak RSS in MiB, stderr text)."""
    with open(log_path, "wb") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = pathlib.Path(log_path).read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}:\n{text[-4000:]}")
    return wall, usage.ru_maxrss / 1024.0, text  # ru_maxrss is KiB on Linux


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def sdserve_timings(log: str) -> dict:
    """The fields of the `generated N image(s)` line (JSON or text log format)."""
    for line in reversed(ANSI.sub("", log).splitlines()):
        if "denoise_s" not in line:
            continue
        try:
            fields = json.loads(line).get("fields", {})
            return {k: float(fields[k]) for k in ("text_encoder_s", "denoise_s", "vae_decode_s")}
        except (ValueError, KeyError):
            found = dict(re.findall(r"(\w+_s)=([0-9.eE+-]+)", line))
            return {k: float(found[k]) for k in ("text_encoder_s", "denoise_s", "vae_decode_s")}
    raise SystemExit(f"no timing line in sdserve's log:\n{log[-4000:]}")


def sdserve_bf16_kernel(log: str):
    """The `bf16_kernel` field of sdserve's load line (--dtype bf16 on the CPU), or None."""
    m = re.search(r'"bf16_kernel":"(\w+)"|bf16_kernel="?(\w+)', ANSI.sub("", log))
    return (m.group(1) or m.group(2)) if m else None


def compare_one(args, size, work: pathlib.Path, diffusers_first: bool) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    latents_path = work / f"latents-{size}.safetensors"
    gen = torch.Generator().manual_seed(args.seed)
    latents = torch.randn((1, 4, size // 8, size // 8), generator=gen, dtype=torch.float32)
    save_file({"latents": latents.contiguous()}, latents_path)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # Neither side may use more threads than asked (OpenMP/MKL pools read these too).
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               RAYON_NUM_THREADS=str(args.threads))

    results = {}
    order = ["diffusers", "sdserve"] if diffusers_first else ["sdserve", "diffusers"]
    if args.dtype != "f32" and not args.no_reference:
        # The quality cost of lower precision: both sides against diffusers in f32.
        order.append("reference")
    for side in order:
        print(f"  running {side} at {size}px ...", file=sys.stderr, flush=True)
        if side == "sdserve":
            png = work / f"sdserve-{size}.png"
            cmd = [str(args.sdserve), "generate", "--model", str(args.model),
                   "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                   "--steps", str(args.steps), "--guidance", str(args.guidance),
                   "--scheduler", args.scheduler, "--width", str(size), "--height", str(size),
                   "--latents", str(latents_path), "--output", str(png), "--dtype", args.dtype]
            wall, rss, log = run_child(cmd, dict(env, RUST_LOG="info", SDSERVE_LOG_FORMAT="json"),
                                       work / f"sdserve-{size}.log")
            t = sdserve_timings(log)
            r = {
                "text_encoder_s": t["text_encoder_s"],
                "denoise_s": t["denoise_s"],
                "vae_decode_s": t["vae_decode_s"],
                "generate_s": t["text_encoder_s"] + t["denoise_s"] + t["vae_decode_s"],
                "bf16_kernel": sdserve_bf16_kernel(log),
            }
            image = np.asarray(Image.open(png).convert("RGB"))
        else:
            npy = work / f"{side}-{size}.npy"
            res = work / f"{side}-{size}.json"
            dtype = "f32" if side == "reference" else args.dtype
            cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "diffusers",
                   "--model", str(args.model), "--size", str(size), "--steps", str(args.steps),
                   "--guidance", str(args.guidance), "--scheduler", args.scheduler,
                   "--threads", str(args.threads), "--latents", str(latents_path),
                   "--image", str(npy), "--result", str(res), "--dtype", dtype]
            wall, rss, _ = run_child(cmd, env, work / f"{side}-{size}.log")
            r = json.loads(res.read_text())
            image = np.load(npy)
            r["unet_s_per_call_median"] = float(np.median(r["unet_s_per_call"]))
        r["s_per_step"] = r["denoise_s"] / args.steps
        r["wall_s"] = wall
        r["peak_rss_mib"] = rss
        r["_image"] = image
        results[side] = r

    a = results["sdserve"].pop("_image").astype(np.int16)
    b = results["diffusers"].pop("_image").astype(np.int16)
    if a.shape != b.shape:
        raise SystemExit(f"image shapes differ: sdserve {a.shape}, diffusers {b.shape}")
    results["image"] = dict(image_distance(a, b),
                            saturated_fraction_diffusers=float(((b == 0) | (b == 255)).mean()),
                            mean_value_diffusers=float(b.mean()),
                            std_value_diffusers=float(b.std()))
    if "reference" in results:
        ref = results.pop("reference")
        f32 = ref.pop("_image").astype(np.int16)
        results["quality"] = {
            "sdserve_vs_f32": image_distance(a, f32),
            "diffusers_vs_f32": image_distance(b, f32),
        }
    return results


def image_distance(a, b) -> dict:
    import numpy as np
    d = np.abs(a - b)
    mse = float((d.astype(np.float64) ** 2).mean())
    return {
        "max_abs_diff": int(d.max()),
        "mean_abs_diff": float(d.mean()),
        "pixels_differing_over_2": float((d > 2).mean()),
        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse)),
    }


ROWS = [
    ("s per CFG step (denoise/steps)", "s_per_step", "{:.2f}"),
    ("denoise total s", "denoise_s", "{:.2f}"),
    ("VAE decode s", "vae_decode_s", "{:.2f}"),
    ("text encoder s", "text_encoder_s", "{:.3f}"),
    ("end to end s (text+denoise+decode)", "generate_s", "{:.2f}"),
    ("process wall s (incl. load)", "wall_s", "{:.2f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
]


def print_table(size, steps, r):
    s, d = r["sdserve"], r["diffusers"]
    print(f"\n{d.get('pipeline', '')} {size}x{size}, {steps} steps, CFG, threads={ARGS.threads}, scheduler={ARGS.scheduler}, "
          f"dtype={ARGS.dtype}" + (f" (sdserve kernel {s['bf16_kernel']})" if s.get("bf16_kernel") else ""))
    print(f"| {'':36} | {'sdserve':>9} | {'diffusers':>9} | {'sdserve/diffusers':>17} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 11}|{'-' * 19}|")
    for label, key, fmt in ROWS:
        ratio = s[key] / d[key] if d[key] else float("nan")
        print(f"| {label:36} | {fmt.format(s[key]):>9} | {fmt.format(d[key]):>9} | {ratio:>17.2f} |")
    print(f"| {'diffusers UNet call s (median)':36} | {'':>9} | {d['unet_s_per_call_median']:>9.2f} | {'':>17} |")
    im = r["image"]
    print(f"image: max |diff| {im['max_abs_diff']}/255, mean {im['mean_abs_diff']:.4f}, "
          f"{100 * im['pixels_differing_over_2']:.3f}% of values differ by >2; "
          f"diffusers image mean {im['mean_value_diffusers']:.1f} std {im['std_value_diffusers']:.1f}, "
          f"{100 * im['saturated_fraction_diffusers']:.1f}% saturated")
    for side, q in r.get("quality", {}).items():
        print(f"quality, {side.replace('_vs_f32', '')} {ARGS.dtype} vs diffusers f32: "
              f"PSNR {q['psnr_db']:.1f} dB, mean |diff| {q['mean_abs_diff']:.3f}/255, "
              f"max {q['max_abs_diff']}/255")


def print_summary(size, runs):
    """Per-run ratios and their median, for --repeat."""
    print(f"\n{size}x{size}, {len(runs)} runs (first side of each run: "
          f"{', '.join(r['first'] for r in runs)})")
    print(f"| {'sdserve/diffusers':36} | {'per run':>23} | {'median':>7} |")
    print(f"|{'-' * 38}|{'-' * 25}|{'-' * 9}|")
    for label, key, _ in ROWS:
        ratios = [r["sdserve"][key] / r["diffusers"][key] if r["diffusers"][key] else float("nan")
                  for r in runs]
        per_run = " ".join(f"{x:.2f}" for x in ratios)
        print(f"| {label:36} | {per_run:>23} | {statistics.median(ratios):>7.2f} |")


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=pathlib.Path, default=ROOT / "models/sd15-random")
    ap.add_argument("--size", type=int, action="append", help="pixels (square); repeatable; default 256")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--scheduler", default="dpmpp_2m", choices=sorted(KINDS))
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="both sides (default: all cores)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the starting latents")
    ap.add_argument("--sdserve", type=pathlib.Path, default=ROOT / "target/release/sdserve")
    ap.add_argument("--diffusers-first", action="store_true", help="run diffusers before sdserve")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per size, alternating which side goes first (the first process of a "
                         "run was measured up to 15%% slower on a shared host); prints each run, then "
                         "the per-run ratios and their median")
    ap.add_argument("--keep", type=pathlib.Path, help="keep images and logs in this folder")
    ap.add_argument("--json", type=pathlib.Path, help="also write all numbers here")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="both sides; with bf16, diffusers also runs in f32 as the quality reference")
    ap.add_argument("--no-reference", action="store_true",
                    help="with bf16: skip the diffusers f32 quality reference (timing runs only)")
    # worker mode (internal)
    ap.add_argument("--worker", choices=["diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--latents", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ARGS = ap.parse_args()

    if args.worker:
        args.size = args.size[0]
        return diffusers_worker(args)

    if args.repeat < 1:
        raise SystemExit("--repeat: at least 1")
    if not args.sdserve.is_file():
        raise SystemExit(f"{args.sdserve} not found: build it with `cargo build --release`")
    if not (args.model / "model_index.json").is_file():
        raise SystemExit(f"no model at {args.model}: make one with tools/make_fullsize_model.py")
    sizes = args.size or [256]
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; threads {args.threads}",
          file=sys.stderr)
    all_results = {"threads": args.threads, "steps": args.steps, "scheduler": args.scheduler,
                   "dtype": args.dtype,
                   "guidance": args.guidance, "model": str(args.model), "load_before": load,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or pathlib.Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            runs = []
            for i in range(args.repeat):
                diffusers_first = args.diffusers_first != (i % 2 == 1)
                r = compare_one(args, size, work, diffusers_first)
                r["load_after"] = os.getloadavg()
                r["first"] = "diffusers" if diffusers_first else "sdserve"
                runs.append(r)
                print_table(size, args.steps, r)
                print(f"load average after: {' '.join(f'{x:.2f}' for x in r['load_after'])}")
            if args.repeat > 1:
                print_summary(size, runs)
            all_results["sizes"][size] = runs[0] if args.repeat == 1 else runs
    if args.json:
        args.json.write_text(json.dumps(all_results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    sys.exit(main())
