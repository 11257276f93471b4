//! The gallery: reference embeddings of enrolled products, by SKU, in one file.
//!
//! `DIR/gallery.swg` holds, in order: the magic `SWGALLRY`, the format version (u32 LE),
//! the length of a JSON header (u32 LE), the header (the embedding model's id and one
//! record per reference), the vectors (f32 LE, references x dimensions), and the sha256
//! of everything before it. A change is written to a temporary file beside it, synced,
//! and renamed over it, so a crash at any point leaves either the old gallery or the new
//! one, never a mixture; a damaged file is refused by its checksum, not half-read.
//! Writers take an exclusive lock on `DIR/.lock`, so two `enroll`s do not lose each
//! other's references.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsutil::{self, Durability};
use crate::vision::embed::{cosine, ModelId};

const MAGIC: &[u8; 8] = b"SWGALLRY";
/// The only format version; a newer file is refused with its version named.
pub const VERSION: u32 = 1;
pub const FILE_NAME: &str = "gallery.swg";
/// Temporary copies as versions before issue #19 named them (`gallery.swg.tmp.<pid>`),
/// cleared like today's (fsutil::temp_prefix) when a writer died mid-write.
const LEGACY_TEMP_PREFIX: &str = "gallery.swg.tmp.";
/// The SKU reported when nothing in the gallery is similar enough.
pub const UNKNOWN: &str = "unknown";

#[derive(Debug, thiserror::Error)]
pub enum GalleryError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a usable gallery: {message}")]
    Format { path: PathBuf, message: String },
    #[error(
        "{path}: made with embedding model {} ({}, {} dimensions) but the model in use is \
         {} ({}); re-enrol the references with this model",
        gallery.name, short(&gallery.sha256), gallery.dimensions, model.name, short(&model.sha256)
    )]
    ModelMismatch {
        path: PathBuf,
        gallery: Box<ModelId>,
        model: Box<ModelId>,
    },
    #[error("{path}: no gallery here (enrol a product first: shelfwatch enroll --gallery DIR --sku ID IMAGE)")]
    Missing { path: PathBuf },
    #[error("SKU {0:?}: {1}")]
    Sku(String, String),
}

/// The first 12 characters of a hash. A gallery's hash is whatever its header says, so
/// the cut is at a character, not a byte: a byte index inside a multi-byte character
/// panicked while the error was being printed (found by fuzzing, issue #19).
fn short(sha: &str) -> &str {
    sha.char_indices().nth(12).map_or(sha, |(i, _)| &sha[..i])
}

/// One enrolled reference image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Reference {
    pub sku: String,
    /// Human-readable product name, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The image it came from (file name as given to `enroll`).
    pub source: String,
    /// RFC 3339 time of enrolment.
    pub added: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Header {
    model: ModelId,
    references: Vec<Reference>,
}

/// One SKU's answer to a query.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Match {
    pub sku: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Cosine similarity to the SKU's closest reference, -1..1.
    pub similarity: f32,
}

/// Per SKU: how many references it has.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SkuSummary {
    pub sku: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub references: usize,
    pub sources: Vec<String>,
}

/// Enrolled references and their embeddings, all from one model.
#[derive(Debug, Clone)]
pub struct Gallery {
    model: ModelId,
    references: Vec<Reference>,
    /// references.len() x model.dimensions, row-major.
    vectors: Vec<f32>,
}

/// SKUs end up in MQTT payloads, count maps and topic-safe places: printable, no
/// spaces, no MQTT wildcards or separators.
pub fn check_sku(sku: &str) -> Result<(), GalleryError> {
    let bad = |m: &str| Err(GalleryError::Sku(sku.to_owned(), m.to_owned()));
    if sku.is_empty() || sku.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if sku == UNKNOWN {
        return bad("is reserved for matches below the threshold");
    }
    if let Some(c) = sku
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '+' | '#'))
    {
        return bad(&format!(
            "contains {c:?}; use letters, digits and punctuation other than / + #"
        ));
    }
    Ok(())
}

impl Gallery {
    pub fn new(model: ModelId) -> Self {
        Self {
            model,
            references: Vec::new(),
            vectors: Vec::new(),
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    pub fn model(&self) -> &ModelId {
        &self.model
    }

    pub fn len(&self) -> usize {
        self.references.len()
    }

    pub fn is_empty(&self) -> bool {
        self.references.is_empty()
    }

    pub fn references(&self) -> &[Reference] {
        &self.references
    }

    /// Reads `DIR/gallery.swg`, checking magic, version and checksum.
    pub fn load(dir: &Path) -> Result<Self, GalleryError> {
        let path = Self::path(dir);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f
                .read_to_end(&mut bytes)
                .map_err(|error| GalleryError::Io {
                    path: path.clone(),
                    error,
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(GalleryError::Missing { path })
            }
            Err(error) => return Err(GalleryError::Io { path, error }),
        };
        Self::decode(&path, &bytes)
    }

    /// Loads the gallery and checks that it was made by `model`.
    pub fn load_for(dir: &Path, model: &ModelId) -> Result<Self, GalleryError> {
        let g = Self::load(dir)?;
        g.check_model(dir, model)?;
        Ok(g)
    }

    fn check_model(&self, dir: &Path, model: &ModelId) -> Result<(), GalleryError> {
        if &self.model != model {
            return Err(GalleryError::ModelMismatch {
                path: Self::path(dir),
                gallery: Box::new(self.model.clone()),
                model: Box::new(model.clone()),
            });
        }
        Ok(())
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<Self, GalleryError> {
        let bad = |message: String| GalleryError::Format {
            path: path.to_owned(),
            message,
        };
        if bytes.len() < 8 + 4 + 4 + 32 || &bytes[..8] != MAGIC {
            return Err(bad(
                "not a shelfwatch gallery file (no SWGALLRY header)".into()
            ));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(bad(format!(
                "format version {version}; this build reads version {VERSION}"
            )));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(bad(
                "checksum mismatch: the file is truncated or damaged (restore it from a \
                 backup or enrol again)"
                    .into(),
            ));
        }
        let header_len = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) as usize;
        let header_end = 16usize
            .checked_add(header_len)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| bad("header length beyond the end of the file".into()))?;
        let header: Header = serde_json::from_slice(&body[16..header_end])
            .map_err(|e| bad(format!("header: {e}")))?;
        // A damaged or hostile header must be an error here, not a panic or a wrong
        // answer later: vectors are cut into rows of `dimensions` (0 panics), counted
        // as references x dimensions (which can overflow), compared by cosine (NaN
        // ranks arbitrarily) and SKUs end up in payloads.
        let dims = header.model.dimensions;
        if dims == 0 {
            return Err(bad("the embedding model has 0 dimensions".into()));
        }
        let sha = &header.model.sha256;
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "the embedding model's sha256 {:?} is not 64 hex digits",
                sha.chars().take(80).collect::<String>()
            )));
        }
        if let Some(e) = header
            .references
            .iter()
            .find_map(|r| check_sku(&r.sku).err())
        {
            return Err(bad(e.to_string()));
        }
        let raw = &body[header_end..];
        let expected = header
            .references
            .len()
            .checked_mul(dims)
            .and_then(|n| n.checked_mul(4));
        if expected != Some(raw.len()) {
            return Err(bad(format!(
                "{} bytes of vectors for {} references of {dims} dimensions (expected {})",
                raw.len(),
                header.references.len(),
                expected.map_or("more than memory holds".into(), |n| n.to_string()),
            )));
        }
        let vectors: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        if let Some(i) = vectors.iter().position(|v| !v.is_finite()) {
            let r = &header.references[i / dims];
            return Err(bad(format!(
                "the vector of reference {} (SKU {}, from {}) holds {}",
                i / dims,
                r.sku,
                r.source,
                vectors[i]
            )));
        }
        Ok(Self {
            model: header.model,
            references: header.references,
            vectors,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&Header {
            model: self.model.clone(),
            references: self.references.clone(),
        })
        .expect("the header serialises");
        let mut out = Vec::with_capacity(16 + header.len() + self.vectors.len() * 4 + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        for v in &self.vectors {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Adds a reference. The vector must come from this gallery's model (same length);
    /// it is stored unit-length.
    pub fn add(&mut self, reference: Reference, vector: &[f32]) -> Result<(), GalleryError> {
        check_sku(&reference.sku)?;
        assert_eq!(
            vector.len(),
            self.model.dimensions,
            "vector from another model"
        );
        let mut v = vector.to_vec();
        crate::vision::embed::normalise(&mut v);
        self.references.push(reference);
        self.vectors.extend_from_slice(&v);
        Ok(())
    }

    /// Removes a SKU's references (only those from `source` when given); how many went.
    pub fn remove(&mut self, sku: &str, source: Option<&str>) -> usize {
        let d = self.model.dimensions;
        let mut kept_refs = Vec::with_capacity(self.references.len());
        let mut kept_vecs = Vec::with_capacity(self.vectors.len());
        for (r, v) in self.references.drain(..).zip(self.vectors.chunks_exact(d)) {
            if r.sku == sku && source.is_none_or(|s| r.source == s) {
                continue;
            }
            kept_refs.push(r);
            kept_vecs.extend_from_slice(v);
        }
        let removed = self.vectors.len() / d.max(1) - kept_refs.len();
        self.references = kept_refs;
        self.vectors = kept_vecs;
        removed
    }

    /// SKUs in the gallery, sorted, with their reference counts.
    pub fn skus(&self) -> Vec<SkuSummary> {
        let mut by: std::collections::BTreeMap<&str, SkuSummary> = Default::default();
        for r in &self.references {
            let s = by.entry(&r.sku).or_insert_with(|| SkuSummary {
                sku: r.sku.clone(),
                name: None,
                references: 0,
                sources: Vec::new(),
            });
            s.references += 1;
            if r.name.is_some() {
                s.name = r.name.clone();
            }
            s.sources.push(r.source.clone());
        }
        by.into_values().collect()
    }

    /// The `k` most similar SKUs (each by its closest reference), most similar first.
    /// Exact search: one dot product per reference.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<Match> {
        let d = self.model.dimensions;
        let mut best: std::collections::HashMap<&str, (f32, usize)> = Default::default();
        for (i, v) in self.vectors.chunks_exact(d).enumerate() {
            let s = cosine(query, v);
            let sku = self.references[i].sku.as_str();
            let e = best.entry(sku).or_insert((f32::NEG_INFINITY, i));
            if s > e.0 {
                *e = (s, i);
            }
        }
        let mut all: Vec<(&str, f32, usize)> =
            best.into_iter().map(|(sku, (s, i))| (sku, s, i)).collect();
        // Ties (identical references) break by SKU so answers are deterministic.
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        all.truncate(k);
        all.into_iter()
            .map(|(sku, similarity, i)| Match {
                sku: sku.to_owned(),
                name: self
                    .name_of(sku)
                    .or_else(|| self.references[i].name.clone()),
                similarity,
            })
            .collect()
    }

    fn name_of(&self, sku: &str) -> Option<String> {
        self.references
            .iter()
            .rev()
            .find(|r| r.sku == sku && r.name.is_some())
            .and_then(|r| r.name.clone())
    }

    /// Similarity of `query` to the closest reference of `sku`, if it is enrolled.
    pub fn similarity_to(&self, query: &[f32], sku: &str) -> Option<f32> {
        let d = self.model.dimensions;
        self.references
            .iter()
            .zip(self.vectors.chunks_exact(d))
            .filter(|(r, _)| r.sku == sku)
            .map(|(_, v)| cosine(query, v))
            .reduce(f32::max)
    }

    /// Writes the gallery to `DIR/gallery.swg` atomically (see the module docs).
    pub fn save(&self, dir: &Path) -> Result<(), GalleryError> {
        self.save_with(dir, |f, bytes| f.write_all(bytes))
    }

    /// [`Gallery::save`] with the write of the file's bytes supplied, so tests can make it
    /// fail (or stop) part-way, as a crash or a full disk would.
    pub fn save_with(
        &self,
        dir: &Path,
        write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), GalleryError> {
        std::fs::create_dir_all(dir).map_err(|error| GalleryError::Io {
            path: dir.to_owned(),
            error,
        })?;
        let bytes = self.encode();
        fsutil::write_atomic(&Self::path(dir), Durability::Synced, |f| write(f, &bytes)).map_err(
            |e| GalleryError::Io {
                path: e.path,
                error: e.error,
            },
        )
    }
}

/// An exclusive lock on a gallery directory for a read-modify-write, released on drop.
/// It also clears temporary files that a writer which died mid-write left behind.
pub struct GalleryLock {
    _lock: nix::fcntl::Flock<File>,
}

impl GalleryLock {
    pub fn acquire(dir: &Path) -> Result<Self, GalleryError> {
        let io = |path: PathBuf| move |error| GalleryError::Io { path, error };
        std::fs::create_dir_all(dir).map_err(io(dir.to_owned()))?;
        let path = dir.join(".lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(path.clone()))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| GalleryError::Io {
                path: path.clone(),
                error: e.into(),
            })
            .map(|locked| {
                let prefix = fsutil::temp_prefix(FILE_NAME);
                if let Ok(entries) = std::fs::read_dir(dir) {
                    for e in entries.flatten() {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        if name.starts_with(&prefix) || name.starts_with(LEGACY_TEMP_PREFIX) {
                            tracing::info!(file = %e.path().display(), "removing an unfinished gallery write");
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                }
                Self { _lock: locked }
            })
    }
}

/// Loads the gallery under `dir` for a change, or starts an empty one for `model`.
pub fn open_for_change(dir: &Path, model: &ModelId) -> Result<Gallery, GalleryError> {
    match Gallery::load_for(dir, model) {
        Ok(g) => Ok(g),
        Err(GalleryError::Missing { .. }) => Ok(Gallery::new(model.clone())),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelId {
        ModelId {
            name: "test".into(),
            sha256: "ab".repeat(32),
            dimensions: 4,
        }
    }

    fn reference(sku: &str, source: &str) -> Reference {
        Reference {
            sku: sku.into(),
            name: None,
            source: source.into(),
            added: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn two_skus() -> Gallery {
        let mut g = Gallery::new(model());
        g.add(reference("A", "a1.jpg"), &[1.0, 0.0, 0.0, 0.0])
            .unwrap();
        g.add(reference("A", "a2.jpg"), &[0.0, 1.0, 0.0, 0.0])
            .unwrap();
        g.add(reference("B", "b.jpg"), &[0.0, 0.0, 1.0, 0.0])
            .unwrap();
        g
    }

    #[test]
    fn search_ranks_skus_by_their_closest_reference() {
        let g = two_skus();
        let m = g.search(&[0.1, 0.9, 0.3, 0.0], 5);
        assert_eq!(m.len(), 2, "two SKUs, not three references");
        assert_eq!(m[0].sku, "A");
        assert!((m[0].similarity - 0.9).abs() < 1e-6);
        assert_eq!(m[1].sku, "B");
        assert_eq!(g.similarity_to(&[0.0, 0.0, 1.0, 0.0], "B"), Some(1.0));
        assert_eq!(g.similarity_to(&[0.0, 0.0, 1.0, 0.0], "C"), None);
    }

    #[test]
    fn a_saved_gallery_loads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let g = two_skus();
        g.save(dir.path()).unwrap();
        let back = Gallery::load_for(dir.path(), &model()).unwrap();
        assert_eq!(back.references(), g.references());
        assert_eq!(back.vectors, g.vectors);
    }

    #[test]
    fn a_crash_mid_write_leaves_the_previous_gallery_intact() {
        let dir = tempfile::tempdir().unwrap();
        two_skus().save(dir.path()).unwrap();
        let mut bigger = two_skus();
        bigger
            .add(reference("C", "c.jpg"), &[0.0, 0.0, 0.0, 1.0])
            .unwrap();
        // The write dies after half the bytes, as a power cut would.
        let err = bigger
            .save_with(dir.path(), |f, bytes| {
                f.write_all(&bytes[..bytes.len() / 2])?;
                Err(std::io::Error::other("power lost"))
            })
            .unwrap_err();
        assert!(err.to_string().contains("power lost"), "{err}");
        let g = Gallery::load_for(dir.path(), &model()).unwrap();
        assert_eq!(g.len(), 3, "the old gallery, whole");
        // A process killed outright leaves its temporary file behind: loading ignores
        // it and the next writer clears it.
        let stale = dir
            .path()
            .join(format!("{}abc123", fsutil::temp_prefix(FILE_NAME)));
        let legacy = dir.path().join(format!("{LEGACY_TEMP_PREFIX}99999"));
        for f in [&stale, &legacy] {
            std::fs::write(f, &bigger.encode()[..40]).unwrap();
        }
        assert_eq!(Gallery::load(dir.path()).unwrap().len(), 3);
        let _lock = GalleryLock::acquire(dir.path()).unwrap();
        assert!(!stale.exists() && !legacy.exists());
    }

    #[test]
    fn a_truncated_or_foreign_file_is_refused_with_its_path_named() {
        let dir = tempfile::tempdir().unwrap();
        two_skus().save(dir.path()).unwrap();
        let path = Gallery::path(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        let e = Gallery::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("gallery.swg") && e.contains("checksum"), "{e}");
        std::fs::write(&path, b"hello").unwrap();
        let e = Gallery::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a shelfwatch gallery"), "{e}");
    }

    /// A gallery file as `save` frames it (magic, version, header, checksum), around
    /// whatever header and vector bytes a damaged or hostile writer chose.
    fn framed(header: &serde_json::Value, vectors: &[u8]) -> Vec<u8> {
        let header = serde_json::to_vec(header).unwrap();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(vectors);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    fn header(dimensions: u64, skus: &[&str]) -> serde_json::Value {
        let references: Vec<_> = skus
            .iter()
            .map(|s| serde_json::to_value(reference(s, "x.jpg")).unwrap())
            .collect();
        serde_json::json!({
            "model": {"name": "test", "sha256": "ab".repeat(32), "dimensions": dimensions},
            "references": references,
        })
    }

    fn floats(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    // Issue #19: a gallery with dimension 0 loaded, then `gallery remove` panicked
    // (chunks_exact(0)); other header fields had the same class of bug.
    #[test]
    fn a_hostile_gallery_header_is_refused_naming_the_file_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = Gallery::path(dir.path());
        let mut bad_sha = header(4, &["A"]);
        bad_sha["model"]["sha256"] = "é".repeat(32).into();
        let cases = [
            (
                "dimension 0",
                framed(&header(0, &["A"]), &[]),
                "0 dimensions",
            ),
            (
                // 2 x 2^63 x 4 wraps to 0 bytes of vectors in a release build (2 x 2^31
                // x 4 on a 32-bit board; 2^63 would not even parse there).
                "references x dimensions overflowing",
                framed(&header(1 << (usize::BITS - 1), &["A", "B"]), &[]),
                "expected more than memory holds",
            ),
            (
                "vectors shorter than the header says",
                framed(&header(4, &["A", "B"]), &floats(&[1.0; 7])),
                "expected 32",
            ),
            (
                "vectors longer than the header says",
                framed(&header(4, &["A"]), &floats(&[1.0; 5])),
                "expected 16",
            ),
            (
                "a NaN vector",
                framed(&header(2, &["A", "B"]), &floats(&[1.0, 0.0, f32::NAN, 0.0])),
                "reference 1 (SKU B",
            ),
            (
                "an infinite vector",
                framed(&header(2, &["A"]), &floats(&[f32::INFINITY, 0.0])),
                "holds inf",
            ),
            (
                "a SKU no enrolment accepts",
                framed(&header(2, &["a/b"]), &floats(&[1.0, 0.0])),
                "SKU \"a/b\"",
            ),
            (
                "a sha256 that is not hex (and not ASCII)",
                framed(&bad_sha, &floats(&[1.0; 4])),
                "not 64 hex digits",
            ),
        ];
        for (what, bytes, message) in cases {
            std::fs::write(&path, bytes).unwrap();
            let e = Gallery::load(dir.path()).unwrap_err().to_string();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(message),
                "{what}: {e}"
            );
        }
    }

    // Issue #19: a gallery's temporary copy had a predictable name (pid), which a
    // symlink planted there redirected.
    #[test]
    fn a_symlink_at_the_old_temporary_name_does_not_redirect_a_save() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let planted = dir
            .path()
            .join(format!("{LEGACY_TEMP_PREFIX}{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        two_skus().save(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(Gallery::load_for(dir.path(), &model()).unwrap().len(), 3);
    }

    /// Issue #19 (found by fuzzing): the mismatch message cut the gallery's hash at byte
    /// 12, inside a character, and panicked instead of refusing the gallery.
    #[test]
    fn a_gallery_whose_model_hash_is_not_ascii_is_refused_with_a_message_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut odd = model();
        odd.sha256 = "\u{e9}".repeat(32);
        Gallery::new(odd).save(dir.path()).unwrap();
        // Refused as another model's, or as damaged: either way with the file named.
        let e = Gallery::load_for(dir.path(), &model())
            .unwrap_err()
            .to_string();
        assert!(e.contains("gallery.swg"), "{e}");
    }

    /// Issue #19 (found by fuzzing): 1 reference x 2^62 dimensions x 4 bytes wrapped to
    /// 0 expected bytes (2^30 on a 32-bit board), so a gallery without vectors loaded; `gallery remove` then
    /// dropped its references and reported none removed. 0 dimensions loaded too, and
    /// the first search panicked (chunks of 0).
    #[test]
    fn a_gallery_whose_dimensions_are_zero_or_overflow_its_size_is_refused_at_load() {
        for dimensions in [0, 1 << (usize::BITS - 2)] {
            let dir = tempfile::tempdir().unwrap();
            let g = Gallery {
                model: ModelId {
                    dimensions,
                    ..model()
                },
                references: vec![reference("A", "a.jpg")],
                vectors: Vec::new(),
            };
            g.save(dir.path()).unwrap();
            let e = Gallery::load(dir.path()).unwrap_err().to_string();
            assert!(e.contains("gallery.swg") && e.contains("dimensions"), "{e}");
        }
    }

    #[test]
    fn a_gallery_of_another_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        two_skus().save(dir.path()).unwrap();
        let mut other = model();
        other.sha256 = "cd".repeat(32);
        let e = Gallery::load_for(dir.path(), &other)
            .unwrap_err()
            .to_string();
        assert!(e.contains("re-enrol"), "{e}");
    }

    #[test]
    fn removing_a_sku_drops_only_its_references() {
        let mut g = two_skus();
        assert_eq!(g.remove("A", Some("a1.jpg")), 1);
        assert_eq!(g.remove("A", None), 1);
        assert_eq!(g.remove("A", None), 0);
        assert_eq!(g.len(), 1);
        assert_eq!(g.search(&[0.0, 0.0, 1.0, 0.0], 1)[0].sku, "B");
    }

    #[test]
    fn skus_with_spaces_wildcards_or_the_reserved_name_are_refused() {
        assert!(check_sku("4006381333931").is_ok());
        assert!(check_sku("ACME-cola_0.5l").is_ok());
        for bad in ["", "a b", "a/b", "x+", "#", "unknown"] {
            assert!(check_sku(bad).is_err(), "{bad:?}");
        }
    }
}
