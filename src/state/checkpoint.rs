//! Checkpoints in object storage: the operator states of materialized views at one
//! barrier epoch, committed by a manifest written last.
//!
//! Layout under the store root, owned by [`checkpoint_dir`]:
//! `checkpoint/<epoch>/view-<id>.state` holds one view's operator states and
//! `checkpoint/<epoch>/MANIFEST` lists the views the checkpoint holds; spilled state's SST
//! files live in `checkpoint/shared/<lineage>/<file>`, shared by every checkpoint that
//! refers to them and deleted once none does. A checkpoint without
//! its manifest is incomplete and never read. Every object has the log's framing (magic and
//! CRC32), so a truncated or damaged one is detected. This module knows bytes, not what an
//! operator or a view is; `catalog::checkpoint` decides what to checkpoint and when.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use super::log::{LogEntry, decode, encode};
pub use super::spill::SHARED_PREFIX;
use crate::error::{Error, Result};

const STATE_MAGIC: &[u8; 8] = b"FRSHCKS2";
const MANIFEST_MAGIC: &[u8; 8] = b"FRSHCKM1";

/// The format of operator states: a checkpoint written by another build may encode rows
/// differently (arrow's row format is not stable across versions), so it is not restored;
/// its views are rebuilt from their inputs instead.
pub fn state_format() -> String {
    format!("freshet {} state 2", env!("CARGO_PKG_VERSION"))
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
    /// Its operators' names in number order: states are restored only into this layout.
    pub layout: String,
    pub bytes: u64,
    /// The shared files its states refer to (objects under [`SHARED_PREFIX`]).
    #[serde(default)]
    pub files: Vec<String>,
}

/// One operator's part of a view's checkpoint: its bytes, and the shared files they refer
/// to as (name in the operator's store, object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredState {
    pub bytes: Vec<u8>,
    pub files: Vec<(String, String)>,
}

/// Stores one view's operator states (by operator number); returns the object and its size.
/// Framing: `magic | (operator u64 | len u64 | state | files u64 | (len u64 | name | len u64
/// | object)*)* | crc32 u32`, little-endian.
pub async fn write_view(
    store: &Arc<dyn ObjectStore>,
    epoch: u64,
    view: u64,
    states: &BTreeMap<usize, StoredState>,
) -> Result<(String, u64)> {
    let files = |s: &StoredState| s.files.iter().map(|(n, o)| 16 + n.len() + o.len()).sum::<usize>();
    let size = STATE_MAGIC.len() + states.values().map(|s| 24 + s.bytes.len() + files(s)).sum::<usize>() + 4;
    let mut bytes = Vec::with_capacity(size);
    let word = |bytes: &mut Vec<u8>, n: usize| bytes.extend_from_slice(&(n as u64).to_le_bytes());
    bytes.extend_from_slice(STATE_MAGIC);
    for (operator, state) in states {
        word(&mut bytes, *operator);
        word(&mut bytes, state.bytes.len());
        bytes.extend_from_slice(&state.bytes);
        word(&mut bytes, state.files.len());
        for (name, object) in &state.files {
            for text in [name, object] {
                word(&mut bytes, text.len());
                bytes.extend_from_slice(text.as_bytes());
            }
        }
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let path = view_path(epoch, view);
    store.put(&path, Bytes::from(bytes).into()).await?;
    Ok((path.to_string(), size as u64))
}

/// Reads a view's operator states back, checking the framing and the checksum.
pub async fn read_view(store: &Arc<dyn ObjectStore>, object: &str) -> Result<BTreeMap<usize, StoredState>> {
    let bytes = store.get(&Path::from(object)).await?.bytes().await?;
    let corrupt = |reason: &str| Error::Corrupt { location: object.to_string(), reason: reason.to_string() };
    if bytes.len() < STATE_MAGIC.len() + 4 || &bytes[..STATE_MAGIC.len()] != STATE_MAGIC {
        return Err(corrupt("not a freshet view state (bad magic or truncated)"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Err(corrupt("checksum mismatch"));
    }
    let mut rest = &body[STATE_MAGIC.len()..];
    let word = |rest: &mut &[u8]| -> Result<usize> {
        let (head, tail) = rest.split_at_checked(8).ok_or_else(|| corrupt("a state is truncated"))?;
        *rest = tail;
        Ok(u64::from_le_bytes(head.try_into().expect("eight bytes")) as usize)
    };
    let take = |rest: &mut &[u8], len: usize| -> Result<Vec<u8>> {
        let (head, tail) = rest.split_at_checked(len).ok_or_else(|| corrupt("a state is truncated"))?;
        *rest = tail;
        Ok(head.to_vec())
    };
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).map_err(|_| corrupt("a file name is not UTF-8"));
    let mut states = BTreeMap::new();
    while !rest.is_empty() {
        let operator = word(&mut rest)?;
        let len = word(&mut rest)?;
        let bytes = take(&mut rest, len)?;
        let mut files = Vec::new();
        for _ in 0..word(&mut rest)? {
            let len = word(&mut rest)?;
            let name = text(take(&mut rest, len)?)?;
            let len = word(&mut rest)?;
            files.push((name, text(take(&mut rest, len)?)?));
        }
        states.insert(operator, StoredState { bytes, files });
    }
    Ok(states)
}

/// Every shared file in the store (objects under [`SHARED_PREFIX`]) and its size.
pub async fn shared_files(store: &Arc<dyn ObjectStore>) -> Result<HashMap<String, u64>> {
    let objects: Vec<_> = store.list(Some(&Path::from(SHARED_PREFIX))).try_collect().await?;
    Ok(objects.into_iter().map(|o| (o.location.to_string(), o.size)).collect())
}

/// Uploads a shared file from local disk. When the store is a local directory
/// (`local_root`), the file is linked into it instead of copied: shared files are never
/// changed once written, so both names can hold the same bytes.
pub async fn upload_file(
    store: &Arc<dyn ObjectStore>,
    local_root: Option<&std::path::Path>,
    local: &std::path::Path,
    object: &str,
) -> Result<u64> {
    if let Some(root) = local_root
        && let Ok(size) = link(local, &root.join(object)).await
    {
        return Ok(size);
    }
    let bytes = tokio::fs::read(local)
        .await
        .map_err(|e| Error::Storage(format!("reading {} to upload it: {e}", local.display())))?;
    let size = bytes.len() as u64;
    store.put(&Path::from(object), Bytes::from(bytes).into()).await?;
    Ok(size)
}

/// Downloads a shared file to local disk (by a link when the store is a local directory,
/// as [`upload_file`] does).
pub async fn download_file(
    store: &Arc<dyn ObjectStore>,
    local_root: Option<&std::path::Path>,
    object: &str,
    local: &std::path::Path,
) -> Result<u64> {
    if let Some(root) = local_root
        && let Ok(size) = link(&root.join(object), local).await
    {
        return Ok(size);
    }
    let bytes = store.get(&Path::from(object)).await?.bytes().await?;
    tokio::fs::write(local, &bytes)
        .await
        .map_err(|e| Error::Storage(format!("writing {} from the checkpoint: {e}", local.display())))?;
    Ok(bytes.len() as u64)
}

/// Gives file `from` the second name `to` (replacing a file there), and returns its size.
/// Fails across file systems; callers copy instead.
async fn link(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<u64> {
    if let Some(parent) = to.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    if let Err(e) = tokio::fs::hard_link(from, to).await {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
        tokio::fs::remove_file(to).await?;
        tokio::fs::hard_link(from, to).await?;
    }
    Ok(tokio::fs::metadata(to).await?.len())
}

/// Deletes the shared files no complete checkpoint refers to any more; returns them.
pub async fn delete_unreferenced(store: &Arc<dyn ObjectStore>) -> Result<Vec<String>> {
    let referenced: HashSet<String> =
        complete(store).await?.into_iter().flat_map(|m| m.views.into_iter().flat_map(|v| v.files)).collect();
    let mut deleted = Vec::new();
    for object in shared_files(store).await?.into_keys() {
        if !referenced.contains(&object) {
            store.delete(&Path::from(object.as_str())).await?;
            deleted.push(object);
        }
    }
    Ok(deleted)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Into and out of a local store, a shared file gets a second name: the store reads
    /// the same bytes, and each name outlives the other.
    #[tokio::test]
    async fn shared_files_are_linked_into_and_out_of_a_local_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("data");
        let store = crate::state::open_local_store(&root).expect("store");
        let spill = dir.path().join("spill");
        std::fs::create_dir_all(&spill).expect("spill dir");
        let local = spill.join("000012.sst");
        std::fs::write(&local, b"immutable sorted rows").expect("written");
        let object = "checkpoint/shared/lineage/000012.sst";
        let size = upload_file(&store, Some(&root), &local, object).await.expect("uploaded");
        assert_eq!(size, 21);
        let stored = root.join(object);
        assert_eq!(std::fs::metadata(&stored).expect("stored").ino(), std::fs::metadata(&local).expect("local").ino());
        std::fs::remove_file(&local).expect("the spill store drops its copy");
        let bytes = store.get(&Path::from(object)).await.expect("get").bytes().await.expect("bytes");
        assert_eq!(&bytes[..], b"immutable sorted rows");
        // Restoring links it out again; deleting the checkpoint's object keeps that copy.
        let restored = spill.join("restored.sst");
        assert_eq!(download_file(&store, Some(&root), object, &restored).await.expect("downloaded"), 21);
        store.delete(&Path::from(object)).await.expect("deleted");
        assert_eq!(std::fs::read(&restored).expect("restored"), b"immutable sorted rows");
        // Without a local root (an object store elsewhere) the bytes are copied.
        let copied = spill.join("copied.sst");
        std::fs::write(&local, b"other rows").expect("written");
        upload_file(&store, None, &local, "checkpoint/shared/lineage/000013.sst").await.expect("uploaded");
        download_file(&store, None, "checkpoint/shared/lineage/000013.sst", &copied).await.expect("downloaded");
        assert_ne!(std::fs::metadata(&copied).expect("copy").ino(), std::fs::metadata(&local).expect("local").ino());
        assert_eq!(std::fs::read(&copied).expect("copy"), b"other rows");
    }
}
