//! Edit jobs through `POST /generate` over real HTTP on tiny-sd1: an
//! `init_image` sent as base64 or named as an earlier result, the same PNG
//! `sdserve generate --init-image` writes for the same parameters, the input
//! kept in storage beside the record so a killed server runs the edit after a
//! restart, and bad inputs as 400s naming the field; the same for inpainting
//! (`mask_image`, `--mask`) on tiny-sd1's ordinary UNet.

mod common;

use std::path::PathBuf;
use std::process::Command;

use base64::Engine as _;
use common::server::{Server, accepted, client, get_png, tiny, wait_final, wait_status};
use serde_json::{Value, json};

fn input_png() -> PathBuf {
    common::fixtures().join("edit/input-96.png")
}

/// What `sdserve generate` makes of `init` with the job API's defaults for
/// the rest (style "none": the text as the prompt).
fn cli_edit(init: &std::path::Path, prompt: &str, seed: u64, strength: f64) -> image::RgbImage {
    cli_run(init, None, prompt, seed, strength)
}

/// [`cli_edit`] with `--mask` when `mask` is given.
fn cli_run(
    init: &std::path::Path,
    mask: Option<&std::path::Path>,
    prompt: &str,
    seed: u64,
    strength: f64,
) -> image::RgbImage {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cli.png");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdserve"));
    cmd.arg("generate");
    if let Some(mask) = mask {
        cmd.arg("--mask").arg(mask);
    }
    let status = cmd
        .args(["--model", &tiny(), "--prompt", prompt])
        .args([
            "--steps",
            "4",
            "--scheduler",
            "euler",
            "--seed",
            &seed.to_string(),
        ])
        .args(["--strength", &strength.to_string(), "--init-image"])
        .arg(init)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    image::open(&out).unwrap().to_rgb8()
}

#[test]
fn edits_from_base64_and_from_an_earlier_result() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(input_png()).unwrap());
    let body = json!({"text": "a red boat", "style": "none", "steps": 4, "scheduler": "euler",
                      "seed": 3, "init_image": b64, "strength": 0.75});
    let id = accepted(&s, body);
    let done = wait_final(&s, &id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request"]["strength"], 0.75);
    assert_eq!(done["mask_image_url"], Value::Null, "{done}");
    let shown = get_png(&s, done["init_image_url"].as_str().unwrap());
    assert!(shown == image::open(input_png()).unwrap().to_rgb8());
    assert!(
        done["request"].get("init_image").is_none(),
        "no image bytes in the record: {done}"
    );
    let served = get_png(&s, done["image_url"].as_str().unwrap());
    assert_eq!(served.dimensions(), (96, 96));
    assert!(served == cli_edit(&input_png(), "a red boat", 3, 0.75));

    // Edit that result again, by reference.
    let again = accepted(
        &s,
        json!({"text": "a red boat", "style": "none", "steps": 4, "scheduler": "euler",
               "seed": 4, "init_image": {"image_id": id, "index": 0}, "strength": 0.5}),
    );
    let done2 = wait_final(&s, &again);
    assert_eq!(done2["status"], "completed", "{done2}");
    let second = get_png(&s, done2["image_url"].as_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let first_png = dir.path().join("first.png");
    served.save(&first_png).unwrap();
    assert!(second == cli_edit(&first_png, "a red boat", 4, 0.5));

    let bad = |body: Value, field: &str| {
        let r = client()
            .post(s.url("/generate"))
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().unwrap();
        assert_eq!(v["field"], field, "{v}");
    };
    let missing = "00000000-0000-4000-8000-000000000000";
    bad(json!({"text": "x", "init_image": "%%%"}), "init_image");
    bad(
        json!({"text": "x", "init_image": {"image_id": missing}}),
        "init_image",
    );
    bad(
        json!({"text": "x", "init_image": {"image_id": id, "index": 5}}),
        "init_image",
    );
    bad(json!({"text": "x", "strength": 0.5}), "strength");
    bad(
        json!({"text": "x", "init_image": b64, "strength": 1.5}),
        "strength",
    );
}

#[test]
fn a_killed_server_runs_an_accepted_edit_after_restart() {
    let data = tempfile::tempdir().unwrap();
    let storage = data.path().to_str().unwrap().to_string();
    let args = ["--model", &tiny(), "--storage", &storage];
    let s = Server::start(&args, &[]);
    let blocker = accepted(&s, json!({"text": "a", "steps": 400, "scheduler": "ddim"}));
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(input_png()).unwrap());
    let edit = accepted(
        &s,
        json!({"text": "a red boat", "style": "none", "steps": 4, "scheduler": "euler",
               "seed": 9, "init_image": format!("data:image/png;base64,{b64}"),
               "strength": 0.75}),
    );
    wait_status(&s, &blocker, "processing");
    s.kill();
    let input = data.path().join(format!("inputs/{edit}/init.png"));
    assert!(input.is_file(), "the input is stored with the job");

    let s = Server::start(&args, &[]);
    let done = wait_final(&s, &edit);
    assert_eq!(done["status"], "completed", "{done}");
    let served = get_png(&s, done["image_url"].as_str().unwrap());
    assert!(served == cli_edit(&input_png(), "a red boat", 9, 0.75));
}

fn mask_png() -> PathBuf {
    common::fixtures().join("edit/mask-96.png")
}

fn b64_of(path: &std::path::Path) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

#[test]
fn an_inpainting_job_keeps_its_mask_through_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let storage = data.path().to_str().unwrap().to_string();
    let args = ["--model", &tiny(), "--storage", &storage];
    let s = Server::start(&args, &[]);
    let blocker = accepted(&s, json!({"text": "a", "steps": 400, "scheduler": "ddim"}));
    let body = |seed: u64| {
        json!({"text": "a red boat", "style": "none", "steps": 4, "scheduler": "euler",
               "seed": seed, "init_image": b64_of(&input_png()),
               "mask_image": format!("data:image/png;base64,{}", b64_of(&mask_png()))})
    };
    let edit = accepted(&s, body(9));
    wait_status(&s, &blocker, "processing");
    s.kill();
    for name in ["init", "mask"] {
        let stored = data.path().join(format!("inputs/{edit}/{name}.png"));
        assert!(stored.is_file(), "{name} is stored with the job");
    }

    let s = Server::start(&args, &[]);
    let done = wait_final(&s, &edit);
    assert_eq!(done["status"], "completed", "{done}");
    // Inpainting's default strength, as diffusers' pipeline has it.
    assert_eq!(done["request"]["strength"], 1.0, "{done}");
    assert!(done["request"].get("mask_image").is_none(), "{done}");
    // GET /image/{id} shows what was edited: the stored picture and mask.
    let shown = |key: &str| get_png(&s, done[key].as_str().expect(key));
    assert!(shown("init_image_url") == image::open(input_png()).unwrap().to_rgb8());
    assert!(shown("mask_image_url") == image::open(mask_png()).unwrap().to_rgb8());
    let served = get_png(&s, done["image_url"].as_str().unwrap());
    let cli = cli_run(&input_png(), Some(&mask_png()), "a red boat", 9, 1.0);
    assert!(
        served == cli,
        "the recovered job and --mask inpaint differently"
    );
    // Without the mask the same seed is image to image at 1.0: another picture.
    assert!(served != cli_edit(&input_png(), "a red boat", 9, 1.0));

    // A mask by reference to an earlier result, and bad masks named.
    let by_ref = accepted(
        &s,
        json!({"text": "a red boat", "style": "none", "steps": 4, "scheduler": "euler",
               "seed": 2, "strength": 0.5, "init_image": {"image_id": edit},
               "mask_image": b64_of(&mask_png())}),
    );
    let done = wait_final(&s, &by_ref);
    assert_eq!(done["status"], "completed", "{done}");
    let bad = |body: Value, field: &str| {
        let r = client()
            .post(s.url("/generate"))
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().unwrap();
        assert_eq!(v["field"], field, "{v}");
    };
    bad(
        json!({"text": "x", "init_image": b64_of(&input_png()), "mask_image": "%%%"}),
        "mask_image",
    );
    bad(
        json!({"text": "x", "mask_image": b64_of(&mask_png())}),
        "mask_image",
    );
}
