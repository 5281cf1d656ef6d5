use serde_json::{Map, Value, json};

use super::schemas::scheduler_option;
use super::*;
use crate::diffusion::schedulers::OVERRIDABLE_KEYS;
use crate::diffusion::schedulers::check_overrides;
use crate::http::{ApiError, from_object};
use crate::jobs::JobRequest;

fn bounds() -> Bounds {
    Bounds {
        limits: Limits {
            max_pixels: 4096,
            max_side: 64,
            max_steps: 3,
            max_images: 2,
            ..Limits::default()
        },
        multiple: 8,
        // A 96-px model's default, as `Bounds::new` fits it to these limits.
        default_size: Some(64),
        train_steps: Some(1000),
        xl: Some(true),
        refiner: Some(false),
        defaults: SamplingDefaults::SDXL,
    }
}

fn property_names(schema: &Value) -> Vec<String> {
    let mut names: Vec<String> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
}

#[test]
fn the_field_tables_are_the_types_fields() {
    let doc = spec(&bounds());
    let schemas = &doc["components"]["schemas"];
    let mut generate: Vec<String> = super::super::jobs::FIELDS
        .iter()
        .map(|f| f.to_string())
        .collect();
    generate.sort();
    assert_eq!(property_names(&schemas["GenerateRequest"]), generate);
    assert_eq!(property_names(&schemas["JobRequest"]), generate);
    let mut invocation: Vec<String> = super::super::sagemaker::FIELDS
        .iter()
        .map(|(f, _)| f.to_string())
        .chain(["eta".to_string()])
        .collect();
    invocation.sort();
    assert_eq!(property_names(&schemas["Invocation"]), invocation);
    for name in ["GenerateRequest", "Invocation"] {
        assert_eq!(schemas[name]["additionalProperties"], false, "{name}");
    }
}

#[test]
fn bounds_come_from_the_limits() {
    let b = bounds();
    assert_eq!(b.max_side(), 64);
    let doc = spec(&b);
    let s = &doc["components"]["schemas"];
    let g = &s["GenerateRequest"]["properties"];
    assert_eq!(g["steps"]["maximum"], 3);
    assert_eq!(g["num_images"]["maximum"], 2);
    assert_eq!(
        g["resolution"]["pattern"],
        "^(8|16|24|32|40|48|56|64)[xX×](8|16|24|32|40|48|56|64)$"
    );
    // The defaults fit these limits (64x64, 3 steps): only the text is required.
    assert_eq!(s["GenerateRequest"]["required"], json!(["text"]));
    let i = &s["Invocation"]["properties"];
    assert_eq!(i["width"]["multipleOf"], 8);
    assert_eq!(i["height"]["maximum"], 64);
    assert_eq!(i["prompt"]["maxLength"], Limits::default().max_prompt_chars);
    let bodies = &doc["paths"]["/invocations"]["post"]["requestBody"]["content"];
    assert!(bodies.get("text/plain").is_some());
    // Limits below one multiple leave no default size: the size is
    // required, and a bare prompt is not offered.
    let tiny = Bounds {
        limits: Limits {
            max_pixels: 32,
            ..b.limits
        },
        default_size: Some(b.limits.default_side(96, 8)),
        ..b
    };
    let doc = spec(&tiny);
    let required = doc["components"]["schemas"]["GenerateRequest"]["required"].clone();
    assert_eq!(required, json!(["text", "resolution"]));
    let bodies = &doc["paths"]["/invocations"]["post"]["requestBody"]["content"];
    assert!(bodies.get("text/plain").is_none());

    // The default limits: the area bounds a side only through the other side.
    let wide = Bounds {
        limits: Limits {
            max_side: 2048,
            max_pixels: 4096,
            ..Limits::default()
        },
        ..b
    };
    assert_eq!(wide.max_side(), 512);
    let roomy = Bounds {
        limits: Limits::default(),
        default_size: Some(512),
        ..b
    };
    assert_eq!(roomy.max_side(), Limits::default().max_side);
    let doc = spec(&roomy);
    let required = doc["components"]["schemas"]["GenerateRequest"]["required"].clone();
    assert_eq!(required, json!(["text"]));
    assert!(
        doc["paths"]["/invocations"]["post"]["requestBody"]["content"]
            .get("text/plain")
            .is_some()
    );
    // The caller's text is bounded by the limit, a style's template aside.
    let s = &doc["components"]["schemas"];
    for schema in ["GenerateRequest", "JobRequest"] {
        assert_eq!(
            s[schema]["properties"]["text"]["maxLength"],
            Limits::default().max_prompt_chars,
            "{schema}"
        );
    }
}

/// Whether `v` is valid per the keywords `scheduler_option` uses.
fn valid(schema: &Value, v: &Value) -> bool {
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let type_ok = types.iter().any(|t| match *t {
        "boolean" => v.is_boolean(),
        "string" => v.is_string(),
        "null" => v.is_null(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        other => panic!("unexpected type {other}"),
    });
    let enum_ok = schema
        .get("enum")
        .and_then(Value::as_array)
        .is_none_or(|e| e.contains(v));
    let n = v.as_f64();
    let bound =
        |key: &str, ok: fn(f64, f64) -> bool| match (schema.get(key).and_then(Value::as_f64), n) {
            (Some(b), Some(n)) => ok(n, b),
            _ => true,
        };
    type_ok
        && enum_ok
        && bound("minimum", |n, b| n >= b)
        && bound("maximum", |n, b| n <= b)
        && bound("exclusiveMinimum", |n, b| n > b)
        && bound("exclusiveMaximum", |n, b| n < b)
}

#[test]
fn scheduler_option_schemas_match_check_overrides() {
    // (Integral floats such as 3.0 are left out: JSON Schema counts them
    // as integers, check_overrides does not; the API's parser makes them
    // integers first, see `integer::options`.)
    let mut probes = vec![
        json!(true),
        json!(false),
        Value::Null,
        json!(0),
        json!(1),
        json!(3),
        json!(4),
        json!(-1),
        json!(999),
        json!(1000),
        json!(0.5),
        json!(1e-9),
        json!(-0.5),
        json!("nope"),
    ];
    for key in OVERRIDABLE_KEYS {
        if let Some(names) = scheduler_option(key)["enum"].as_array() {
            probes.extend(names.iter().cloned());
        }
    }
    for key in OVERRIDABLE_KEYS {
        let schema = scheduler_option(key);
        for v in &probes {
            let options = Map::from_iter([(key.to_string(), v.clone())]);
            assert_eq!(
                valid(&schema, v),
                check_overrides(&options).is_ok(),
                "{key} = {v}: the schema {schema} and check_overrides disagree"
            );
        }
    }
}

#[test]
fn integers_may_be_written_as_floats() {
    #[derive(serde::Deserialize)]
    struct T {
        #[serde(default, deserialize_with = "crate::fields::integer::option")]
        n: Option<usize>,
    }
    let parse = |v: Value| serde_json::from_value::<T>(v).map(|t| t.n);
    assert_eq!(parse(json!({"n": 8})).unwrap(), Some(8));
    assert_eq!(parse(json!({"n": 8.0})).unwrap(), Some(8));
    assert_eq!(parse(json!({"n": null})).unwrap(), None);
    assert_eq!(parse(json!({})).unwrap(), None);
    for bad in [json!(8.5), json!(-1), json!(-1.0), json!("8"), json!(1e30)] {
        assert!(parse(json!({ "n": bad })).is_err(), "{bad}");
    }
    #[derive(serde::Deserialize)]
    struct S {
        #[serde(default, deserialize_with = "crate::fields::integer::option")]
        seed: Option<u64>,
    }
    let max: S = serde_json::from_str(r#"{"seed": 18446744073709551615}"#).unwrap();
    assert_eq!(max.seed, Some(u64::MAX));
    assert!(serde_json::from_str::<S>(r#"{"seed": 18446744073709551616}"#).is_err());
}

#[test]
fn a_mistyped_field_is_named() {
    let obj = json!({"text": "a", "steps": "many"});
    match from_object::<JobRequest>(obj.as_object().unwrap().clone()) {
        Err(ApiError::BadRequest { field, message }) => {
            assert_eq!(field, "steps");
            assert!(message.contains("integer"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let ok = json!({"text": "a", "steps": 2.0, "seed": 7,
        "scheduler_options": {"solver_order": 2.0, "beta_start": 0.5, "sigma_max": 3.0}});
    let r: JobRequest = from_object(ok.as_object().unwrap().clone()).unwrap();
    assert_eq!((r.steps, r.seed), (Some(2), Some(7)));
    let options = r.scheduler_options.unwrap();
    assert!(options["solver_order"].is_i64() && options["sigma_max"].is_i64());
    assert_eq!(options["beta_start"], 0.5);
    check_overrides(&options).unwrap();
}
