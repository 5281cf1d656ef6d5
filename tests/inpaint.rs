//! Inpainting against diffusers (`tools/make_inpaint_fixtures.py`): the mask
//! read as `mask_processor.preprocess` makes it, and every
//! `StableDiffusionInpaintPipeline.__call__` case step by step, on a
//! 9-channel inpainting UNet (tiny-sd1-inpaint) and on an ordinary one
//! (tiny-sd1, the blend after each step), through validation and `generate`
//! and through `sdserve generate --init-image --mask`. Every random draw
//! diffusers made is injected. Tolerances: 50 × the f32-vs-f64 drift
//! diffusers itself shows, as in `tests/parity.rs`.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use common::{Reference, max_abs_diff};
use sdserve::request::{
    GenerateParams, GenerateRequest, GivenLatents, Inputs, Limits, SourceImage, default_strength,
};
use serde_json::Value;

fn fixture(r: &Reference, key: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(r.json[key].as_str().unwrap())
}

fn picture(r: &Reference) -> SourceImage {
    SourceImage::read(&fixture(r, "input"), "init_image", 1 << 20).unwrap()
}

fn mask(r: &Reference) -> SourceImage {
    SourceImage::read(&fixture(r, "mask"), "mask_image", 1 << 20).unwrap()
}

fn model_name(case: &Value) -> &str {
    case["model_dir"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
}

#[test]
fn the_mask_is_read_as_diffusers_reads_it() {
    let r = Reference::load("inpaint");
    let m = mask(&r).to_mask(96, 96).unwrap();
    assert_eq!(max_abs_diff(&m, &r.get("mask/condition")), 0.0);
    // Both sides of the cut occur (the fixture's edges are soft).
    let share = m.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(share > 0.1 && share < 0.5, "{share}");
    // The masked picture the 9-channel UNet is conditioned on: image * (mask < 0.5).
    let pixels = picture(&r).to_tensor(96, 96).unwrap();
    let masked = pixels.broadcast_mul(&(1.0 - &m).unwrap()).unwrap();
    assert_eq!(max_abs_diff(&masked, &r.get("mask/masked_image")), 0.0);
}

fn case_request(r: &Reference, case: &Value) -> GenerateRequest {
    let name = case["name"].as_str().unwrap();
    let key = |k: &str| format!("case/{name}/{k}");
    let inputs = Inputs {
        latents: Some(GivenLatents {
            latents: r.get(&key("latents")),
            step_noise: r.tensors.get(&key("noise")).cloned(),
            vae_noise: r.tensors.get(&key("vae_noise")).cloned(),
            masked_image_vae_noise: Some(r.get(&key("masked_image_vae_noise"))),
        }),
        init_image: Some((picture(r), "init_image".into())),
        mask_image: Some((mask(r), "mask_image".into())),
    };
    let sd = common::model(model_name(case));
    common::edit_case_params(case, default_strength(sd.info(), true))
        .validate_with(sd.info(), &Limits::default(), inputs)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_case_matches_diffusers_step_by_step() {
    check_cases("inpaint", HashMap::from([(9, 4), (4, 4)]));
}

/// SDXL (`StableDiffusionXLInpaintPipeline`) on an ordinary UNet: the blend,
/// both text encoders, the default strength 0.9999 (the first step skipped).
#[test]
fn every_sdxl_case_matches_diffusers_step_by_step() {
    let r = Reference::load("inpaint-sdxl");
    let cases = r.json["cases"].as_array().unwrap();
    assert!(
        cases
            .iter()
            .any(|c| c["strength"] == 0.9999 && c["start"] == 1)
    );
    check_cases("inpaint-sdxl", HashMap::from([(4, 4)]));
}

/// Every case of `reference`, and how many ran on each kind of UNet (its input channels).
fn check_cases(reference: &str, want_kinds: HashMap<u64, usize>) {
    let r = Reference::load(reference);
    let cases = r.json["cases"].as_array().unwrap();
    assert_eq!(cases.len(), want_kinds.values().sum::<usize>());
    let (step_tol, image_tol) = r.case_tolerances();
    let mut kinds = HashMap::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let key = |k: &str| format!("case/{name}/{k}");
        let sd = common::model(model_name(case));
        let channels = case["unet_in_channels"].as_u64().unwrap();
        assert_eq!(sd.info().inpainting, channels == 9, "{name}");
        *kinds.entry(channels).or_insert(0) += 1;
        let req = case_request(&r, case);
        assert_eq!(req.init.as_ref().unwrap().strength, case["strength"]);
        assert_eq!(
            req.guided,
            case["do_classifier_free_guidance"].as_bool().unwrap()
        );
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
    assert_eq!(kinds, want_kinds);
}

/// The mask decides what changes: on an ordinary UNet the kept area ends as
/// the picture's own latents, exactly; moving the mask moves the change.
#[test]
fn the_mask_reaches_the_result() {
    let r = Reference::load("inpaint");
    let cases = r.json["cases"].as_array().unwrap();
    let case = cases.iter().find(|c| c["name"] == "blend_euler").unwrap();
    let sd = common::model("tiny-sd1");
    let req = case_request(&r, case);
    let mut last = None;
    sd.generate(&req, &mut |p| {
        last = Some(p.latents.clone());
        true
    })
    .unwrap();
    let last = last.unwrap();
    let init = req.init.as_ref().unwrap();
    let vae_noise = r.get("case/blend_euler/vae_noise");
    let post = sd.encode_image(&init.pixels).unwrap();
    let image_latents = (post.sample(&vae_noise).unwrap() * 0.18215).unwrap();
    let keep = (1.0 - &r.get("mask/latent")).unwrap();
    let outside = |t: &candle_core::Tensor| t.broadcast_mul(&keep).unwrap();
    let d = max_abs_diff(&outside(&last), &outside(&image_latents));
    assert!(d < 1e-5, "the kept area moved by {d}");
    let inside = max_abs_diff(&last, &image_latents);
    assert!(inside > 0.1, "the masked area did not change ({inside})");

    // The same draws with the mask flipped left to right: a different result.
    let mut flipped = req.clone();
    let m = flipped.init.as_mut().unwrap().mask.as_mut().unwrap();
    *m = m.flip(&[3]).unwrap();
    let run = |req: &GenerateRequest| sd.generate(req, &mut |_| true).unwrap().images;
    let d = max_abs_diff(&run(&req), &run(&flipped));
    assert!(d > 0.05, "moving the mask changed nothing ({d})");
}

#[test]
fn bad_inpainting_requests_name_the_field() {
    let r = Reference::load("inpaint");
    let check = |model: &str, inputs: Inputs, params: GenerateParams, field: &str, words: &str| {
        let sd = common::model(model);
        let got = params.validate_with(sd.info(), &Limits::default(), inputs);
        common::assert_refused(got, field, words);
    };
    let prompt = || GenerateParams {
        prompt: Some("x".into()),
        steps: Some(4),
        ..Default::default()
    };
    let with = |init: bool, m: bool| Inputs {
        latents: None,
        init_image: init.then(|| (picture(&r), "init_image".into())),
        mask_image: m.then(|| (mask(&r), "mask_image".into())),
    };
    // A mask needs its picture.
    check(
        "tiny-sd1",
        with(false, true),
        prompt(),
        "mask_image",
        "init_image",
    );
    // An inpainting model needs both, for text to image and image to image alike.
    check(
        "tiny-sd1-inpaint",
        with(false, false),
        prompt(),
        "mask_image",
        "inpainting model",
    );
    check(
        "tiny-sd1-inpaint",
        with(true, false),
        prompt(),
        "mask_image",
        "inpainting model",
    );
    // Noise for a masked picture needs a mask.
    let noise = |k: &str| {
        let t = candle_core::Tensor::zeros(
            (1, 4, 12, 12),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut given = GivenLatents {
            latents: t.clone(),
            step_noise: None,
            vae_noise: None,
            masked_image_vae_noise: None,
        };
        match k {
            "vae_noise" => given.vae_noise = Some(t.zeros_like().unwrap()),
            _ => given.masked_image_vae_noise = Some(t.reshape((1, 4, 6, 24)).unwrap()),
        }
        given
    };
    let inputs = Inputs {
        latents: Some(noise("masked")),
        ..with(true, false)
    };
    check(
        "tiny-sd1",
        inputs,
        prompt(),
        "latents",
        "masked_image_vae_noise",
    );
    let inputs = Inputs {
        latents: Some(noise("masked")),
        ..with(true, true)
    };
    check("tiny-sd1", inputs, prompt(), "latents", "shape");
    let inputs = Inputs {
        latents: Some(noise("vae_noise")),
        ..with(false, false)
    };
    check("tiny-sd1", inputs, prompt(), "latents", "vae_noise");
    // Strength still bounded with a mask; default 1.0 there, 0.8 without.
    let strong = GenerateParams {
        strength: Some(1.5),
        ..prompt()
    };
    check(
        "tiny-sd1",
        with(true, true),
        strong,
        "strength",
        "outside (0, 1]",
    );
    let sd = common::model("tiny-sd1");
    let strength = |inputs| {
        prompt()
            .validate_with(sd.info(), &Limits::default(), inputs)
            .unwrap()
            .init
            .unwrap()
            .strength
    };
    assert_eq!(strength(with(true, true)), 1.0);
    assert_eq!(strength(with(true, false)), 0.8);
    // A mask of another size is resized to the output's.
    let small = SourceImage {
        rgb: image::RgbImage::from_pixel(24, 24, image::Rgb([255, 255, 255])),
    };
    let inputs = Inputs {
        mask_image: Some((small, "mask_image".into())),
        ..with(true, false)
    };
    let req = prompt()
        .validate_with(sd.info(), &Limits::default(), inputs)
        .unwrap();
    let m = req.init.unwrap().mask.unwrap();
    assert_eq!(m.dims(), [1, 1, 96, 96]);
    assert_eq!(m.min_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
}

fn sdserve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sdserve"))
}

/// `sdserve generate --init-image --mask --latents` reproduces diffusers'
/// images within one 8-bit level on both kinds of UNet, and a bad mask fails
/// naming the flag.
#[test]
fn the_cli_inpaints_as_diffusers_does() {
    let dir = tempfile::tempdir().unwrap();
    for (reference, name) in [
        ("inpaint", "ddim"),
        ("inpaint", "blend_euler_a"),
        ("inpaint-sdxl", "default"),
    ] {
        let r = Reference::load(reference);
        let cases = r.json["cases"].as_array().unwrap();
        let case = cases.iter().find(|c| c["name"] == name).unwrap();
        let latents = dir.path().join(format!("{name}.safetensors"));
        let mut tensors = HashMap::new();
        for k in ["latents", "vae_noise", "masked_image_vae_noise", "noise"] {
            if let Some(t) = r.tensors.get(&format!("case/{name}/{k}")) {
                tensors.insert(k.to_string(), t.clone());
            }
        }
        candle_core::safetensors::save(&tensors, &latents).unwrap();
        let out = dir.path().join(format!("{name}.png"));
        let status = sdserve()
            .args(["generate", "--model"])
            .arg(common::model_dir(model_name(case)))
            .args(["--prompt", case["prompt"].as_str().unwrap()])
            .args([
                "--negative-prompt",
                case["negative_prompt"].as_str().unwrap(),
            ])
            .args(["--scheduler", case["scheduler"].as_str().unwrap()])
            .args(["--steps", &case["num_inference_steps"].to_string()])
            .args(["--guidance", &case["guidance_scale"].to_string()])
            .args(["--strength", &case["strength"].to_string()])
            .arg("--init-image")
            .arg(fixture(&r, "input"))
            .arg("--mask")
            .arg(fixture(&r, "mask"))
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

    let garbage = dir.path().join("garbage.png");
    std::fs::write(&garbage, b"definitely not a picture").unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = sdserve()
            .args(["generate", "--model"])
            .arg(common::model_dir("tiny-sd1-inpaint"))
            .args(["--prompt", "x", "--steps", "2"])
            .args(args)
            .arg("-o")
            .arg(dir.path().join("x.png"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let input = fixture(&Reference::load("inpaint"), "input");
    let err = run(&[
        "--init-image".as_ref(),
        input.as_os_str(),
        "--mask".as_ref(),
        garbage.as_os_str(),
    ]);
    assert!(
        err.contains("--mask") && err.contains("unknown format"),
        "{err}"
    );
    let err = run(&["--init-image".as_ref(), input.as_os_str()]);
    assert!(
        err.contains("--mask") && err.contains("inpainting model"),
        "{err}"
    );
}

/// `POST /invocations` with JumpStart's `image` and `mask_image` on an
/// inpainting model: the PNG `sdserve generate --init-image --mask` writes for
/// the same seed; a mask without its picture, a bad mask, and a missing mask
/// on this model are 400s naming the field.
#[test]
fn invocations_inpaint_like_the_cli() {
    use base64::Engine as _;
    use common::server::{Server, client};
    use serde_json::json;

    let r = Reference::load("inpaint");
    let b64 = |key: &str| {
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(fixture(&r, key)).unwrap())
    };
    let model = common::model_dir("tiny-sd1-inpaint");
    let model = model.to_str().unwrap();
    // The warm-up (an inpainting model's is an inpainting request) lets it get ready.
    let s = Server::start(&["--model", model], &[]);
    s.wait_ready();
    let info: Value = client().get(s.url("/info")).send().unwrap().json().unwrap();
    assert_eq!(info["inpainting"], true, "{info}");
    let invoke = |body: Value| {
        client()
            .post(s.url("/invocations"))
            .header("accept", "image/png")
            .json(&body)
            .send()
            .unwrap()
    };
    let body = json!({"prompt": "a lighthouse", "num_inference_steps": 4, "seed": 5,
                      "scheduler": "ddim", "image": b64("input"),
                      "mask_image": format!("data:image/png;base64,{}", b64("mask"))});
    let resp = invoke(body);
    assert_eq!(resp.status(), 200);
    let served = image::load_from_memory(&resp.bytes().unwrap())
        .unwrap()
        .to_rgb8();
    assert_eq!(served.dimensions(), (96, 96), "the picture's own size");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cli.png");
    let status = sdserve()
        .args(["generate", "--model", model, "--prompt", "a lighthouse"])
        .args(["--steps", "4", "--seed", "5", "--scheduler", "ddim"])
        .arg("--init-image")
        .arg(fixture(&r, "input"))
        .arg("--mask")
        .arg(fixture(&r, "mask"))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        served == image::open(&out).unwrap().to_rgb8(),
        "/invocations and generate inpaint differently"
    );

    for (body, field) in [
        (
            json!({"prompt": "x", "mask_image": b64("mask")}),
            "mask_image",
        ),
        (
            json!({"prompt": "x", "image": b64("input"), "mask_image": "%%%"}),
            "mask_image",
        ),
        (
            json!({"prompt": "x", "image": b64("input"), "mask_image": 3}),
            "mask_image",
        ),
        (json!({"prompt": "x", "image": b64("input")}), "mask_image"),
        (json!({"prompt": "x"}), "mask_image"),
    ] {
        let resp = invoke(body.clone());
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().unwrap();
        assert_eq!(v["field"], field, "{body}: {v}");
    }
}
