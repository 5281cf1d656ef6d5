//! A real `sdserve serve` process on loopback for the HTTP tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;

/// A running `sdserve serve` child process and its log.
pub struct Server {
    child: Child,
    pub base: String,
    log: Arc<Mutex<String>>,
    /// Storage folder made for this server when the caller gave none.
    _data: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts `sdserve serve` on a free loopback port with `extra` flags and
    /// waits for `/ping` 200. Images and records go to a fresh temporary folder
    /// unless `extra` names `--storage`.
    pub fn start(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let server = Self::spawn(extra, env);
        server.wait_ready();
        server
    }

    /// Like [`Server::start`] without waiting for the model.
    pub fn spawn(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let data = (!extra.contains(&"--storage")).then(|| tempfile::tempdir().unwrap());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdserve"));
        cmd.args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(extra)
            .env_remove("SDSERVE_MODEL")
            .env_remove("SAGEMAKER_BIND_TO_PORT")
            .env("SDSERVE_SAGEMAKER_MODEL_DIR", "/nonexistent/opt/ml/model")
            .env("RUST_LOG", "info")
            .env_remove("SDSERVE_STORAGE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(d) = &data {
            cmd.env("SDSERVE_STORAGE", d.path());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starts sdserve serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                log2.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server prints its address");
        Server {
            child,
            base: format!("http://{addr}"),
            log,
            _data: data,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(r) = reqwest::blocking::get(self.url("/ping"))
                && r.status() == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server never became ready:\n{}", self.log.lock().unwrap());
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits (30 s at most) for the exit.
    pub fn terminate(self) -> std::process::ExitStatus {
        self.sigterm();
        self.wait_exit(Duration::from_secs(30))
    }
}

impl Server {
    /// Sends SIGTERM without waiting (see [`Server::wait_exit`]).
    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process at once (SIGKILL), as a crash or OOM would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for a log line containing both `a` and `b`.
    pub fn wait_for_log(&self, a: &str, b: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.log().lines().any(|l| l.contains(a) && l.contains(b)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no log line with {a:?} and {b:?}:\n{}", self.log());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

pub fn tiny() -> String {
    super::model_dir("tiny-sd1").display().to_string()
}

pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// `POST /generate` with `body`; asserts 202 and returns the image id.
pub fn accepted(s: &Server, body: serde_json::Value) -> String {
    let r = client()
        .post(s.url("/generate"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text());
    let v: serde_json::Value = r.json().unwrap();
    v["image_id"].as_str().unwrap().to_string()
}

/// `GET /image/{id}`, asserting 200.
pub fn job_status(s: &Server, id: &str) -> serde_json::Value {
    let r = client().get(s.url(&format!("/image/{id}"))).send().unwrap();
    assert_eq!(r.status(), 200);
    r.json().unwrap()
}

/// Polls until the job reaches a final status and returns it.
pub fn wait_final(s: &Server, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = job_status(s, id);
        if ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} never finished: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until the job's status is `want`.
pub fn wait_status(s: &Server, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while job_status(s, id)["status"] != want {
        assert!(Instant::now() < deadline, "job {id} never {want}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `GET url` (a path on `s`), asserting 200, as an RGB picture.
pub fn get_png(s: &Server, url: &str) -> image::RgbImage {
    let r = client().get(s.url(url)).send().unwrap();
    assert_eq!(r.status(), 200, "{url}");
    image::load_from_memory(&r.bytes().unwrap())
        .unwrap()
        .to_rgb8()
}
