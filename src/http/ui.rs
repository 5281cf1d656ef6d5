//! The web page (`GET /`): plain HTML/CSS/JS embedded in the binary, no build
//! step. `GET /config.js` tells it the API base; here it is the same origin.
//! Hosted elsewhere (S3 + CloudFront), the page loads that host's config.js,
//! which sets `window.SDSERVE_API_BASE` to this server's URL (see README).

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

const INDEX: &str = include_str!("ui/index.html");
const EDITOR: &str = include_str!("ui/editor.js");

/// The page's Content-Security-Policy: its own inline script and style and
/// `config.js`; images from anywhere (presigned S3 URLs) and API calls to any
/// origin (`?api=` or a `config.js` may point elsewhere); never framed (no
/// clickjacking), no plugins, forms and `<base>` pinned.
const PAGE_CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-inline'; \
    style-src 'self' 'unsafe-inline'; img-src * data: blob:; connect-src *; \
    object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub async fn index() -> Response {
    (
        [
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(INDEX),
    )
        .into_response()
}

pub async fn config_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        "// Served by sdserve itself: the API is on the same origin.\n",
    )
        .into_response()
}

/// The page's image editor (`editor.js`, beside `index.html` wherever the page is hosted).
pub async fn editor_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        EDITOR,
    )
        .into_response()
}
