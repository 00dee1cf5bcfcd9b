//! Durable state: where freshet keeps what must survive a crash.
//!
//! Everything goes through the `object_store` crate, so the same code writes to a local
//! directory (the default, `--data-dir`) or an S3-compatible bucket. [`log::Log`] is the
//! write-ahead log with group commit and snapshots; [`checkpoint`] stores the operator
//! states of views at a barrier; [`spill`] keeps operator state beyond memory in a local
//! RocksDB whose files checkpoints upload. This module knows bytes and Arrow batches, never what a
//! table or a view is.

pub mod checkpoint;
pub mod log;
pub mod spill;

use std::path::Path;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;

use crate::error::{Error, Result};

/// Opens (creating if needed) the local data directory as an object store.
pub fn open_local_store(data_dir: &Path) -> Result<Arc<dyn ObjectStore>> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::Storage(format!("cannot create data directory {}: {e}", data_dir.display())))?;
    let store = LocalFileSystem::new_with_prefix(data_dir)
        .map_err(|e| Error::Storage(format!("cannot open data directory {}: {e}", data_dir.display())))?;
    // A deleted checkpoint leaves no empty directory behind.
    Ok(Arc::new(store.with_automatic_cleanup(true)))
}

/// Whether `path` names an object store (`s3://…`) rather than the local file system
/// (a plain path or `file://…`).
pub fn is_url(path: &str) -> bool {
    path.contains("://") && !path.starts_with("file://")
}

/// Opens the object store a URL names and returns it with the key inside it (which may
/// hold glob characters; it is returned as written). Only `s3://bucket/key` is known: an
/// S3-compatible store whose credentials, region and endpoint come from the standard AWS
/// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
/// `AWS_ENDPOINT_URL`); an `http://` endpoint is allowed without further settings.
pub fn open_url(url: &str) -> Result<(Arc<dyn ObjectStore>, String)> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(Error::Storage(format!("{url} is not a URL (expected s3://bucket/key)")));
    };
    if !scheme.eq_ignore_ascii_case("s3") {
        return Err(Error::NotSupported {
            feature: format!("the object store scheme {scheme}://"),
            hint: Some("object-store paths are s3://bucket/key (any S3-compatible store)".into()),
        });
    }
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::Storage(format!("{url} names no bucket (expected s3://bucket/key)")));
    }
    let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
    let endpoint = std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT"));
    if endpoint.is_ok_and(|e| e.starts_with("http://")) {
        builder = builder.with_allow_http(true);
    }
    let store = builder.build().map_err(|e| Error::Storage(format!("cannot open {url}: {e}")))?;
    Ok((Arc::new(store), key.trim_matches('/').to_string()))
}

/// The object store at an object-store URL as the root of the durable state: everything is
/// stored under the URL's key, which is the store's root from freshet's point of view.
pub fn open_prefix(url: &str) -> Result<Arc<dyn ObjectStore>> {
    let (store, key) = open_url(url)?;
    if key.is_empty() {
        return Ok(store);
    }
    Ok(Arc::new(object_store::prefix::PrefixStore::new(store, key.as_str())))
}
