//! The `sdserve` binary end to end on the tiny fixture models: diffusers parity
//! through `--latents`, reproducibility, PNG metadata, and clear errors for bad
//! flags and files.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use common::{Reference, model_dir};

fn sdserve(args: &[&str]) -> Output {
    sdserve_env(args, &[])
}

fn sdserve_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("SDSERVE_MODEL")
        .env_remove("SDSERVE_BF16_KERNEL")
        .envs(env.iter().copied())
        .output()
        .expect("runs sdserve")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "sdserve failed: {}", stderr(&o));
    o
}

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// Runs one reference case through the CLI with diffusers' latents (and, for
/// ancestral schedulers, its recorded noise) and returns the written images.
fn run_case(
    model: &str,
    reference: &Reference,
    case: &serde_json::Value,
    dir: &Path,
) -> Vec<PathBuf> {
    let name = case["name"].as_str().unwrap();
    let latents_file = dir.join(format!("{name}.safetensors"));
    reference.save_latents(name, &latents_file);
    let out = dir.join(format!("{name}.png"));
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let model_path = model_dir(model);
    let args: Vec<String> = vec![
        "generate".into(),
        "--model".into(),
        model_path.display().to_string(),
        "--prompt".into(),
        s(&case["prompt"]),
        "--steps".into(),
        s(&case["num_inference_steps"]),
        "--guidance".into(),
        s(&case["guidance_scale"]),
        "--scheduler".into(),
        s(&case["scheduler"]),
        "--width".into(),
        s(&case["width"]),
        "--height".into(),
        s(&case["height"]),
        "--latents".into(),
        latents_file.display().to_string(),
        "--output".into(),
        out.display().to_string(),
    ];
    let mut args = args;
    // Absent stays absent: SDXL conditions a missing negative prompt on zeros.
    for key in ["negative_prompt", "prompt_2", "negative_prompt_2"] {
        if let Some(text) = case[key].as_str() {
            args.push(format!("--{}", key.replace('_', "-")));
            args.push(text.to_string());
        }
    }
    for (k, v) in case["micro"].as_object().into_iter().flatten() {
        args.push(format!("--{}", k.replace('_', "-")));
        args.push(format!("{},{}", v[0], v[1]));
    }
    for (k, v) in case["overrides"].as_object().into_iter().flatten() {
        args.push("--scheduler-option".into());
        args.push(format!("{k}={}", s(v)));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = ok(sdserve(&args));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect()
}

/// Every pipeline case diffusers recorded, reproduced through `sdserve generate
/// --latents` (with `--scheduler-option` for the cases that override the
/// scheduler config), compared on the 8-bit PNG pixels.
fn cli_matches_diffusers(model: &str, refname: &str) {
    let reference = Reference::load(refname);
    let tmp = tempfile::tempdir().unwrap();
    let cases = reference.json["cases"].as_array().unwrap().clone();
    let mut checked = 0;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let paths = run_case(model, &reference, case, tmp.path());
        let expected = reference.get(&format!("case/{name}/image")); // [n, H, W, 3] in [0, 1]
        let (n, h, w, _) = expected.dims4().unwrap();
        assert_eq!(paths.len(), n, "{name}: image count");
        for (i, p) in paths.iter().enumerate() {
            let got = common::png_levels(p);
            assert_eq!(got.dims(), [h, w, 3], "{name}: size");
            let want = reference.image_levels(name, i);
            // One 8-bit level: the float images agree to ~1e-4 (tests/parity.rs),
            // so only values within that of a rounding boundary may flip.
            let d = common::max_abs_diff(&got, &want);
            assert!(
                d <= 1.0,
                "{name} image {i}: max pixel difference {d} levels"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, cases.len());
    assert!(checked >= 6, "only {checked} cases checked");
}

#[test]
fn cli_reproduces_diffusers_sd1() {
    cli_matches_diffusers("tiny-sd1", "sd1");
}

#[test]
fn cli_reproduces_diffusers_sd2() {
    cli_matches_diffusers("tiny-sd2", "sd2");
}

/// Every SDXL case: each scheduler, guidance on and off, absent vs empty
/// negative prompt, `--prompt-2`, the size flags, non-square, unicode and
/// over-long prompts, Turbo's single step, UniPC.
#[test]
fn cli_reproduces_diffusers_sdxl() {
    cli_matches_diffusers("tiny-sdxl", "sdxl");
}

#[test]
fn sdxl_fields_travel_through_png_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("tiny-sdxl");
    let first = tmp.path().join("a.png");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a lighthouse",
        "--prompt-2",
        "an oil painting",
        "--original-size",
        "64,80",
        "--crops-coords-top-left",
        "8,0",
        "--steps",
        "2",
        "--seed",
        "3",
        "--output",
        first.to_str().unwrap(),
    ];
    ok(sdserve(&args));
    let meta = sdserve::output::read_png_metadata(&first).unwrap();
    assert_eq!(meta.prompt_2.as_deref(), Some("an oil painting"));
    assert_eq!(meta.negative_prompt, None);
    assert_eq!(meta.micro.original_size, Some([64, 80]));
    assert_eq!(meta.micro.crops_coords_top_left, Some([8, 0]));
    // --from-image reproduces it, and the fields made a difference.
    let again = tmp.path().join("b.png");
    ok(sdserve(&[
        "generate",
        "--from-image",
        first.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--output",
        again.to_str().unwrap(),
    ]));
    assert_eq!(rgb(&first), rgb(&again));
    let plain = tmp.path().join("c.png");
    let mut without = args[..5].to_vec();
    without.extend([
        "--steps",
        "2",
        "--seed",
        "3",
        "--output",
        plain.to_str().unwrap(),
    ]);
    ok(sdserve(&without));
    assert_ne!(rgb(&first), rgb(&plain));
    // A bad pair names its flag.
    assert_bad_flag(
        sdserve(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--target-size",
            "0,64",
        ]),
        "--target-size",
    );
}

fn generate(dir: &Path, name: &str, extra: &[&str]) -> Output {
    generate_env(dir, name, extra, &[])
}

fn generate_env(dir: &Path, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let model = model_dir("tiny-sd1");
    let out = dir.join(name);
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    sdserve_env(&args, env)
}

#[test]
fn same_seed_same_bytes_and_metadata_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let base = [
        "--prompt",
        "a red cube",
        "--steps",
        "3",
        "--scheduler",
        "euler_a",
        "--seed",
        "1234",
    ];
    ok(generate(tmp.path(), "a.png", &base));
    ok(generate(tmp.path(), "b.png", &base));
    let a = std::fs::read(tmp.path().join("a.png")).unwrap();
    let b = std::fs::read(tmp.path().join("b.png")).unwrap();
    assert_eq!(a, b, "same seed must give identical bytes");

    let mut other = base.to_vec();
    other[7] = "1235";
    ok(generate(tmp.path(), "c.png", &other));
    assert_ne!(
        rgb(&tmp.path().join("a.png")),
        rgb(&tmp.path().join("c.png")),
        "another seed, another image"
    );

    // The PNG carries its parameters; --from-image regenerates the same pixels.
    let meta = sdserve::output::read_png_metadata(&tmp.path().join("a.png")).unwrap();
    assert_eq!(meta.seed, 1234);
    assert_eq!(meta.scheduler, "euler_a");
    assert_eq!(meta.prompt, "a red cube");
    let from = tmp.path().join("a.png");
    ok(generate(
        tmp.path(),
        "d.png",
        &["--from-image", from.to_str().unwrap()],
    ));
    assert_eq!(
        rgb(&tmp.path().join("a.png")),
        rgb(&tmp.path().join("d.png"))
    );
    let text = String::from_utf8_lossy(&a);
    assert!(
        text.contains("parameters") && text.contains("Sampler: Euler a"),
        "A1111 parameters chunk"
    );
}

#[test]
fn several_images_get_consecutive_seeds_and_match_single_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let common = [
        "--prompt",
        "two boats",
        "--steps",
        "2",
        "--scheduler",
        "ddim",
        "--width",
        "96",
        "--height",
        "64",
    ];
    let mut batch = common.to_vec();
    batch.extend_from_slice(&["--seed", "7", "--num-images", "2"]);
    let o = ok(generate(tmp.path(), "batch.png", &batch));
    let paths: Vec<PathBuf> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(
        paths,
        vec![
            tmp.path().join("batch-0.png"),
            tmp.path().join("batch-1.png")
        ]
    );
    let mut single = common.to_vec();
    single.extend_from_slice(&["--seed", "8"]);
    ok(generate(tmp.path(), "single.png", &single));
    // Image 1 of the batch is seed 8; batching does not change it.
    let d = common::max_abs_diff(
        &Tensor::from_vec(rgb(&paths[1]).into_raw(), (64 * 96 * 3,), &Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap(),
        &Tensor::from_vec(
            rgb(&tmp.path().join("single.png")).into_raw(),
            (64 * 96 * 3,),
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap(),
    );
    assert!(
        d <= 1.0,
        "batched image differs from its single run by {d} levels"
    );
    assert_eq!(rgb(&paths[0]).dimensions(), (96, 64));
}

fn assert_bad_flag(o: Output, flag: &str) {
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected a usage error for {flag}: {err}"
    );
    assert!(err.contains(flag), "error should name {flag}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Every bf16 kernel this CPU can run (`SDSERVE_BF16_KERNEL`), end to end: close to
/// the f32 image and not equal to it. (Kernels differ only in the order of their f32
/// sums, but on this random tiny model that moves the image about as far as bf16
/// rounding does: mean 0.5, max 6 levels between avx2 and avx512bf16.)
#[test]
fn bf16_on_the_cpu_is_close_to_f32() {
    use sdserve::kernels::bf16::Kernel;
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--prompt", "a red fox", "--steps", "6", "--seed", "7"];
    let with = |dtype: &str, kernel: &str| {
        let mut v = args.to_vec();
        v.extend_from_slice(&["--dtype", dtype]);
        let name = format!("{dtype}-{kernel}.png");
        let env: &[(&str, &str)] = if kernel.is_empty() {
            &[]
        } else {
            &[("SDSERVE_BF16_KERNEL", kernel)]
        };
        ok(generate_env(tmp.path(), &name, &v, env));
        rgb(&tmp.path().join(name))
    };
    let diff = |a: &image::RgbImage, b: &image::RgbImage| {
        let d: Vec<f64> = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .collect();
        let max = d.iter().cloned().fold(0.0, f64::max);
        (d.iter().sum::<f64>() / d.len() as f64, max)
    };
    let full = with("f32", "");
    for kernel in Kernel::ALL.into_iter().filter(|k| k.usable()) {
        let mixed = with("bf16", kernel.name());
        let (mean, max) = diff(&full, &mixed);
        // Measured once at 96 px with 10 steps (this test runs 6): mean 0.37, max 4 (8-bit levels).
        eprintln!("bf16 ({}) vs f32: mean {mean:.3}, max {max}", kernel.name());
        assert!(max > 0.0, "bf16 gave the f32 image: not taken");
        assert!(
            mean < 1.5 && max < 24.0,
            "bf16 ({}) too far from f32: mean {mean}, max {max}",
            kernel.name()
        );
    }
}

#[test]
fn bad_inputs_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let p = ["--prompt", "x", "--steps", "1"];
    let with = |extra: &[&str]| {
        let mut v = p.to_vec();
        v.extend_from_slice(extra);
        generate(tmp.path(), "bad.png", &v)
    };
    assert_bad_flag(with(&["--width", "65"]), "--width");
    assert_bad_flag(with(&["--height", "0"]), "--height");
    assert_bad_flag(with(&["--width", "4096", "--height", "4096"]), "--width");
    assert_bad_flag(
        generate(tmp.path(), "bad.png", &["--prompt", "x", "--steps", "0"]),
        "--steps",
    );
    let o = with(&["--scheduler", "heun"]);
    assert_bad_flag(o, "--scheduler");
    assert!(
        stderr(&with(&["--scheduler", "heun"])).contains("dpmpp_2m_karras"),
        "lists the choices"
    );
    assert_bad_flag(with(&["--guidance", "NaN"]), "--guidance");
    // No GPU here (CI): the message says why and what to do.
    let o = with(&["--device", "cuda"]);
    assert_bad_flag(o, "--device");
    let err = stderr(&with(&["--device", "cuda"]));
    let why = if cfg!(feature = "cuda") {
        "--device cpu"
    } else {
        "no CUDA support"
    };
    assert!(err.contains(why), "{err}");
    assert_bad_flag(with(&["--device", "tpu"]), "--device");
    assert_bad_flag(with(&["--dtype", "f16"]), "--dtype");
    assert!(
        stderr(&with(&["--dtype", "f16"])).contains("bf16"),
        "suggests bf16"
    );
    assert_bad_flag(with(&["--dtype", "f64"]), "--dtype");
    let bad_kernel = generate_env(
        tmp.path(),
        "bad.png",
        &["--prompt", "x", "--steps", "1", "--dtype", "bf16"],
        &[("SDSERVE_BF16_KERNEL", "mmx")],
    );
    assert_bad_flag(bad_kernel, "SDSERVE_BF16_KERNEL");
    assert_bad_flag(with(&["--num-images", "0"]), "--num-images");
    assert_bad_flag(
        with(&["--scheduler-option", "timestep_spacng=trailing"]),
        "--scheduler-option",
    );
    assert_bad_flag(
        with(&["--scheduler-option", "timestep_spacing"]),
        "--scheduler-option",
    );
    let o = with(&[
        "--scheduler",
        "euler",
        "--scheduler-option",
        "timestep_spacing=sideways",
    ]);
    assert_bad_flag(o, "--scheduler-option timestep_spacing");
    // Integral floats are integers, as over HTTP; out of range is named.
    let mut ok = p.to_vec();
    ok.extend_from_slice(&[
        "--scheduler",
        "dpmpp_2m",
        "--scheduler-option",
        "solver_order=2.0",
    ]);
    let o = generate(tmp.path(), "order.png", &ok);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = with(&[
        "--scheduler",
        "dpmpp_2m",
        "--scheduler-option",
        "solver_order=2.5",
    ]);
    assert_bad_flag(o, "--scheduler-option solver_order");
    assert_bad_flag(
        with(&["--latents", "/nonexistent/latents.safetensors"]),
        "--latents",
    );
    // Latents of the wrong shape for the size.
    let lat = tmp.path().join("lat.safetensors");
    let t = Tensor::zeros((1, 4, 5, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents".to_string(), t)]),
        &lat,
    )
    .unwrap();
    assert_bad_flag(with(&["--latents", lat.to_str().unwrap()]), "--latents");
    assert_bad_flag(
        generate(tmp.path(), "bad.png", &["--steps", "1"]),
        "--prompt",
    );
    assert!(
        !tmp.path().join("bad.png").exists(),
        "nothing written on error"
    );
}

#[test]
fn missing_model_names_the_folder() {
    let o = sdserve(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("/nonexistent/model"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn hub_ids_resolve_from_the_hf_cache_offline() {
    // Lay the fixture out as hf-hub's cache does: models--org--name/{refs/main, snapshots/<sha>/...}.
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--sdserve-test--tiny-sd1");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    common::copy_dir(&model_dir("tiny-sd1"), &repo.join("snapshots").join(sha));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    let out = home.path().join("hub.png");
    let o = Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args([
            "generate",
            "--model",
            "sdserve-test/tiny-sd1",
            "--prompt",
            "x",
            "--steps",
            "1",
            "--output",
        ])
        .arg(&out)
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    ok(o);
    assert!(out.is_file());

    // Not in the cache: the error says how to use a local folder.
    let o = Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args([
            "generate",
            "--model",
            "sdserve-test/absent",
            "--prompt",
            "x",
        ])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("HF_HUB_OFFLINE") && err.contains("--model"),
        "{err}"
    );
}

#[test]
fn unreachable_hub_says_how_to_use_a_local_folder() {
    let home = tempfile::tempdir().unwrap();
    // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    let o = Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(["download", "sdserve-test/absent"])
        .env("HF_HOME", home.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("cannot download sdserve-test/absent") && err.contains("--model"),
        "{err}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let o = ok(generate(
        tmp.path(),
        "j.png",
        &["--prompt", "x", "--steps", "1", "--log-format", "json"],
    ));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{v}");
    }
}
