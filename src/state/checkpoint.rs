//! Checkpoints in object storage: the operator states of materialized views at one
//! barrier epoch, committed by a manifest written last.
//!
//! Layout under the store root, owned by [`checkpoint_dir`]:
//! `checkpoint/<epoch>/view-<id>.state` holds one view's operator states and
//! `checkpoint/<epoch>/MANIFEST` lists the views the checkpoint holds. A checkpoint without
//! its manifest is incomplete and never read. Every object has the log's framing (magic and
//! CRC32), so a truncated or damaged one is detected. This module knows bytes, not what an
//! operator or a view is; `catalog::checkpoint` decides what to checkpoint and when.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{Array, LargeBinaryArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use super::log::{LogEntry, decode, encode};
use crate::error::{Error, Result};

const STATE_MAGIC: &[u8; 8] = b"FRSHCKS1";
const MANIFEST_MAGIC: &[u8; 8] = b"FRSHCKM1";

/// The format of operator states: a checkpoint written by another build may encode rows
/// differently (arrow's row format is not stable across versions), so it is not restored;
/// its views are rebuilt from their inputs instead.
pub fn state_format() -> String {
    format!("freshet {} state 1", env!("CARGO_PKG_VERSION"))
}

/// The directory of checkpoint `epoch`. Zero-padded so listing order is epoch order.
pub fn checkpoint_dir(epoch: u64) -> Path {
    Path::from(format!("checkpoint/{epoch:020}"))
}

fn view_path(epoch: u64, view: u64) -> Path {
    checkpoint_dir(epoch).join(format!("view-{view}.state").as_str())
}

fn manifest_path(epoch: u64) -> Path {
    checkpoint_dir(epoch).join("MANIFEST")
}

/// What a complete checkpoint holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub epoch: u64,
    /// [`state_format`] of the build that wrote it.
    pub format: String,
    pub views: Vec<ManifestView>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

/// One view in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestView {
    pub name: String,
    /// The view's query text: a view re-created with another query is not restored.
    pub query: String,
    /// The object holding its operator states.
    pub object: String,
    pub bytes: u64,
}

/// Stores one view's operator states (by operator number); returns the object and its size.
pub async fn write_view(
    store: &Arc<dyn ObjectStore>,
    epoch: u64,
    view: u64,
    states: &BTreeMap<usize, Vec<u8>>,
) -> Result<(String, u64)> {
    let schema = Arc::new(Schema::new(vec![Field::new("state", DataType::LargeBinary, false)]));
    let entries = states
        .iter()
        .map(|(operator, state)| {
            let column = Arc::new(LargeBinaryArray::from_vec(vec![state.as_slice()]));
            Ok(LogEntry {
                header: operator.to_string().into_bytes(),
                batch: Some(RecordBatch::try_new(schema.clone(), vec![column])?),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = encode(&entries, STATE_MAGIC)?;
    let size = bytes.len() as u64;
    let path = view_path(epoch, view);
    store.put(&path, bytes.into()).await?;
    Ok((path.to_string(), size))
}

/// Reads a view's operator states back.
pub async fn read_view(store: &Arc<dyn ObjectStore>, object: &str) -> Result<BTreeMap<usize, Vec<u8>>> {
    let path = Path::from(object);
    let bytes = store.get(&path).await?.bytes().await?;
    let corrupt = |reason: &str| Error::Corrupt { location: object.to_string(), reason: reason.to_string() };
    decode(&bytes, STATE_MAGIC, &path)?
        .into_iter()
        .map(|entry| {
            let operator = std::str::from_utf8(&entry.header)
                .ok()
                .and_then(|h| h.parse::<usize>().ok())
                .ok_or_else(|| corrupt("an entry does not name its operator"))?;
            let batch = entry.batch.ok_or_else(|| corrupt("an operator's state is missing"))?;
            let column = batch
                .columns()
                .first()
                .and_then(|c| c.as_any().downcast_ref::<LargeBinaryArray>())
                .filter(|c| c.len() == 1)
                .ok_or_else(|| corrupt("an operator's state is not one binary value"))?;
            Ok((operator, column.value(0).to_vec()))
        })
        .collect()
}

/// Commits checkpoint `manifest.epoch`: written after every view object it names.
pub async fn write_manifest(store: &Arc<dyn ObjectStore>, manifest: &Manifest) -> Result<u64> {
    let header = serde_json::to_vec(manifest).map_err(|e| Error::Internal(format!("encoding a manifest: {e}")))?;
    let bytes = encode(&[LogEntry { header, batch: None }], MANIFEST_MAGIC)?;
    let size = bytes.len() as u64;
    store.put(&manifest_path(manifest.epoch), bytes.into()).await?;
    Ok(size)
}

/// Every checkpoint epoch in the store, complete or not, oldest first.
pub async fn epochs(store: &Arc<dyn ObjectStore>) -> Result<Vec<u64>> {
    let listed = store.list_with_delimiter(Some(&Path::from("checkpoint"))).await?;
    let mut epochs: Vec<u64> = listed.common_prefixes.iter().filter_map(|p| p.filename()?.parse().ok()).collect();
    epochs.sort_unstable();
    Ok(epochs)
}

/// The complete checkpoints, newest first. A damaged manifest is reported and skipped: the
/// checkpoint before it is used instead.
pub async fn complete(store: &Arc<dyn ObjectStore>) -> Result<Vec<Manifest>> {
    let mut manifests = Vec::new();
    for epoch in epochs(store).await?.into_iter().rev() {
        let path = manifest_path(epoch);
        let bytes: Bytes = match store.get(&path).await {
            Ok(got) => got.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => continue, // never committed
            Err(e) => return Err(e.into()),
        };
        let manifest = decode(&bytes, MANIFEST_MAGIC, &path).and_then(|entries| {
            let header = entries.first().map(|e| e.header.as_slice()).unwrap_or_default();
            serde_json::from_slice::<Manifest>(header)
                .map_err(|e| Error::Corrupt { location: path.to_string(), reason: e.to_string() })
        });
        match manifest {
            Ok(manifest) => manifests.push(manifest),
            Err(e) => tracing::error!("checkpoint {epoch} is unusable ({e}); trying the one before it"),
        }
    }
    Ok(manifests)
}

/// Deletes every checkpoint but the newest `kept` complete ones (and any newer, still
/// being written). Returns how many were deleted.
pub async fn delete_old(store: &Arc<dyn ObjectStore>, kept: usize) -> Result<usize> {
    let complete = complete(store).await?;
    let Some(oldest_kept) = complete.iter().take(kept).map(|m| m.epoch).min() else { return Ok(0) };
    let mut deleted = 0;
    for epoch in epochs(store).await? {
        if epoch >= oldest_kept {
            continue;
        }
        let objects: Vec<_> = store.list(Some(&checkpoint_dir(epoch))).try_collect().await?;
        // The manifest first: from then on the rest is an incomplete checkpoint, never read.
        let mut paths: Vec<Path> = objects.into_iter().map(|o| o.location).collect();
        paths.sort_by_key(|p| p.filename() != Some("MANIFEST"));
        for path in paths {
            store.delete(&path).await?;
        }
        deleted += 1;
    }
    Ok(deleted)
}
