//! The CPU's mixed precision (`--dtype bf16`: bf16 weights and matmuls, f32 in between)
//! against diffusers' f32 references on the tiny fixture models, end to end through
//! the real pipeline.
//!
//! bf16 keeps 8 significant bits (relative rounding 2^-9), so results move away from
//! f32 by far more than f32 drift but stay close: each check bounds the error relative
//! to the values' magnitude, with about 3x headroom over what was measured on this
//! project's machines (the measured values are printed), and checks that the error is
//! not zero, i.e. that the bf16 path really ran.

mod common;

use candle_core::DType;
use common::{Reference, max_abs, max_abs_diff};
use sdserve::diffusion::pipelines::{LoadOptions, StableDiffusion};
use sdserve::diffusion::schedulers::SchedulerKind;

fn load_bf16(name: &str) -> StableDiffusion {
    let opts = LoadOptions {
        dtype: Some(DType::BF16),
        ..LoadOptions::default()
    };
    StableDiffusion::load(&common::model_dir(name), &opts).unwrap()
}

/// `|got - want|` relative to `want`'s largest magnitude, after checking it is in
/// `(0, bound]`.
fn check(what: &str, got: &candle_core::Tensor, want: &candle_core::Tensor, bound: f32) {
    let rel = max_abs_diff(got, want) / max_abs(want);
    eprintln!("{what}: relative max diff {rel:.3e} (bound {bound:.0e})");
    assert!(rel > 0.0, "{what}: identical to f32: bf16 path not taken");
    assert!(rel <= bound, "{what}: {rel} > {bound}");
}

fn unet_and_vae(model: &str, refname: &str) {
    let sd = load_bf16(model);
    assert_eq!(sd.info().dtype, "bf16");
    let r = Reference::load(refname);
    for prefix in ["unet", "unet_ns"] {
        let t = r.json[prefix]["timestep"].as_f64().unwrap();
        let out = sd
            .predict(
                &r.get(&format!("{prefix}/sample")),
                t,
                &r.get(&format!("{prefix}/encoder_hidden_states")),
            )
            .unwrap();
        assert_eq!(out.dtype(), DType::F32);
        check(
            &format!("{refname} {prefix}"),
            &out,
            &r.get(&format!("{prefix}/out")),
            0.04,
        );
    }
    let img = sd.decode_raw(&r.get("vae/latents")).unwrap();
    check(&format!("{refname} vae"), &img, &r.get("vae/image"), 0.05);
}

#[test]
fn sd1_unet_and_vae_in_bf16() {
    unet_and_vae("tiny-sd1", "sd1");
}

#[test]
fn sd2_unet_and_vae_in_bf16() {
    unet_and_vae("tiny-sd2", "sd2");
}

/// Whole guided generations (every fixture case of the first scheduler kind in the
/// reference) stay close to diffusers' f32 images.
#[test]
fn sd1_generation_in_bf16_is_close_to_f32() {
    let sd = load_bf16("tiny-sd1");
    let r = Reference::load("sd1");
    let cases = r.json["cases"].as_array().unwrap();
    let mut checked = 0;
    for case in cases.iter().filter(|c| c["keys"].get("noise").is_none()) {
        let name = case["name"].as_str().unwrap();
        let get = |k: &str| r.get(case["keys"][k].as_str().unwrap());
        let guidance = case["guidance_scale"].as_f64().unwrap();
        let n = case["num_images"].as_u64().unwrap() as usize;
        let emb = sd
            .prompt_embeddings(
                case["prompt"].as_str().unwrap(),
                case["negative_prompt"].as_str().unwrap_or(""),
                n,
                guidance > 1.0,
            )
            .unwrap();
        let kind = SchedulerKind::parse(case["scheduler"].as_str().unwrap()).unwrap();
        let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
        let overrides = case["overrides"].as_object().cloned().unwrap_or_default();
        let mut scheduler = sd
            .scheduler_config()
            .build(kind, &overrides, steps)
            .unwrap();
        let mut noise = sdserve::diffusion::latents::SeededNoise::new(&[0]);
        let latents = sd
            .denoise(
                &emb,
                &get("latents"),
                scheduler.as_mut(),
                guidance,
                &mut noise,
                &mut |_| true,
            )
            .unwrap();
        let images = sd.decode(&latents).unwrap().permute((0, 2, 3, 1)).unwrap();
        check(&format!("sd1/{name} image"), &images, &get("image"), 0.1);
        checked += 1;
    }
    assert!(checked > 0, "no deterministic case in the reference");
}
