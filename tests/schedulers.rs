//! Parity of sdserve's scheduler ports with diffusers 0.42.1.
//!
//! The references come from `tools/make_scheduler_refs.py`: for each case it builds
//! `Class.from_config(<stable-diffusion-v1-5 scheduler_config.json>, **overrides)`,
//! calls `set_timesteps(steps)` and runs a whole denoising loop on a [2, 4, 3, 5]
//! (extras: [1, 4, 3, 5]) float32 sample with the synthetic model
//! `0.3 * x + 0.05 * cos(t / 97) * x.flip(-1)`. Here the same loop runs through
//! `SchedulerConfig::build` with the same overrides, free-running (each step consumes
//! this side's previous output), and every step is compared with diffusers'.
//!
//! `add_noise` is compared at the first, middle and last step of every case
//! (diffusers after `set_begin_index(i)`, as image to image calls it); measured
//! worst relative error 2.5e-7.
//!
//! Two passes: teacher-forced (each step starts from diffusers' previous output, so
//! every step is measured alone) and free-running (sdserve's own loop end to end).
//!
//! Tolerances. Both sides compute in float32 with the same operation order; the
//! tables (`alphas_cumprod`) are bit-identical to torch's. What remains are last-bit
//! differences: torch's CPU `sqrt`/`log`/`exp` are not always correctly rounded (its
//! `** 0.5` is 1 ulp off for ~20% of the training sigmas), numpy's float32 `log`
//! likewise, and candle divides by a scalar as a multiplication by its reciprocal.
//! Errors are measured against max(|step input|, |step output|), since a step that
//! cancels most of its input (zero-terminal-SNR Euler goes from σ = 4096 to 14 in one
//! step) scales the input's last-bit differences up by the same factor. Measured
//! (print with `--nocapture`): teacher-forced ≤ 6.5e-7 for every scheduler;
//! free-running ≤ 1e-6 except zero-terminal-SNR Euler / Euler ancestral, 3.9e-5 and
//! 4.7e-6 (σ_max is 4096 in torch but 4095.9998 correctly rounded, amplified ~300×
//! by that first step and carried through the loop). The limits, 1e-5 per step and
//! 1e-4 for whole loops, leave margin over those and still catch real mistakes: a
//! 2e-4 relative change in one DPM-Solver coefficient fails 15 cases.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use common::{max_abs, max_abs_diff};
use serde_json::{Map, Value, json};

use sdserve::diffusion::latents::ReplayNoise;
use sdserve::diffusion::schedulers::common::{BetaConfig, ClassConfig};
use sdserve::diffusion::schedulers::{SchedulerConfig, SchedulerKind};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/references");

/// Allowed error of a step's output, relative to the reference tensor's largest magnitude.
const TRAJECTORY_RTOL: f32 = 1e-5;
/// The same for whole loops run on this side's own outputs, where differences carry over.
const FREE_RUNNING_RTOL: f32 = 1e-4;
/// Allowed relative error of fractional timesteps, sigmas and init_noise_sigma.
const SCALAR_RTOL: f64 = 1e-6;

struct Fixture {
    meta: Value,
    tensors: HashMap<String, Tensor>,
    base: SchedulerConfig,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let text = std::fs::read_to_string(format!("{FIXTURES}/schedulers.json"))
            .expect("schedulers.json");
        let meta: Value = serde_json::from_str(&text).expect("valid JSON");
        let tensors = candle_core::safetensors::load(
            format!("{FIXTURES}/schedulers.safetensors"),
            &Device::Cpu,
        )
        .expect("schedulers.safetensors");
        let base =
            SchedulerConfig::from_json(&meta["base_config"].to_string()).expect("base config");
        Fixture {
            meta,
            tensors,
            base,
        }
    })
}

impl Fixture {
    fn tensor(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("missing tensor {key}"))
    }

    fn vec(&self, key: &str) -> Vec<f32> {
        self.tensor(key)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }
}

fn kind(name: &str) -> SchedulerKind {
    SchedulerKind::parse(name).unwrap_or_else(|| panic!("unknown kind {name}"))
}

fn overrides(v: &Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// The synthetic model of the reference script, in the same float32 operations.
fn model(x: &Tensor, t: f64) -> Tensor {
    let c = 0.05 * (t / 97.0).cos();
    (x.affine(0.3, 0.0).unwrap() + x.flip(&[3]).unwrap().affine(c, 0.0).unwrap()).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1.0)
}

/// Compares timesteps: integral ones exactly, fractional ones to `SCALAR_RTOL`.
fn check_timesteps(what: &str, ours: &[f64], reference: &[f32], failures: &mut Vec<String>) {
    if ours.len() != reference.len() {
        failures.push(format!(
            "{what}: {} timesteps, diffusers has {}: {ours:?} vs {reference:?}",
            ours.len(),
            reference.len()
        ));
        return;
    }
    for (i, (&a, &b)) in ours.iter().zip(reference).enumerate() {
        let b = b as f64;
        let ok = if b.fract() == 0.0 && a.fract() == 0.0 {
            a == b
        } else {
            rel(a, b) <= SCALAR_RTOL
        };
        if !ok {
            failures.push(format!("{what}: timestep {i} is {a}, diffusers {b}"));
            return;
        }
    }
}

fn check_sigmas(what: &str, ours: &[f64], reference: &[f32], failures: &mut Vec<String>) {
    if ours.len() != reference.len() {
        failures.push(format!(
            "{what}: {} sigmas, diffusers has {}",
            ours.len(),
            reference.len()
        ));
        return;
    }
    for (i, (&a, &b)) in ours.iter().zip(reference).enumerate() {
        if rel(a, b as f64) > SCALAR_RTOL {
            failures.push(format!("{what}: sigma {i} is {a}, diffusers {b}"));
            return;
        }
    }
}

#[test]
fn alphas_cumprod_tables_match_torch() {
    let fx = fixture();
    for table in fx.meta["tables"].as_array().unwrap() {
        let name = table["name"].as_str().unwrap();
        let merged = fx.base.merged(&overrides(&table["overrides"]));
        let cfg = ClassConfig::new("DDIMScheduler", &merged);
        let ours = BetaConfig::read(&cfg, true)
            .unwrap()
            .alphas_cumprod("DDIMScheduler")
            .unwrap();
        let reference = fx.vec(table["key"].as_str().unwrap());
        assert_eq!(ours.len(), reference.len());
        let max_rel = ours
            .iter()
            .zip(&reference)
            .map(|(&a, &b)| ((a - b).abs() / b.abs().max(f32::MIN_POSITIVE)) as f64)
            .fold(0.0, f64::max);
        let mismatches = ours.iter().zip(&reference).filter(|(a, b)| a != b).count();
        println!(
            "table {name}: {mismatches} of {} differ, max relative error {max_rel:.2e}",
            ours.len()
        );
        if name == "rescaled_zero_snr" {
            // torch's float32 sqrt is not correctly rounded; the rescale goes through it.
            let max_abs = ours
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(max_abs < 1e-6, "{name}: max abs error {max_abs}");
        } else {
            // torch.linspace's float32 formula and cumprod's f64 accumulation are mirrored exactly.
            assert_eq!(mismatches, 0, "{name}: alphas_cumprod differs from torch");
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Every step starts from diffusers' previous output: measures each step alone.
    TeacherForced,
    /// Every step starts from our own previous output: the whole loop as sdserve runs it.
    FreeRunning,
}

/// Worst errors of one case: relative to max|output| and to max(|input|, |output|).
#[derive(Default, Clone, Copy)]
struct Worst {
    out: f32,
    io: f32,
}

/// Runs one reference case through `SchedulerConfig::build`; `Err` describes the
/// first mismatch beyond `rtol * max(|step input|, |step output|)`.
fn run_case(fx: &Fixture, case: &Value, mode: Mode, rtol: f32) -> Result<Worst, String> {
    let name = case["name"].as_str().unwrap();
    let steps = case["steps"].as_u64().unwrap() as usize;
    let keys = &case["keys"];
    let mut sched = fx
        .base
        .build(
            kind(case["kind"].as_str().unwrap()),
            &overrides(&case["overrides"]),
            steps,
        )
        .map_err(|e| format!("{name}: build failed: {e}"))?;

    let mut failures = Vec::new();
    check_timesteps(
        name,
        sched.timesteps(),
        &fx.vec(keys["timesteps"].as_str().unwrap()),
        &mut failures,
    );
    if let Some(k) = keys.get("sigmas") {
        match sched.sigmas() {
            Some(s) => check_sigmas(name, s, &fx.vec(k.as_str().unwrap()), &mut failures),
            None => failures.push(format!("{name}: scheduler has no sigmas")),
        }
    }
    let init_ref = fx.vec(keys["init_noise_sigma"].as_str().unwrap())[0] as f64;
    if rel(sched.init_noise_sigma(), init_ref) > SCALAR_RTOL {
        failures.push(format!(
            "{name}: init_noise_sigma {} vs diffusers {init_ref}",
            sched.init_noise_sigma()
        ));
    }
    if !failures.is_empty() {
        return Err(failures.join("\n"));
    }

    let prev_ref = fx.tensor(keys["prev"].as_str().unwrap());
    let batch = prev_ref.dim(1).unwrap();
    let scaled_ref = keys.get("scaled").map(|k| fx.tensor(k.as_str().unwrap()));
    let mut noise = ReplayNoise::new(match keys.get("noise") {
        Some(k) => {
            let all = fx.tensor(k.as_str().unwrap());
            (0..all.dim(0).unwrap())
                .map(|i| all.get(i).unwrap())
                .collect::<Vec<_>>()
        }
        None => Vec::new(),
    });

    let latents = fx
        .tensor(fx.meta["latents"].as_str().unwrap())
        .narrow(0, 0, batch)
        .unwrap();
    let init = match mode {
        Mode::TeacherForced => init_ref,
        Mode::FreeRunning => sched.init_noise_sigma(),
    };
    let mut x = latents.affine(init, 0.0).unwrap();
    let mut worst = Worst::default();
    let mut compare = |what: &str, ours: &Tensor, reference: &Tensor, input_scale: f32| {
        let err = max_abs_diff(ours, reference);
        let out_scale = max_abs(reference);
        // Relative to the step's input or output, whichever is larger: a step that
        // cancels most of its input (zero-terminal-SNR Euler goes from sigma 4096 to 14)
        // scales last-bit differences of the input up by the same factor.
        let scale = out_scale.max(input_scale);
        worst.out = worst.out.max(err / out_scale.max(1e-30));
        worst.io = worst.io.max(err / scale.max(1e-30));
        if err <= rtol * scale {
            Ok(())
        } else {
            Err(format!(
                "{name}: {what} differs by {err:.3e} (scale {scale:.3e}, relative {:.3e})",
                err / scale
            ))
        }
    };
    let timesteps = sched.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let input = match (mode, i) {
            (Mode::TeacherForced, 1..) => prev_ref.get(i - 1).unwrap(),
            _ => x.clone(),
        };
        let input_scale = max_abs(&input);
        let x_in = sched
            .scale_model_input(&input, i)
            .map_err(|e| format!("{name}: scale {i}: {e}"))?;
        if let Some(s) = scaled_ref {
            compare(
                &format!("scaled input {i}"),
                &x_in,
                &s.get(i).unwrap(),
                input_scale,
            )?;
        }
        let out = model(&x_in, t);
        x = sched
            .step(&out, i, &input, &mut noise)
            .map_err(|e| format!("{name}: step {i} failed: {e}"))?;
        compare(
            &format!("step {i} (t = {t})"),
            &x,
            &prev_ref.get(i).unwrap(),
            input_scale,
        )?;
    }
    Ok(worst)
}

/// Runs every case in `mode`, prints the worst errors per scheduler and fails on any mismatch.
fn check_all_cases(mode: Mode, rtol: f32) {
    let fx = fixture();
    let cases = fx.meta["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    // family -> (worst vs max|out|, its case, worst vs max(|in|, |out|), its case)
    let mut worst: HashMap<String, (f32, String, f32, String)> = HashMap::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let kind_name = case["kind"].as_str().unwrap();
        match run_case(fx, case, mode, rtol) {
            Err(e) => failures.push(e),
            Ok(w) => {
                let family = if name.starts_with("extra") {
                    format!("{kind_name} (extras)")
                } else {
                    kind_name.to_string()
                };
                let entry = worst
                    .entry(family)
                    .or_insert((0.0, String::new(), 0.0, String::new()));
                if w.out >= entry.0 {
                    (entry.0, entry.1) = (w.out, name.to_string());
                }
                if w.io >= entry.2 {
                    (entry.2, entry.3) = (w.io, name.to_string());
                }
            }
        }
    }
    let mut families: Vec<_> = worst.into_iter().collect();
    families.sort_by(|a, b| a.0.cmp(&b.0));
    println!("{mode:?}:");
    for (family, (out, case, io, case_io)) in families {
        println!(
            "  {family:<25} err/max|out| {out:.2e} ({case}); err/max(|in|,|out|) {io:.2e} ({case_io})"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from diffusers:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn every_step_matches_diffusers() {
    check_all_cases(Mode::TeacherForced, TRAJECTORY_RTOL);
}

#[test]
fn whole_loops_match_diffusers() {
    check_all_cases(Mode::FreeRunning, FREE_RUNNING_RTOL);
}

#[test]
fn timestep_sweeps_match_diffusers() {
    let fx = fixture();
    let steps_list: Vec<usize> = fx.meta["sweep_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let mut failures = Vec::new();
    for sweep in fx.meta["sweeps"].as_array().unwrap() {
        let k = kind(sweep["kind"].as_str().unwrap());
        let ov = overrides(&sweep["overrides"]);
        let ts_all = fx.vec(sweep["timesteps"].as_str().unwrap());
        let sig_all = sweep.get("sigmas").map(|s| fx.vec(s.as_str().unwrap()));
        let (mut ts_off, mut sig_off) = (0usize, 0usize);
        for &steps in &steps_list {
            let what = format!(
                "{} {:?} steps={steps}",
                sweep["kind"],
                ov.get("timestep_spacing")
            );
            let sched = match fx.base.build(k, &ov, steps) {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("{what}: {e}"));
                    break;
                }
            };
            let n = sched.timesteps().len();
            if ts_off + n > ts_all.len() {
                failures.push(format!("{what}: more timesteps than diffusers"));
                break;
            }
            let before = failures.len();
            check_timesteps(
                &what,
                sched.timesteps(),
                &ts_all[ts_off..ts_off + n],
                &mut failures,
            );
            ts_off += n;
            if let (Some(all), Some(ours)) = (&sig_all, sched.sigmas()) {
                check_sigmas(
                    &what,
                    ours,
                    &all[sig_off..(sig_off + ours.len()).min(all.len())],
                    &mut failures,
                );
                sig_off += ours.len();
            }
            if failures.len() > before {
                break;
            }
        }
        if failures.is_empty() {
            assert_eq!(ts_off, ts_all.len(), "{}: timestep count", sweep["kind"]);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `add_noise` at the first, middle and last step of every case, as image-to-image
/// calls it for the first step it keeps (diffusers after `set_begin_index(i)`).
#[test]
fn add_noise_matches_diffusers() {
    let fx = fixture();
    let latents = fx.tensor(fx.meta["latents"].as_str().unwrap());
    let original = fx.tensor("add_noise_original");
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut worst = 0f32;
    for case in fx.meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let sched = fx
            .base
            .build(
                kind(case["kind"].as_str().unwrap()),
                &overrides(&case["overrides"]),
                case["steps"].as_u64().unwrap() as usize,
            )
            .unwrap();
        let reference = fx.tensor(case["keys"]["add_noise"].as_str().unwrap());
        let batch = reference.dim(1).unwrap();
        let (noise, x0) = (
            latents.narrow(0, 0, batch).unwrap(),
            original.narrow(0, 0, batch).unwrap(),
        );
        let steps = case["add_noise_steps"].as_array().unwrap();
        for (j, i) in steps.iter().enumerate() {
            let i = i.as_u64().unwrap() as usize;
            let ours = sched.add_noise(&x0, &noise, i).unwrap();
            let want = reference.get(j).unwrap();
            let rel = max_abs_diff(&ours, &want) / max_abs(&want);
            worst = worst.max(rel);
            checked += 1;
            if rel > TRAJECTORY_RTOL {
                failures.push(format!(
                    "{name}: add_noise at step {i} differs by {rel:.3e}"
                ));
            }
        }
    }
    println!("add_noise: {checked} checks, worst relative error {worst:.2e}");
    assert!(checked > 300, "only {checked} add_noise references");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn pndm_plms_calls_the_unet_one_extra_time() {
    let fx = fixture();
    let s = fx
        .base
        .build(SchedulerKind::Default, &Map::new(), 4)
        .unwrap();
    assert!(
        s.class_name() == "PNDMScheduler",
        "SD 1.5's default scheduler is PNDM"
    );
    // leading spacing with steps_offset 1: [1, 251, 501, 751], second one repeated.
    assert_eq!(s.timesteps(), &[751.0, 501.0, 501.0, 251.0, 1.0]);
    let one = fx.base.build(SchedulerKind::Pndm, &Map::new(), 1).unwrap();
    assert_eq!(one.timesteps(), &[1.0]);
}

fn build_err(k: SchedulerKind, ov: Value, steps: usize) -> String {
    let fx = fixture();
    match fx.base.build(k, &overrides(&ov), steps) {
        Ok(s) => panic!("{k} with {ov} built: {:?}", s.timesteps()),
        Err(e) => e.to_string(),
    }
}

const KINDS: [SchedulerKind; 7] = [
    SchedulerKind::Ddim,
    SchedulerKind::Euler,
    SchedulerKind::EulerAncestral,
    SchedulerKind::DpmPp2M,
    SchedulerKind::DpmPp2MKarras,
    SchedulerKind::Pndm,
    SchedulerKind::Lms,
];

#[test]
fn unknown_beta_schedule_is_an_error() {
    for k in KINDS {
        let msg = build_err(k, json!({"beta_schedule": "cubic"}), 10);
        assert!(
            msg.contains("beta_schedule") && msg.contains("cubic"),
            "{k}: {msg}"
        );
    }
}

#[test]
fn unknown_prediction_type_is_an_error() {
    for k in KINDS {
        let msg = build_err(k, json!({"prediction_type": "noise"}), 10);
        assert!(
            msg.contains("prediction_type") && msg.contains("noise"),
            "{k}: {msg}"
        );
    }
    // Supported by some classes only, as in diffusers.
    let msg = build_err(
        SchedulerKind::EulerAncestral,
        json!({"prediction_type": "sample"}),
        10,
    );
    assert!(msg.contains("prediction_type"), "{msg}");
    let msg = build_err(
        SchedulerKind::Pndm,
        json!({"prediction_type": "sample"}),
        10,
    );
    assert!(msg.contains("prediction_type"), "{msg}");
}

#[test]
fn unknown_timestep_spacing_is_an_error() {
    for k in KINDS {
        let msg = build_err(k, json!({"timestep_spacing": "uniform"}), 10);
        assert!(
            msg.contains("timestep_spacing") && msg.contains("uniform"),
            "{k}: {msg}"
        );
    }
}

#[test]
fn zero_or_too_many_steps_is_an_error() {
    for k in KINDS {
        let msg = build_err(k, json!({}), 0);
        assert!(msg.contains("steps"), "{k}: {msg}");
        let msg = build_err(k, json!({}), 1001);
        assert!(
            msg.contains("steps") && msg.contains("num_train_timesteps"),
            "{k}: {msg}"
        );
    }
}

#[test]
fn unsupported_options_are_errors() {
    let cases = [
        (
            SchedulerKind::Ddim,
            json!({"thresholding": true}),
            "thresholding",
        ),
        (
            SchedulerKind::DpmPp2M,
            json!({"thresholding": true}),
            "thresholding",
        ),
        (
            SchedulerKind::DpmPp2M,
            json!({"algorithm_type": "sde-dpmsolver++"}),
            "algorithm_type",
        ),
        (
            SchedulerKind::DpmPp2M,
            json!({"algorithm_type": "dpmsolver"}),
            "algorithm_type",
        ),
        (
            SchedulerKind::DpmPp2M,
            json!({"algorithm_type": "deis"}),
            "final_sigmas_type",
        ),
        (
            SchedulerKind::DpmPp2M,
            json!({"solver_type": "rk4"}),
            "solver_type",
        ),
        (
            SchedulerKind::DpmPp2M,
            json!({"final_sigmas_type": "one"}),
            "final_sigmas_type",
        ),
        (
            SchedulerKind::DpmPp2M,
            json!({"use_lu_lambdas": true}),
            "use_lu_lambdas",
        ),
        (
            SchedulerKind::DpmPp2M,
            json!({"solver_order": 0}),
            "solver_order",
        ),
        (
            SchedulerKind::DpmPp2M,
            json!({"variance_type": "learned_range"}),
            "variance_type",
        ),
        (
            SchedulerKind::Euler,
            json!({"interpolation_type": "log_linear"}),
            "interpolation_type",
        ),
        (
            SchedulerKind::Euler,
            json!({"use_exponential_sigmas": true}),
            "use_exponential_sigmas",
        ),
        (
            SchedulerKind::Euler,
            json!({"timestep_type": "fractional"}),
            "timestep_type",
        ),
        (
            SchedulerKind::Pndm,
            json!({"skip_prk_steps": false}),
            "skip_prk_steps",
        ),
        (
            SchedulerKind::Ddim,
            json!({"beta_start": "small"}),
            "beta_start",
        ),
        (
            SchedulerKind::Ddim,
            json!({"steps_offset": 5000}),
            "steps_offset",
        ),
        (
            SchedulerKind::Ddim,
            json!({"num_train_timesteps": 0}),
            "num_train_timesteps",
        ),
    ];
    for (k, ov, key) in cases {
        let steps = if key == "skip_prk_steps" { 3 } else { 10 };
        let msg = build_err(k, ov.clone(), steps);
        assert!(msg.contains(key), "{k} {ov}: {msg}");
    }
}

#[test]
fn class_defaults_apply_to_missing_keys_and_unknown_keys_are_ignored() {
    // An empty config: every key takes the class's own __init__ default.
    let empty = SchedulerConfig::from_json("{}").unwrap();
    // DDIM: leading spacing, steps_offset 0.
    let s = empty.build(SchedulerKind::Ddim, &Map::new(), 4).unwrap();
    assert_eq!(s.timesteps(), &[750.0, 500.0, 250.0, 0.0]);
    // Euler: linspace spacing (fractional), init_noise_sigma = max sigma.
    let s = empty.build(SchedulerKind::Euler, &Map::new(), 4).unwrap();
    assert_eq!(s.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
    // DPM-Solver: linspace over n + 1 points, last dropped.
    let s = empty.build(SchedulerKind::DpmPp2M, &Map::new(), 4).unwrap();
    assert_eq!(s.timesteps(), &[999.0, 749.0, 500.0, 250.0]);
    // PNDM: skip_prk_steps defaults to false, so 12 Runge-Kutta calls come first.
    let s = empty.build(SchedulerKind::Pndm, &Map::new(), 4).unwrap();
    assert_eq!(s.timesteps().len(), 13);

    let fx = fixture();
    let ov =
        overrides(&json!({"not_a_scheduler_key": [1, 2, 3], "skip_prk_steps": "ignored by DDIM"}));
    let a = fx.base.build(SchedulerKind::Ddim, &ov, 10).unwrap();
    let b = fx.base.build(SchedulerKind::Ddim, &Map::new(), 10).unwrap();
    assert_eq!(a.timesteps(), b.timesteps());
}

/// LCMScheduler's own errors: as the other classes for the shared keys (it
/// ignores `timestep_spacing`, as diffusers does), and more steps than the
/// schedule it was distilled on names the steps and the option.
#[test]
fn lcm_config_errors_name_the_key() {
    let k = SchedulerKind::Lcm;
    let msg = build_err(k, json!({"beta_schedule": "cubic"}), 4);
    assert!(msg.contains("beta_schedule"), "{msg}");
    let msg = build_err(k, json!({"prediction_type": "noise"}), 4);
    assert!(msg.contains("prediction_type"), "{msg}");
    let msg = build_err(k, json!({}), 0);
    assert!(msg.contains("steps"), "{msg}");
    let msg = build_err(k, json!({}), 51);
    assert!(msg.contains("original_inference_steps 50"), "{msg}");
    let msg = build_err(k, json!({"original_inference_steps": 2000}), 4);
    assert!(msg.contains("num_train_timesteps"), "{msg}");
    let msg = build_err(k, json!({"thresholding": true}), 4);
    assert!(msg.contains("thresholding"), "{msg}");
    // Zero terminal SNR with ε prediction divides by ᾱ = 0 at t = 999.
    let msg = build_err(k, json!({"rescale_betas_zero_snr": true}), 4);
    assert!(msg.contains("rescale_betas_zero_snr"), "{msg}");
    let ok = json!({"rescale_betas_zero_snr": true, "prediction_type": "v_prediction"});
    assert!(fixture().base.build(k, &overrides(&ok), 4).is_ok());
}

/// UniPC configurations that end in NaN in diffusers (B(h) = h, or the ε form,
/// at a final sigma of 0) are refused, naming the key that fixes them.
#[test]
fn unipc_refuses_what_ends_in_nan() {
    for ov in [json!({"solver_type": "bh1"}), json!({"predict_x0": false})] {
        let msg = build_err(SchedulerKind::UniPc, ov.clone(), 8);
        assert!(msg.contains("final_sigmas_type"), "{ov}: {msg}");
        let mut ok = ov.as_object().unwrap().clone();
        ok.insert("final_sigmas_type".into(), json!("sigma_min"));
        assert!(
            fixture().base.build(SchedulerKind::UniPc, &ok, 8).is_ok(),
            "{ok:?}"
        );
    }
    let msg = build_err(SchedulerKind::UniPc, json!({"solver_type": "bh3"}), 8);
    assert!(msg.contains("solver_type"), "{msg}");
    let msg = build_err(SchedulerKind::UniPc, json!({"thresholding": true}), 8);
    assert!(msg.contains("thresholding"), "{msg}");
}
