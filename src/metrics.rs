//! Prometheus metrics (OpenMetrics text, served at `GET /metrics`): requests by
//! route and status, queue depth and wait, generation and per-step seconds, job
//! outcomes. The engine and the HTTP layer record into one [`Metrics`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route pattern (`/image/{image_id}`), never the raw path.
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// completed, failed, cancelled or interrupted.
    pub outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric sdserve exports.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_seconds: HistogramFamily<RouteLabels>,
    pub queue_depth: Gauge,
    pub queue_wait_seconds: Histogram,
    pub generation_seconds: Histogram,
    pub step_seconds: Histogram,
    pub batch_images: Histogram,
    pub jobs: Family<OutcomeLabels, Counter>,
    pub images: Counter,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn long_histogram() -> Histogram {
    // 50 ms .. ~1.8 h: tiny models on GPUs to full-size models on CPUs.
    Histogram::new(exponential_buckets(0.05, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sdserve");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route pattern, method and status",
            http_requests.clone(),
        );
        let http_seconds: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to the response head, by route pattern",
            http_seconds.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Jobs waiting for the model (not counting the running one)",
            queue_depth.clone(),
        );
        let queue_wait_seconds = long_histogram();
        registry.register(
            "queue_wait_seconds",
            "Seconds a job waited in the queue before it started",
            queue_wait_seconds.clone(),
        );
        let generation_seconds = long_histogram();
        registry.register(
            "generation_seconds",
            "Seconds one job ran on the model (text encoder, denoising, VAE decode)",
            generation_seconds.clone(),
        );
        let step_seconds = latency_histogram();
        registry.register(
            "step_seconds",
            "Seconds per denoising step (one UNet batch plus the scheduler)",
            step_seconds.clone(),
        );
        let batch_images = Histogram::new([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]);
        registry.register(
            "batch_images",
            "Images per UNet batch (compatible queued jobs run together)",
            batch_images.clone(),
        );
        let jobs = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "jobs",
            "Jobs that left the engine, by outcome",
            jobs.clone(),
        );
        let images = Counter::default();
        registry.register("images_generated", "Images generated", images.clone());
        Self {
            registry,
            http_requests,
            http_seconds,
            queue_depth,
            queue_wait_seconds,
            generation_seconds,
            step_seconds,
            batch_images,
            jobs,
            images,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn job_finished(&self, outcome: &'static str) {
        self.jobs.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let m = Metrics::default();
        m.http_requests
            .get_or_create(&HttpLabels {
                route: "/ping".into(),
                method: "GET".into(),
                status: 200,
            })
            .inc();
        m.step_seconds.observe(0.25);
        m.job_finished("completed");
        m.queue_depth.set(3);
        let text = m.render();
        assert!(
            text.contains(
                r#"sdserve_http_requests_total{route="/ping",method="GET",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("sdserve_step_seconds_count 1"), "{text}");
        assert!(
            text.contains(r#"sdserve_jobs_total{outcome="completed"} 1"#),
            "{text}"
        );
        assert!(text.contains("sdserve_queue_depth 3"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
