//! Where file sources find their files: local paths matching a glob, or objects in an
//! S3-compatible store whose keys match one (`s3://bucket/data/*.csv`).

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::error::{Error, Result};

/// The files a glob names.
pub enum FileSet {
    /// A glob over the local file system.
    Local(String),
    /// A glob over the keys of an object store; `base` is what comes before a key in the
    /// names users see (`s3://bucket/`).
    Store { store: Arc<dyn ObjectStore>, base: String, pattern: glob::Pattern, prefix: String },
}

impl FileSet {
    /// The set for `path`: a local glob, `file://` glob, or object-store URL with a glob key.
    pub fn open(path: &str) -> Result<FileSet> {
        if !crate::state::is_url(path) {
            let path = path.trim_start_matches("file://");
            glob::Pattern::new(path).map_err(|e| invalid_glob(path, e))?;
            return Ok(FileSet::Local(path.to_string()));
        }
        let (store, key) = crate::state::open_url(path)?;
        let pattern = glob::Pattern::new(&key).map_err(|e| invalid_glob(path, e))?;
        // Listing starts at the directory of the key's first glob character (a whole key
        // without one is listed from its own directory: a listing prefix is a directory).
        let literal = &key[..key.find(['*', '?', '[']).unwrap_or(key.len())];
        let prefix = &literal[..literal.rfind('/').unwrap_or(0)];
        let scheme_end = path.find("://").map_or(0, |i| i + 3);
        let bucket = path[scheme_end..].split('/').next().unwrap_or_default();
        let base = format!("{}{bucket}/", &path[..scheme_end]);
        Ok(FileSet::Store { store, base, pattern, prefix: prefix.to_string() })
    }

    /// The names of the files there now, sorted. A store that cannot be listed is an error
    /// to retry; an unreadable local directory entry is left out.
    pub async fn list(&self) -> Result<Vec<String>> {
        let mut names = match self {
            FileSet::Local(pattern) => glob::glob(pattern)
                .map_err(|e| invalid_glob(pattern, e))?
                .filter_map(|p| p.ok())
                .filter(|p| p.is_file())
                .map(|p| p.display().to_string())
                .collect(),
            FileSet::Store { store, base, pattern, prefix } => {
                let prefix = (!prefix.is_empty()).then(|| StorePath::from(prefix.as_str()));
                let objects: Vec<_> = store
                    .list(prefix.as_ref())
                    .try_collect()
                    .await
                    .map_err(|e| Error::Storage(format!("listing {base}{}: {e}", prefix.unwrap_or_default())))?;
                let options = glob::MatchOptions { require_literal_separator: true, ..Default::default() };
                objects
                    .into_iter()
                    .map(|o| o.location.to_string())
                    .filter(|key| pattern.matches_with(key, options))
                    .map(|key| format!("{base}{key}"))
                    .collect::<Vec<_>>()
            }
        };
        names.sort();
        Ok(names)
    }

    /// The bytes of the file `name` (one [`FileSet::list`] returned).
    pub async fn read(&self, name: &str) -> Result<bytes::Bytes> {
        match self {
            FileSet::Local(_) => {
                tokio::fs::read(name).await.map(Into::into).map_err(|e| Error::Storage(format!("reading {name}: {e}")))
            }
            FileSet::Store { store, base, .. } => {
                let key = StorePath::from(name.strip_prefix(base.as_str()).unwrap_or(name));
                let read = async { store.get(&key).await?.bytes().await };
                read.await.map_err(|e| Error::Storage(format!("reading {name}: {e}")))
            }
        }
    }
}

fn invalid_glob(path: &str, e: glob::PatternError) -> Error {
    super::option_error(format!("path = '{path}' is not a valid glob: {e}"))
}
