//! The public job API: `POST /generate` → 202 and an image id; `GET`/`DELETE
//! /image/{id}`; live progress as Server-Sent Events; recent images; the image
//! files; style presets and model info for the page.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{ApiError, AppState, Bodies, body_object, ready_model};
use crate::diffusion::schedulers::SchedulerKind;
use crate::jobs::{JobRequest, JobState, JobView};
use crate::request::Limits;

/// Fields `POST /generate` accepts: those of [`JobRequest`] (a test checks).
pub const FIELDS: &[&str] = &[
    "text",
    "style",
    "resolution",
    "negative_prompt",
    "prompt_2",
    "negative_prompt_2",
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
    "aesthetic_score",
    "negative_aesthetic_score",
    "steps",
    "guidance",
    "seed",
    "scheduler",
    "num_images",
    "scheduler_options",
    "init_image",
    "mask_image",
    "strength",
];

/// Parses the body, naming the first unknown or mistyped field.
fn parse_request(headers: &HeaderMap, body: &Bytes) -> Result<JobRequest, ApiError> {
    let mut obj = body_object(headers, body, Bodies::Json)?;
    if let Some(prompt) = obj.remove("prompt") {
        // SageMaker-minded callers say `prompt`; saying both is ambiguous.
        if obj.contains_key("text") {
            return Err(ApiError::BadRequest {
                field: "prompt".into(),
                message: "give `text` or `prompt`, not both".into(),
            });
        }
        obj.insert("text".into(), prompt);
    }
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::BadRequest {
            field: unknown.clone(),
            message: format!("unknown field; accepted: {}", FIELDS.join(", ")),
        });
    }
    // The type `/openapi.json` documents as `GenerateRequest`.
    super::from_object(obj)
}

fn status_name(s: JobState) -> Value {
    serde_json::to_value(s).unwrap_or_default()
}

pub async fn generate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request = parse_request(&headers, &body)?;
    let view = state.jobs.submit(request).await?;
    let id = view.record.image_id.clone();
    // The job may have started already: report its current state.
    let view = match state.jobs.get(&id).await? {
        Some(rx) => rx.borrow().clone(),
        None => view,
    };
    let body = state.jobs.status_body(&view).await?;
    let location = format!("/image/{id}");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location.clone())],
        Json(json!({
            "image_id": id,
            "status": status_name(body.status),
            "queue_position": body.queue_position,
            "estimated_time": body.estimated_time,
            "status_url": location,
            "events_url": format!("/image/{id}/events"),
        })),
    )
        .into_response())
}

fn no_job(id: &str) -> ApiError {
    ApiError::NotFound(format!("no image with id {id:?}"))
}

async fn view_of(state: &AppState, id: &str) -> Result<watch::Receiver<JobView>, ApiError> {
    state.jobs.get(id).await?.ok_or_else(|| no_job(id))
}

pub async fn status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = view_of(&state, &id).await?.borrow().clone();
    Ok(Json(state.jobs.status_body(&view).await?).into_response())
}

pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = state.jobs.cancel(&id).await?.ok_or_else(|| no_job(&id))?;
    let body = state.jobs.status_body(&view).await?;
    // A running job stops after its current step: accepted, not yet done.
    let code = if view.record.status.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((code, Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
pub struct RecentQuery {
    limit: Option<String>,
}

pub async fn recent(
    State(state): State<Arc<AppState>>,
    Query(q): Query<RecentQuery>,
) -> Result<Response, ApiError> {
    let limit = match q.limit.as_deref() {
        None => 12,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| ApiError::BadRequest {
                field: "limit".into(),
                message: format!("{s:?} is not a number in 1..=100"),
            })?,
    };
    let mut images = Vec::new();
    for view in state.jobs.recent(limit) {
        images.push(state.jobs.status_body(&view).await?);
    }
    Ok(Json(json!({ "images": images })).into_response())
}

pub async fn file(
    State(state): State<Arc<AppState>>,
    Path((id, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let stem = file
        .strip_suffix(".png")
        .ok_or_else(|| ApiError::NotFound(format!("no file {file:?}")))?;
    let bytes = match stem {
        // An edit's stored inputs (`init_image_url`, `mask_image_url`).
        "init" | "mask" => state.jobs.input(&id, &format!("{stem}_image")).await?,
        _ => {
            let index = stem
                .parse::<usize>()
                .map_err(|_| ApiError::NotFound(format!("no file {file:?}")))?;
            state.jobs.image(&id, index).await?
        }
    };
    let bytes = bytes.ok_or_else(|| ApiError::NotFound(format!("no {file} for id {id:?}")))?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            // An image id's files never change.
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        bytes,
    )
        .into_response())
}

pub async fn styles() -> Json<Value> {
    Json(json!({
        "default": crate::styles::DEFAULT_STYLE,
        "styles": crate::styles::STYLES,
    }))
}

/// Resolutions offered when the default side is `default`: the family's
/// trained sizes where it has them (SDXL's buckets, scaled when the default is
/// not their 1024), else the square, then 4:3, 3:2 and 16:9 both ways; rounded
/// to `factor`, within the limits.
fn resolutions(
    default: usize,
    factor: usize,
    trained: &[(usize, usize)],
    limits: &Limits,
) -> Vec<String> {
    let round = |v: f64| ((v / factor as f64).round() as usize).max(1) * factor;
    let mut out = vec![format!("{default}x{default}")];
    if let Some(&(base, _)) = trained.first() {
        let scale = default as f64 / base as f64;
        for &(w, h) in &trained[1..] {
            out.push(format!(
                "{}x{}",
                round(w as f64 * scale),
                round(h as f64 * scale)
            ));
        }
    } else {
        let area = (default * default) as f64;
        for (a, b) in [(4.0, 3.0), (3.0, 2.0), (16.0, 9.0)] {
            let long = round((area * a / b).sqrt());
            let short = round((area * b / a).sqrt());
            out.push(format!("{long}x{short}"));
            out.push(format!("{short}x{long}"));
        }
    }
    out.dedup();
    out.retain(|r| {
        let (w, h) = crate::jobs::record::parse_resolution(r).unwrap_or((usize::MAX, 1));
        w.max(h) <= limits.max_side && w.saturating_mul(h) <= limits.max_pixels
    });
    out
}

pub async fn info(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let model = ready_model(&state.engine)?;
    let limits = state.limits;
    let default_side = limits.default_side(model.default_size, model.vae_scale_factor);
    // The model's scheduler class (`PNDMScheduler`) as a request name (`pndm`).
    let default_scheduler =
        SchedulerKind::parse(&model.default_scheduler).map_or("default", |k| k.name());
    Ok(Json(json!({
        "model": model.name,
        "family": model.family.name(),
        "pipeline_class": model.pipeline_class,
        "inpainting": model.inpainting,
        "refiner": model.refiner,
        "default_resolution": format!("{0}x{0}", default_side),
        "resolutions": resolutions(
            default_side,
            model.vae_scale_factor,
            model.family.trained_sizes(),
            &limits,
        ),
        "resolution_multiple": model.vae_scale_factor,
        "schedulers": SchedulerKind::ALL.map(|k| k.name()),
        "default_scheduler": default_scheduler,
        "default_scheduler_class": model.default_scheduler,
        "default_steps": limits.default_steps(&model.defaults),
        "default_guidance": model.defaults.guidance,
        "max_steps": limits.max_steps,
        "max_images": limits.max_images,
        "max_pixels": limits.max_pixels,
        "queue_length": state.engine.queue_len(),
        "queue_capacity": state.engine.queue_capacity(),
    })))
}

/// What a view says, as an SSE event name and data; also the dedupe key.
async fn event_for(state: &AppState, view: &JobView) -> (String, Value) {
    match view.record.status {
        JobState::Queued => (
            "queued".into(),
            json!({
                "queue_position": view.queue_position,
                "estimated_time": state.jobs.status_body(view).await.ok().and_then(|b| b.estimated_time),
            }),
        ),
        JobState::Processing => (
            "progress".into(),
            json!({
                "step": view.step,
                "total_steps": view.total_steps,
                "progress": view.progress(),
                "estimated_time": state.jobs.status_body(view).await.ok().and_then(|b| b.estimated_time),
            }),
        ),
        JobState::Completed => (
            "completed".into(),
            state
                .jobs
                .status_body(view)
                .await
                .ok()
                .and_then(|b| serde_json::to_value(b).ok())
                .unwrap_or_default(),
        ),
        JobState::Failed => ("failed".into(), json!({ "error": view.record.error })),
        JobState::Cancelled => ("cancelled".into(), json!({})),
    }
}

struct EventState {
    app: Arc<AppState>,
    id: String,
    rx: watch::Receiver<JobView>,
    /// (status, position, step) of the last event sent.
    last: Option<(JobState, Option<usize>, usize)>,
    first: bool,
    done: bool,
}

/// `GET /image/{id}/events`: `queued`, `progress`, then one of `completed`,
/// `failed`, `cancelled`, after which the stream ends.
pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let rx = view_of(&state, &id).await?;
    let init = EventState {
        app: state,
        id,
        rx,
        last: None,
        first: true,
        done: false,
    };
    let stream = futures_util::stream::unfold(init, |mut s| async move {
        if s.done {
            return None;
        }
        let closing = s.app.jobs.closing();
        loop {
            if !s.first {
                let changed = tokio::select! {
                    r = s.rx.changed() => r.is_ok(),
                    _ = closing.cancelled() => return None,
                };
                if !changed {
                    // Not this server's live job (another replica's, or the
                    // engine stopped): follow the stored record.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = closing.cancelled() => return None,
                    }
                    s.rx = match s.app.jobs.get(&s.id).await {
                        Ok(Some(rx)) => rx,
                        _ => return None,
                    };
                    s.first = true;
                    continue;
                }
            }
            s.first = false;
            let view = s.rx.borrow_and_update().clone();
            let key = (view.record.status, view.queue_position, view.step);
            if s.last == Some(key) {
                continue;
            }
            s.last = Some(key);
            s.done = view.record.status.is_final();
            let (name, data) = event_for(&s.app, &view).await;
            let event = Event::default().event(name).data(data.to_string());
            return Some((Ok(event), s));
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolutions_are_multiples_within_the_limit() {
        let limits = |max_pixels, max_side| Limits {
            max_pixels,
            max_side,
            ..Limits::default()
        };
        let r = resolutions(512, 8, &[], &limits(1024 * 1024, 2048));
        assert_eq!(r[0], "512x512");
        assert!(r.contains(&"592x440".to_string()), "{r:?}");
        assert!(r.contains(&"440x592".to_string()), "{r:?}");
        for s in &r {
            let (w, h) = crate::jobs::record::parse_resolution(s).unwrap();
            assert!(w % 8 == 0 && h % 8 == 0 && w * h <= 1024 * 1024, "{s}");
        }
        let small = resolutions(512, 8, &[], &limits(512 * 512, 2048));
        assert!(small.iter().all(|s| {
            let (w, h) = crate::jobs::record::parse_resolution(s).unwrap();
            w * h <= 512 * 512
        }));
        // The side limit drops the long ones: 592x440 stays, 624x416 goes.
        let narrow = resolutions(512, 8, &[], &limits(1024 * 1024, 600));
        assert!(narrow.contains(&"592x440".to_string()), "{narrow:?}");
        assert!(!narrow.iter().any(|s| s.starts_with("624")), "{narrow:?}");
    }

    #[test]
    fn sdxl_offers_its_trained_sizes() {
        use crate::diffusion::pipelines::Family;
        let trained = Family::Sdxl.trained_sizes();
        let all = resolutions(1024, 8, trained, &Limits::default());
        let want: Vec<String> = trained.iter().map(|(w, h)| format!("{w}x{h}")).collect();
        assert_eq!(all, want);
        // A smaller default scales the buckets, keeping their shapes.
        let half = resolutions(512, 8, trained, &Limits::default());
        assert_eq!(half[..3], ["512x512", "576x448", "448x576"]);
        // The limits still apply: 1536x640 is over a 1400-pixel side.
        let narrow = Limits {
            max_side: 1400,
            ..Limits::default()
        };
        let some = resolutions(1024, 8, trained, &narrow);
        assert!(some.contains(&"1344x768".to_string()) && !some.contains(&"1536x640".to_string()));
    }
}
