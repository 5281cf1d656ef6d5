//! SDXL against diffusers on the tiny SDXL fixture
//! (`tools/make_sdxl_fixtures.py`: diffusers 0.42.1, transformers 5.24, f32 on the
//! CPU from f16-stored weights): both tokenizers, both CLIP encoders' penultimate
//! states, the pooled projection, the UNet with SDXL's text_time conditioning, and
//! every pipeline case (`StableDiffusionXLPipeline.__call__`) step by step.
//! Tolerances: 50 × the f32-vs-f64 drift diffusers itself shows (the JSON's
//! `drift`), as in `tests/parity.rs`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{Reference, max_abs, max_abs_diff};
use sdserve::diffusion::loading::config::{ClipTextConfig, UNetConfig, read_json};
use sdserve::diffusion::loading::tokenizer::ClipTokenizer;
use sdserve::diffusion::loading::weights::WeightFiles;
use sdserve::diffusion::models::clip::ClipTextModel;
use sdserve::diffusion::models::unet::{AddedConditioning, Extra};
use sdserve::diffusion::pipelines::{Family, StableDiffusion, build_unet};
use sdserve::request::{GenerateParams, GenerateRequest, GivenLatents, Limits, MicroConditioning};
use serde_json::Value;

fn encoder(sub: &str, with_projection: bool) -> ClipTextModel {
    let dir = common::model_dir("tiny-sdxl").join(sub);
    let cfg: ClipTextConfig = read_json(&dir.join("config.json")).unwrap();
    let files = WeightFiles::find(&dir, "model", false).unwrap();
    ClipTextModel::new(
        files.var_builder(DType::F32, &Device::Cpu).unwrap(),
        &cfg,
        with_projection,
    )
    .unwrap()
}

fn ids(tok: &ClipTokenizer, text: &str) -> Tensor {
    let (ids, _) = tok.encode(text).unwrap();
    Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap()
}

#[test]
fn both_tokenizers_and_encoders_match_diffusers() {
    let r = Reference::load("sdxl");
    let dir = common::model_dir("tiny-sdxl");
    let tok1 = ClipTokenizer::from_dir(&dir.join("tokenizer"), 77).unwrap();
    let tok2 = ClipTokenizer::from_dir(&dir.join("tokenizer_2"), 77).unwrap();
    let (te1, te2) = (
        encoder("text_encoder", false),
        encoder("text_encoder_2", true),
    );
    let prompts = r.json["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 5);
    for p in prompts {
        let (name, text) = (p["name"].as_str().unwrap(), p["prompt"].as_str().unwrap());
        for (tok, key) in [(&tok1, "tok"), (&tok2, "tok2")] {
            let want: Vec<i64> = r
                .get(&format!("{key}/{name}"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got: Vec<i64> = ids(tok, text)
                .flatten_all()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect();
            assert_eq!(got, want, "{key} ids of {name:?}");
        }
        let o1 = te1.forward_all(&ids(&tok1, text)).unwrap();
        let o2 = te2.forward_all(&ids(&tok2, text)).unwrap();
        assert!(o1.text_embeds.is_none());
        let pooled = o2.text_embeds.expect("text_encoder_2 has a projection");
        for (key, got) in [
            ("hidden", &o1.penultimate),
            ("hidden2", &o2.penultimate),
            ("pooled", &pooled),
        ] {
            let k = format!("{key}/{name}");
            let want = r.get(&k);
            let d = max_abs_diff(got, &want);
            let tol = r.tolerance(&k, max_abs(&want));
            assert!(d <= tol, "{k}: |sdserve - diffusers| {d} > {tol}");
        }
        // The final-normed state is not what SDXL conditions on: a port that used it
        // would be far off.
        let wrong = max_abs_diff(&o2.last_hidden_state, &r.get(&format!("hidden2/{name}")));
        assert!(
            wrong > 1e-2,
            "last_hidden_state unexpectedly equals hidden_states[-2]"
        );
    }
}

#[test]
fn unet_with_text_time_conditioning_matches_diffusers() {
    let r = Reference::load("sdxl");
    let dir = common::model_dir("tiny-sdxl").join("unet");
    let cfg_path = dir.join("config.json");
    let cfg: UNetConfig = read_json(&cfg_path).unwrap();
    let files = WeightFiles::find(&dir, "diffusion_pytorch_model", false).unwrap();
    let unet = build_unet(
        files.var_builder(DType::F32, &Device::Cpu).unwrap(),
        &cfg,
        &cfg_path,
        &files.describe(),
    )
    .unwrap();
    assert!(unet.takes_added_conditioning());
    for prefix in ["unet", "unet_ns"] {
        let t = r.json[prefix]["timestep"].as_f64().unwrap();
        let added = AddedConditioning {
            text_embeds: r.get(&format!("{prefix}/text_embeds")),
            time_ids: r.get(&format!("{prefix}/time_ids")),
        };
        let sample = r.get(&format!("{prefix}/sample"));
        let ctx = r.get(&format!("{prefix}/encoder_hidden_states"));
        let extra = Extra {
            added: Some(&added),
            timestep_cond: None,
        };
        let got = unet.forward_with(&sample, t, &ctx, extra).unwrap();
        let key = format!("{prefix}/out");
        let want = r.get(&key);
        let d = max_abs_diff(&got, &want);
        let tol = r.tolerance(&key, max_abs(&want));
        assert!(d <= tol, "{key}: |sdserve - diffusers| {d} > {tol}");
        // Without its added conditioning the UNet refuses rather than guessing.
        let e = unet.forward(&sample, t, &ctx).unwrap_err().to_string();
        assert!(e.contains("text_embeds and time_ids"), "{e}");
    }
    // Rows with different time ids give different predictions (the ids are used per row).
    let o = r.get("unet/out");
    let rows_differ = max_abs_diff(&o.narrow(0, 0, 1).unwrap(), &o.narrow(0, 1, 1).unwrap());
    assert!(rows_differ > 1e-3);
}

fn string(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

fn pair(v: &Value) -> Option<[u32; 2]> {
    v.as_array()
        .map(|a| [a[0].as_u64().unwrap() as u32, a[1].as_u64().unwrap() as u32])
}

/// The validated request a case describes, with its latents (and noise) given.
fn case_request(sd: &StableDiffusion, r: &Reference, case: &Value) -> GenerateRequest {
    let name = case["name"].as_str().unwrap();
    let key = |k: &str| format!("case/{name}/{k}");
    let micro = &case["micro"];
    let params = GenerateParams {
        prompt: string(&case["prompt"]),
        negative_prompt: string(&case["negative_prompt"]),
        prompt_2: string(&case["prompt_2"]),
        negative_prompt_2: string(&case["negative_prompt_2"]),
        micro: MicroConditioning {
            original_size: pair(&micro["original_size"]),
            crops_coords_top_left: pair(&micro["crops_coords_top_left"]),
            target_size: pair(&micro["target_size"]),
            negative_original_size: pair(&micro["negative_original_size"]),
            negative_crops_coords_top_left: pair(&micro["negative_crops_coords_top_left"]),
            negative_target_size: pair(&micro["negative_target_size"]),
            ..Default::default()
        },
        width: case["width"].as_u64().map(|v| v as usize),
        height: case["height"].as_u64().map(|v| v as usize),
        steps: case["num_inference_steps"].as_u64().map(|v| v as usize),
        guidance: case["guidance_scale"].as_f64(),
        scheduler: string(&case["scheduler"]),
        scheduler_options: case["overrides"].as_object().cloned(),
        seed: Some(0),
        num_images: case["num_images"].as_u64().map(|v| v as usize),
        strength: None,
    };
    let latents = GivenLatents {
        latents: r.get(&key("latents")),
        step_noise: r.tensors.get(&key("noise")).cloned(),
        vae_noise: None,
        masked_image_vae_noise: None,
    };
    params
        .validate(sd.info(), &Limits::default(), Some(latents))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every case through the pipeline a request runs (`generate`, as the CLI and
/// the server call it): the conditioning (both encoders, pooled, time ids),
/// every step's latents and the image, against `StableDiffusionXLPipeline`.
#[test]
fn every_case_matches_diffusers_through_the_pipeline() {
    let r = Reference::load("sdxl");
    let sd = StableDiffusion::load(&common::model_dir("tiny-sdxl"), &Default::default()).unwrap();
    assert_eq!(sd.info().family, Family::Sdxl);
    let cases = r.json["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 16);
    let (step_tol, image_tol) = r.case_tolerances();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let key = |k: &str| format!("case/{name}/{k}");
        let req = case_request(&sd, &r, case);
        let guided = case["do_classifier_free_guidance"].as_bool().unwrap();
        assert_eq!(req.guidance > 1.0, guided, "{name}");

        let cond = sd.conditioning(&req, guided).unwrap();
        let added = cond.added.as_ref().expect("SDXL has added conditioning");
        for (what, got) in [
            ("prompt_embeds", &cond.text),
            ("add_text_embeds", &added.text_embeds),
        ] {
            let want = r.get(&key(what));
            let d = max_abs_diff(got, &want);
            assert!(d <= 1e-4, "{name}: {what} differ by {d}");
        }
        assert_eq!(
            max_abs_diff(&added.time_ids, &r.get(&key("add_time_ids"))),
            0.0,
            "{name}: add_time_ids"
        );

        let step_latents = r.get(&key("step_latents"));
        let (image, worst, steps_seen) = common::generate_against(&sd, &req, &step_latents);
        assert_eq!(steps_seen, step_latents.dim(0).unwrap(), "{name}: steps");
        eprintln!("sdxl/{name}: worst step latent diff {worst:.3e} (tolerance {step_tol:.3e})");
        assert!(worst <= step_tol, "{name}: step latents differ by {worst}");
        let d = max_abs_diff(&image, &r.get(&key("image")));
        eprintln!("sdxl/{name}: image diff {d:.3e} (tolerance {image_tol:.3e})");
        assert!(d <= image_tol, "{name}: image differs by {d}");
    }
    // The cases can tell apart what they test: an absent negative prompt (zeros)
    // from an empty one, and the second prompt from the first.
    let differ = |a: &str, b: &str, what: &str| {
        let d = max_abs_diff(
            &r.get(&format!("case/{a}/{what}")),
            &r.get(&format!("case/{b}/{what}")),
        );
        assert!(d > 1e-3, "{a} vs {b}: {what} differ by only {d}");
    };
    differ("null_negative", "empty_negative", "prompt_embeds");
    differ("null_negative", "empty_negative", "image");
    differ("prompt_2", "dpmpp_2m", "prompt_embeds");
    differ("micro", "default", "image");
}

#[test]
fn sdxl_fields_are_refused_by_name_on_an_sd_model() {
    let sd = common::model("tiny-sd1");
    for (field, params) in [
        (
            "prompt_2",
            GenerateParams {
                prompt_2: Some("x".into()),
                ..Default::default()
            },
        ),
        (
            "target_size",
            GenerateParams {
                micro: MicroConditioning {
                    target_size: Some([64, 64]),
                    ..Default::default()
                },
                ..Default::default()
            },
        ),
    ] {
        let e = GenerateParams {
            prompt: Some("a cat".into()),
            ..params
        }
        .validate(sd.info(), &Limits::default(), None)
        .unwrap_err();
        match e {
            sdserve::Error::InvalidRequest { field: f, message } => {
                assert_eq!(f, field);
                assert!(message.contains("only SDXL"), "{message}");
            }
            other => panic!("{other}"),
        }
    }
}

#[test]
fn micro_conditioning_out_of_range_is_refused_by_name() {
    let sd = StableDiffusion::load(&common::model_dir("tiny-sdxl"), &Default::default()).unwrap();
    for (field, micro) in [
        (
            "original_size",
            MicroConditioning {
                original_size: Some([0, 64]),
                ..Default::default()
            },
        ),
        (
            "negative_crops_coords_top_left",
            MicroConditioning {
                negative_crops_coords_top_left: Some([0, 1 << 20]),
                ..Default::default()
            },
        ),
    ] {
        let e = GenerateParams {
            prompt: Some("a cat".into()),
            micro,
            ..Default::default()
        }
        .validate(sd.info(), &Limits::default(), None)
        .unwrap_err();
        assert!(
            matches!(&e, sdserve::Error::InvalidRequest { field: f, .. } if f == field),
            "{e}"
        );
    }
}

/// Only a refiner's UNet runs on `text_encoder_2` alone (tests/img2img.rs
/// runs the refiner): a base folder without `text_encoder`, or claiming
/// `requires_aesthetics_score`, is refused naming what does not add up.
#[test]
fn a_base_folder_posing_as_a_refiner_is_refused_with_the_reason() {
    let edited = |edit: &dyn Fn(&mut Value)| {
        let dir = common::copy_model("tiny-sdxl");
        let index_path = dir.path().join("model_index.json");
        let mut index: Value =
            serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
        edit(&mut index);
        std::fs::write(&index_path, index.to_string()).unwrap();
        StableDiffusion::load(dir.path(), &Default::default())
            .unwrap_err()
            .to_string()
    };
    let e = edited(&|index| {
        index["text_encoder"] = serde_json::json!([null, null]);
        index["tokenizer"] = serde_json::json!([null, null]);
    });
    assert!(
        e.contains("cross_attention_dim") && e.contains("text_encoder_2"),
        "{e}"
    );
    let e = edited(&|index| index["requires_aesthetics_score"] = true.into());
    assert!(
        e.contains("projection_class_embeddings_input_dim")
            && e.contains("requires_aesthetics_score is true"),
        "{e}"
    );
}

#[test]
fn mismatched_sdxl_widths_are_refused_naming_the_unet_config() {
    let dir = common::copy_model("tiny-sdxl");
    let cfg_path = dir.path().join("unet/config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["projection_class_embeddings_input_dim"] = 61.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = StableDiffusion::load(dir.path(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("projection_class_embeddings_input_dim") && e.contains("unet"),
        "{e}"
    );
}

/// Requests with different prompts, negative prompts (absent, so zeros, vs
/// given) and micro-conditioning share one UNet batch, and each image is the
/// one its request makes alone: every row carries its own pooled embedding and
/// time ids.
#[test]
fn a_mixed_sdxl_batch_gives_each_request_its_own_images() {
    let sd = StableDiffusion::load(&common::model_dir("tiny-sdxl"), &Default::default()).unwrap();
    let request = |prompt: &str, negative: Option<&str>, micro, num_images| {
        GenerateParams {
            prompt: Some(prompt.into()),
            negative_prompt: negative.map(str::to_string),
            micro,
            steps: Some(3),
            seed: Some(11),
            num_images: Some(num_images),
            ..Default::default()
        }
        .validate(sd.info(), &Limits::default(), None)
        .unwrap()
    };
    let a = request("a red boat", None, MicroConditioning::default(), 1);
    let b = request(
        "a green hill",
        Some("fog"),
        MicroConditioning {
            original_size: Some([48, 64]),
            crops_coords_top_left: Some([8, 0]),
            ..Default::default()
        },
        2,
    );
    assert!(a.batches_with(&b));
    let together = sd.generate_batch(&[&a, &b], &mut |_| true).unwrap();
    for (req, batched) in [&a, &b].into_iter().zip(&together) {
        let alone = sd.generate(req, &mut |_| true).unwrap();
        let d = max_abs_diff(&alone.images, &batched.images);
        assert!(
            d <= 1e-4,
            "{:?}: batched differs from alone by {d}",
            req.prompt
        );
    }
    // The micro-conditioning is used: b's prompt with a's defaults differs.
    let plain_b = request("a green hill", Some("fog"), MicroConditioning::default(), 2);
    let plain = sd.generate(&plain_b, &mut |_| true).unwrap();
    assert!(max_abs_diff(&plain.images, &together[1].images) > 1e-3);
}

/// The job API and `/invocations` serve an SDXL folder: `/info` says so, the
/// seed's request shape (`text`, `style`, `resolution`) runs, SDXL's fields are
/// taken and kept in the record, and a mistyped size pair is a 400 naming it.
#[test]
fn the_server_serves_an_sdxl_folder_through_both_apis() {
    use common::server::{Server, accepted, client, wait_final};
    let model = common::model_dir("tiny-sdxl").display().to_string();
    let s = Server::start(&["--model", &model], &[]);
    let info: Value = client().get(s.url("/info")).send().unwrap().json().unwrap();
    assert_eq!(info["family"], "sdxl");
    assert_eq!(info["default_resolution"], "96x96");
    let id = accepted(
        &s,
        serde_json::json!({"text": "a lighthouse", "style": "oil-painting", "resolution": "96x96",
            "steps": 2, "seed": 5, "prompt_2": "an old harbour", "original_size": [64, 80]}),
    );
    let done = wait_final(&s, &id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request"]["prompt_2"], "an old harbour");
    assert_eq!(
        done["request"]["original_size"],
        serde_json::json!([64, 80])
    );
    for (path, body, field) in [
        (
            "/generate",
            serde_json::json!({"text": "x", "target_size": "96x96"}),
            "target_size",
        ),
        (
            "/invocations",
            serde_json::json!({"prompt": "x", "original_size": [0, 96]}),
            "original_size",
        ),
    ] {
        let r = client().post(s.url(path)).json(&body).send().unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let v: Value = r.json().unwrap();
        assert_eq!(v["field"], field, "{path}: {v}");
    }
    let r = client()
        .post(s.url("/invocations"))
        .json(
            &serde_json::json!({"prompt": "a fox", "negative_prompt_2": "fog",
            "crops_coords_top_left": [8, 8], "num_inference_steps": 2, "seed": 1}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v["parameters"]["negative_prompt"], Value::Null);
    assert_eq!(v["generated_images"].as_array().unwrap().len(), 1);
}
