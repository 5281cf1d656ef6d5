//! Latent consistency models against diffusers on the tiny LCM fixture
//! (`tools/make_lcm_fixtures.py`: tiny-sd1 with an LCM-distilled UNet and
//! LCMScheduler, as SimianLuo/LCM_Dreamshaper_v7 is laid out): the guidance
//! scale embedding, the UNet with `timestep_cond`, and every
//! `LatentConsistencyModelPipeline.__call__` case step by step, through
//! validation and `generate` and through `sdserve generate`. Tolerances: 50 ×
//! the f32-vs-f64 drift diffusers itself shows, as in `tests/parity.rs`.

mod common;

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{Reference, max_abs, max_abs_diff};
use sdserve::diffusion::loading::config::{UNetConfig, read_json};
use sdserve::diffusion::loading::weights::WeightFiles;
use sdserve::diffusion::models::unet::Extra;
use sdserve::diffusion::pipelines::{
    SamplingDefaults, StableDiffusion, build_unet, guidance_scale_embedding,
};
use sdserve::request::{GenerateParams, GenerateRequest, GivenLatents, Limits};
use serde_json::{Value, json};

fn load() -> StableDiffusion {
    StableDiffusion::load(&common::model_dir("tiny-lcm"), &Default::default()).unwrap()
}

#[test]
fn the_unet_takes_the_guidance_embedding_as_diffusers_does() {
    let r = Reference::load("lcm");
    let scales = r.json["unet"]["guidance_scale"].as_array().unwrap();
    let want = r.get("unet/timestep_cond");
    let rows: Vec<Tensor> = scales
        .iter()
        .map(|g| guidance_scale_embedding(g.as_f64().unwrap() - 1.0, 32, 1, &Device::Cpu).unwrap())
        .collect();
    let got = Tensor::cat(&rows, 0).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d <= 1e-6, "guidance embedding differs by {d}");

    let dir = common::model_dir("tiny-lcm").join("unet");
    let cfg_path = dir.join("config.json");
    let cfg: UNetConfig = read_json(&cfg_path).unwrap();
    assert_eq!(cfg.time_cond_proj_dim, Some(32));
    let files = WeightFiles::find(&dir, "diffusion_pytorch_model", false).unwrap();
    let vb = files.var_builder(DType::F32, &Device::Cpu).unwrap();
    let unet = build_unet(vb, &cfg, &cfg_path, &files.describe()).unwrap();
    assert_eq!(unet.time_cond_dim(), Some(32));
    let t = r.json["unet"]["timestep"].as_f64().unwrap();
    let (sample, ctx) = (r.get("unet/sample"), r.get("unet/encoder_hidden_states"));
    let extra = Extra {
        added: None,
        timestep_cond: Some(&want),
    };
    let out = unet.forward_with(&sample, t, &ctx, extra).unwrap();
    let want_out = r.get("unet/out");
    let d = max_abs_diff(&out, &want_out);
    let tol = r.tolerance("unet/out", max_abs(&want_out));
    assert!(d <= tol, "unet out differs by {d} (tolerance {tol})");
    // Without its embedding the UNet refuses to run rather than guess.
    let err = unet.forward(&sample, t, &ctx).unwrap_err().to_string();
    assert!(err.contains("timestep_cond"), "{err}");
}

/// The validated request a case describes, with its latents (and noise) given.
fn case_request(sd: &StableDiffusion, r: &Reference, case: &Value) -> GenerateRequest {
    let name = case["name"].as_str().unwrap();
    let params = GenerateParams {
        prompt: case["prompt"].as_str().map(str::to_string),
        width: case["width"].as_u64().map(|v| v as usize),
        height: case["height"].as_u64().map(|v| v as usize),
        steps: case["num_inference_steps"].as_u64().map(|v| v as usize),
        guidance: case["guidance_scale"].as_f64(),
        scheduler_options: case["overrides"].as_object().cloned(),
        seed: Some(0),
        num_images: case["num_images"].as_u64().map(|v| v as usize),
        ..Default::default()
    };
    let latents = GivenLatents {
        latents: r.get(&format!("case/{name}/latents")),
        step_noise: r.tensors.get(&format!("case/{name}/noise")).cloned(),
        vae_noise: None,
        masked_image_vae_noise: None,
    };
    params
        .validate(sd.info(), &Limits::default(), Some(latents))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every case through what a request runs: one conditional pass per step (no
/// classifier-free guidance), the guidance scale as the UNet's embedding, and
/// LCMScheduler's steps, against `LatentConsistencyModelPipeline` (which the
/// fixture script checked `StableDiffusionPipeline` agrees with).
#[test]
fn every_case_matches_diffusers_through_the_pipeline() {
    let r = Reference::load("lcm");
    let sd = load();
    assert!(sd.info().guidance_embedded);
    let cases = r.json["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    let (step_tol, image_tol) = r.case_tolerances();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let key = |k: &str| format!("case/{name}/{k}");
        let req = case_request(&sd, &r, case);
        assert!(
            !req.guided,
            "{name}: an LCM UNet runs no unconditional pass"
        );
        let timesteps: Vec<f64> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap())
            .collect();
        let scheduler = sd
            .scheduler(req.scheduler, &req.scheduler_options, req.steps)
            .unwrap();
        assert_eq!(scheduler.class_name(), "LCMScheduler");
        assert_eq!(scheduler.timesteps(), timesteps.as_slice(), "{name}");

        let cond = sd.conditioning(&req, false).unwrap();
        let d = max_abs_diff(&cond.text, &r.get(&key("prompt_embeds")));
        assert!(d <= 1e-4, "{name}: prompt_embeds differ by {d}");
        let w = cond.timestep_cond.as_ref().expect("a guidance embedding");
        let d = max_abs_diff(w, &r.get(&key("w_embedding")));
        assert!(d <= 1e-6, "{name}: w_embedding differs by {d}");

        let (image, worst, steps_seen) =
            common::generate_against(&sd, &req, &r.get(&key("step_latents")));
        assert_eq!(steps_seen, timesteps.len(), "{name}: steps");
        eprintln!("lcm/{name}: worst step latent diff {worst:.3e} (tolerance {step_tol:.3e})");
        assert!(worst <= step_tol, "{name}: step latents differ by {worst}");
        let d = max_abs_diff(&image, &r.get(&key("image")));
        eprintln!("lcm/{name}: image diff {d:.3e} (tolerance {image_tol:.3e})");
        assert!(d <= image_tol, "{name}: image differs by {d}");
    }
    // The guidance scale reaches the image: w = 0 is not w = 7.5.
    let d = max_abs_diff(
        &r.get("case/w_zero/w_embedding"),
        &r.get("case/default/w_embedding"),
    );
    assert!(d > 0.1, "{d}");
}

#[test]
fn an_lcm_folder_defaults_to_four_steps_at_its_guidance_and_refuses_too_many() {
    let sd = load();
    assert_eq!(sd.info().defaults, SamplingDefaults::LCM);
    let req = GenerateParams {
        prompt: Some("a fox".into()),
        ..Default::default()
    }
    .validate(sd.info(), &Limits::default(), None)
    .unwrap();
    assert_eq!((req.steps, req.guidance, req.guided), (4, 8.5, false));
    // LCMScheduler's schedule is a subset of the 50 it was distilled on.
    let err = GenerateParams {
        prompt: Some("a fox".into()),
        steps: Some(60),
        ..Default::default()
    }
    .validate(sd.info(), &Limits::default(), None)
    .unwrap_err();
    assert!(
        matches!(&err, sdserve::Error::InvalidRequest { field, message }
            if field == "steps" && message.contains("original_inference_steps")),
        "{err:?}"
    );
    // A shorter distillation schedule asked for is named when it is what fails.
    let err = GenerateParams {
        prompt: Some("a fox".into()),
        steps: Some(20),
        scheduler_options: json!({"original_inference_steps": 10}).as_object().cloned(),
        ..Default::default()
    }
    .validate(sd.info(), &Limits::default(), None)
    .unwrap_err();
    assert!(
        matches!(&err, sdserve::Error::InvalidRequest { field, .. }
            if field == "scheduler_options.original_inference_steps"),
        "{err:?}"
    );
    // The distillation schedule is a scheduler option.
    let req = GenerateParams {
        prompt: Some("a fox".into()),
        steps: Some(60),
        scheduler_options: json!({"original_inference_steps": 100})
            .as_object()
            .cloned(),
        ..Default::default()
    }
    .validate(sd.info(), &Limits::default(), None);
    assert!(req.is_ok(), "{req:?}");
}

/// `sdserve generate` on the LCM folder with only the prompt, size and noise:
/// the model's defaults (4 steps, guidance 8.5) reproduce diffusers' default
/// case within one 8-bit level.
#[test]
fn the_cli_reproduces_diffusers_lcm_image_with_the_models_defaults() {
    let r = Reference::load("lcm");
    let tmp = tempfile::tempdir().unwrap();
    let latents = tmp.path().join("latents.safetensors");
    assert!(r.tensors.contains_key("case/default/noise"));
    r.save_latents("default", &latents);
    let out = tmp.path().join("lcm.png");
    let case = &r.json["cases"][0];
    assert_eq!(case["name"], "default");
    let o = Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(["generate", "--model"])
        .arg(common::model_dir("tiny-lcm"))
        .args(["--prompt", case["prompt"].as_str().unwrap()])
        .arg("--latents")
        .arg(&latents)
        .arg("--output")
        .arg(&out)
        .env_remove("SDSERVE_MODEL")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = sdserve::output::read_png_metadata(&out).unwrap();
    assert_eq!((meta.steps, meta.guidance), (4, 8.5));
    let got = common::png_levels(&out);
    assert_eq!(got.dims(), [96, 96, 3]);
    let d = max_abs_diff(&got, &r.image_levels("default", 0));
    assert!(d <= 1.0, "max pixel difference {d} levels");
}

fn pair(v: &Value) -> Option<[u32; 2]> {
    v.as_array()
        .map(|a| [a[0].as_u64().unwrap() as u32, a[1].as_u64().unwrap() as u32])
}

/// An LCM UNet in an SDXL folder (latent-consistency/lcm-sdxl's use:
/// `StableDiffusionXLPipeline` with LCMScheduler): SDXL's pooled embedding and
/// time ids plus the guidance embedding, one conditional pass per step.
#[test]
fn an_sdxl_lcm_unet_matches_stable_diffusion_xl_pipeline() {
    use sdserve::diffusion::pipelines::Family;
    use sdserve::request::MicroConditioning;
    let r = Reference::load("lcm-sdxl");
    let sd =
        StableDiffusion::load(&common::model_dir("tiny-lcm-sdxl"), &Default::default()).unwrap();
    assert_eq!(sd.info().family, Family::Sdxl);
    assert_eq!(sd.info().defaults, SamplingDefaults::LCM);
    let (step_tol, image_tol) = r.case_tolerances();
    let cases = r.json["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let key = |k: &str| format!("case/{name}/{k}");
        let micro = &case["micro"];
        let params = GenerateParams {
            prompt: case["prompt"].as_str().map(str::to_string),
            prompt_2: case["prompt_2"].as_str().map(str::to_string),
            micro: MicroConditioning {
                original_size: pair(&micro["original_size"]),
                crops_coords_top_left: pair(&micro["crops_coords_top_left"]),
                ..Default::default()
            },
            steps: case["num_inference_steps"].as_u64().map(|v| v as usize),
            guidance: case["guidance_scale"].as_f64(),
            seed: Some(0),
            ..Default::default()
        };
        let latents = GivenLatents {
            latents: r.get(&key("latents")),
            step_noise: r.tensors.get(&key("noise")).cloned(),
            vae_noise: None,
            masked_image_vae_noise: None,
        };
        let req = params
            .validate(sd.info(), &Limits::default(), Some(latents))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!req.guided, "{name}");
        let cond = sd.conditioning(&req, false).unwrap();
        let added = cond.added.as_ref().expect("SDXL conditioning");
        for (what, got, tol) in [
            ("prompt_embeds", &cond.text, 1e-4),
            ("add_text_embeds", &added.text_embeds, 1e-4),
            ("add_time_ids", &added.time_ids, 0.0),
            ("w_embedding", cond.timestep_cond.as_ref().unwrap(), 1e-6),
        ] {
            let d = max_abs_diff(got, &r.get(&key(what)));
            assert!(d <= tol, "{name}: {what} differs by {d}");
        }
        let (image, worst, _) = common::generate_against(&sd, &req, &r.get(&key("step_latents")));
        eprintln!("lcm-sdxl/{name}: worst step latent diff {worst:.3e} (tolerance {step_tol:.3e})");
        assert!(worst <= step_tol, "{name}: step latents differ by {worst}");
        let d = max_abs_diff(&image, &r.get(&key("image")));
        assert!(d <= image_tol, "{name}: image differs by {d}");
    }
}
