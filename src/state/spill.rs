//! Operator state beyond memory: a local RocksDB per operator, the memory pool that says
//! when to spill into it, and the files a checkpoint of it uploads.
//!
//! An operator keeps its hot state in memory, as Rust maps, and moves cold entries into
//! its [`SpillStore`] when the [`MemoryPool`] is over `--memory-limit`. The store is local
//! scratch: nothing in it is trusted after a restart until a checkpoint has put it back.
//! A checkpoint of a store flushes it and lists its SST files: files already uploaded by
//! an earlier checkpoint are only referenced again, so the bytes a checkpoint uploads
//! follow what changed, not the size of the state. [`StateFile`] names each file by an
//! object path that never changes its content, which is what lets checkpoints share them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rocksdb::{
    BlockBasedOptions, DB, DBCompressionType, IngestExternalFileOptions, Options, SstFileWriter, WriteBatch,
    WriteOptions,
};

use crate::error::{Error, Result};

/// The object-store folder holding SST files shared by checkpoints.
pub const SHARED_PREFIX: &str = "checkpoint/shared";

/// A file a checkpoint refers to: uploaded to `object` unless an earlier checkpoint did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFile {
    /// Where it lives (or will live) in the object store, under [`SHARED_PREFIX`].
    pub object: String,
    /// Its name in the store's directory.
    pub name: String,
    /// A hard link to it taken at the checkpoint, which compaction cannot delete.
    pub local: PathBuf,
}

/// A store's files written whole into a checkpoint (its RocksDB manifest, CURRENT and
/// OPTIONS): (name, bytes).
pub type SmallFiles = Vec<(String, Vec<u8>)>;

/// One key and its value.
pub type Entry = (Box<[u8]>, Box<[u8]>);

/// Memory used by operator states, against one limit for the whole server.
#[derive(Debug)]
pub struct MemoryPool {
    limit: Option<usize>,
    used: AtomicUsize,
    /// By (view, operator): bytes in memory and bytes spilled, for `freshet_catalog.views`.
    usage: Mutex<HashMap<(u64, usize), (usize, u64)>>,
}

impl MemoryPool {
    /// A pool of `limit` bytes (`None`: no limit, nothing spills).
    pub fn new(limit: Option<usize>) -> Arc<MemoryPool> {
        Arc::new(MemoryPool { limit, used: AtomicUsize::new(0), usage: Mutex::default() })
    }

    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// Records what operator `(view, operator)` holds now. Returns the bytes it should
    /// shrink its memory to when the pool is over its limit: every operator gives up the
    /// same share of what it holds, and a little more, so spills are not every barrier.
    pub fn report(&self, owner: (u64, usize), memory: usize, spilled: u64) -> Option<usize> {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let before = usage.insert(owner, (memory, spilled)).map_or(0, |(m, _)| m);
        let used = if memory >= before {
            self.used.fetch_add(memory - before, Ordering::Relaxed) + (memory - before)
        } else {
            self.used.fetch_sub(before - memory, Ordering::Relaxed) - (before - memory)
        };
        let limit = self.limit?;
        (used > limit).then(|| (memory as f64 * limit as f64 / used as f64 * 0.7) as usize)
    }

    /// Operator `owner` is gone.
    pub fn forget(&self, owner: (u64, usize)) {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((memory, _)) = usage.remove(&owner) {
            self.used.fetch_sub(memory, Ordering::Relaxed);
        }
    }

    /// Bytes in memory and spilled, summed over the operators of `view`.
    pub fn view_usage(&self, view: u64) -> (u64, u64) {
        let usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        usage
            .iter()
            .filter(|((v, _), _)| *v == view)
            .fold((0, 0), |(m, s), (_, (memory, spilled))| (m + *memory as u64, s + spilled))
    }

    /// Bytes in memory over every operator.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Where one operator may keep state on local disk, and the pool it counts against.
#[derive(Debug, Clone)]
pub struct LocalState {
    /// A directory of its own (created when first used).
    pub dir: PathBuf,
    pub pool: Arc<MemoryPool>,
    /// (view id, operator number), the operator's name in the pool.
    pub owner: (u64, usize),
}

/// Makes each store's object names unique: a store restored from a checkpoint keeps
/// numbering files where the checkpointed one stopped, and so might a run that crashed
/// before its checkpoint was committed.
fn lineage() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Writes of at least this many entries are built into SST files and ingested whole,
/// rather than inserted into the memtable one by one: the first checkpoint of a large
/// view or GROUP BY writes every row or group at once.
const INGEST_FROM: usize = 50_000;
/// A bulk write starts a new SST file past this size (small in unit tests, so that they
/// see writes spread over several files).
#[cfg(not(test))]
const INGEST_FILE_BYTES: u64 = 64 << 20;
#[cfg(test)]
const INGEST_FILE_BYTES: u64 = 64 << 10;

/// An operator's spilled entries: a local RocksDB without a write-ahead log (the
/// checkpoints are what survives a crash).
pub struct SpillStore {
    db: DB,
    /// What the store was opened with, which the SST files of bulk writes are built with.
    options: Options,
    dir: PathBuf,
    lineage: String,
    /// Files the store was restored from, by name, and their objects.
    inherited: HashMap<String, String>,
    checkpoints: u64,
}

impl SpillStore {
    /// An empty store in `dir/db` (whatever was there is removed).
    pub fn create(dir: &Path) -> Result<SpillStore> {
        let db_dir = dir.join("db");
        if db_dir.exists() {
            std::fs::remove_dir_all(&db_dir).map_err(|e| io_error(&db_dir, e))?;
        }
        std::fs::create_dir_all(&db_dir).map_err(|e| io_error(&db_dir, e))?;
        Self::open(dir, HashMap::new())
    }

    /// A store from a checkpoint's files, downloaded into `files` (whose directory is
    /// moved under `dir`): `small` are the files written whole into the checkpoint, and
    /// `shared` maps the downloaded SST names to their objects.
    pub fn restore(
        dir: &Path,
        files: &Path,
        small: &[(String, Vec<u8>)],
        shared: HashMap<String, String>,
    ) -> Result<SpillStore> {
        let db_dir = dir.join("db");
        if db_dir.exists() {
            std::fs::remove_dir_all(&db_dir).map_err(|e| io_error(&db_dir, e))?;
        }
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        std::fs::rename(files, &db_dir).map_err(|e| io_error(files, e))?;
        for (name, bytes) in small {
            if name.contains('/') || name.contains("..") {
                return Err(Error::Corrupt {
                    location: "a spilled state".into(),
                    reason: format!("bad file name {name}"),
                });
            }
            std::fs::write(db_dir.join(name), bytes).map_err(|e| io_error(&db_dir, e))?;
        }
        for name in shared.keys() {
            if !db_dir.join(name).is_file() {
                return Err(Error::Corrupt {
                    location: db_dir.display().to_string(),
                    reason: format!("the checkpoint's file {name} was not downloaded"),
                });
            }
        }
        Self::open(dir, shared)
    }

    fn open(dir: &Path, inherited: HashMap<String, String>) -> Result<SpillStore> {
        let db_dir = dir.join("db");
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_compression_type(DBCompressionType::Lz4);
        // Small memtables: what is spilled is what memory could not hold.
        options.set_write_buffer_size(8 << 20);
        options.set_max_background_jobs(1);
        // Few compactions: each L0→L1 compaction rewrites most of the state, and every
        // rewritten file is uploaded again by the next checkpoint. Sixteen flushes between
        // them keep checkpoints mostly to what changed; bloom filters keep reads cheap.
        options.set_level_zero_file_num_compaction_trigger(16);
        options.set_level_zero_slowdown_writes_trigger(40);
        options.set_level_zero_stop_writes_trigger(60);
        options.set_keep_log_file_num(2);
        options.set_max_log_file_size(1 << 20);
        let mut table = BlockBasedOptions::default();
        // Most lookups are for keys never spilled: a bloom filter answers them from memory.
        table.set_bloom_filter(10.0, false);
        options.set_block_based_table_factory(&table);
        let db = DB::open(&options, &db_dir).map_err(|e| rocks_error(&db_dir, e))?;
        Ok(SpillStore { db, options, dir: dir.to_path_buf(), lineage: lineage(), inherited, checkpoints: 0 })
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get(key).map_err(|e| rocks_error(&self.dir, e))
    }

    /// Writes `Some` values and deletes `None` ones; where a key comes twice, the later
    /// one counts. Nothing is durable until a checkpoint, so a large write need not be
    /// one atomic batch.
    pub fn write<'a>(&self, entries: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>) -> Result<()> {
        let mut entries: Vec<(&[u8], Option<&[u8]>)> = entries.into_iter().collect();
        // In key order, memtable inserts continue where the last one ended instead of
        // searching the skip list from the top. The sort is stable, so of a repeated key
        // the last value is kept.
        entries.sort_by(|a, b| a.0.cmp(b.0));
        entries.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 = later.1;
            }
            same
        });
        if entries.len() >= INGEST_FROM {
            return self.ingest(&entries);
        }
        let mut batch = WriteBatch::default();
        for (key, value) in entries {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut options = WriteOptions::default();
        options.disable_wal(true);
        self.db.write_opt(batch, &options).map_err(|e| rocks_error(&self.dir, e))
    }

    /// Writes `entries` (keys strictly increasing) as SST files of their own and adds
    /// them to the store, which places them below what they overlap.
    fn ingest(&self, entries: &[(&[u8], Option<&[u8]>)]) -> Result<()> {
        let mut paths = Vec::new();
        let result = self.build_files(entries, &mut paths).and_then(|()| {
            let mut options = IngestExternalFileOptions::default();
            options.set_move_files(true);
            self.db.ingest_external_file_opts(&options, paths.clone()).map_err(|e| rocks_error(&self.dir, e))
        });
        for path in &paths {
            // Ingestion links the file into the store's directory; this name, or a file a
            // failure left, is no longer needed either way.
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn build_files(&self, entries: &[(&[u8], Option<&[u8]>)], paths: &mut Vec<PathBuf>) -> Result<()> {
        let mut rest = entries;
        while !rest.is_empty() {
            let path = self.dir.join(format!("ingest-{}.sst", paths.len()));
            paths.push(path.clone());
            let mut writer = SstFileWriter::create(&self.options);
            writer.open(&path).map_err(|e| rocks_error(&path, e))?;
            let mut written = 0;
            for (key, value) in rest {
                match value {
                    Some(value) => writer.put(key, value),
                    None => writer.delete(key),
                }
                .map_err(|e| rocks_error(&path, e))?;
                written += 1;
                if written % 4096 == 0 && writer.file_size() >= INGEST_FILE_BYTES {
                    break;
                }
            }
            writer.finish().map_err(|e| rocks_error(&path, e))?;
            rest = &rest[written..];
        }
        Ok(())
    }

    /// Every entry, in key order.
    pub fn entries(&self) -> impl Iterator<Item = Result<Entry>> + '_ {
        self.db.iterator(rocksdb::IteratorMode::Start).map(|item| item.map_err(|e| rocks_error(&self.dir, e)))
    }

    /// Bytes on disk (SST files and memtables).
    pub fn size(&self) -> u64 {
        let property = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        property("rocksdb.total-sst-files-size") + property("rocksdb.cur-size-all-mem-tables")
    }

    /// Flushes the store and takes a consistent copy of it: the small files (the
    /// RocksDB manifest, CURRENT, OPTIONS) whole, and the SST files as [`StateFile`]s,
    /// hard links that stay until the next checkpoint of this store.
    pub fn checkpoint(&mut self) -> Result<(SmallFiles, Vec<StateFile>)> {
        // The copy of the previous checkpoint has been uploaded by now (one checkpoint
        // is written at a time) or its checkpoint failed.
        let previous = self.dir.join(format!("checkpoint-{}", self.checkpoints));
        if previous.exists() {
            std::fs::remove_dir_all(&previous).map_err(|e| io_error(&previous, e))?;
        }
        self.checkpoints += 1;
        let target = self.dir.join(format!("checkpoint-{}", self.checkpoints));
        if target.exists() {
            // Left by an earlier store in this directory (one started over numbers its
            // checkpoints from the start again); its checkpoint is done with too.
            std::fs::remove_dir_all(&target).map_err(|e| io_error(&target, e))?;
        }
        self.db.flush().map_err(|e| rocks_error(&self.dir, e))?;
        rocksdb::checkpoint::Checkpoint::new(&self.db)
            .and_then(|c| c.create_checkpoint(&target))
            .map_err(|e| rocks_error(&target, e))?;
        let mut small = Vec::new();
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&target).map_err(|e| io_error(&target, e))? {
            let entry = entry.map_err(|e| io_error(&target, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let local = entry.path();
            if name.ends_with(".sst") {
                let object = self
                    .inherited
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| format!("{SHARED_PREFIX}/{}/{name}", self.lineage));
                files.push(StateFile { object, name, local });
            } else if ["MANIFEST-", "CURRENT", "OPTIONS-"].iter().any(|p| name.starts_with(p)) {
                small.push((name, std::fs::read(&local).map_err(|e| io_error(&local, e))?));
            }
        }
        small.sort();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((small, files))
    }
}

fn rocks_error(path: &Path, e: rocksdb::Error) -> Error {
    Error::Storage(format!("spilled state in {}: {e}", path.display()))
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Storage(format!("spilled state in {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_store_holds_what_was_checkpointed_and_names_only_new_files_anew() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SpillStore::create(&dir.path().join("a")).expect("create");
        store.write([(&b"k1"[..], Some(&b"v1"[..])), (&b"k2"[..], Some(&b"v2"[..]))]).expect("write");
        let (small, first) = store.checkpoint().expect("checkpoint");
        assert_eq!(first.len(), 1, "one flush, one SST file");
        store.write([(&b"k2"[..], None), (&b"k3"[..], Some(&b"v3"[..]))]).expect("write");
        let (small2, second) = store.checkpoint().expect("checkpoint");
        assert_eq!(second.len(), 2);
        assert!(second.contains(&StateFile { local: second[0].local.clone(), ..first[0].clone() }));
        assert!(!small.is_empty() && !small2.is_empty());

        // Download: copy the SSTs into a directory, as a restore from the object store does.
        let downloaded = dir.path().join("download");
        std::fs::create_dir_all(&downloaded).expect("mkdir");
        let mut shared = HashMap::new();
        for file in &second {
            std::fs::copy(&file.local, downloaded.join(&file.name)).expect("copy");
            shared.insert(file.name.clone(), file.object.clone());
        }
        let mut restored = SpillStore::restore(&dir.path().join("b"), &downloaded, &small2, shared).expect("restore");
        let entries: Vec<_> = restored.entries().map(|e| e.expect("entry")).collect();
        assert_eq!(
            entries,
            vec![(Box::from(&b"k1"[..]), Box::from(&b"v1"[..])), (Box::from(&b"k3"[..]), Box::from(&b"v3"[..]))]
        );
        restored.write([(&b"k4"[..], Some(&b"v4"[..]))]).expect("write");
        let (_, third) = restored.checkpoint().expect("checkpoint");
        let objects: Vec<_> = third.iter().map(|f| f.object.clone()).collect();
        for file in &second {
            assert!(objects.contains(&file.object), "an inherited file keeps its object");
        }
        let new: Vec<_> = third.iter().filter(|f| !second.iter().any(|s| s.object == f.object)).collect();
        assert_eq!(new.len(), 1);
        assert!(!second.iter().any(|s| s.object == new[0].object), "a new file never reuses an object name");
    }

    #[test]
    fn a_bulk_write_in_any_order_lands_whole_and_the_last_value_of_a_key_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SpillStore::create(&dir.path().join("a")).expect("create");
        let n = INGEST_FROM as u64 * 3;
        // Keys in a scrambled order, some of them repeated, and every tenth one written
        // again later with another value.
        let key = |i: u64| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % n).to_be_bytes();
        let mut entries: Vec<([u8; 8], Vec<u8>)> = (0..n).map(|i| (key(i), vec![1; 40])).collect();
        entries.extend((0..n).step_by(10).map(|i| (key(i), vec![2; 40])));
        store.write(entries.iter().map(|(k, v)| (&k[..], Some(v.as_slice())))).expect("bulk write");
        // A bulk write of deletions over what is there.
        let deleted: Vec<[u8; 8]> = (0..n).step_by(7).map(key).collect();
        let mut deletes: Vec<([u8; 8], Option<&[u8]>)> = deleted.iter().map(|k| (*k, None)).collect();
        deletes.extend((0..INGEST_FROM as u64).map(|i| ((n + i).to_be_bytes(), Some(&b"new"[..]))));
        store.write(deletes.iter().map(|(k, v)| (&k[..], *v))).expect("bulk delete");
        let (small, files) = store.checkpoint().expect("checkpoint");
        assert!(files.len() > 2, "the writes went into several files: {}", files.len());

        let downloaded = dir.path().join("download");
        std::fs::create_dir_all(&downloaded).expect("mkdir");
        let shared = files
            .iter()
            .map(|file| {
                std::fs::copy(&file.local, downloaded.join(&file.name)).expect("copy");
                (file.name.clone(), file.object.clone())
            })
            .collect();
        let restored = SpillStore::restore(&dir.path().join("b"), &downloaded, &small, shared).expect("restore");
        let got: Vec<_> = restored.entries().map(|e| e.expect("entry")).collect();
        // What the writes mean, key by key in the order they were made.
        let mut expected = std::collections::BTreeMap::new();
        for (k, v) in &entries {
            expected.insert(*k, v.clone());
        }
        for (k, v) in &deletes {
            match v {
                Some(v) => expected.insert(*k, v.to_vec()),
                None => expected.remove(k),
            };
        }
        assert_eq!(got.len(), expected.len());
        for ((k, v), (ek, ev)) in got.iter().zip(&expected) {
            assert_eq!((k.as_ref(), v.as_ref()), (&ek[..], ev.as_slice()));
        }
        assert!(
            !std::fs::read_dir(dir.path().join("a"))
                .expect("dir")
                .any(|e| { e.expect("entry").file_name().to_string_lossy().starts_with("ingest-") }),
            "no SST file of a bulk write is left outside the store"
        );
        assert!(restored.write([(&b"k"[..], Some(&b"v"[..]))]).is_ok());
    }

    #[test]
    fn the_pool_asks_operators_over_the_limit_to_shrink_by_their_share() {
        let pool = MemoryPool::new(Some(1000));
        assert_eq!(pool.report((1, 0), 600, 0), None);
        let target = pool.report((2, 0), 900, 0).expect("over the limit");
        assert!(target < 900 * 1000 / 1500, "shrinks below its share: {target}");
        pool.forget((2, 0));
        assert_eq!(pool.used(), 600);
        assert_eq!(pool.view_usage(1), (600, 0));
    }
}
