//! The model cache: each model as tract has decluttered it for one input size, stored
//! as NNEF, so that a restart skips the ONNX parse, type inference and graph
//! simplification and only runs the (CPU-specific) kernel selection and weight packing.
//!
//! Entries are keyed by everything that shapes the stored graph (the ONNX file's sha256,
//! the input shape, the outputs kept, the tract and shelfwatch versions), written
//! atomically (temporary file, fsync, rename) and verified on load against a sha256
//! stored beside them. A missing, stale or damaged entry is never an error: the model is
//! built from its ONNX file again and the entry rewritten.

use std::io::Write;
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use tract_nnef::framework::Nnef;
use tract_onnx::prelude::*;

use crate::fsutil::{self, Durability};

/// tract's version as Cargo.lock pins it: a new tract may decode the same NNEF into a
/// different graph, so it is part of every key.
fn tract_version() -> &'static str {
    const LOCK: &str = include_str!("../../Cargo.lock");
    LOCK.split("[[package]]")
        .find(|p| p.contains("name = \"tract-core\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
        .map(|v| v.trim_matches('"'))
        .unwrap_or("unknown")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn nnef() -> Nnef {
    tract_nnef::nnef().with_onnx()
}

/// Entries kept: models in use at once (a detector, an embedder) plus the previous
/// versions of a model being rolled back to.
const KEEP: usize = 4;

/// A directory of cached models.
#[derive(Debug, Clone)]
pub struct ModelCache {
    dir: PathBuf,
}

impl ModelCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The key of a model file (by its sha256) run with `shape`, read by the decoder
    /// `decoder` describes (which decides the outputs kept).
    pub fn key(model_sha256: &str, shape: &[usize], decoder: &str) -> String {
        let mut h = Sha256::new();
        for part in [
            model_sha256.to_ascii_lowercase(),
            format!("{shape:?}"),
            decoder.to_string(),
            tract_version().to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        hex(&h.finalize())[..32].to_string()
    }

    fn paths(&self, key: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{key}.nnef.tar")),
            self.dir.join(format!("{key}.sha256")),
        )
    }

    /// The cached model and its output names, or `None` (logged) when there is none or
    /// it cannot be used.
    pub fn load(&self, key: &str) -> Option<(TypedModel, Vec<String>)> {
        let (tar, sum) = self.paths(key);
        let bytes = match std::fs::read(&tar) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %tar.display(), error = %e, "model cache unreadable; rebuilding");
                return None;
            }
        };
        // The sidecar: the entry's sha256, then the model's output names, a line each.
        let sidecar = std::fs::read_to_string(&sum).unwrap_or_default();
        let mut lines = sidecar.lines();
        let expected = lines.next().unwrap_or_default();
        let outputs: Vec<String> = lines.map(str::to_owned).collect();
        if hex(&Sha256::digest(&bytes)) != expected.trim() || outputs.is_empty() {
            tracing::warn!(file = %tar.display(), "model cache entry damaged; rebuilding");
            self.remove(key);
            return None;
        }
        match nnef().model_for_read(&mut std::io::Cursor::new(bytes)) {
            Ok(m) => {
                // Marks the entry as in use for eviction; failing to is harmless.
                let _ = std::fs::File::options()
                    .append(true)
                    .open(&tar)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                Some((m, outputs))
            }
            Err(e) => {
                tracing::warn!(file = %tar.display(), error = %format!("{e:#}"), "model cache entry unusable; rebuilding");
                self.remove(key);
                None
            }
        }
    }

    /// Stores `model` under `key`. Failing to cache (read-only disk, full disk) only
    /// costs the next start its time, so it is logged, not returned.
    pub fn store(&self, key: &str, model: &TypedModel, outputs: &[String]) {
        match self.write(key, model, outputs) {
            Ok(()) => self.evict_all_but_newest(KEEP),
            // Not every graph has an NNEF form: tract 0.23 cannot write the QuantizeLinear
            // of ONNX int8 models. Such a model simply loads from ONNX every time.
            Err(StoreError::Translate(e)) => tracing::info!(
                error = %format!("{e:#}"),
                "this model cannot be cached; it is read from ONNX at every start"
            ),
            Err(StoreError::Io(e)) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write the model cache")
            }
        }
    }

    /// Streams the entry to a temporary file (no second copy of the weights in memory:
    /// this runs while the model is loading, at the process's peak), then renames it.
    fn write(&self, key: &str, model: &TypedModel, outputs: &[String]) -> Result<(), StoreError> {
        std::fs::create_dir_all(&self.dir)?;
        let (tar, sum) = self.paths(key);
        // Removed on any error below when dropped.
        let tmp = fsutil::temp_beside(&tar)?;
        let hashing = HashingWriter {
            // A second handle, so that no borrow of `tmp` outlives the writing.
            inner: std::io::BufWriter::new(tmp.as_file().try_clone()?),
            hasher: Sha256::new(),
        };
        let hashing = nnef()
            .write_to_tar_with_config(model, hashing, false, true)
            .map_err(|e| {
                // A full or read-only disk surfaces through tract as well.
                match e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()) {
                    Some(io) => StoreError::Io(std::io::Error::new(io.kind(), format!("{e:#}"))),
                    None => StoreError::Translate(e),
                }
            })?;
        hashing.inner.into_inner().map_err(|e| e.into_error())?;
        let mut sidecar = hex(&hashing.hasher.finalize());
        for o in outputs {
            sidecar.push('\n');
            sidecar.push_str(o);
        }
        // The sidecar first: a crash between the two renames leaves an entry whose
        // sha256 does not match, which the next load discards.
        fsutil::write_atomic(&sum, Durability::Synced, |f| {
            f.write_all(sidecar.as_bytes())
        })?;
        fsutil::persist(tmp, &tar, Durability::Synced)?;
        Ok(())
    }

    /// Entries of models no longer in use would otherwise pile up, one per model
    /// update; loading marks an entry as used (its mtime).
    fn evict_all_but_newest(&self, keep: usize) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(std::time::SystemTime, String)> = dir
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e
                    .file_name()
                    .to_str()?
                    .strip_suffix(".nnef.tar")?
                    .to_owned();
                Some((e.metadata().ok()?.modified().ok()?, name))
            })
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (_, key) in entries.into_iter().skip(keep) {
            tracing::info!(entry = %key, "model cache entry evicted");
            self.remove(&key);
        }
    }

    fn remove(&self, key: &str) {
        let (tar, sum) = self.paths(key);
        let _ = std::fs::remove_file(tar);
        let _ = std::fs::remove_file(sum);
    }
}

enum StoreError {
    Translate(TractError),
    Io(std::io::Error),
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(e)
    }
}

impl From<fsutil::WriteError> for StoreError {
    fn from(e: fsutil::WriteError) -> Self {
        StoreError::Io(std::io::Error::new(e.error.kind(), e.to_string()))
    }
}

/// Hashes what it writes on the way through.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Issue #19: the entry and its sidecar were written through `<name>.tmp.<pid>`, a
    // predictable name a symlink planted there redirected.
    #[test]
    fn a_symlink_at_the_old_temporary_names_does_not_redirect_a_cache_write() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let cache = ModelCache::new(dir.path());
        let key = ModelCache::key("ab", &[1, 3], "test");
        let pid = std::process::id();
        let mut victims = Vec::new();
        for name in [format!("{key}.nnef.tmp.{pid}"), format!("{key}.tmp.{pid}")] {
            let victim = outside.path().join(&name);
            std::fs::write(&victim, "precious").unwrap();
            std::os::unix::fs::symlink(&victim, dir.path().join(&name)).unwrap();
            victims.push(victim);
        }
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 3])).unwrap();
        model.select_output_outlets(&[x]).unwrap();
        cache.store(&key, &model, &["x".into()]);
        for v in &victims {
            assert_eq!(std::fs::read_to_string(v).unwrap(), "precious");
        }
        assert!(cache.load(&key).is_some(), "the entry was written");
    }
}
