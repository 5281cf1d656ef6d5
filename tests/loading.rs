//! Loading diffusers folders: both fixture layouts load, and every damaged or
//! unsupported file gives an error naming the file instead of a panic.

mod common;

use std::path::Path;

use common::{copy_model, model_dir};
use sdserve::diffusion::pipelines::{LoadOptions, StableDiffusion};

fn load_err(dir: &Path) -> String {
    match StableDiffusion::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn both_fixture_layouts_load_with_config_values() {
    let sd1 = common::model("tiny-sd1");
    assert_eq!(sd1.info().pipeline_class, "StableDiffusionPipeline");
    assert_eq!(sd1.info().vae_scale_factor, 8);
    assert_eq!(sd1.info().default_size, 96);
    assert_eq!(sd1.info().prediction_type, "epsilon");
    assert_eq!(sd1.info().default_scheduler, "PNDMScheduler");
    // SD 2.x-style: f16 weights, `text_model.`-prefixed text encoder, v-prediction.
    let sd2 = common::model("tiny-sd2");
    assert_eq!(sd2.info().prediction_type, "v_prediction");
    assert_eq!(sd2.info().default_scheduler, "DDIMScheduler");
}

#[test]
fn missing_config_names_the_file() {
    let tmp = copy_model("tiny-sd1");
    std::fs::remove_file(tmp.path().join("unet/config.json")).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("unet/config.json") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn missing_tokenizer_file_names_the_file() {
    let tmp = copy_model("tiny-sd1");
    std::fs::remove_file(tmp.path().join("tokenizer/merges.txt")).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("tokenizer/merges.txt") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn missing_weights_names_the_file_and_mentions_bin() {
    let tmp = copy_model("tiny-sd1");
    let st = tmp.path().join("vae/diffusion_pytorch_model.safetensors");
    std::fs::rename(&st, tmp.path().join("vae/diffusion_pytorch_model.bin")).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("vae/diffusion_pytorch_model.safetensors"),
        "{err}"
    );
    assert!(err.contains(".bin"), "{err}");
}

#[test]
fn truncated_weights_name_the_file() {
    let tmp = copy_model("tiny-sd1");
    let path = tmp.path().join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("unet/diffusion_pytorch_model.safetensors"),
        "{err}"
    );
    assert!(err.contains("truncated or corrupt"), "{err}");
}

#[test]
fn config_weight_mismatch_names_the_file_and_tensor() {
    let tmp = copy_model("tiny-sd1");
    edit_json(&tmp.path().join("text_encoder/config.json"), |v| {
        v["intermediate_size"] = serde_json::json!(48);
    });
    let err = load_err(tmp.path());
    assert!(err.contains("text_encoder/model.safetensors"), "{err}");
    assert!(err.contains("fc1"), "{err}");
}

#[test]
fn unsupported_pipeline_and_unet_features_are_refused() {
    let tmp = copy_model("tiny-sd1");
    edit_json(&tmp.path().join("model_index.json"), |v| {
        v["_class_name"] = serde_json::json!("StableDiffusion3Pipeline");
    });
    let err = load_err(tmp.path());
    assert!(
        err.contains("model_index.json")
            && err.contains("StableDiffusion3Pipeline")
            && err.contains("StableDiffusionXLPipeline"),
        "{err}"
    );
    // An SD 1.x folder called SDXL lacks SDXL's second text encoder, named as missing.
    let tmp = copy_model("tiny-sd1");
    edit_json(&tmp.path().join("model_index.json"), |v| {
        v["_class_name"] = serde_json::json!("StableDiffusionXLPipeline");
    });
    let err = load_err(tmp.path());
    assert!(
        err.contains("text_encoder_2/config.json") && err.contains("missing"),
        "{err}"
    );

    let tmp = copy_model("tiny-sd1");
    edit_json(&tmp.path().join("unet/config.json"), |v| {
        v["addition_embed_type"] = serde_json::json!("text_time");
    });
    let err = load_err(tmp.path());
    assert!(
        err.contains("unet/config.json") && err.contains("addition_embed_type"),
        "{err}"
    );

    // Without addition_embed_type diffusers builds no added embedding, whatever
    // addition_time_embed_dim says: the model loads.
    let tmp = copy_model("tiny-sd1");
    edit_json(&tmp.path().join("unet/config.json"), |v| {
        v["addition_time_embed_dim"] = serde_json::json!(256);
    });
    sdserve::diffusion::pipelines::StableDiffusion::load(tmp.path(), &Default::default())
        .expect("addition_time_embed_dim alone is ignored");

    // Every UNet key that changes the network away from its default is named.
    for (key, value) in [
        ("attention_type", serde_json::json!("gated")),
        ("time_embedding_act_fn", serde_json::json!("silu")),
        ("timestep_post_act", serde_json::json!("silu")),
        ("num_class_embeds", serde_json::json!(10)),
        ("class_embeddings_concat", serde_json::json!(true)),
        (
            "reverse_transformer_layers_per_block",
            serde_json::json!([[1, 1], [1, 1]]),
        ),
        ("mid_block_only_cross_attention", serde_json::json!(true)),
        ("cross_attention_norm", serde_json::json!("group_norm")),
        ("time_embedding_dim", serde_json::json!(7)),
    ] {
        let tmp = copy_model("tiny-sd1");
        edit_json(&tmp.path().join("unet/config.json"), |v| {
            v[key] = value.clone();
        });
        let err = load_err(tmp.path());
        assert!(
            err.contains("unet/config.json") && err.contains(key),
            "{key}: {err}"
        );
    }
}

#[test]
fn malformed_json_names_the_file() {
    let tmp = copy_model("tiny-sd1");
    std::fs::write(tmp.path().join("vae/config.json"), "{ not json").unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("vae/config.json") && err.contains("invalid config"),
        "{err}"
    );
}

#[test]
fn not_a_folder() {
    let err = load_err(&model_dir("does-not-exist"));
    assert!(err.contains("does-not-exist"), "{err}");
}

#[test]
fn half_precision_on_cpu_is_a_clear_error() {
    let opts = LoadOptions {
        device: candle_core::Device::Cpu,
        dtype: Some(candle_core::DType::F16),
    };
    let err = StableDiffusion::load(&model_dir("tiny-sd1"), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dtype") && err.contains("CPU"), "{err}");
}

#[test]
fn bf16_weights_load_into_f32() {
    // Two copies of the sd1 VAE: one stored in bf16, one storing the same bf16-rounded
    // values in f32. bf16 -> f32 is exact, so both must decode bit for bit alike.
    let dev = candle_core::Device::Cpu;
    let original = candle_core::safetensors::load(
        model_dir("tiny-sd1").join("vae/diffusion_pytorch_model.safetensors"),
        &dev,
    )
    .unwrap();
    let save = |dtype: candle_core::DType| {
        let tmp = copy_model("tiny-sd1");
        let t: std::collections::HashMap<String, candle_core::Tensor> = original
            .iter()
            .map(|(k, v)| {
                let rounded = v.to_dtype(candle_core::DType::BF16).unwrap();
                (k.clone(), rounded.to_dtype(dtype).unwrap())
            })
            .collect();
        candle_core::safetensors::save(
            &t,
            tmp.path().join("vae/diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        tmp
    };
    let (bf16_dir, f32_dir) = (
        save(candle_core::DType::BF16),
        save(candle_core::DType::F32),
    );
    let bf16 = StableDiffusion::load(bf16_dir.path(), &LoadOptions::default()).unwrap();
    let f32 = StableDiffusion::load(f32_dir.path(), &LoadOptions::default()).unwrap();
    let z = candle_core::Tensor::randn(0f32, 1f32, (1, 4, 12, 12), &dev).unwrap();
    let (a, b) = (bf16.decode_raw(&z).unwrap(), f32.decode_raw(&z).unwrap());
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    // ...and the rounding really happened (the test would pass vacuously otherwise).
    let full = common::model("tiny-sd1").decode_raw(&z).unwrap();
    assert!(common::max_abs_diff(&a, &full) > 0.0);
}
