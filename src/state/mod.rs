//! Durable state: where freshet keeps what must survive a crash.
//!
//! Everything goes through the `object_store` crate, so the same code writes to a local
//! directory (the default, `--data-dir`) or an S3-compatible bucket. [`log::Log`] is the
//! write-ahead log with group commit and snapshots. This module knows bytes and Arrow
//! batches, never what a table or a view is.

pub mod log;

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
    Ok(Arc::new(store))
}
