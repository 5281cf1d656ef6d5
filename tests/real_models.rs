//! The same code loads the real hub models unchanged: for
//! `stable-diffusion-v1-5/stable-diffusion-v1-5`, `stabilityai/stable-diffusion-2-1`,
//! `stabilityai/sd-turbo`, `stabilityai/stable-diffusion-xl-base-1.0` and
//! `stabilityai/sdxl-turbo`, sdserve's components, built from those repos' config
//! files, request exactly the tensors (names and shapes) their checkpoints hold —
//! recorded without the multi-GB weights by a VarBuilder backend that hands out
//! zero-size broadcasts — and those tensors add up to the published parameter
//! counts. Layouts come from diffusers/transformers (`tools/dump_real_layouts.py`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use sdserve::diffusion::loading::config::{ClipTextConfig, UNetConfig, VaeConfig, read_json};
use sdserve::diffusion::loading::tokenizer::ClipTokenizer;
use sdserve::diffusion::models::clip::ClipTextModel;
use sdserve::diffusion::pipelines::{Family, SamplingDefaults, build_unet, build_vae, inspect};
use sdserve::diffusion::schedulers::{SchedulerConfig, SchedulerKind};

type Layout = BTreeMap<String, Vec<usize>>;

/// Serves tensors of the checkpoint's shapes as broadcast zeros, recording requests.
struct Recorder {
    layout: Layout,
    requested: Arc<Mutex<BTreeSet<String>>>,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() == &s {
            self.requested.lock().unwrap().insert(name.to_string());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = self.layout.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("the checkpoint has no tensor {name}"))
        })?;
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape.as_slice())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.layout.contains_key(name)
    }
}

fn dir(model: &str) -> PathBuf {
    common::fixtures().join("real-configs").join(model)
}

fn layout(model: &str, component: &str) -> Layout {
    let all: BTreeMap<String, Layout> = read_json(&dir(model).join("layout.json")).unwrap();
    all[component].clone()
}

/// Builds one component through `build` and checks it requests exactly the
/// checkpoint's tensors, except those under `unused` prefixes (parts sdserve
/// does not run, e.g. the VAE encoder for text-to-image).
fn check_component(
    model: &str,
    component: &str,
    unused: &[&str],
    build: impl FnOnce(VarBuilder<'static>) -> sdserve::Result<()>,
) {
    let mut layout = layout(model, component);
    let total = layout.len();
    layout.retain(|name, _| !unused.iter().any(|p| name.starts_with(p)));
    assert!(
        unused.is_empty() || layout.len() < total,
        "{model} {component}: no tensor under {unused:?}: stale exclusion"
    );
    let requested = Arc::new(Mutex::new(BTreeSet::new()));
    let backend = Recorder {
        layout: layout.clone(),
        requested: requested.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    build(vb).unwrap_or_else(|e| panic!("{model} {component}: {e}"));
    let requested = requested.lock().unwrap().clone();
    let expected: BTreeSet<String> = layout.keys().cloned().collect();
    let missing: Vec<_> = expected.difference(&requested).collect();
    assert!(
        missing.is_empty(),
        "{model} {component}: checkpoint tensors never loaded: {missing:?}"
    );
    assert_eq!(requested.len(), layout.len(), "{model} {component}");
}

/// What one published model is, as its model card and hub files state it.
struct Published {
    folder: &'static str,
    family: Family,
    default_size: usize,
    prediction: &'static str,
    defaults: SamplingDefaults,
    /// Parameters per component (diffusers' / transformers' `num_parameters()`).
    params: &'static [(&'static str, u64)],
    /// (text encoder folder, tokenizer folder, CLIPTextModelWithProjection, pad id).
    text: &'static [(&'static str, &'static str, bool, u32)],
}

const CLIP_L: u64 = 123_060_480;
const OPENCLIP_H: u64 = 340_387_840;
const OPENCLIP_BIG_G_PROJ: u64 = 694_659_840;
const VAE: u64 = 83_653_863;
const SD_TEXT: &[(&str, &str, bool, u32)] = &[("text_encoder", "tokenizer", false, 49407)];
const SD2_TEXT: &[(&str, &str, bool, u32)] = &[("text_encoder", "tokenizer", false, 0)];
const XL_TEXT: &[(&str, &str, bool, u32)] = &[
    ("text_encoder", "tokenizer", false, 49407),
    ("text_encoder_2", "tokenizer_2", true, 0),
];
const XL_PARAMS: &[(&str, u64)] = &[
    ("unet", 2_567_463_684),
    ("vae", VAE),
    ("text_encoder", CLIP_L),
    ("text_encoder_2", OPENCLIP_BIG_G_PROJ),
];
const SD2_PARAMS: &[(&str, u64)] = &[
    ("unet", 865_910_724),
    ("vae", VAE),
    ("text_encoder", OPENCLIP_H),
];

fn param_count(layout: &Layout) -> u64 {
    layout
        .values()
        .map(|s| s.iter().product::<usize>() as u64)
        .sum()
}

fn check_model(m: &Published) {
    let model = m.folder;
    let d = dir(model);
    for (component, published) in m.params {
        assert_eq!(
            param_count(&layout(model, component)),
            *published,
            "{model} {component}: parameters"
        );
    }
    let info = inspect(&d).unwrap_or_else(|e| panic!("{model}: {e}"));
    assert_eq!(info.family, m.family, "{model}");
    assert_eq!(info.default_size, m.default_size, "{model}");
    assert_eq!(info.prediction_type, m.prediction, "{model}");
    assert_eq!(info.defaults, m.defaults, "{model}");

    let unet_path = d.join("unet/config.json");
    let unet_cfg: UNetConfig = read_json(&unet_path).unwrap();
    check_component(model, "unet", &[], |vb| {
        build_unet(vb, &unet_cfg, &unet_path, Path::new("unet")).map(|_| ())
    });
    let vae_path = d.join("vae/config.json");
    let vae_cfg: VaeConfig = read_json(&vae_path).unwrap();
    check_component(model, "vae", &[], |vb| {
        build_vae(vb, &vae_cfg, &vae_path, Path::new("vae")).map(|_| ())
    });
    assert_eq!(
        unet_cfg.sample_size().unwrap() * vae_cfg.scale_factor(),
        m.default_size
    );

    let sched = SchedulerConfig::from_file(&d.join("scheduler/scheduler_config.json")).unwrap();
    for kind in SchedulerKind::ALL {
        let s = sched
            .build(kind, &Default::default(), 30)
            .unwrap_or_else(|e| panic!("{model} {kind}: {e}"));
        assert!(!s.timesteps().is_empty());
    }
    if m.defaults == SamplingDefaults::TURBO {
        // Trailing spacing: the one default step starts from pure noise at the
        // last training timestep, as the distilled model was trained to.
        let own = sched
            .build(SchedulerKind::Default, &Default::default(), 1)
            .unwrap();
        assert_eq!(own.timesteps(), [999.0], "{model}");
    }

    for &(encoder, tokenizer, with_projection, pad_id) in m.text {
        let te_cfg: ClipTextConfig = read_json(&d.join(encoder).join("config.json")).unwrap();
        check_component(model, encoder, &[], |vb| {
            ClipTextModel::new(vb, &te_cfg, with_projection).map(|_| ())
        });
        // The real tokenizer configs with the real vocabulary (shared with the tiny fixture).
        let tmp = tempfile::tempdir().unwrap();
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(
                common::model_dir("tiny-sd1").join("tokenizer").join(f),
                tmp.path().join(f),
            )
            .unwrap();
        }
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            std::fs::copy(d.join(tokenizer).join(f), tmp.path().join(f)).unwrap();
        }
        let tok = ClipTokenizer::from_dir(tmp.path(), te_cfg.max_position_embeddings).unwrap();
        let (ids, _) = tok.encode("a photo").unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(
            (ids[0], ids[3], ids[76]),
            (49406, 49407, pad_id),
            "{model} {tokenizer}"
        );
    }
}

#[test]
fn stable_diffusion_1_5_loads_unchanged() {
    check_model(&Published {
        folder: "sd15",
        family: Family::Sd,
        default_size: 512,
        prediction: "epsilon",
        defaults: SamplingDefaults::SD,
        params: &[
            ("unet", 859_520_964),
            ("vae", VAE),
            ("text_encoder", CLIP_L),
        ],
        text: SD_TEXT,
    });
}

#[test]
fn stable_diffusion_2_1_loads_unchanged() {
    check_model(&Published {
        folder: "sd21",
        family: Family::Sd,
        default_size: 768,
        prediction: "v_prediction",
        defaults: SamplingDefaults::SD,
        params: SD2_PARAMS,
        text: SD2_TEXT,
    });
}

/// SD-Turbo: SD 2.1's architecture distilled to 512 px; one step, no guidance.
#[test]
fn sd_turbo_loads_unchanged_with_its_one_step_default() {
    check_model(&Published {
        folder: "sd-turbo",
        family: Family::Sd,
        default_size: 512,
        prediction: "epsilon",
        defaults: SamplingDefaults::TURBO,
        params: SD2_PARAMS,
        text: SD2_TEXT,
    });
}

#[test]
fn sdxl_base_1_0_loads_unchanged() {
    check_model(&Published {
        folder: "sdxl-base",
        family: Family::Sdxl,
        default_size: 1024,
        prediction: "epsilon",
        defaults: SamplingDefaults::SDXL,
        params: XL_PARAMS,
        text: XL_TEXT,
    });
}

/// SDXL-Turbo: SDXL base's architecture distilled to 512 px; one step, no guidance.
#[test]
fn sdxl_turbo_loads_unchanged_with_its_one_step_default() {
    check_model(&Published {
        folder: "sdxl-turbo",
        family: Family::Sdxl,
        default_size: 512,
        prediction: "epsilon",
        defaults: SamplingDefaults::TURBO,
        params: XL_PARAMS,
        text: XL_TEXT,
    });
}
