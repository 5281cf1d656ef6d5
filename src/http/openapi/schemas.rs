//! The request bodies' schemas: generated from the types the handlers parse
//! (schemars), then given this server's bounds (limits, size multiple,
//! scheduler and style names) and descriptions.

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use super::super::sagemaker::Invocation;
use super::Bounds;
use crate::diffusion::params::{AESTHETIC_FIELDS, MICRO_FIELDS};
use crate::diffusion::schedulers::{Allowed, OVERRIDABLE_KEYS, SchedulerKind, allowed};
use crate::jobs::JobRequest;
use crate::styles::STYLES;

/// The schemas of the request types, as `components/schemas` entries.
pub(super) fn generated_schemas() -> Map<String, Value> {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    generator.subschema_for::<JobRequest>();
    generator.subschema_for::<Invocation>();
    let mut schemas = generator.take_definitions(true);
    for schema in schemas.values_mut() {
        tidy(schema);
    }
    schemas
}

/// Drops what the derive adds that says nothing to an API caller: Rust's
/// integer formats (`uint`, `uint64`: the bounds say it), `"default": null`
/// (an absent field is the default), the types' rustdoc.
fn tidy(schema: &mut Value) {
    if let Some(obj) = schema.as_object_mut() {
        obj.remove("description");
    }
    let Some(Value::Object(properties)) = schema.get_mut("properties") else {
        return;
    };
    for prop in properties.values_mut().filter_map(Value::as_object_mut) {
        if prop.get("default").is_some_and(Value::is_null) {
            prop.remove("default");
        }
        if prop
            .get("format")
            .and_then(Value::as_str)
            .is_some_and(|f| f.starts_with("uint") || f.starts_with("int"))
        {
            prop.remove("format");
        }
    }
}

/// Property `name` of the object schema `schema` (a missing one is a bug the
/// unit tests catch: the type and this module disagree).
fn property<'a>(schema: &'a mut Value, name: &str) -> &'a mut Map<String, Value> {
    schema
        .pointer_mut(&format!("/properties/{name}"))
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("the request type has no field {name:?}"))
}

/// Adds (or replaces) `keywords` in property `name`.
fn constrain(schema: &mut Value, name: &str, keywords: Value) {
    let prop = property(schema, name);
    if let Value::Object(keywords) = keywords {
        prop.extend(keywords);
    }
}

/// Appends a sentence to property `name`'s description.
fn describe(schema: &mut Value, name: &str, sentence: &str) {
    let prop = property(schema, name);
    let text = match prop.get("description").and_then(Value::as_str) {
        Some(d) => format!("{d} {sentence}"),
        None => sentence.to_string(),
    };
    prop.insert("description".into(), Value::String(text));
}

/// Makes property `name` required and not null.
fn require(schema: &mut Value, name: &str) {
    let prop = property(schema, name);
    if let Some(Value::Array(types)) = prop.get_mut("type") {
        types.retain(|t| t != "null");
        if let [only] = types.as_slice() {
            let only = only.clone();
            prop.insert("type".into(), only);
        }
    }
    if let Some(Value::Array(values)) = prop.get_mut("enum") {
        values.retain(|v| !v.is_null());
    }
    if let Some(Value::Array(required)) = schema.get_mut("required") {
        if !required.iter().any(|r| r == name) {
            required.push(Value::String(name.to_string()));
        }
    } else {
        schema["required"] = json!([name]);
    }
}

/// A closed enum of names, or null (the default).
fn names_or_null<'a>(names: impl Iterator<Item = &'a str>) -> Value {
    let mut values: Vec<Value> = names.map(|n| Value::String(n.to_string())).collect();
    values.push(Value::Null);
    Value::Array(values)
}

/// What each scheduler option may be set to, whatever scheduler runs: the
/// ranges `check_overrides` enforces, as JSON Schema (a unit test probes both).
pub(super) fn scheduler_option(key: &str) -> Value {
    match allowed(key) {
        Allowed::Bool => json!({"type": "boolean"}),
        Allowed::OneOf(names) => json!({"type": "string", "enum": names}),
        Allowed::Open(lo, hi) => {
            json!({"type": "number", "exclusiveMinimum": lo, "exclusiveMaximum": hi})
        }
        Allowed::PositiveOrNull => json!({"type": ["number", "null"], "exclusiveMinimum": 0}),
        Allowed::Integer(lo, hi) => json!({"type": "integer", "minimum": lo, "maximum": hi}),
    }
}

/// The bounds every request type shares: steps, images, seed, scheduler.
fn constrain_common(
    schema: &mut Value,
    b: &Bounds,
    [steps, images, scheduler, options]: [&str; 4],
) {
    constrain(schema, steps, json!({"maximum": b.max_steps()}));
    if !b.default_steps_fit() {
        require(schema, steps);
        describe(
            schema,
            steps,
            &format!(
                "Required here: the default of {} is over this model's limit of {}.",
                b.default_steps(),
                b.max_steps()
            ),
        );
    }
    constrain(schema, images, json!({"maximum": b.limits.max_images}));
    constrain(schema, "seed", json!({"minimum": 0, "maximum": u64::MAX}));
    constrain(
        schema,
        scheduler,
        json!({"enum": names_or_null(SchedulerKind::ALL.iter().map(|k| k.name()))}),
    );
    let properties: Map<String, Value> = OVERRIDABLE_KEYS
        .iter()
        .map(|k| (k.to_string(), scheduler_option(k)))
        .collect();
    constrain(
        schema,
        options,
        json!({"properties": properties, "additionalProperties": false}),
    );
    describe(
        schema,
        options,
        "Each option's type and range is checked at once; whether the chosen scheduler \
         takes the combination (with the model's scheduler config and the step count) is \
         checked by building it, as diffusers raises in `__init__`/`set_timesteps`: a 400 \
         names `scheduler_options` (or `scheduler`/`steps`).",
    );
}

/// A regex matching exactly the sides `b` accepts, `(8|16|...)`.
fn sides_regex(b: &Bounds) -> String {
    let sides: Vec<String> = b.sides().map(|s| s.to_string()).collect();
    format!("({})", sides.join("|"))
}

/// SDXL's fields: sizes and crop corners within what validation takes; on a
/// model of another family only `null` (a value is a 400 naming the field).
fn constrain_sdxl(schema: &mut Value, b: &Bounds) {
    let max = crate::request::MAX_MICRO_VALUE;
    for field in MICRO_FIELDS {
        let min = if field.contains("crops") { 0 } else { 1 };
        constrain(
            schema,
            field,
            json!({"items": {"type": "integer", "minimum": min, "maximum": max}, "minItems": 2, "maxItems": 2}),
        );
    }
    for field in ["prompt_2", "negative_prompt_2"] {
        constrain(
            schema,
            field,
            json!({"maxLength": b.limits.max_prompt_chars}),
        );
    }
    for field in AESTHETIC_FIELDS {
        constrain(schema, field, json!({"minimum": 0, "maximum": 10}));
    }
    let only_null = |schema: &mut Value, field: &str, why: &str| {
        let prop = property(schema, field);
        prop.clear();
        prop.insert("type".into(), "null".into());
        prop.insert(
            "description".into(),
            format!(
                "{why}: this server's model is not one, and refuses a value (400 naming the field)."
            )
            .into(),
        );
    };
    if b.xl == Some(false) {
        let fields = MICRO_FIELDS
            .iter()
            .chain(&["prompt_2", "negative_prompt_2"])
            .chain(&AESTHETIC_FIELDS);
        for field in fields {
            only_null(schema, field, "SDXL models only");
        }
    } else if b.refiner == Some(true) {
        for field in ["prompt_2", "negative_prompt_2"] {
            only_null(
                schema,
                field,
                "SDXL base models only (a refiner has one text encoder)",
            );
        }
    } else if b.refiner == Some(false) {
        for field in AESTHETIC_FIELDS {
            only_null(schema, field, "SDXL refiners only");
        }
    }
}

/// `GenerateRequest`: the `POST /generate` body. With `stored`, the request
/// as a job record keeps it (every default resolved), for `Status.request`:
/// the text is then bounded by the limit alone, a style's template being
/// checked with it when the job was accepted.
pub(super) fn generate_request(mut schema: Value, b: &Bounds, stored: bool) -> Value {
    let max = b.limits.max_prompt_chars;
    for field in ["text", "negative_prompt"] {
        constrain(&mut schema, field, json!({"maxLength": max}));
    }
    if !stored {
        for field in ["text", "negative_prompt"] {
            describe(
                &mut schema,
                field,
                &format!("At most {max} characters (the style's template is not counted)."),
            );
        }
    }
    constrain(
        &mut schema,
        "style",
        json!({"enum": names_or_null(STYLES.iter().map(|s| s.name)), "default": crate::styles::DEFAULT_STYLE}),
    );
    constrain(
        &mut schema,
        "resolution",
        json!({"pattern": format!("^{0}[xX×]{0}$", sides_regex(b))}),
    );
    describe(
        &mut schema,
        "resolution",
        &format!(
            "Each side a multiple of {} from {} to {}, and width × height at most {} pixels \
             (a larger area, or more working memory than this server allows per request, \
             is a 400 naming `resolution`).",
            b.multiple,
            b.multiple,
            b.max_side(),
            b.limits.max_pixels
        ),
    );
    if !b.default_size_fits() && !stored {
        require(&mut schema, "resolution");
        describe(
            &mut schema,
            "resolution",
            "Required here: no size fits this server's limits.",
        );
    }
    constrain_common(
        &mut schema,
        b,
        ["steps", "num_images", "scheduler", "scheduler_options"],
    );
    constrain_sdxl(&mut schema, b);
    schema
}

/// `Invocation`: the `POST /invocations` JSON body.
pub(super) fn invocation(mut schema: Value, b: &Bounds) -> Value {
    let max = b.limits.max_prompt_chars;
    for field in ["prompt", "negative_prompt"] {
        constrain(&mut schema, field, json!({"maxLength": max}));
    }
    for side in ["width", "height"] {
        constrain(
            &mut schema,
            side,
            json!({"minimum": b.multiple, "maximum": b.max_side(), "multipleOf": b.multiple}),
        );
        describe(
            &mut schema,
            side,
            &format!(
                "A multiple of {} up to {}; width × height at most {} pixels (a larger area, \
                 or more working memory than this server allows per request, is a 400 naming `width`).",
                b.multiple,
                b.max_side(),
                b.limits.max_pixels
            ),
        );
        if !b.default_size_fits() {
            require(&mut schema, side);
            describe(
                &mut schema,
                side,
                "Required here: no size fits this server's limits.",
            );
        }
    }
    constrain_common(
        &mut schema,
        b,
        [
            "num_inference_steps",
            "num_images_per_prompt",
            "scheduler",
            "scheduler_options",
        ],
    );
    constrain_sdxl(&mut schema, b);
    schema
}
