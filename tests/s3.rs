//! The S3 storage backend against a real S3-protocol server on loopback
//! (moto's server mode, from PyPI: `tools/test` installs it into `.venv-test/`):
//! images and records go to the bucket, image URLs are presigned, and a
//! restarted server answers from the bucket.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::{Server, client, tiny};
use serde_json::{Value, json};

/// A `moto_server` child process on a free loopback port.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Self {
        Self::start_on(common::free_port())
    }

    /// moto on `port` (again, after [`Moto::stop`]: an outage and its end).
    fn start_on(port: u16) -> Self {
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut moto = Moto { child, endpoint };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if reqwest::blocking::get(&moto.endpoint).is_ok() {
                return moto;
            }
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!(
                    "moto_server exited ({status}); tools/test installs it (into .venv-test/, \
                     put on PATH), from deploy/pyproject.toml (its test extra)"
                );
            }
            assert!(Instant::now() < deadline, "moto_server never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Moto {
    fn port(&self) -> u16 {
        self.endpoint.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Creates `bucket` with a plain S3 PUT (moto does not check signatures).
    fn bucket(&self, bucket: &str) {
        let r = client()
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{:?}", r.text());
    }

    /// The object at `key` in `bucket`, if any, read with boto3 (moto
    /// refuses unsigned object reads with 403).
    fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        const SCRIPT: &str = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
try:
    body = s3.get_object(Bucket=sys.argv[2], Key=sys.argv[3])["Body"].read()
except s3.exceptions.NoSuchKey:
    sys.exit(3)
sys.stdout.buffer.write(body)
"#;
        let out = Command::new("python3")
            .args(["-c", SCRIPT, &self.endpoint, bucket, key])
            .output()
            .expect("python3 runs");
        match out.status.code() {
            Some(0) => Some(out.stdout),
            Some(3) => None,
            _ => panic!("boto3 get_object: {}", String::from_utf8_lossy(&out.stderr)),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ALLOW_HTTP", "true".into()),
    ]
}

fn wait_final(s: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v: Value = client()
            .get(s.url(&format!("/image/{id}")))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        assert!(Instant::now() < deadline, "never finished: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn images_and_records_live_in_the_bucket() {
    let moto = Moto::start();
    moto.bucket("sdserve-test");

    let env = aws_env(&moto.endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = ["--model", &tiny(), "--storage", "s3://sdserve-test/run1"];
    let s = Server::start(&args, &env);
    let r = client()
        .post(s.url("/generate"))
        .json(&json!({"text": "a boat", "steps": 2, "seed": 5}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().unwrap()["image_id"]
        .as_str()
        .unwrap()
        .to_string();
    let done = wait_final(&s, &id);
    assert_eq!(done["status"], "completed", "{done}");

    // The URL is presigned, straight to the bucket.
    let url = done["image_url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!(
            "{}/sdserve-test/run1/images/{id}/0.png?",
            moto.endpoint
        )),
        "{url}"
    );
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let direct = client().get(url).send().unwrap();
    assert_eq!(direct.status(), 200);
    let png = direct.bytes().unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    // The server serves the same bytes from the bucket too.
    let proxied = client()
        .get(s.url(&format!("/files/{id}/0.png")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(proxied, png);

    // The record is in the bucket, under the prefix.
    let listing = client()
        .get(format!(
            "{}/sdserve-test?list-type=2&prefix=run1/jobs/",
            moto.endpoint
        ))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        listing.contains(&format!("<Key>run1/jobs/{id}.json</Key>")),
        "{listing}"
    );
    // A fresh server on the same bucket answers for the job from its record.
    s.kill();
    let s = Server::start(&args, &env);
    let again: Value = client()
        .get(s.url(&format!("/image/{id}")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(again["status"], "completed");
    assert_eq!(again["seeds"], json!([5]));

    // An inpainting edit of that result: its inputs go to the bucket too, and
    // GET /image/{id} presigns them.
    use base64::Engine as _;
    let mask = std::fs::read(common::fixtures().join("edit/mask-96.png")).unwrap();
    let mask = base64::engine::general_purpose::STANDARD.encode(mask);
    let r = client()
        .post(s.url("/generate"))
        .json(
            &json!({"text": "a boat", "steps": 2, "seed": 5, "resolution": "96x96",
                      "init_image": {"image_id": id}, "mask_image": mask}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let edit = r.json::<Value>().unwrap()["image_id"]
        .as_str()
        .unwrap()
        .to_string();
    let done = wait_final(&s, &edit);
    assert_eq!(done["status"], "completed", "{done}");
    for (field, name) in [("init_image_url", "init"), ("mask_image_url", "mask")] {
        let url = done[field].as_str().unwrap();
        let key = format!("run1/inputs/{edit}/{name}.png");
        assert!(
            url.starts_with(&format!("{}/sdserve-test/{key}?", moto.endpoint)),
            "{url}"
        );
        let direct = client().get(url).send().unwrap();
        assert_eq!(direct.status(), 200, "{url}");
        assert_eq!(
            direct.bytes().unwrap(),
            moto.object("sdserve-test", &key).unwrap()
        );
    }
}

#[test]
fn an_unreachable_bucket_refuses_jobs_instead_of_losing_them() {
    // Nothing listens on this port: storing the record fails, so the job is
    // refused with a 503 and Retry-After (nothing ran unrecorded), naming no
    // internal location.
    let port = common::free_port();
    let env = aws_env(&format!("http://127.0.0.1:{port}"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = Server::start(&["--model", &tiny(), "--storage", "s3://nowhere/x"], &env);
    let r = client()
        .post(s.url("/generate"))
        .json(&json!({"text": "x", "steps": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().unwrap();
    let error = v["error"].as_str().unwrap();
    assert!(error.contains("storage is unavailable"), "{v}");
    assert!(
        !error.contains("nowhere") && !error.contains("127.0.0.1"),
        "{v}"
    );
}

#[test]
fn a_storage_outage_delays_accepted_jobs_instead_of_failing_them() {
    let moto = Moto::start();
    moto.bucket("outage");
    let env = aws_env(&moto.endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = Server::start(&["--model", &tiny(), "--storage", "s3://outage/run"], &env);
    let r = client()
        .post(s.url("/generate"))
        .json(&json!({"text": "a", "steps": 400, "scheduler": "ddim", "seed": 9}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().unwrap()["image_id"]
        .as_str()
        .unwrap()
        .to_string();
    let status = |s: &Server| -> Value {
        client()
            .get(s.url(&format!("/image/{id}")))
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&s)["status"] != "processing" {
        assert!(Instant::now() < deadline, "never started");
        std::thread::sleep(Duration::from_millis(10));
    }

    // S3 goes away while the job runs.
    let port = moto.port();
    drop(moto);
    // New work is refused with 503 + Retry-After, not 500.
    let r = client()
        .post(s.url("/generate"))
        .json(&json!({"text": "b", "steps": 1}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503, "{:?}", r.text());
    assert!(r.headers().contains_key("retry-after"));
    // The job's images can't be stored: it waits, and says it is still
    // processing, as its record does.
    s.wait_for_log("storing an image failed, retrying", "");
    assert_eq!(status(&s)["status"], "processing");

    // S3 is back (moto starts empty: the bucket is made again).
    let moto = Moto::start_on(port);
    moto.bucket("outage");
    let done = wait_final(&s, &id);
    assert_eq!(done["status"], "completed", "{done}");
    let png = client()
        .get(done["image_url"].as_str().unwrap())
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let record: Value = serde_json::from_slice(
        &moto
            .object("outage", &format!("run/jobs/{id}.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(record["status"], "completed");
    // And new jobs are accepted again.
    let r = client()
        .post(s.url("/generate"))
        .json(&json!({"text": "c", "steps": 1}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
}
