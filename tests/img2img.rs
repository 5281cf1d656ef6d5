//! Image to image against diffusers on tiny-sd1 (`tools/make_edit_fixtures.py`):
//! the input picture read as `VaeImageProcessor.preprocess` makes it, the VAE
//! encoder's posterior and a round trip, and every
//! `StableDiffusionImg2ImgPipeline.__call__` case (five schedulers, strengths
//! 0.5-1, with and without guidance) step by step through validation and
//! `generate`, and through `sdserve generate --init-image`. Every random draw
//! diffusers made is injected. Tolerances: 50 × the f32-vs-f64 drift diffusers
//! itself shows, as in `tests/parity.rs`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Reference, max_abs, max_abs_diff};
use sdserve::request::{
    GenerateParams, GenerateRequest, GivenLatents, Inputs, Limits, SourceImage, default_strength,
};
use serde_json::Value;

fn input_png(r: &Reference) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(r.json["input"].as_str().unwrap())
}

/// The fixture model a reference was made with (tiny-sd1, tiny-sd2).
fn model_of(r: &Reference) -> std::sync::Arc<sdserve::diffusion::pipelines::StableDiffusion> {
    let dir = r.json["model_dir"].as_str().unwrap();
    common::model(dir.rsplit('/').next().unwrap())
}

fn picture(r: &Reference) -> SourceImage {
    SourceImage::read(&input_png(r), "init_image", 1 << 20).unwrap()
}

#[test]
fn the_vae_encodes_as_diffusers_does() {
    let r = Reference::load("img2img");
    let sd = common::model("tiny-sd1");
    // The picture as VaeImageProcessor.preprocess hands it to the VAE, exactly.
    let img = picture(&r);
    let pixels = img.to_tensor(img.width(), img.height()).unwrap();
    assert_eq!(max_abs_diff(&pixels, &r.get("vae/image")), 0.0);

    let post = sd.encode_image(&pixels).unwrap();
    for (key, got) in [("mean", &post.mean), ("logvar", &post.logvar)] {
        let want = r.get(&format!("vae/{key}"));
        let d = max_abs_diff(got, &want);
        let tol = r.tolerance(&format!("vae/{key}"), max_abs(&want));
        assert!(d <= tol, "posterior {key} differs by {d} (tolerance {tol})");
    }
    let want = r.get("vae/sample");
    let d = max_abs_diff(&post.sample(&r.get("vae/noise")).unwrap(), &want);
    let tol = r.tolerance("vae/sample", max_abs(&want));
    assert!(
        d <= tol,
        "posterior sample differs by {d} (tolerance {tol})"
    );

    let want = r.get("vae/roundtrip");
    let d = max_abs_diff(&sd.decode_raw(post.mode()).unwrap(), &want);
    let tol = r.tolerance("vae/roundtrip", max_abs(&want));
    assert!(d <= tol, "round trip differs by {d} (tolerance {tol})");
}

fn case_request(r: &Reference, case: &Value) -> GenerateRequest {
    let name = case["name"].as_str().unwrap();
    let key = |k: &str| format!("case/{name}/{k}");
    let inputs = Inputs {
        latents: Some(GivenLatents {
            latents: r.get(&key("latents")),
            step_noise: r.tensors.get(&key("noise")).cloned(),
            vae_noise: Some(r.get(&key("vae_noise"))),
            masked_image_vae_noise: None,
        }),
        init_image: Some((picture(r), "init_image".into())),
        mask_image: None,
    };
    let sd = model_of(r);
    common::edit_case_params(case, default_strength(sd.info(), false))
        .validate_with(sd.info(), &Limits::default(), inputs)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_case_matches_diffusers_step_by_step() {
    check_cases("img2img", 6);
}

/// SD 2.x: v-prediction through DDIM (the folder's own), Euler and DPM++ 2M.
#[test]
fn every_sd2_v_prediction_case_matches_diffusers_step_by_step() {
    let r = Reference::load("img2img-sd2");
    assert_eq!(r.json["prediction_type"], "v_prediction");
    check_cases("img2img-sd2", 3);
}

/// SDXL (`StableDiffusionXLImg2ImgPipeline`): both text encoders, the size
/// conditioning from the picture's size, its default strength 0.3, a missing
/// negative prompt as zeros.
#[test]
fn every_sdxl_case_matches_diffusers_step_by_step() {
    let r = Reference::load("img2img-sdxl");
    assert_eq!(model_of(&r).info().family.name(), "sdxl");
    assert!(
        r.json["cases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["strength"] == 0.3)
    );
    check_cases("img2img-sdxl", 5);
}

/// The SDXL refiner (`StableDiffusionXLImg2ImgPipeline` with
/// `requires_aesthetics_score`): only `text_encoder_2`, which takes `prompt`,
/// and five time ids ending in an aesthetic score (the defaults 6 / 2.5, and 8 /
/// 1 given); DDIM, Euler and Euler ancestral without a negative prompt.
#[test]
fn every_refiner_case_matches_diffusers_step_by_step() {
    let r = Reference::load("refiner");
    let info = model_of(&r).info().clone();
    assert!(info.refiner && info.family.is_xl());
    let cases = r.json["cases"].as_array().unwrap();
    assert!(cases.iter().any(|c| c["aesthetic_score"].is_number()));
    assert!(cases.iter().any(|c| c["aesthetic_score"].is_null()));
    check_cases("refiner", 3);
}

/// What a refiner refuses, and what only a refiner takes, by field.
#[test]
fn refiner_fields_are_checked_by_name() {
    let r = Reference::load("refiner");
    let refiner = model_of(&r);
    let base = common::model("tiny-sdxl");
    let sd1 = common::model("tiny-sd1");
    let check = |sd: &sdserve::diffusion::pipelines::StableDiffusion,
                 params: GenerateParams,
                 image: bool,
                 field: &str,
                 words: &str| {
        let inputs = Inputs {
            latents: None,
            init_image: image.then(|| (picture(&r), "init_image".into())),
            mask_image: None,
        };
        let got = params.validate_with(sd.info(), &Limits::default(), inputs);
        common::assert_refused(got, field, words);
    };
    let prompt = || GenerateParams {
        prompt: Some("a lighthouse".into()),
        steps: Some(4),
        ..Default::default()
    };
    check(&refiner, prompt(), false, "init_image", "refiner");
    let mut p = prompt();
    p.prompt_2 = Some("oil".into());
    check(&refiner, p, true, "prompt_2", "one text encoder");
    let mut p = prompt();
    p.micro.aesthetic_score = Some(11.0);
    check(&refiner, p, true, "aesthetic_score", "[0, 10]");
    let mut p = prompt();
    p.micro.negative_aesthetic_score = Some(f64::NAN);
    check(&refiner, p, true, "negative_aesthetic_score", "[0, 10]");
    let mut p = prompt();
    p.micro.aesthetic_score = Some(7.0);
    check(
        &base,
        p.clone(),
        true,
        "aesthetic_score",
        "only an SDXL refiner",
    );
    check(&sd1, p, true, "aesthetic_score", "only SDXL");
    // and a scored refinement is fine
    let mut p = prompt();
    p.micro.aesthetic_score = Some(7.0);
    p.micro.negative_aesthetic_score = Some(0.0);
    let inputs = Inputs {
        init_image: Some((picture(&r), "init_image".into())),
        ..Default::default()
    };
    let req = p
        .validate_with(refiner.info(), &Limits::default(), inputs)
        .unwrap();
    let strength = req.init.as_ref().map(|i| i.strength);
    assert_eq!(strength, Some(0.3), "SDXL image to image's default");
}

fn check_cases(reference: &str, count: usize) {
    let r = Reference::load(reference);
    let sd = model_of(&r);
    let cases = r.json["cases"].as_array().unwrap();
    assert_eq!(cases.len(), count);
    let (step_tol, image_tol) = r.case_tolerances();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let key = |k: &str| format!("case/{name}/{k}");
        let req = case_request(&r, case);
        assert_eq!(
            (req.width, req.height),
            (96, 96),
            "{name}: the picture's size"
        );
        assert_eq!(
            req.guided,
            case["do_classifier_free_guidance"].as_bool().unwrap()
        );
        // The kept timesteps are diffusers' (get_timesteps: from `start` on).
        let scheduler = sd
            .scheduler(req.scheduler, &req.scheduler_options, req.steps)
            .unwrap();
        assert_eq!(
            scheduler.class_name(),
            case["scheduler_class"].as_str().unwrap()
        );
        let start = case["start"].as_u64().unwrap() as usize;
        let kept: Vec<f64> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap())
            .collect();
        assert_eq!(&scheduler.timesteps()[start..], kept.as_slice(), "{name}");

        let (image, worst, steps_seen) =
            common::generate_against(&sd, &req, &r.get(&key("step_latents")));
        assert_eq!(steps_seen, kept.len(), "{name}: steps run");
        eprintln!(
            "{reference}/{name}: worst step latent diff {worst:.3e} (tolerance {step_tol:.3e})"
        );
        assert!(worst <= step_tol, "{name}: step latents differ by {worst}");
        let d = max_abs_diff(&image, &r.get(&key("image")));
        eprintln!("{reference}/{name}: image diff {d:.3e} (tolerance {image_tol:.3e})");
        assert!(d <= image_tol, "{name}: image differs by {d}");
    }
}

#[test]
fn the_init_image_and_strength_reach_the_result() {
    let r = Reference::load("img2img");
    let sd = common::model("tiny-sd1");
    let case = &r.json["cases"][1]; // ddim, strength 0.6
    let base = case_request(&r, case);
    let run = |req: &GenerateRequest| sd.generate(req, &mut |_| true).unwrap().images;
    let first = run(&base);
    // A different picture: a different result from the same draws.
    let mut flipped = base.clone();
    let init = flipped.init.as_mut().unwrap();
    init.pixels = init.pixels.flip(&[3]).unwrap();
    let d = max_abs_diff(&first, &run(&flipped));
    assert!(d > 0.05, "the init image changed nothing ({d})");
    // A lower strength keeps more of the picture: fewer steps, closer to it.
    let mut params = common::edit_case_params(case, f64::NAN);
    params.strength = Some(0.3);
    let inputs = Inputs {
        latents: base.latents.clone(),
        init_image: Some((picture(&r), "init_image".into())),
        mask_image: None,
    };
    let low = params
        .validate_with(sd.info(), &Limits::default(), inputs)
        .unwrap();
    let mut steps = 0;
    let out = sd
        .generate(&low, &mut |p| {
            steps = p.total;
            true
        })
        .unwrap();
    assert_eq!(steps, 3, "int(10 * 0.3) steps");
    // Against the picture as this (random-weight) VAE reproduces it, by mean
    // distance (the tiny model's images saturate, so the largest is 1 either way).
    let roundtrip = ((r.get("vae/roundtrip") / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    let mean_dist = |a: &candle_core::Tensor| {
        (a - &roundtrip)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (far, near) = (mean_dist(&first), mean_dist(&out.images));
    assert!(
        near < far,
        "strength 0.3 ({near}) not closer than 0.6 ({far})"
    );
}

#[test]
fn bad_edit_requests_name_the_field() {
    let r = Reference::load("img2img");
    let sd = common::model("tiny-sd1");
    let check = |params: GenerateParams, image: bool, field: &str, words: &str| {
        let inputs = Inputs {
            latents: None,
            init_image: image.then(|| (picture(&r), "init_image".into())),
            mask_image: None,
        };
        let got = params.validate_with(sd.info(), &Limits::default(), inputs);
        common::assert_refused(got, field, words);
    };
    let p = |strength: Option<f64>, steps: usize, scheduler: Option<&str>| GenerateParams {
        prompt: Some("x".into()),
        strength,
        steps: Some(steps),
        scheduler: scheduler.map(str::to_string),
        ..Default::default()
    };
    check(p(Some(0.0), 10, None), true, "strength", "outside (0, 1]");
    check(p(Some(1.5), 10, None), true, "strength", "outside (0, 1]");
    check(p(Some(f64::NAN), 10, None), true, "strength", "outside");
    check(p(Some(0.1), 5, None), true, "strength", "runs none");
    check(p(Some(0.5), 10, None), false, "strength", "init image");
    check(p(Some(0.5), 4, Some("lcm")), true, "scheduler", "LCM");
    // A picture smaller than the VAE's factor has no size to default to.
    let tiny = SourceImage {
        rgb: image::RgbImage::new(5, 40),
    };
    let inputs = Inputs {
        latents: None,
        init_image: Some((tiny, "init_image".into())),
        mask_image: None,
    };
    let err = p(None, 10, None)
        .validate_with(sd.info(), &Limits::default(), inputs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("init_image") && err.contains("5x40"), "{err}");
}

fn sdserve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sdserve"))
}

/// `sdserve generate --init-image --strength --latents` reproduces diffusers'
/// images within one 8-bit level, and bad inputs fail naming the flag.
#[test]
fn the_cli_edits_an_image_as_diffusers_does() {
    let dir = tempfile::tempdir().unwrap();
    // euler at strength 1, euler_a (with its step noise) at 0.5; SDXL without
    // a negative prompt (zeros, not the empty prompt's encoding)
    // the refiner with aesthetic scores given
    for (reference, i) in [
        ("img2img", 2),
        ("img2img", 3),
        ("img2img-sdxl", 3),
        ("refiner", 1),
    ] {
        let r = Reference::load(reference);
        let case = &r.json["cases"][i];
        let name = case["name"].as_str().unwrap();
        let latents = dir.path().join(format!("{name}.safetensors"));
        let mut tensors = std::collections::HashMap::new();
        for (k, file_key) in [
            ("latents", "latents"),
            ("vae_noise", "vae_noise"),
            ("noise", "noise"),
        ] {
            if let Some(t) = r.tensors.get(&format!("case/{name}/{file_key}")) {
                tensors.insert(k.to_string(), t.clone());
            }
        }
        candle_core::safetensors::save(&tensors, &latents).unwrap();
        let out = dir.path().join(format!("{name}.png"));
        let mut cmd = sdserve();
        cmd.arg("generate");
        if let Some(negative) = case["negative_prompt"].as_str() {
            cmd.args(["--negative-prompt", negative]);
        }
        for flag in ["aesthetic_score", "negative_aesthetic_score"] {
            if let Some(v) = case[flag].as_f64() {
                cmd.arg(format!("--{}", flag.replace('_', "-")))
                    .arg(v.to_string());
            }
        }
        let status = cmd
            .arg("--model")
            .arg(
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join(r.json["model_dir"].as_str().unwrap()),
            )
            .args(["--prompt", case["prompt"].as_str().unwrap()])
            .args(["--scheduler", case["scheduler"].as_str().unwrap()])
            .args(["--steps", &case["num_inference_steps"].to_string()])
            .args(["--guidance", &case["guidance_scale"].to_string()])
            .args(["--strength", &case["strength"].to_string()])
            .arg("--init-image")
            .arg(input_png(&r))
            .arg("--latents")
            .arg(&latents)
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "{name}");
        let got = common::png_levels(&out);
        let d = max_abs_diff(&got, &r.image_levels(name, 0));
        assert!(
            d <= 1.0,
            "{name}: PNG differs from diffusers' by {d} levels"
        );
    }

    let missing = dir.path().join("nope.png");
    let garbage = dir.path().join("garbage.png");
    std::fs::write(&garbage, b"definitely not a picture").unwrap();
    for (file, want) in [(&missing, "nope.png"), (&garbage, "unknown format")] {
        let out = sdserve()
            .args(["generate", "--model"])
            .arg(common::model_dir("tiny-sd1"))
            .args(["--prompt", "x", "--init-image"])
            .arg(file)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("init_image") || err.contains("init-image"),
            "{err}"
        );
        assert!(err.contains(want), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `POST /invocations` with JumpStart's `image` (base64) and `strength` edits
/// the picture: the same PNG `sdserve generate --init-image` writes for the
/// same seed and parameters, unlike the text-to-image one; bad images and
/// strengths are 400s naming the field.
#[test]
fn invocations_edit_an_image_like_the_cli() {
    use base64::Engine as _;
    use common::server::{Server, client, tiny};
    use serde_json::json;

    let r = Reference::load("img2img");
    let png = std::fs::read(input_png(&r)).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let s = Server::start(&["--model", &tiny()], &[]);
    let invoke = |body: Value| {
        client()
            .post(s.url("/invocations"))
            .header("accept", "image/png")
            .json(&body)
            .send()
            .unwrap()
    };
    let params = json!({"prompt": "a lighthouse", "num_inference_steps": 5, "seed": 5,
                        "scheduler": "ddim", "guidance_scale": 6.0});
    let mut edit = params.clone();
    edit["image"] = json!(format!("data:image/png;base64,{b64}"));
    edit["strength"] = json!(0.6);
    let resp = invoke(edit);
    assert_eq!(resp.status(), 200);
    let served = image::load_from_memory(&resp.bytes().unwrap())
        .unwrap()
        .to_rgb8();
    assert_eq!(served.dimensions(), (96, 96), "the picture's own size");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cli.png");
    let status = sdserve()
        .args(["generate", "--model", &tiny(), "--prompt", "a lighthouse"])
        .args([
            "--steps",
            "5",
            "--seed",
            "5",
            "--scheduler",
            "ddim",
            "--guidance",
            "6",
        ])
        .args(["--strength", "0.6", "--init-image"])
        .arg(input_png(&r))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let cli = image::open(&out).unwrap().to_rgb8();
    assert!(served == cli, "/invocations and generate edit differently");

    let mut txt = params.clone();
    txt["width"] = json!(96);
    txt["height"] = json!(96);
    let plain = image::load_from_memory(&invoke(txt).bytes().unwrap())
        .unwrap()
        .to_rgb8();
    assert!(plain != served, "the image changed nothing");

    for (body, field) in [
        (json!({"prompt": "x", "image": "%%%"}), "image"),
        (json!({"prompt": "x", "image": 7}), "image"),
        (
            json!({"prompt": "x", "image": b64, "strength": 0}),
            "strength",
        ),
        (json!({"prompt": "x", "strength": 0.5}), "strength"),
    ] {
        let resp = invoke(body.clone());
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().unwrap();
        assert_eq!(v["field"], field, "{v}");
    }
}

/// A server on the refiner becomes ready (its warm-up refines a picture),
/// says so on /info, refuses text to image naming the picture's field, and
/// refines with aesthetic scores on `/generate` as `sdserve generate` does.
#[test]
fn a_refiner_serves_edits_and_refuses_text_to_image() {
    use base64::Engine as _;
    use common::server::{Server, client};
    use serde_json::json;

    let r = Reference::load("refiner");
    let model = common::model_dir("tiny-sdxl-refiner");
    let model = model.to_str().unwrap();
    let png = std::fs::read(input_png(&r)).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let s = Server::start(&["--model", model], &[]);
    let info: Value = client().get(s.url("/info")).send().unwrap().json().unwrap();
    assert_eq!(info["refiner"], true, "{info}");

    let post = |path: &str, body: Value| client().post(s.url(path)).json(&body).send().unwrap();
    for (path, body, field) in [
        ("/invocations", json!({"prompt": "x"}), "image"),
        ("/generate", json!({"text": "x"}), "init_image"),
        (
            "/generate",
            json!({"text": "x", "init_image": b64, "prompt_2": "y"}),
            "prompt_2",
        ),
        (
            "/generate",
            json!({"text": "x", "init_image": b64, "aesthetic_score": "high"}),
            "aesthetic_score",
        ),
    ] {
        let resp = post(path, body.clone());
        assert_eq!(resp.status(), 400, "{path} {body}");
        let v: Value = resp.json().unwrap();
        assert_eq!(v["field"], field, "{path}: {v}");
    }

    let body = json!({"text": "a lighthouse", "style": "none", "init_image": b64, "steps": 4,
                      "seed": 3, "strength": 0.5, "aesthetic_score": 8.5,
                      "negative_aesthetic_score": 1.5});
    let id = common::server::accepted(&s, body);
    let done = common::server::wait_final(&s, &id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request"]["aesthetic_score"], 8.5, "{done}");
    let served = common::server::get_png(&s, done["image_url"].as_str().unwrap());

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cli.png");
    let status = sdserve()
        .args(["generate", "--model", model, "--prompt", "a lighthouse"])
        .args(["--steps", "4", "--seed", "3", "--strength", "0.5"])
        .args([
            "--aesthetic-score",
            "8.5",
            "--negative-aesthetic-score",
            "1.5",
        ])
        .arg("--init-image")
        .arg(input_png(&r))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let cli = image::open(&out).unwrap().to_rgb8();
    assert!(served == cli, "/generate and generate refine differently");
    // the scores reach the picture
    let plain = dir.path().join("plain.png");
    let status = sdserve()
        .args(["generate", "--model", model, "--prompt", "a lighthouse"])
        .args(["--steps", "4", "--seed", "3", "--strength", "0.5"])
        .arg("--init-image")
        .arg(input_png(&r))
        .arg("-o")
        .arg(&plain)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        image::open(&plain).unwrap().to_rgb8() != cli,
        "the scores changed nothing"
    );
}
