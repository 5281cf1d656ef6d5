//! A Turbo folder (EulerAncestral with trailing spacing, as stabilityai's
//! sd-turbo and sdxl-turbo ship) runs its own recipe when a request leaves
//! steps and guidance out: one step, no guidance. The CLI then reproduces
//! diffusers' SDXL-Turbo image; the server offers the same defaults in `/info`
//! and the job record, and `--default-steps` / `--default-guidance` replace
//! them.

mod common;

use std::process::Command;

use common::Reference;
use common::server::{Server, accepted, client, wait_final};
use serde_json::{Value, json};

/// tiny-sdxl with the scheduler config a Turbo folder has.
fn turbo_copy() -> tempfile::TempDir {
    let tmp = common::copy_model("tiny-sdxl");
    let path = tmp.path().join("scheduler/scheduler_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["_class_name"] = json!("EulerAncestralDiscreteScheduler");
    cfg["timestep_spacing"] = json!("trailing");
    std::fs::write(&path, cfg.to_string()).unwrap();
    tmp
}

/// diffusers' "turbo" case (`EulerAncestralDiscreteScheduler` with trailing
/// spacing, `num_inference_steps=1, guidance_scale=0.0`, no negative prompt),
/// reproduced by `sdserve generate` given only the prompt, size and noise.
#[test]
fn the_cli_runs_a_turbo_folder_with_its_one_step_default() {
    let model = turbo_copy();
    let reference = Reference::load("sdxl");
    let case = reference.json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "turbo")
        .unwrap()
        .clone();
    assert_eq!(
        (&case["num_inference_steps"], &case["guidance_scale"]),
        (&json!(1), &json!(0.0))
    );
    let tmp = tempfile::tempdir().unwrap();
    let latents = tmp.path().join("latents.safetensors");
    assert!(reference.tensors.contains_key("case/turbo/noise"));
    reference.save_latents("turbo", &latents);
    let out = tmp.path().join("turbo.png");
    let o = Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(["generate", "--model"])
        .arg(model.path())
        .args(["--prompt", case["prompt"].as_str().unwrap()])
        .args(["--width", &case["width"].to_string()])
        .args(["--height", &case["height"].to_string()])
        .arg("--latents")
        .arg(&latents)
        .arg("--output")
        .arg(&out)
        .env_remove("SDSERVE_MODEL")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let meta = sdserve::output::read_png_metadata(&out).unwrap();
    assert_eq!((meta.steps, meta.guidance), (1, 0.0));
    assert_eq!(meta.negative_prompt, None);
    let want = reference.image_levels("turbo", 0);
    let d = common::max_abs_diff(&common::png_levels(&out), &want);
    assert!(d <= 1.0, "max pixel difference {d} levels");
}

fn info(s: &Server) -> Value {
    client().get(s.url("/info")).send().unwrap().json().unwrap()
}

#[test]
fn the_server_offers_the_models_defaults_and_the_flags_replace_them() {
    let model = turbo_copy();
    let path = model.path().display().to_string();
    let s = Server::start(&["--model", &path, "--no-warmup"], &[]);
    let i = info(&s);
    assert_eq!(
        (&i["default_steps"], &i["default_guidance"]),
        (&json!(1), &json!(0.0)),
        "{i}"
    );
    let id = accepted(&s, json!({"prompt": "a red fox", "seed": 3}));
    let done = wait_final(&s, &id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        (&done["request"]["steps"], &done["request"]["guidance"]),
        (&json!(1), &json!(0.0)),
        "{done}"
    );
    let r = client()
        .post(s.url("/invocations"))
        .json(&json!({"prompt": "a red fox", "seed": 3}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v["parameters"]["num_inference_steps"], 1, "{v}");
    drop(s);

    // SDXL's own guidance default, then the flags over it.
    let base = common::model_dir("tiny-sdxl").display().to_string();
    let s = Server::start(&["--model", &base, "--no-warmup"], &[]);
    let i = info(&s);
    assert_eq!(
        (&i["default_steps"], &i["default_guidance"]),
        (&json!(30), &json!(5.0)),
        "{i}"
    );
    drop(s);
    let s = Server::start(
        &[
            "--model",
            &path,
            "--no-warmup",
            "--default-steps",
            "2",
            "--default-guidance",
            "3.5",
        ],
        &[],
    );
    let i = info(&s);
    assert_eq!(
        (&i["default_steps"], &i["default_guidance"]),
        (&json!(2), &json!(3.5)),
        "{i}"
    );
    let id = accepted(&s, json!({"prompt": "a red fox", "seed": 3}));
    let done = wait_final(&s, &id);
    assert_eq!(
        (&done["request"]["steps"], &done["request"]["guidance"]),
        (&json!(2), &json!(3.5)),
        "{done}"
    );
}

#[test]
fn bad_default_flags_are_refused_by_name() {
    let base = common::model_dir("tiny-sdxl").display().to_string();
    for (flag, value, says) in [
        ("--default-steps", "0", "--default-steps"),
        ("--default-steps", "900", "--max-steps"),
        ("--default-guidance", "-1", "--default-guidance"),
        ("--default-guidance", "NaN", "--default-guidance"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_sdserve"))
            .args(["serve", "--port", "0", "--model", &base])
            .arg(format!("{flag}={value}"))
            .env_remove("SDSERVE_MODEL")
            .env("SDSERVE_SAGEMAKER_MODEL_DIR", "/nonexistent")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flag} {value}");
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
}

/// `--default-steps` beyond what the model's scheduler can run (an LCM
/// folder's 50-step distillation schedule) fails the model load, naming the flag.
#[test]
fn default_steps_the_scheduler_cannot_run_fail_the_load_by_name() {
    let lcm = common::model_dir("tiny-lcm").display().to_string();
    let s = Server::spawn(
        &["--model", &lcm, "--no-warmup", "--default-steps", "60"],
        &[],
    );
    s.wait_for_log("model failed to load", "default-steps");
    let r = client().get(s.url("/ping")).send().unwrap();
    assert_eq!(r.status(), 503);
}
