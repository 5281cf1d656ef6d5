//! The web page (`GET /`): plain HTML/CSS/JS embedded in the binary, no build
//! step. `GET /config.js` tells it the API base; here it is the same origin.
//! Hosted elsewhere (S3 + CloudFront), the page loads that host's config.js,
//! which sets `window.SDSERVE_API_BASE` to this server's URL (see README).

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

const INDEX: &str = include_str!("ui/index.html");

pub async fn index() -> Html<&'static str> {
    Html(INDEX)
}

pub async fn config_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        "// Served by sdserve itself: the API is on the same origin.\n",
    )
        .into_response()
}
