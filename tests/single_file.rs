//! Single-file checkpoints (`tests/fixtures/single-file/`, written by
//! tools/make_single_file_fixtures.py from the tiny folders in the original
//! layout, and proven there with diffusers' own readers): loaded with
//! `--config` (the folder's configs and tokenizers), they compute bit for bit
//! what their folders compute, at every step, on every front door; pickles,
//! a missing or mismatched `--config` and files that are no SD checkpoint are
//! refused naming the flag or file.

mod common;

use std::path::PathBuf;
use std::process::Command;

use sdserve::diffusion::pipelines::StableDiffusion;
use sdserve::request::{GenerateParams, GenerateRequest, Inputs, Limits, SourceImage};

fn checkpoint(name: &str) -> PathBuf {
    common::fixtures()
        .join("single-file")
        .join(format!("{name}.safetensors"))
}

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load_single_file(
        &checkpoint(name),
        &common::model_dir(name),
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn sdserve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sdserve"))
}

/// Every step's latents and the image of `req` through both models, which
/// must be equal bit for bit.
fn assert_same_run(a: &StableDiffusion, b: &StableDiffusion, req: &GenerateRequest) {
    let run = |sd: &StableDiffusion| {
        let mut steps = Vec::new();
        let out = sd
            .generate(req, &mut |p| {
                steps.push(p.latents.clone());
                true
            })
            .unwrap();
        (steps, out.images)
    };
    let (steps_a, image_a) = run(a);
    let (steps_b, image_b) = run(b);
    assert_eq!(steps_a.len(), steps_b.len());
    for (i, (x, y)) in steps_a.iter().zip(&steps_b).enumerate() {
        assert_eq!(common::max_abs_diff(x, y), 0.0, "step {i}");
    }
    assert_eq!(common::max_abs_diff(&image_a, &image_b), 0.0, "image");
}

#[test]
fn a_single_file_computes_what_its_folder_computes() {
    let file = load("tiny-sd1");
    let folder = common::model("tiny-sd1");
    assert_eq!(file.info().name, "tiny-sd1");
    assert_eq!(file.info().pipeline_class, folder.info().pipeline_class);
    let params = GenerateParams {
        prompt: Some("a lighthouse at dusk, dramatic clouds".into()),
        negative_prompt: Some("blurry".into()),
        steps: Some(3),
        seed: Some(11),
        ..Default::default()
    };
    let req = params
        .validate_with(file.info(), &Limits::default(), Inputs::default())
        .unwrap();
    assert_same_run(&file, &folder, &req);
}

/// The 9-channel inpainting checkpoint, with the picture and mask the
/// inpainting references use: the VAE encoder and the mask conditioning too.
#[test]
fn an_inpainting_single_file_inpaints_as_its_folder_does() {
    let file = load("tiny-sd1-inpaint");
    let folder = common::model("tiny-sd1-inpaint");
    assert!(file.info().inpainting);
    let edit = common::fixtures().join("edit");
    let read = |name: &str, field: &str| {
        SourceImage::read(&edit.join(format!("{name}-96.png")), field, 1 << 20).unwrap()
    };
    let inputs = Inputs {
        latents: None,
        init_image: Some((read("input", "init_image"), "init_image".into())),
        mask_image: Some((read("mask", "mask_image"), "mask_image".into())),
    };
    let params = GenerateParams {
        prompt: Some("a red boat".into()),
        steps: Some(3),
        seed: Some(5),
        ..Default::default()
    };
    let req = params
        .validate_with(file.info(), &Limits::default(), inputs)
        .unwrap();
    assert_same_run(&file, &folder, &req);
}

#[test]
fn generate_and_serve_take_a_single_file_with_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let png = |model: &[&str], name: &str| {
        let out = dir.path().join(name);
        let status = sdserve()
            .arg("generate")
            .args(model)
            .args([
                "--prompt",
                "a red boat",
                "--steps",
                "4",
                "--seed",
                "3",
                "-o",
            ])
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "{model:?}");
        image::open(&out).unwrap().to_rgb8()
    };
    let file = checkpoint("tiny-sd1");
    let config = common::model_dir("tiny-sd1");
    let (file, config) = (file.to_str().unwrap(), config.to_str().unwrap());
    let from_file = png(&["--model", file, "--config", config], "file.png");
    let from_folder = png(&["--model", config], "folder.png");
    assert!(
        from_file == from_folder,
        "the checkpoint and its folder differ"
    );

    use common::server::{Server, accepted, get_png, wait_final};
    let s = Server::start(&["--model", file, "--config", config], &[]);
    let info: serde_json::Value = common::server::client()
        .get(s.url("/info"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["model"], "tiny-sd1", "{info}");
    let id = accepted(
        &s,
        serde_json::json!({"text": "a red boat", "style": "none", "steps": 4, "seed": 3}),
    );
    let done = wait_final(&s, &id);
    assert_eq!(done["status"], "completed", "{done}");
    assert!(get_png(&s, done["image_url"].as_str().unwrap()) == from_folder);
}

#[test]
fn bad_checkpoints_and_configs_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let pickle = dir.path().join("model.ckpt");
    std::fs::write(&pickle, b"\x80\x02}q\x00.").unwrap();
    let not_sd = common::model_dir("tiny-sd1").join("unet/diffusion_pytorch_model.safetensors");
    let file = checkpoint("tiny-sd1");
    let inpaint_file = checkpoint("tiny-sd1-inpaint");
    let sd1 = common::model_dir("tiny-sd1");
    let inpaint = common::model_dir("tiny-sd1-inpaint");
    let sdxl = common::model_dir("tiny-sdxl");
    let cases: Vec<(Vec<&std::ffi::OsStr>, &str, &str)> = vec![
        (vec![pickle.as_os_str()], "model.ckpt", "never unpickles"),
        (vec![file.as_os_str()], "--config", "needs --config DIR"),
        (
            vec![not_sd.as_os_str(), "--config".as_ref(), sd1.as_os_str()],
            "diffusion_pytorch_model.safetensors",
            "is not a Stable Diffusion checkpoint",
        ),
        (
            vec![file.as_os_str(), "--config".as_ref(), inpaint.as_os_str()],
            "--config",
            "SD 1.x (v1) checkpoint",
        ),
        (
            vec![
                inpaint_file.as_os_str(),
                "--config".as_ref(),
                sd1.as_os_str(),
            ],
            "--config",
            "SD 1.x inpainting checkpoint",
        ),
        (
            vec![file.as_os_str(), "--config".as_ref(), sdxl.as_os_str()],
            "--config",
            "StableDiffusionXLPipeline",
        ),
        (
            vec![sd1.as_os_str(), "--config".as_ref(), sd1.as_os_str()],
            "--config",
            "only a single-file --model",
        ),
    ];
    for (model, name, words) in cases {
        let out = sdserve()
            .args(["generate", "--prompt", "x", "--steps", "1", "--model"])
            .args(&model)
            .arg("-o")
            .arg(dir.path().join("x.png"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{model:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(name) && err.contains(words),
            "{model:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}
