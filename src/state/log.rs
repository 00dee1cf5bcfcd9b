//! The durable log: an ordered sequence of segments in object storage, plus snapshots that
//! let old segments be deleted.
//!
//! Writers call [`Log::append`] in the order their changes were applied in memory. One
//! committer task takes every append queued since its last write and stores them as one
//! segment object (group commit), so concurrent writers share a single storage round trip
//! instead of queueing behind each other. Only after the segment is stored does the
//! committer run each append's `publish` callback (in order) and acknowledge the writer:
//! readers never see a change that could still be lost.
//!
//! The log does not know what its entries mean: an entry is an opaque header plus an
//! optional Arrow record batch. The catalog gives them meaning.
//!
//! Layout under the store root (owned by [`segment_path`] and [`snapshot_path`]):
//! `log/<seq>.seg` for segments and `snapshot/<seq>.snap` for snapshots, where a snapshot
//! with sequence `S` contains everything in segments `1..=S`. The newest two snapshots are
//! kept, with every segment after the older one, so a damaged newest snapshot is survived. Each object is written with
//! a single `put`, which object stores make atomic, and carries a CRC32 trailer so that a
//! damaged file is detected rather than half-read.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

const SEGMENT_MAGIC: &[u8; 8] = b"FRSHSEG1";
const SNAPSHOT_MAGIC: &[u8; 8] = b"FRSHSNP1";
/// Most appends folded into one segment; bounds segment size under heavy load.
const MAX_APPENDS_PER_SEGMENT: usize = 4096;
/// Appends waiting for the committer before writers feel backpressure.
const QUEUE_DEPTH: usize = 8192;
/// Snapshots kept (with the log after the oldest of them): recovery falls back to an
/// older one when the newest is damaged.
pub const SNAPSHOTS_KEPT: usize = 2;

/// One record in the log: what it is (`header`, meaningful to the caller) and its rows.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub header: Vec<u8>,
    pub batch: Option<RecordBatch>,
}

/// What [`Log::open`] found in storage: the newest snapshot and the segments after it.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Sequence number and entries of the newest snapshot, if one exists.
    pub snapshot: Option<(u64, Vec<LogEntry>)>,
    /// Segments newer than the snapshot, oldest first.
    pub segments: Vec<(u64, Vec<LogEntry>)>,
}

/// Runs after an append is durable, with the sequence number of the segment that holds it.
pub type Publish = Box<dyn FnOnce(u64) + Send>;

struct Append {
    entries: Vec<LogEntry>,
    publish: Publish,
    done: oneshot::Sender<Result<u64>>,
    /// No later append shares its segment (a snapshot may be cut right after it).
    seals: bool,
}

/// Resolves when an enqueued append is durable; see [`Log::enqueue`].
pub struct Ack(oneshot::Receiver<Result<u64>>);

impl Ack {
    /// Waits for the committer's verdict on this append.
    pub async fn durable(self) -> Result<u64> {
        self.0.await.map_err(|_| Error::Storage("the log committer has stopped".into()))?
    }
}

/// Handle to the log; cheap to share behind an `Arc`.
pub struct Log {
    store: Arc<dyn ObjectStore>,
    queue: mpsc::Sender<Append>,
    stats: Arc<LogStats>,
}

/// Counters the server exports as metrics.
#[derive(Debug, Default)]
pub struct LogStats {
    pub segments_written: AtomicU64,
    pub appends_committed: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Highest segment sequence number stored so far.
    pub last_seq: AtomicU64,
    /// Sequence number of the newest snapshot.
    pub snapshot_seq: AtomicU64,
}

/// The object path of segment `seq`. Zero-padded so listing order is sequence order.
pub fn segment_path(seq: u64) -> Path {
    Path::from(format!("log/{seq:020}.seg"))
}

/// The object path of the snapshot covering segments `1..=seq`.
pub fn snapshot_path(seq: u64) -> Path {
    Path::from(format!("snapshot/{seq:020}.snap"))
}

fn seq_of(path: &Path, suffix: &str) -> Option<u64> {
    path.filename()?.strip_suffix(suffix)?.parse().ok()
}

impl Log {
    /// Reads what storage holds and starts the committer. A damaged or unreadable newest
    /// snapshot is reported and the one before it used (with the longer log after it).
    /// Fails if a segment the chosen snapshot needs is damaged or missing: recovering past
    /// a hole would silently lose data.
    pub async fn open(store: Arc<dyn ObjectStore>) -> Result<(Log, Recovered)> {
        let snapshot_seqs = list_seqs(&store, "snapshot", ".snap").await?;
        let first_segment = list_seqs(&store, "log", ".seg").await?.first().copied();
        let mut snapshot = None;
        let mut damaged = Vec::new();
        for &seq in snapshot_seqs.iter().rev() {
            let path = snapshot_path(seq);
            let read = async { Ok::<_, Error>(store.get(&path).await?.bytes().await?) }.await;
            match read.and_then(|bytes| decode(&bytes, SNAPSHOT_MAGIC, &path)) {
                Ok(entries) => {
                    snapshot = Some((seq, entries));
                    break;
                }
                Err(e) => {
                    tracing::error!("snapshot {path} is unusable ({e}); trying the one before it");
                    damaged.push(e);
                }
            }
        }
        if snapshot.is_none() && !damaged.is_empty() && first_segment != Some(1) {
            // Without a snapshot the log must go back to its first segment.
            return Err(damaged.remove(0));
        }
        if let (Some((seq, _)), false) = (&snapshot, damaged.is_empty()) {
            tracing::warn!("recovering from the older snapshot {seq} and the log after it");
        }
        let base = snapshot.as_ref().map_or(0, |(seq, _)| *seq);
        let mut segments = Vec::new();
        let mut expected = base + 1;
        for seq in list_seqs(&store, "log", ".seg").await? {
            if seq <= base {
                continue; // already folded into the snapshot; deletion was interrupted
            }
            if seq != expected {
                return Err(Error::Corrupt {
                    location: segment_path(expected).to_string(),
                    reason: format!("segment missing (found segment {seq} after {})", expected - 1),
                });
            }
            let path = segment_path(seq);
            let bytes = store.get(&path).await?.bytes().await?;
            segments.push((seq, decode(&bytes, SEGMENT_MAGIC, &path)?));
            expected += 1;
        }
        let stats = Arc::new(LogStats::default());
        stats.last_seq.store(expected - 1, Ordering::Relaxed);
        stats.snapshot_seq.store(base, Ordering::Relaxed);
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(commit_loop(store.clone(), receiver, expected, stats.clone()));
        Ok((Log { store, queue, stats }, Recovered { snapshot, segments }))
    }

    /// Queues `entries` behind every earlier append. The returned [`Ack`] resolves once
    /// they are durable (and published), with the sequence number of their segment. An
    /// append with no entries is a marker: nothing is stored, but its `publish` runs in
    /// order between the appends before and after it.
    ///
    /// Callers that hold a lock across this call get log order equal to lock order; when
    /// the queue is full this waits, which is the writers' backpressure.
    pub async fn enqueue(&self, entries: Vec<LogEntry>, publish: Publish) -> Result<Ack> {
        self.enqueue_with(entries, publish, false).await
    }

    /// Like [`Log::enqueue`], and the append ends its segment: no later append is stored
    /// in it, so a snapshot cut at this segment holds nothing after these entries.
    pub async fn enqueue_sealed(&self, entries: Vec<LogEntry>, publish: Publish) -> Result<Ack> {
        self.enqueue_with(entries, publish, true).await
    }

    async fn enqueue_with(&self, entries: Vec<LogEntry>, publish: Publish, seals: bool) -> Result<Ack> {
        let (done, acked) = oneshot::channel();
        self.queue
            .send(Append { entries, publish, done, seals })
            .await
            .map_err(|_| Error::Storage("the log committer has stopped".into()))?;
        Ok(Ack(acked))
    }

    /// Stores a snapshot of everything up to and including segment `seq`; returns its size.
    /// Then deletes what is no longer needed to recover from any of the newest
    /// [`SNAPSHOTS_KEPT`] snapshots: older snapshots, and the segments up to the oldest
    /// kept one (so a damaged newest snapshot still leaves a way back).
    pub async fn write_snapshot(&self, seq: u64, entries: &[LogEntry]) -> Result<u64> {
        let bytes = encode(entries, SNAPSHOT_MAGIC)?;
        let size = bytes.len() as u64;
        self.store.put(&snapshot_path(seq), bytes.into()).await?;
        self.stats.bytes_written.fetch_add(size, Ordering::Relaxed);
        self.stats.snapshot_seq.store(seq, Ordering::Relaxed);
        let snapshots = list_seqs(&self.store, "snapshot", ".snap").await?;
        let kept = &snapshots[snapshots.len().saturating_sub(SNAPSHOTS_KEPT)..];
        let oldest_kept = kept.first().copied().unwrap_or(seq);
        for &old in &snapshots {
            if old < oldest_kept {
                self.store.delete(&snapshot_path(old)).await?;
            }
        }
        for old in list_seqs(&self.store, "log", ".seg").await? {
            if old <= oldest_kept {
                self.store.delete(&segment_path(old)).await?;
            }
        }
        Ok(size)
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &Arc<LogStats> {
        &self.stats
    }
}

async fn list_seqs(store: &Arc<dyn ObjectStore>, dir: &str, suffix: &str) -> Result<Vec<u64>> {
    let metas: Vec<_> = store.list(Some(&Path::from(dir))).try_collect().await?;
    let mut seqs: Vec<u64> = metas.iter().filter_map(|m| seq_of(&m.location, suffix)).collect();
    seqs.sort_unstable();
    Ok(seqs)
}

async fn commit_loop(
    store: Arc<dyn ObjectStore>,
    mut receiver: mpsc::Receiver<Append>,
    mut next_seq: u64,
    stats: Arc<LogStats>,
) {
    // Once a segment fails to store, the in-memory state is ahead of storage; refuse all
    // later writes instead of building on changes that may be lost.
    let mut failed: Option<String> = None;
    while let Some(first) = receiver.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_APPENDS_PER_SEGMENT && !group.last().is_some_and(|a| a.seals) {
            match receiver.try_recv() {
                Ok(append) => group.push(append),
                Err(_) => break,
            }
        }
        if let Some(reason) = &failed {
            for append in group {
                let _ = append.done.send(Err(Error::Storage(reason.clone())));
            }
            continue;
        }
        let entries: Vec<&LogEntry> = group.iter().flat_map(|a| a.entries.iter()).collect();
        if entries.is_empty() {
            // Only markers (appends with no entries): they order callbacks among the
            // writes without storing anything.
            for append in group {
                (append.publish)(next_seq - 1);
                let _ = append.done.send(Ok(next_seq - 1));
            }
            continue;
        }
        let stored = match encode_refs(&entries, SEGMENT_MAGIC) {
            Ok(bytes) => {
                let size = bytes.len() as u64;
                store.put(&segment_path(next_seq), bytes.into()).await.map(|_| size).map_err(Error::from)
            }
            Err(e) => Err(e),
        };
        match stored {
            Ok(size) => {
                stats.segments_written.fetch_add(1, Ordering::Relaxed);
                stats.appends_committed.fetch_add(group.len() as u64, Ordering::Relaxed);
                stats.bytes_written.fetch_add(size, Ordering::Relaxed);
                stats.last_seq.store(next_seq, Ordering::Relaxed);
                for append in group {
                    (append.publish)(next_seq);
                    let _ = append.done.send(Ok(next_seq));
                }
                next_seq += 1;
            }
            Err(e) => {
                let reason = format!(
                    "writing {} failed ({e}); writes are refused until freshet restarts, committed data is intact",
                    segment_path(next_seq)
                );
                tracing::error!("{reason}");
                for append in group {
                    let _ = append.done.send(Err(Error::Storage(reason.clone())));
                }
                failed = Some(reason);
            }
        }
    }
}

pub(super) fn encode(entries: &[LogEntry], magic: &[u8; 8]) -> Result<Bytes> {
    let refs: Vec<&LogEntry> = entries.iter().collect();
    encode_refs(&refs, magic)
}

/// `magic | (header_len u32 | header | has_batch u8 | [ipc_len u64 | ipc])* | crc32 u32`
fn encode_refs(entries: &[&LogEntry], magic: &[u8; 8]) -> Result<Bytes> {
    // Sized up front from the batches' data, so the buffer is not grown (and copied) as
    // the IPC streams are written into it.
    let data = |batch: &RecordBatch| -> usize {
        batch.columns().iter().map(|c| c.to_data().get_slice_memory_size().unwrap_or(0)).sum()
    };
    let capacity = entries.iter().map(|e| 1024 + e.header.len() + e.batch.as_ref().map_or(0, data)).sum::<usize>();
    let mut out = BytesMut::with_capacity(magic.len() + capacity + 4);
    out.put_slice(magic);
    for entry in entries {
        out.put_u32(entry.header.len() as u32);
        out.put_slice(&entry.header);
        match &entry.batch {
            None => out.put_u8(0),
            Some(batch) => {
                out.put_u8(1);
                // The stream goes straight after its length, which is filled in after.
                let at = out.len();
                out.put_u64(0);
                {
                    let mut writer = StreamWriter::try_new((&mut out).writer(), &batch.schema())?;
                    writer.write(batch)?;
                    writer.finish()?;
                }
                let len = (out.len() - at - 8) as u64;
                out[at..at + 8].copy_from_slice(&len.to_be_bytes());
            }
        }
    }
    let crc = crc32fast::hash(&out);
    out.put_u32(crc);
    Ok(out.freeze())
}

pub(super) fn decode(bytes: &Bytes, magic: &[u8; 8], path: &Path) -> Result<Vec<LogEntry>> {
    let corrupt = |reason: &str| Error::Corrupt { location: path.to_string(), reason: reason.to_string() };
    if bytes.len() < magic.len() + 4 || &bytes[..magic.len()] != magic {
        return Err(corrupt("not a freshet log object (bad magic or truncated)"));
    }
    let body_len = bytes.len() - 4;
    let stored_crc =
        u32::from_be_bytes([bytes[body_len], bytes[body_len + 1], bytes[body_len + 2], bytes[body_len + 3]]);
    if crc32fast::hash(&bytes[..body_len]) != stored_crc {
        return Err(corrupt("checksum mismatch"));
    }
    let mut body = bytes.slice(magic.len()..body_len);
    let mut entries = Vec::new();
    while body.has_remaining() {
        if body.remaining() < 5 {
            return Err(corrupt("entry header truncated"));
        }
        let header_len = body.get_u32() as usize;
        if body.remaining() < header_len + 1 {
            return Err(corrupt("entry header truncated"));
        }
        let header = body.split_to(header_len).to_vec();
        let batch = match body.get_u8() {
            0 => None,
            1 => {
                if body.remaining() < 8 {
                    return Err(corrupt("entry rows truncated"));
                }
                let ipc_len = body.get_u64() as usize;
                if body.remaining() < ipc_len {
                    return Err(corrupt("entry rows truncated"));
                }
                let ipc = body.split_to(ipc_len);
                let mut reader = StreamReader::try_new(Cursor::new(ipc), None)
                    .map_err(|e| corrupt(&format!("unreadable rows: {e}")))?;
                let batch = reader
                    .next()
                    .ok_or_else(|| corrupt("entry has no rows batch"))?
                    .map_err(|e| corrupt(&format!("unreadable rows: {e}")))?;
                Some(batch)
            }
            _ => return Err(corrupt("unknown entry flag")),
        };
        entries.push(LogEntry { header, batch });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use object_store::local::LocalFileSystem;

    fn rows(ids: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let names: Vec<String> = ids.iter().map(|i| format!("n{i}")).collect();
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(ids.to_vec())), Arc::new(StringArray::from(names))])
            .expect("columns match the schema")
    }

    fn entry(tag: &str, ids: Option<&[i64]>) -> LogEntry {
        LogEntry { header: tag.as_bytes().to_vec(), batch: ids.map(rows) }
    }

    #[test]
    fn segments_round_trip_and_detect_damage() {
        let entries = vec![entry("create", None), entry("insert", Some(&[1, 2, 3]))];
        let bytes = encode(&entries, SEGMENT_MAGIC).expect("encodes");
        let path = segment_path(1);
        let back = decode(&bytes, SEGMENT_MAGIC, &path).expect("decodes");
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].header, b"create");
        assert_eq!(back[1].batch.as_ref().map(|b| b.num_rows()), Some(3));

        let mut damaged = bytes.to_vec();
        damaged[12] ^= 0xff;
        let err = decode(&Bytes::from(damaged), SEGMENT_MAGIC, &path).expect_err("damage is detected");
        assert!(err.to_string().contains("checksum"), "{err}");
        let truncated = bytes.slice(..bytes.len() - 7);
        assert!(decode(&truncated, SEGMENT_MAGIC, &path).is_err());
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_snapshots_drop_old_segments() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
        let (log, recovered) = Log::open(store.clone()).await.expect("opens");
        assert!(recovered.snapshot.is_none() && recovered.segments.is_empty());
        let published = Arc::new(AtomicU64::new(0));
        let mut acks = Vec::new();
        for i in 0..20 {
            let p = published.clone();
            let ack = log
                .enqueue(
                    vec![entry("insert", Some(&[i]))],
                    Box::new(move |_| {
                        p.fetch_add(1, Ordering::SeqCst);
                    }),
                )
                .await
                .expect("queued");
            acks.push(ack.durable());
        }
        let seqs: Vec<u64> = futures::future::try_join_all(acks).await.expect("all durable");
        assert_eq!(published.load(Ordering::SeqCst), 20);
        assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "segments are in append order");
        let last = *seqs.last().expect("twenty appends");
        drop(log);

        let (log, recovered) = Log::open(store.clone()).await.expect("reopens");
        let ids: usize = recovered.segments.iter().map(|(_, e)| e.len()).sum();
        assert_eq!(ids, 20);
        log.write_snapshot(last, &[entry("all", Some(&[0, 1]))]).await.expect("snapshot");
        let ack = log.enqueue(vec![entry("later", None)], Box::new(|_| {})).await.expect("queued");
        let after = ack.durable().await.expect("durable");
        assert_eq!(after, last + 1);
        drop(log);

        let (_log, recovered) = Log::open(store).await.expect("reopens after snapshot");
        let (seq, snap) = recovered.snapshot.expect("snapshot found");
        assert_eq!(seq, last);
        assert_eq!(snap.len(), 1);
        assert_eq!(recovered.segments.len(), 1);
        assert_eq!(recovered.segments[0].1[0].header, b"later");
    }

    #[tokio::test]
    async fn a_damaged_newest_snapshot_falls_back_to_the_one_before() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
        let (log, _) = Log::open(store.clone()).await.expect("opens");
        let append = |tag: &'static str| {
            let log = &log;
            async move {
                let ack = log.enqueue(vec![entry(tag, None)], Box::new(|_| {})).await.expect("queued");
                ack.durable().await.expect("durable")
            }
        };
        let first = append("a1").await;
        log.write_snapshot(first, &[entry("upto-a1", None)]).await.expect("snapshot");
        append("a2").await;
        let third = append("a3").await;
        log.write_snapshot(third, &[entry("upto-a3", None)]).await.expect("snapshot");
        append("a4").await;
        drop(log);

        // The newest snapshot is damaged: the older one and the log after it give the same state.
        store.put(&snapshot_path(third), Bytes::from_static(b"garbage").into()).await.expect("damaged");
        let (log, recovered) = Log::open(store.clone()).await.expect("falls back");
        let (seq, entries) = recovered.snapshot.expect("the older snapshot");
        assert_eq!((seq, entries[0].header.as_slice()), (first, b"upto-a1".as_slice()));
        let tags: Vec<&[u8]> = recovered.segments.iter().map(|(_, e)| e[0].header.as_slice()).collect();
        assert_eq!(tags, [b"a2".as_slice(), b"a3", b"a4"]);
        drop(log);

        // Both damaged and the log's start gone: refused, naming the newest snapshot.
        store.put(&snapshot_path(first), Bytes::from_static(b"garbage").into()).await.expect("damaged");
        let err = Log::open(store).await.err().expect("nothing usable");
        assert!(err.to_string().contains(&snapshot_path(third).to_string()), "{err}");
    }
}
