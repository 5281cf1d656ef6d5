//! Shared helpers for the integration tests: fixture paths, reference loading,
//! tensor comparison and a process-wide cache of loaded tiny models.

#![allow(dead_code)]

pub mod browser;
pub mod in_process;
pub mod server;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use sdserve::diffusion::pipelines::{LoadOptions, StableDiffusion};

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// Loads `tiny-sd1` / `tiny-sd2` once per test binary (f32, CPU).
pub fn model(name: &str) -> Arc<StableDiffusion> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<StableDiffusion>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(name.to_string())
        .or_insert_with(|| {
            Arc::new(
                StableDiffusion::load(&model_dir(name), &LoadOptions::default())
                    .unwrap_or_else(|e| panic!("loading {name}: {e}")),
            )
        })
        .clone()
}

/// How many times diffusers' own f32-vs-f64 drift a comparison allows.
pub const DRIFT_FACTOR: f32 = 50.0;

/// A diffusers reference file pair: `references/<name>.safetensors` + `.json`.
pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub json: serde_json::Value,
}

impl Reference {
    pub fn load(name: &str) -> Self {
        let dir = fixtures().join("references");
        let tensors =
            candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
                .unwrap_or_else(|e| panic!("reference {name}: {e}"));
        let json = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        Self { tensors, json }
    }

    /// Allowed |sdserve - diffusers| for reference `key`: [`DRIFT_FACTOR`] × the
    /// measured f32-vs-f64 drift, at least 8 ulps (2^-20 relative) of the values'
    /// magnitude.
    pub fn tolerance(&self, key: &str, magnitude: f32) -> f32 {
        let drift = self.json["drift"][key]["max_abs_diff"]
            .as_f64()
            .unwrap_or_else(|| panic!("no drift measured for {key}")) as f32;
        (DRIFT_FACTOR * drift).max(magnitude * 8.0 / (1 << 23) as f32)
    }

    /// The largest drift measured for any pipeline case's `suffix` (final
    /// latents, step latents or image).
    pub fn case_drift(&self, suffix: &str) -> f32 {
        self.json["drift"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("case/") && k.ends_with(suffix))
            .map(|(_, v)| v["max_abs_diff"].as_f64().unwrap() as f32)
            .fold(0.0, f32::max)
    }

    /// The allowed step-latent and image differences of a pipeline case:
    /// [`DRIFT_FACTOR`] × the largest drift measured for any case's
    /// `step_latents` and `image`.
    pub fn case_tolerances(&self) -> (f32, f32) {
        (
            DRIFT_FACTOR * self.case_drift("step_latents"),
            DRIFT_FACTOR * self.case_drift("image"),
        )
    }

    pub fn get(&self, key: &str) -> Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("reference tensor {key} missing"))
            .clone()
    }

    /// Writes case `name`'s starting latents (and the per-step noise it drew,
    /// if any) as the safetensors file `sdserve generate --latents` reads.
    pub fn save_latents(&self, name: &str, path: &Path) {
        let mut tensors = HashMap::new();
        tensors.insert(
            "latents".to_string(),
            self.get(&format!("case/{name}/latents")),
        );
        if let Some(noise) = self.tensors.get(&format!("case/{name}/noise")) {
            tensors.insert("noise".to_string(), noise.clone());
        }
        candle_core::safetensors::save(&tensors, path).unwrap();
    }

    /// Image `i` of case `name` as 8-bit levels `[h, w, 3]` (f32), as diffusers'
    /// `numpy_to_pil` rounds it.
    pub fn image_levels(&self, name: &str, i: usize) -> Tensor {
        let image = self.get(&format!("case/{name}/image")).get(i).unwrap();
        (image * 255.0).unwrap().round().unwrap()
    }
}

/// Runs `req` through `generate` (the path the CLI and the server take),
/// comparing each step's latents with `step_latents` `[T, n, c, h, w]`: the
/// images as `[n, H, W, 3]`, the worst step difference, and the steps seen.
pub fn generate_against(
    sd: &StableDiffusion,
    req: &sdserve::request::GenerateRequest,
    step_latents: &Tensor,
) -> (Tensor, f32, usize) {
    let (mut worst, mut steps) = (0f32, 0);
    let out = sd
        .generate(req, &mut |p| {
            let want = step_latents.get(p.step - 1).unwrap();
            worst = worst.max(max_abs_diff(p.latents, &want));
            steps += 1;
            true
        })
        .unwrap();
    (out.images.permute((0, 2, 3, 1)).unwrap(), worst, steps)
}

/// A PNG's pixels as levels `[h, w, 3]` (f32).
pub fn png_levels(path: &Path) -> Tensor {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    Tensor::from_vec(img.into_raw(), (h, w, 3), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// max |a - b| over all elements (shapes must match).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())
}

/// max |a| over all elements.
pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Copies a fixture model folder into a temp dir so a test can damage it.
pub fn copy_model(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&model_dir(name), tmp.path());
    tmp
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// The request of an image-to-image or inpainting reference case (the
/// fixture scripts' `cases`): its prompts, steps, guidance, scheduler, the
/// refiner's aesthetic scores, and its strength, left out where it is
/// `default_strength` so that the default is checked too.
pub fn edit_case_params(
    case: &serde_json::Value,
    default_strength: f64,
) -> sdserve::request::GenerateParams {
    let scheduler = case["scheduler"].as_str().unwrap();
    let mut params = sdserve::request::GenerateParams {
        prompt: case["prompt"].as_str().map(str::to_string),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        steps: case["num_inference_steps"].as_u64().map(|v| v as usize),
        guidance: case["guidance_scale"].as_f64(),
        scheduler: (scheduler != "default").then(|| scheduler.to_string()),
        strength: case["strength"].as_f64().filter(|&s| s != default_strength),
        seed: Some(0),
        ..Default::default()
    };
    params.micro.aesthetic_score = case["aesthetic_score"].as_f64();
    params.micro.negative_aesthetic_score = case["negative_aesthetic_score"].as_f64();
    params
}

/// Asserts that validation refused the request naming `field`, with `words`
/// in the message.
pub fn assert_refused<T: std::fmt::Debug>(got: sdserve::Result<T>, field: &str, words: &str) {
    match got {
        Err(sdserve::Error::InvalidRequest { field: f, message }) => {
            assert_eq!(f, field, "{message}");
            assert!(message.contains(words), "{field}: {message}");
        }
        other => panic!("{field}: expected a refusal, got {other:?}"),
    }
}
