//! The server against its own `/openapi.json`: schemathesis (PyPI, pinned in
//! tools/requirements-test.txt, which tools/test installs) generates requests
//! from the document — valid ones, and invalid ones — sends them to a real
//! `sdserve serve` on the tiny model, and checks every answer: no 5xx, every
//! status, content type, header and body as documented, and every request
//! the document allows accepted (a 4xx for one is the document being looser
//! than the server, which is what this test exists to catch).
//!
//! The server runs with small limits so that generating is cheap and so that
//! the one bound the document cannot express — width × height at most
//! `--max-pixels` — can't be crossed by sizes it allows: `--max-side` 64 ×
//! 64 = 4096 = `--max-pixels`.
//!
//! Bounded: a fixed number of examples per operation, a fixed seed (the same
//! cases every run, for one schemathesis version), and a wall-clock limit.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::server::{Server, tiny};

/// Longest the schemathesis run may take (~20 s alone on 2 cores, ~1700
/// cases; more while other tests share the cores).
const TIME_LIMIT: Duration = Duration::from_secs(150);

/// How to install schemathesis, for the failure message.
const INSTALL: &str = "schemathesis is not installed: tools/test installs it (tools/requirements-test.txt \
     into .venv-test/, which it puts on PATH). By hand: python3 -m venv /tmp/st && \
     /tmp/st/bin/pip install -r tools/requirements-test.txt && PATH=/tmp/st/bin:$PATH cargo test --test schema";

/// The schemathesis command: its entry point on PATH, else the PATH Python's module.
fn schemathesis() -> Command {
    let works = |mut c: Command| {
        c.arg("--version")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let entry = || Command::new("schemathesis");
    let module = || {
        let mut c = Command::new("python3");
        c.args(["-m", "schemathesis.cli"]);
        c
    };
    let (cmd, version) = if let Some(v) = works(entry()) {
        (entry(), v)
    } else if let Some(v) = works(module()) {
        (module(), v)
    } else {
        panic!("{INSTALL}");
    };
    // A different version generates different cases: say so, don't fail.
    let pinned = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/requirements-test.txt"),
    )
    .unwrap_or_default();
    let pin = pinned
        .lines()
        .find_map(|l| l.trim().strip_prefix("schemathesis=="))
        .unwrap_or("?");
    if !version.ends_with(pin) {
        eprintln!("note: running {version}; tools/requirements-test.txt pins {pin}");
    }
    cmd
}

/// schemathesis hooks (Python). One failure is excused: the combination the
/// document's `scheduler_options` description names. Each option's type and
/// range is in the schema, but whether the chosen scheduler takes a set of
/// options (with the model's config and the step count) is decided by
/// building it, as diffusers decides in `__init__`/`set_timesteps`; JSON
/// Schema can't say it. A 400 for a schema-valid body is let pass only when
/// the body sets scheduler options and the error names the scheduler, its
/// options as a whole or the steps, or names one option with the message of
/// the scheduler class that refused it (`PNDMScheduler: unsupported
/// prediction_type "sample"`: another class takes that value; `PNDMScheduler
/// with skip_prk_steps=false needs at least 4 steps`: the option is named when
/// the steps fail only with it). An error naming
/// one option without a class (`scheduler_options.beta_start ... is not a
/// number between 0 and 1`) is that option's own type or range, which the
/// schema states: it still fails the run, as does every other rejection.
/// Image to image adds two things a schema can't say: whether an `image`
/// string decodes to a picture (a 400 naming `image` is let pass when the body
/// sent one; `init_image` likewise, which may also name an earlier result that
/// does not exist), and whether a `strength` leaves a step to run with the steps
/// asked for (a 400 naming `strength` that says it "runs none").
const HOOKS: &str = r#"
import re
import schemathesis

SCHEDULER_FIELDS = {"scheduler", "scheduler_options", "steps", "num_inference_steps"}

@schemathesis.hook
def filter_failure(context, failure, case, response):
    if getattr(failure, "code", None) != "ST202" or response.status_code != 400:
        return True
    try:
        field = response.json().get("field", "")
        message = response.json().get("error", "")
    except Exception:
        return True
    if isinstance(case.body, dict):
        if field == "image" and isinstance(case.body.get("image"), str):
            return False
        if field == "init_image" and case.body.get("init_image") is not None:
            return False
        if field == "strength" and "runs none" in message:
            return False
    if not (isinstance(case.body, dict) and case.body.get("scheduler_options")):
        return True
    if field in SCHEDULER_FIELDS:
        return False
    refused_by_class = re.search(r"\b[A-Za-z]+Scheduler\b", message) is not None
    return not (field.startswith("scheduler_options.") and refused_by_class)
"#;

#[test]
fn the_server_keeps_to_its_openapi_document() {
    let mut st = schemathesis();
    let server = Server::start(
        &[
            "--model",
            &tiny(),
            "--max-pixels",
            "4096",
            "--max-side",
            "64",
            "--max-steps",
            "3",
            "--max-images",
            "2",
            // Every generated job is accepted (a full queue would be a 429).
            "--queue-capacity",
            "100000",
        ],
        &[],
    );
    // Its own folder: schemathesis writes reports there and reads a
    // schemathesis.toml from there, and nothing must come from the checkout.
    let work = tempfile::tempdir().unwrap();
    let hooks = work.path().join("hooks.py");
    std::fs::write(&hooks, HOOKS).unwrap();
    let out_path = work.path().join("schemathesis.out");
    let out = std::fs::File::create(&out_path).unwrap();
    st.current_dir(work.path())
        .env("SCHEMATHESIS_HOOKS", &hooks)
        .env("NO_COLOR", "1")
        .env("PYTHONIOENCODING", "utf-8")
        .args(["run", &server.url("/openapi.json")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,positive_data_acceptance",
            // Not `negative_data_rejection`: the document is stricter than the
            // parser on purpose in places (`prompt` for `text`, scheduler
            // aliases, " 64 X 64 ", white space that Python's `\s` has and
            // Rust's trim does not), so a request the document forbids may
            // still be fine. Invalid requests are sent all the same, for the
            // other checks: they must be a documented 4xx, never a 5xx.
            "--mode",
            "all",
            "--max-examples",
            "50",
            "--seed",
            "20240601",
            "--generation-database",
            "none",
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--no-color",
            // The event stream: a 200 is a stream that lasts as long as the
            // job, which schemathesis can neither wait out nor check against
            // a schema (tests/jobs.rs follows events).
            "--exclude-path",
            "/image/{image_id}/events",
        ])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let mut child = st.spawn().expect("starts schemathesis");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let report = std::fs::read_to_string(&out_path).unwrap_or_default();
    // Accepted jobs fail out of sight of schemathesis (a 202, then a record
    // saying `failed`): the server's log says so.
    let log = server.log();
    let broken: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("generation failed"))
        .collect();
    match status {
        Some(s) if s.success() => {
            println!("{report}");
            assert!(
                broken.is_empty(),
                "schemathesis passed, but jobs failed on the server:\n{}",
                broken.join("\n")
            );
        }
        Some(s) => panic!(
            "schemathesis found the server and /openapi.json disagreeing ({s}):\n{report}\n\
             --- server log (tail) ---\n{}",
            tail(&log, 60)
        ),
        None => panic!(
            "schemathesis ran over {TIME_LIMIT:?} and was stopped:\n{report}\n\
             --- server log (tail) ---\n{}",
            tail(&log, 60)
        ),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
