//! The CPU container image (deploy/Dockerfile) on the real Docker engine, run
//! the way SageMaker runs it: `docker run -v MODEL:/opt/ml/model -p ...:8080 IMAGE serve`.
//!
//! Builds the base image with deploy/build-base-image.sh (debootstrap; skipped
//! when `sdserve-base:bookworm` exists), then the image with deploy/build-image.sh
//! from the binary this `cargo test` built (`CARGO_BIN_EXE_sdserve`: the test
//! profile with optimised dependencies; production images use the release
//! binary, `cargo build --release`). Then, on a copy of the tiny fixture model:
//! `/ping` turns 200, `/invocations` with `Accept: image/png` returns a PNG, a
//! job lands in the image's default storage folder, `SAGEMAKER_BIND_TO_PORT` moves
//! the port, the Kubernetes-style hardened run (UID 10001, read-only root
//! filesystem, no capabilities) works and turns the Docker HEALTHCHECK healthy,
//! and `docker stop` (SIGTERM) ends each run with exit code 0 and a clean
//! shutdown in the log. Containers and the test image are removed at the end,
//! pass or fail.
//!
//! Without a Docker engine the test prints `SKIPPED: no Docker engine` and
//! passes, unless `CI` is set (CI has Docker): then it fails.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::free_port;
use common::server::client;
use reqwest::blocking::Client;
use serde_json::{Value, json};

const HARDENED_USER: &str = "10001:10001";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("runs docker")
}

/// Runs docker and returns its trimmed stdout, panicking with stderr on failure.
fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {} failed: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn logs(name: &str) -> String {
    let out = docker(&["logs", name]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Removes the test's containers and image however the test ends.
struct Cleanup {
    image: String,
    containers: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

fn run_script(script: &str, args: &[&str]) {
    let started = Instant::now();
    let out = Command::new(repo().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("runs {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "{script}: {:.0} s; {}",
        started.elapsed().as_secs_f64(),
        stdout.lines().last().unwrap_or("")
    );
}

/// Copies the tiny fixture model into a fresh folder every user can read
/// (the hardened run reads it as UID 10001).
fn model_copy() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&repo().join("tests/fixtures/tiny-sd1"), dir.path());
    // tempdir() is 0700; files keep the fixture's modes (0644).
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir.path())
        .status()
        .unwrap();
    dir
}

/// A `docker run -d` of the test image; returns the container's name.
fn start(cleanup: &mut Cleanup, label: &str, run_args: &[&str]) -> String {
    let name = format!("{}-{label}", cleanup.image.replace([':', '/'], "-"));
    cleanup.containers.push(name.clone());
    let mut args = vec!["run", "-d", "--name", &name];
    args.extend_from_slice(run_args);
    args.push(&cleanup.image);
    args.push("serve");
    docker_ok(&args);
    name
}

fn wait_ready(name: &str, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let c = Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    loop {
        if let Ok(r) = c.get(format!("{base}/ping")).send()
            && r.status() == 200
        {
            return;
        }
        let running = docker_ok(&["inspect", "-f", "{{.State.Running}}", name]);
        assert!(
            running == "true",
            "container {name} exited before /ping turned 200:\n{}",
            logs(name)
        );
        assert!(
            Instant::now() < deadline,
            "/ping not 200 within 60 s:\n{}",
            logs(name)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `POST /generate` and poll until the job completes; returns its id.
fn generate(name: &str, base: &str) -> String {
    let r = client()
        .post(format!("{base}/generate"))
        .json(&json!({"text": "a red cube", "steps": 2, "resolution": "64x64", "seed": 5}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "POST /generate:\n{}", logs(name));
    let id = r.json::<Value>().unwrap()["image_id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = client()
            .get(format!("{base}/image/{id}"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        match v["status"].as_str().unwrap() {
            "completed" => return id,
            "queued" | "processing" => {}
            other => panic!("job {id} ended {other}: {v}\n{}", logs(name)),
        }
        assert!(Instant::now() < deadline, "job {id} not done in 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `docker stop` (SIGTERM, then SIGKILL after 30 s) must end the container
/// promptly with exit code 0 and sdserve's clean-shutdown log lines.
fn stop_cleanly(name: &str) {
    let started = Instant::now();
    docker_ok(&["stop", "-t", "30", name]);
    let took = started.elapsed();
    let log = logs(name);
    let code = docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", name]);
    assert_eq!(code, "0", "exit code after SIGTERM:\n{log}");
    assert!(
        took < Duration::from_secs(20),
        "docker stop took {took:?}: SIGTERM did not reach sdserve?\n{log}"
    );
    assert!(
        log.contains("shutdown signal received") && log.contains("shut down"),
        "no clean shutdown in the log:\n{log}"
    );
}

#[test]
fn cpu_image_runs_as_sagemaker_runs_it() {
    let started = Instant::now();
    let engine = Command::new("docker").arg("info").output();
    if !matches!(&engine, Ok(out) if out.status.success()) {
        let why = match &engine {
            Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
            Err(e) => e.to_string(),
        };
        // Straight to stderr: libtest hides eprintln! output of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "\n**********\nSKIPPED: no Docker engine (docker info: {why})\n**********\n"
        );
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set and there is no Docker engine: the container test must run in CI"
        );
        return;
    }

    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let mut cleanup = Cleanup {
        image: format!("sdserve-test:{}-{nanos}", std::process::id()),
        containers: Vec::new(),
    };
    run_script("deploy/build-base-image.sh", &[]);
    run_script(
        "deploy/build-image.sh",
        &[
            "--binary",
            env!("CARGO_BIN_EXE_sdserve"),
            "--variant",
            "cpu",
            "--tag",
            &cleanup.image,
        ],
    );

    // What SageMaker relies on: the binary as ENTRYPOINT, `serve` as CMD, root,
    // port 8080, the bind-to-port label.
    let config: Value = serde_json::from_str(&docker_ok(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config}}",
        &cleanup.image,
    ]))
    .unwrap();
    assert_eq!(config["Entrypoint"], json!(["/usr/local/bin/sdserve"]));
    assert_eq!(config["Cmd"], json!(["serve"]));
    let user = config["User"].as_str().unwrap_or("");
    assert!(
        ["", "root", "0"].contains(&user),
        "runs as root (SageMaker), not {user:?}"
    );
    assert!(config["ExposedPorts"]["8080/tcp"].is_object(), "{config}");
    assert_eq!(
        config["Labels"]["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"],
        "true"
    );
    assert_eq!(config["WorkingDir"], "/var/lib/sdserve");
    assert!(config["Healthcheck"]["Test"].is_array(), "{config}");

    let model = model_copy();
    let volume = format!("{}:/opt/ml/model:ro", model.path().display());

    // 1. Exactly as SageMaker starts it.
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:8080");
    let c = start(&mut cleanup, "sagemaker", &["-v", &volume, "-p", &publish]);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&c, &base);
    let r = client()
        .post(format!("{base}/invocations"))
        .header("Accept", "image/png")
        .json(
            &json!({"prompt": "a lighthouse at dusk", "num_inference_steps": 2,
                      "width": 64, "height": 48, "seed": 42}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "POST /invocations:\n{}", logs(&c));
    assert_eq!(r.headers()["content-type"], "image/png");
    let png = r.bytes().unwrap();
    let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
        .expect("a PNG comes back");
    assert_eq!((img.width(), img.height()), (64, 48));
    // The job API's default storage is the image's /var/lib/sdserve/data.
    let id = generate(&c, &base);
    docker_ok(&[
        "exec",
        &c,
        "test",
        "-s",
        &format!("/var/lib/sdserve/data/images/{id}/0.png"),
    ]);
    assert!(logs(&c).contains("source=/opt/ml/model"), "{}", logs(&c));
    stop_cleanly(&c);

    // 2. SAGEMAKER_BIND_TO_PORT moves the port.
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:8081");
    let c = start(
        &mut cleanup,
        "bind-to-port",
        &[
            "-e",
            "SAGEMAKER_BIND_TO_PORT=8081",
            "-v",
            &volume,
            "-p",
            &publish,
        ],
    );
    wait_ready(&c, &format!("http://127.0.0.1:{port}"));
    assert!(
        logs(&c).contains("listening on http://0.0.0.0:8081"),
        "{}",
        logs(&c)
    );
    stop_cleanly(&c);

    // 3. As deploy/kubernetes runs it: non-root, read-only root filesystem, no
    //    capabilities, scratch folders on tmpfs; the HEALTHCHECK turns healthy.
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:8080");
    let c = start(
        &mut cleanup,
        "hardened",
        &[
            "--user",
            HARDENED_USER,
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--tmpfs",
            "/var/lib/sdserve:uid=10001,gid=10001,mode=0700",
            "--tmpfs",
            "/tmp",
            "--health-interval",
            "1s",
            "-v",
            &volume,
            "-p",
            &publish,
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&c, &base);
    generate(&c, &base);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = docker_ok(&["inspect", "-f", "{{.State.Health.Status}}", &c]);
        if health == "healthy" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "HEALTHCHECK still {health} after 30 s: {}",
            docker_ok(&["inspect", "-f", "{{json .State.Health}}", &c])
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    stop_cleanly(&c);

    drop(cleanup);
    eprintln!("container test: {:.0} s", started.elapsed().as_secs_f64());
}
