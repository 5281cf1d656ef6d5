//! Where images and job records live: a local folder (the default) or any
//! S3-compatible bucket, both through the `object_store` crate.
//!
//! `--storage ./data` or `file:///abs/path` is a folder; `s3://bucket/prefix`
//! is S3, configured by the standard AWS environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`/`AWS_DEFAULT_REGION`,
//! `AWS_ENDPOINT_URL` or `AWS_ENDPOINT` for S3-compatible servers,
//! `AWS_ALLOW_HTTP=true` for plain-HTTP ones, container and web-identity
//! credentials). S3 objects are handed out as presigned URLs.

use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::signer::{Method, Signer};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};

/// An opened storage location.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// Set for S3: objects are reachable by presigned URL.
    signer: Option<Arc<AmazonS3>>,
    /// The location as the user gave it, for messages.
    location: String,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.location)
    }
}

impl Storage {
    /// Opens `spec`: `s3://bucket[/prefix]`, `file:///path` or a plain folder
    /// path (created if missing).
    pub fn open(spec: &str) -> Result<Self> {
        let bad = |m: String| Error::invalid("storage", m);
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad(format!("{spec:?} names no bucket")));
            }
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            // The AWS SDKs' and CLI's variable; object_store itself reads AWS_ENDPOINT.
            if std::env::var_os("AWS_ENDPOINT").is_none()
                && let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL")
            {
                builder = builder.with_endpoint(endpoint);
            }
            // A few quick retries: a request waits on storage before it is
            // accepted, so an outage should fail it in seconds, not minutes.
            let retry = object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
                ..Default::default()
            };
            let s3 = Arc::new(
                builder
                    .with_retry(retry)
                    .build()
                    .map_err(|e| bad(format!("cannot use {spec}: {e}")))?,
            );
            return Ok(Self {
                store: s3.clone(),
                prefix: parse_prefix(spec, prefix)?,
                signer: Some(s3),
                location: spec.to_string(),
            });
        }
        if spec.contains("://") && !spec.starts_with("file://") {
            return Err(bad(format!(
                "{spec:?}: use a folder path, file:///path or s3://bucket/prefix"
            )));
        }
        let dir = std::path::PathBuf::from(spec.strip_prefix("file://").unwrap_or(spec));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let dir = dir.canonicalize().map_err(|e| Error::io(&dir, e))?;
        let local = LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| bad(format!("cannot use {}: {e}", dir.display())))?;
        Ok(Self {
            store: Arc::new(local),
            prefix: Path::default(),
            signer: None,
            location: dir.display().to_string(),
        })
    }

    /// True when objects are served by presigned URL rather than through us.
    pub fn presigns(&self) -> bool {
        self.signer.is_some()
    }

    fn path(&self, key: &str) -> Path {
        key.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }

    fn error(&self, key: &str, e: impl std::fmt::Display) -> Error {
        Error::storage(format!("{}/{key}", self.location), e)
    }

    /// Writes `bytes` at `key` (replacing what was there).
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.store
            .put(&self.path(key), PutPayload::from(bytes))
            .await
            .map_err(|e| self.error(key, e))?;
        Ok(())
    }

    /// The object at `key`, or `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.store.get(&self.path(key)).await {
            Ok(r) => Ok(Some(
                r.bytes().await.map_err(|e| self.error(key, e))?.to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key, e)),
        }
    }

    /// Keys of every object under `dir` (recursively), relative to the storage root.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>> {
        let base = self.path(dir);
        let metas: Vec<_> = self
            .store
            .list(Some(&base))
            .try_collect()
            .await
            .map_err(|e| self.error(dir, e))?;
        let root: Vec<_> = self.prefix.parts().collect();
        Ok(metas
            .into_iter()
            .map(|m| {
                m.location
                    .parts()
                    .skip(root.len())
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect())
    }

    /// A URL that fetches `key` directly for `expires`, when the store can sign one.
    pub async fn signed_url(&self, key: &str, expires: Duration) -> Result<Option<String>> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let url = signer
            .signed_url(Method::GET, &self.path(key), expires)
            .await
            .map_err(|e| self.error(key, e))?;
        Ok(Some(url.to_string()))
    }
}

fn parse_prefix(spec: &str, prefix: &str) -> Result<Path> {
    Path::parse(prefix.trim_matches('/'))
        .map_err(|e| Error::invalid("storage", format!("bad prefix in {spec:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_round_trip_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path().join("nested/data").to_str().unwrap()).unwrap();
        assert!(!s.presigns());
        assert_eq!(s.get("jobs/a.json").await.unwrap(), None);
        s.put("jobs/a.json", b"{}".to_vec()).await.unwrap();
        s.put("images/a/0.png", vec![1, 2, 3]).await.unwrap();
        assert_eq!(s.get("jobs/a.json").await.unwrap().unwrap(), b"{}");
        assert_eq!(s.list("jobs").await.unwrap(), vec!["jobs/a.json"]);
        assert_eq!(s.list("images").await.unwrap(), vec!["images/a/0.png"]);
        assert_eq!(
            s.signed_url("images/a/0.png", Duration::from_secs(60))
                .await
                .unwrap(),
            None
        );
        assert!(dir.path().join("nested/data/images/a/0.png").is_file());
    }

    #[test]
    fn bad_locations_name_the_field() {
        for spec in ["s3://", "gs://bucket/x"] {
            match Storage::open(spec) {
                Err(Error::InvalidRequest { field, .. }) => assert_eq!(field, "storage"),
                other => panic!("{spec}: {other:?}"),
            }
        }
    }
}
