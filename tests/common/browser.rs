//! A headless Chromium (Debian's `chromium` and `chromium-driver`) driven over
//! the W3C WebDriver protocol, for the page's tests.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::server::client;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process with one headless Chromium session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Browser {
    pub fn start() -> Self {
        let port = super::free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (apt-get install chromium chromium-driver)");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::blocking::get(format!("{base}/status")).is_err() {
            assert!(Instant::now() < deadline, "chromedriver never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": [
                "--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1280,1000"
            ]}
        }}});
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
        };
        b.session = b.call("POST", "/session", Some(caps))["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        b
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let req = client().request(method.parse().unwrap(), url);
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        let v: Value = req.send().unwrap().json().unwrap();
        assert!(v["value"]["error"].is_null(), "{method} {path}: {v}");
        v["value"].clone()
    }

    pub fn session(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) {
        self.session("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn find(&self, css: &str) -> String {
        let v = self.session(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.session(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        );
    }

    pub fn click(&self, css: &str) {
        let e = self.find(css);
        self.session("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    pub fn js(&self, script: &str) -> Value {
        self.session(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Polls `script` until it returns something truthy.
    pub fn wait_for(&self, script: &str, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.js(script);
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; status: {}",
                self.js("return document.querySelector('#status').textContent")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = client()
                .delete(format!("{}/session/{}", self.base, self.session))
                .send();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

pub fn skipped() -> bool {
    if std::env::var_os("SDSERVE_SKIP_BROWSER_TESTS").is_some() {
        eprintln!("SKIPPED: browser test (SDSERVE_SKIP_BROWSER_TESTS is set)");
        return true;
    }
    false
}

impl Browser {
    /// Resizes the window (a phone: 390 × 844).
    pub fn window_size(&self, width: u32, height: u32) {
        self.session(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }

    /// Chooses `path` in the file input `css` (hidden ones too).
    pub fn upload(&self, css: &str, path: &std::path::Path) {
        self.js(&format!("document.querySelector('{css}').hidden = false"));
        let e = self.find(css);
        self.session(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": path.to_str().unwrap() })),
        );
    }

    /// Drags a `kind` pointer (`mouse`, `touch`) over element `css` through
    /// `points`, offsets from its centre in CSS pixels.
    pub fn drag(&self, css: &str, kind: &str, points: &[(i64, i64)]) {
        let e = self.find(css);
        let origin = json!({ ELEMENT: e });
        let mut actions = vec![];
        for (i, (x, y)) in points.iter().enumerate() {
            actions.push(
                json!({"type": "pointerMove", "duration": 20, "origin": origin, "x": x, "y": y}),
            );
            if i == 0 {
                actions.push(json!({"type": "pointerDown", "button": 0}));
            }
        }
        actions.push(json!({"type": "pointerUp", "button": 0}));
        self.session(
            "POST",
            "/actions",
            Some(json!({"actions": [{"type": "pointer", "id": "p1",
                "parameters": {"pointerType": kind}, "actions": actions}]})),
        );
        self.session("DELETE", "/actions", None);
    }
}
