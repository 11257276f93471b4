//! Fuzz targets for the parsers of outside input (issue #19, part 5), run as bounded
//! property tests: cargo-fuzz needs a nightly toolchain, which neither CI nor the
//! developers' machines have. Each target feeds one parser arbitrary bytes and
//! structure-aware mutations of real inputs (the shipped configs, a gallery written by
//! [`Gallery::save`], images encoded here and the photos in tests/fixtures/) and checks
//! that it answers with a value or its own error, never a panic.
//!
//! CI runs a fixed number of cases from a fixed seed (the whole module takes well under
//! a minute in release on 2 cores); `PROPTEST_CASES` and `PROPTEST_RNG_SEED` make a long
//! local run (docs/fuzzing.md has the commands and what was found).
//! Crashes found are kept as named regression tests beside the code they fixed.
//!
//! The scanner envelope's parser is private to its module: its target is
//! `identify::requests::fuzz`, which uses the strategies here.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::RngSeed;

/// The proptest configuration of one target: `ci_cases` cases from a fixed seed, unless
/// the environment asks for more (`PROPTEST_CASES`) or another seed (`PROPTEST_RNG_SEED`).
/// Under qemu (`SHELFWATCH_TEST_SLOWDOWN`) CI's count shrinks by the slowdown: the ARM
/// runs are there for 32-bit arithmetic, not for volume.
pub(crate) fn fuzz_config(ci_cases: u32) -> ProptestConfig {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let slowdown = env("SHELFWATCH_TEST_SLOWDOWN").unwrap_or(1).max(1);
    let cases = env("PROPTEST_CASES")
        .map(|c| c.min(u64::from(u32::MAX)) as u32)
        .unwrap_or_else(|| (u64::from(ci_cases) / slowdown).max(16) as u32);
    let rng_seed = match env("PROPTEST_RNG_SEED") {
        Some(seed) => RngSeed::Fixed(seed),
        // A long run explores; CI repeats the same cases, so a red run is reproducible.
        None if std::env::var_os("PROPTEST_CASES").is_some() => RngSeed::Random,
        None => RngSeed::Fixed(19),
    };
    ProptestConfig {
        cases,
        rng_seed,
        // Failures become named regression tests, not files under src/.
        failure_persistence: None,
        // Shrinking a big mutated image can take long; a partly shrunk input still
        // reproduces.
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

/// A file of the source tree.
pub(crate) fn tree_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

pub(crate) fn read_tree_file(relative: &str) -> Vec<u8> {
    std::fs::read(tree_path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Writes `bytes` to a new file at `path`, replacing any old one: on ext4, truncating
/// and rewriting a file flushes it on close (auto_da_alloc), 4 ms a case here.
pub(crate) fn write_new(path: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// One edit of a seed input, as a mutational fuzzer (AFL's havoc stage) makes them.
/// Positions are [`Index`]es, resolved against the input's length when applied, so a
/// failing case shrinks to fewer edits.
#[derive(Debug, Clone)]
pub(crate) enum Edit {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    /// A byte, 16-, 32- or 64-bit little-endian value from the boundary list.
    Interesting(Index, usize, usize),
    Delete(Index, usize),
    Insert(Index, Vec<u8>),
    /// A token of the target's dictionary inserted or written over.
    Token(Index, usize, bool),
    /// A slice of the input copied elsewhere (repeats a JSON member, a TOML table).
    Duplicate(Index, Index, usize),
    Truncate(Index),
}

const INTERESTING: [u64; 16] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Edit::FlipBit(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::SetByte(i, b)),
        (any::<Index>(), 0..INTERESTING.len(), 0usize..4)
            .prop_map(|(i, v, w)| Edit::Interesting(i, v, w)),
        (any::<Index>(), 1usize..64).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<Index>(), any::<usize>(), any::<bool>())
            .prop_map(|(i, t, over)| Edit::Token(i, t, over)),
        (any::<Index>(), any::<Index>(), 1usize..256)
            .prop_map(|(from, to, n)| Edit::Duplicate(from, to, n)),
        any::<Index>().prop_map(Edit::Truncate),
    ]
}

/// Up to `max_edits` edits.
pub(crate) fn edits(max_edits: usize) -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 0..=max_edits)
}

/// Applies `edits` to `input`; tokens come from `dictionary`.
pub(crate) fn apply(input: &mut Vec<u8>, edits: &[Edit], dictionary: &[&[u8]]) {
    for e in edits {
        let len = input.len();
        match e {
            Edit::FlipBit(i, bit) if len > 0 => input[i.index(len)] ^= 1 << bit,
            Edit::SetByte(i, b) if len > 0 => input[i.index(len)] = *b,
            Edit::Interesting(i, v, width) => {
                let bytes = INTERESTING[*v].to_le_bytes();
                let n = 1 << width;
                let at = i.index(len + 1);
                let end = (at + n).min(len);
                input.splice(at..end, bytes[..n].iter().copied());
            }
            Edit::Delete(i, n) if len > 0 => {
                let at = i.index(len);
                input.drain(at..(at + n).min(len));
            }
            Edit::Insert(i, bytes) => {
                let at = i.index(len + 1);
                input.splice(at..at, bytes.iter().copied());
            }
            Edit::Token(i, t, over) if !dictionary.is_empty() => {
                let token = dictionary[t % dictionary.len()];
                let at = i.index(len + 1);
                let end = if *over {
                    (at + token.len()).min(len)
                } else {
                    at
                };
                input.splice(at..end, token.iter().copied());
            }
            Edit::Duplicate(from, to, n) if len > 0 => {
                let from = from.index(len);
                let piece = input[from..(from + n).min(len)].to_vec();
                let to = to.index(len + 1);
                input.splice(to..to, piece);
            }
            Edit::Truncate(i) => input.truncate(i.index(len + 1)),
            _ => {}
        }
    }
}

/// A seed from `seeds` with up to `max_edits` edits: a mutational fuzzer's input.
pub(crate) fn mutated(
    seeds: Vec<Vec<u8>>,
    dictionary: &'static [&'static [u8]],
    max_edits: usize,
) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    (0..n, edits(max_edits)).prop_map(move |(s, e)| {
        let mut input = seeds[s].clone();
        apply(&mut input, &e, dictionary);
        input
    })
}

/// Arbitrary bytes, short mostly: most parsers reject early, and long inputs only cost
/// time.
pub(crate) fn any_bytes(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..64),
        1 => prop::collection::vec(any::<u8>(), 0..=max_len),
    ]
}

/// Bytes placed flush against an inaccessible page, so a converter that reads one byte
/// past the end of its input faults (the test process dies with SIGSEGV) instead of
/// silently reading whatever the heap holds there. Stable Rust has no AddressSanitizer;
/// this catches the overreads of SIMD kernels, the likeliest ones, with the MMU.
pub(crate) struct Guarded {
    map: *mut libc::c_void,
    map_len: usize,
    start: *const u8,
    len: usize,
}

impl Guarded {
    pub(crate) fn new(data: &[u8]) -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let body = data.len().div_ceil(page).max(1) * page;
        let map_len = body + 2 * page;
        // SAFETY: a fresh private anonymous mapping at an address of the kernel's choice:
        // it aliases no Rust object.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "mmap of {map_len} bytes");
        let base = map.cast::<u8>();
        // SAFETY: the first and the last page lie inside the mapping made above and are
        // page-aligned; nothing refers to them.
        unsafe {
            assert_eq!(libc::mprotect(map, page, libc::PROT_NONE), 0);
            let tail = base.add(page + body).cast();
            assert_eq!(libc::mprotect(tail, page, libc::PROT_NONE), 0);
        }
        // SAFETY: start..start + len ends where the guard page begins, inside the
        // writable body; the source is a distinct allocation.
        let start = unsafe {
            let start = base.add(page + body - data.len());
            std::ptr::copy_nonoverlapping(data.as_ptr(), start, data.len());
            start
        };
        Self {
            map,
            map_len,
            start,
            len: data.len(),
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the bytes were initialised in `new` and are never written again; they
        // stay mapped until `self` is dropped, and the borrow cannot outlive `self`.
        unsafe { std::slice::from_raw_parts(self.start, self.len) }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no slice of it outlives self.
        unsafe {
            libc::munmap(self.map, self.map_len);
        }
    }
}

/// Config files: the shipped examples, mutated, and arbitrary text.
mod config {
    use super::*;
    use crate::config::{Config, ConfigErrors};

    /// Keys, tables and values that reach the validation and the error locator.
    const DICTIONARY: &[&[u8]] = &[
        b"\n[model]\n",
        b"\n[model.label-thresholds]\n",
        b"\"x[\" = 2.0\n",
        b"\"a.b\" = 1.5\n",
        b"\"]\" = -1\n",
        b"\"[0]\" = 7\n",
        b"\n[counting]\n",
        b"\n[[cameras]]\nid = \"c\"\n",
        b"\n[[cameras.zones]]\nname = \"z\"\npolygon = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]\n",
        b"\n[cameras.source]\nkind = \"v4l2\"\n",
        b"\n[[sinks]]\nkind = \"mqtt\"\n",
        b"\n[sinks.tls]\nca-file = \"nowhere.pem\"\n",
        b"\n[identify]\nmodel = \"efficientnet_lite0.toml\"\ngallery = \"g\"\n",
        b"\n[snapshots]\ninterval-s = 5\n",
        b"\n[state]\n",
        b"\n[health]\n",
        b"\n[device]\nid = \"d\"\n",
        b"input-size = [0, 0]\n",
        b"threads = 0\n",
        b"coordinates = \"pixels\"\n",
        b"labels = []\n",
        b"formats = [\"YUYV\", \"MJPG\"]\n",
        b"0",
        b"-1",
        b"1e400",
        b"nan",
        b"-inf",
        b"0.0",
        b"18446744073709551615",
        b"9223372036854775808",
        b"4294967296",
        b"\"\"",
        b"\"x[\"",
        b"\"a.b\"",
        b"'''",
        b"\"\"\"",
        b"[",
        b"]",
        b"[[",
        b"]]",
        b"{",
        b"}",
        b"=",
        b".",
        b",",
        b"\"",
        b"\n",
        b"#",
        b"\\u0000",
        "\u{e9}\u{1F600}".as_bytes(),
        b"1979-05-27T07:32:00Z",
    ];

    /// The configs a user starts from, and snippets for the sections they leave out.
    fn seeds() -> Vec<Vec<u8>> {
        let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(tree_path("examples"))
            .expect("examples/")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .map(|p| std::fs::read(p).expect("an example config"))
            .collect();
        assert!(seeds.len() >= 2, "the shipped configs are the seeds");
        seeds.push(
            b"[identify]\nmodel = \"efficientnet_lite0.toml\"\ngallery = \"../target/fuzz-gallery\"\n\
              top-k = 3\nunknown-threshold = 0.5\n"
                .to_vec(),
        );
        seeds.push(
            b"[[sinks]]\nkind = \"mqtt\"\nbroker = \"localhost:1883\"\nprefix = \"a/b\"\n\
              username = \"u\"\npassword-file = \"pw\"\n[sinks.tls]\nca-file = \"ca.pem\"\n"
                .to_vec(),
        );
        seeds.push(
            b"[model]\nscore-threshold = 0.5\n[model.label-thresholds]\nproduct = 0.4\n".to_vec(),
        );
        seeds
    }

    /// Any outcome but a panic is acceptable; an error must say where it is (a key, or
    /// a line for text that is not TOML), which is what `check-config` prints.
    fn check(text: &str) -> Result<(), TestCaseError> {
        // Beside the shipped configs, so their relative paths (frames, state) resolve and
        // the unmutated seeds are valid.
        let path = tree_path("examples/fuzz.toml");
        match Config::from_text(&path, text) {
            Ok(_) => Ok(()),
            Err(ConfigErrors(errors)) => {
                prop_assert!(!errors.is_empty(), "an error without a problem");
                for e in &errors {
                    prop_assert!(
                        !e.key.is_empty() || e.line.is_some(),
                        "names neither a key nor a line: {e}"
                    );
                    prop_assert!(e.to_string().contains("fuzz.toml"), "no file in {e}");
                }
                Ok(())
            }
        }
    }

    /// Values of every TOML type, in and out of each key's range.
    const VALUES: &[&str] = &[
        "0",
        "1",
        "-1",
        "2",
        "7",
        "100000",
        "9223372036854775807",
        "-9223372036854775808",
        "0.0",
        "-0.0",
        "0.5",
        "1.5",
        "-0.5",
        "1e300",
        "5e-324",
        "nan",
        "inf",
        "-inf",
        "true",
        "false",
        "\"\"",
        "\"x[\"",
        "\"a.b\"",
        "\"a/b\"",
        "\"+\"",
        "\"/\"",
        "\"*\"",
        "\"../*\"",
        "\"\u{e9}\u{1F600}\"",
        "\"embedded\"",
        "\"localhost:99999\"",
        "\"127.0.0.1:0\"",
        "\"pixels\"",
        "\"normalised\"",
        "\"auto\"",
        "\"v4l2\"",
        "\"files\"",
        "\"mqtt\"",
        "\"stdout\"",
        "\"YUYV\"",
        "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"",
        "[]",
        "[0, 0]",
        "[640, 480]",
        "[\"Person\"]",
        "[\"\"]",
        "[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]",
        "[[0.0, 0.0], [1.0, 0.0]]",
        "[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]",
        "[[-5.0, 0.0], [1e9, 0.0], [0.0, nan]]",
        "{}",
        "{ kind = \"files\", path = \"x\" }",
        "1979-05-27T07:32:00Z",
    ];

    /// Keys no config uses, which reach the key-path and line lookups.
    const ODD_KEYS: &[&str] = &[
        "\"x[\"",
        "\"a.b\"",
        "\"]\"",
        "\"[0]\"",
        "\"a[1]b\"",
        "\"\"",
        "\"\u{e9}\"",
        "Person",
        "product",
        "unknown-key",
    ];

    /// Table headers to insert.
    const TABLES: &[&str] = &[
        "[model]",
        "[model.label-thresholds]",
        "[counting]",
        "[[cameras]]",
        "[cameras.source]",
        "[[cameras.zones]]",
        "[[sinks]]",
        "[sinks.tls]",
        "[identify]",
        "[state]",
        "[health]",
        "[snapshots]",
        "[device]",
    ];

    /// An edit of a config's lines that keeps it TOML more often than not, so the
    /// fuzzing reaches the typed parse and the validation, not only the TOML lexer.
    #[derive(Debug, Clone)]
    enum LineEdit {
        /// The value of the n-th `key = value` line replaced.
        Value(Index, usize),
        /// A `key = value` line inserted; the key is one of the seeds' or an odd one.
        Insert(Index, usize, usize),
        Table(Index, usize),
        Delete(Index),
        Duplicate(Index, Index),
    }

    fn line_edit() -> impl Strategy<Value = LineEdit> {
        prop_oneof![
            4 => (any::<Index>(), any::<usize>()).prop_map(|(i, v)| LineEdit::Value(i, v)),
            4 => (any::<Index>(), any::<usize>(), any::<usize>())
                .prop_map(|(i, k, v)| LineEdit::Insert(i, k, v)),
            1 => (any::<Index>(), any::<usize>()).prop_map(|(i, t)| LineEdit::Table(i, t)),
            2 => any::<Index>().prop_map(LineEdit::Delete),
            1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| LineEdit::Duplicate(a, b)),
        ]
    }

    fn keys_of(texts: &[String]) -> Vec<String> {
        let mut keys: Vec<String> = texts
            .iter()
            .flat_map(|t| t.lines())
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim().to_owned()))
            .filter(|k| !k.is_empty() && !k.starts_with('#'))
            .chain(ODD_KEYS.iter().map(|k| (*k).to_owned()))
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    fn apply_lines(text: &str, edits: &[LineEdit], keys: &[String]) -> String {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        for e in edits {
            let n = lines.len();
            match e {
                LineEdit::Value(i, v) => {
                    let assignments: Vec<usize> = (0..n)
                        .filter(|&j| !lines[j].trim_start().starts_with('#'))
                        .filter(|&j| lines[j].contains(" = "))
                        .collect();
                    if !assignments.is_empty() {
                        let j = assignments[i.index(assignments.len())];
                        let key = lines[j].split(" = ").next().unwrap_or_default().to_owned();
                        lines[j] = format!("{key} = {}", VALUES[v % VALUES.len()]);
                    }
                }
                LineEdit::Insert(i, k, v) => lines.insert(
                    i.index(n + 1),
                    format!("{} = {}", keys[k % keys.len()], VALUES[v % VALUES.len()]),
                ),
                LineEdit::Table(i, t) => {
                    lines.insert(i.index(n + 1), TABLES[t % TABLES.len()].into())
                }
                LineEdit::Delete(i) if n > 0 => {
                    lines.remove(i.index(n));
                }
                LineEdit::Duplicate(a, b) if n > 0 => {
                    let line = lines[a.index(n)].clone();
                    lines.insert(b.index(n + 1), line);
                }
                _ => {}
            }
        }
        lines.join("\n")
    }

    fn line_mutated() -> impl Strategy<Value = String> {
        let seeds: Vec<String> = seeds()
            .into_iter()
            .map(|b| String::from_utf8(b).expect("UTF-8 seeds"))
            .collect();
        let keys = keys_of(&seeds);
        (0..seeds.len(), prop::collection::vec(line_edit(), 1..6))
            .prop_map(move |(s, e)| apply_lines(&seeds[s], &e, &keys))
    }

    proptest! {
        #![proptest_config(fuzz_config(10_000))]

        #[test]
        fn any_text_as_a_config_gives_a_config_or_located_config_errors_never_a_panic(
            bytes in any_bytes(2048),
        ) {
            check(&String::from_utf8_lossy(&bytes))?;
        }

        #[test]
        fn mutated_shipped_configs_give_a_config_or_located_config_errors_never_a_panic(
            text in prop_oneof![
                3 => line_mutated(),
                1 => mutated(seeds(), DICTIONARY, 6)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ],
        ) {
            check(&text)?;
        }
    }
}

/// The daemon's state file (`state.json`).
mod state {
    use super::*;
    use crate::counting::{StockStatus, ZoneState};
    use crate::daemon::state::{SavedState, StateError, StateStore};

    const DICTIONARY: &[&[u8]] = &[
        b"18446744073709551615",
        b"18446744073709551616",
        b"4294967296",
        b"-1",
        b"1e999",
        b"0.5",
        b"null",
        b"true",
        b"{}",
        b"[]",
        b"\"\"",
        b"\"schema\":1,",
        b"\"seq\":",
        b"\"zones\":{\"a/b\":{\"counts\":{},\"total\":0,\"status\":\"ok\"}},",
        b"\"status\":\"out-of-stock\"",
        b"\"counts\":{\"x\":4294967295}",
        b"\\ud800",
        b"\\u0000",
        b",",
        b":",
        b"\"",
    ];

    fn seeds() -> Vec<Vec<u8>> {
        let mut s = SavedState {
            schema: 1,
            seq: 1234,
            ..Default::default()
        };
        for (zone, status) in [
            ("cam/top", StockStatus::Ok),
            ("cam/bottom", StockStatus::OutOfStock),
        ] {
            s.zones.insert(
                zone.into(),
                ZoneState {
                    counts: [("product".into(), 3), ("Bottle".into(), 0)].into(),
                    total: 3,
                    status,
                },
            );
        }
        vec![
            serde_json::to_vec_pretty(&s).expect("state serialises"),
            serde_json::to_vec(&s).expect("state serialises"),
        ]
    }

    fn check(store: &StateStore, bytes: &[u8]) -> Result<(), TestCaseError> {
        write_new(&store.path(), bytes);
        match store.load() {
            Ok(s) => prop_assert_eq!(s.schema, 1),
            // Damaged, or parsed but refused (a seq past 2^53, counts that do not add up).
            Err(e @ (StateError::Corrupt { .. } | StateError::Implausible { .. })) => {
                prop_assert!(e.to_string().contains("state.json"), "{}", e)
            }
            Err(e) => prop_assert!(false, "not a corrupt-file error: {}", e),
        }
        Ok(())
    }

    thread_local! {
        // One locked state directory per test thread, rewritten case after case: a
        // directory and a lock per case cost more than the parse.
        static STORE: (tempfile::TempDir, StateStore) = {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let store = StateStore::open(dir.path()).expect("the state directory");
            (dir, store)
        };
    }

    proptest! {
        #![proptest_config(fuzz_config(5_000))]

        #[test]
        fn any_bytes_as_a_state_file_give_a_state_or_an_error_naming_the_file_never_a_panic(
            bytes in any_bytes(1024),
        ) {
            STORE.with(|(_, store)| check(store, &bytes))?;
        }

        #[test]
        fn mutated_state_files_give_a_state_or_an_error_naming_the_file_never_a_panic(
            bytes in mutated(seeds(), DICTIONARY, 6),
        ) {
            STORE.with(|(_, store)| check(store, &bytes))?;
        }
    }
}

/// Gallery files (`gallery.swg`): raw bytes, a real gallery mutated, and galleries whose
/// header and vectors are mutated under a valid checksum, so the fuzzing reaches past
/// the checksum into what a damaged-but-consistent or hand-made file could hold.
mod gallery {
    use super::*;
    use crate::identify::{answer, Gallery, Reference};
    use crate::vision::embed::ModelId;

    const MAGIC: &[u8; 8] = b"SWGALLRY";

    const DICTIONARY: &[&[u8]] = &[
        b"\"dimensions\":0",
        b"\"dimensions\":18446744073709551615",
        b"\"dimensions\":4611686018427387904",
        b"\"dimensions\":-1",
        b"\"sha256\":\"\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\"",
        b"\"sku\":\"\"",
        b"\"sku\":\"unknown\"",
        b"\"name\":null",
        b"\"references\":[]",
        b"{\"sku\":\"A\",\"source\":\"a\",\"added\":\"x\"},",
        b"null",
        b"1e999",
        b"\"",
        b",",
        b"\x00\x00\x80\x7f",
        b"\x00\x00\xc0\x7f",
        b"\x00\x00\x80\xff",
    ];

    fn model() -> ModelId {
        ModelId {
            name: "fuzz".into(),
            sha256: "ab".repeat(32),
            dimensions: 4,
        }
    }

    /// A gallery as `enroll` writes it: three references of two SKUs, one named.
    fn real_gallery() -> Vec<u8> {
        let mut g = Gallery::new(model());
        for (sku, name, v) in [
            ("A", None, [1.0, 0.0, 0.0, 0.0]),
            ("A", Some("Cola 0.5 l"), [0.6, 0.8, 0.0, 0.0]),
            ("B", None, [0.0, 0.0, 1.0, 0.0]),
        ] {
            let r = Reference {
                sku: sku.into(),
                name: name.map(str::to_owned),
                source: format!("{sku}.jpg"),
                added: "2026-01-01T00:00:00Z".into(),
            };
            g.add(r, &v).expect("a valid reference");
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        g.save(dir.path()).expect("save the gallery");
        std::fs::read(Gallery::path(dir.path())).expect("read the gallery")
    }

    /// (header JSON, vector bytes) of a gallery file.
    fn split(file: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let header_len = u32::from_le_bytes(file[12..16].try_into().expect("4 bytes")) as usize;
        let body = &file[..file.len() - 32];
        (
            body[16..16 + header_len].to_vec(),
            body[16 + header_len..].to_vec(),
        )
    }

    /// A gallery file around `header` and `vectors`, with a valid checksum;
    /// `header_len` overrides the true length.
    fn assemble(version: u32, header: &[u8], header_len: Option<u32>, vectors: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        let mut out = MAGIC.to_vec();
        out.extend(version.to_le_bytes());
        out.extend(header_len.unwrap_or(header.len() as u32).to_le_bytes());
        out.extend(header);
        out.extend(vectors);
        let sum = sha2::Sha256::digest(&out);
        out.extend(sum);
        out
    }

    fn mutated_under_checksum() -> impl Strategy<Value = Vec<u8>> {
        let (header, vectors) = split(&real_gallery());
        (
            prop_oneof![8 => Just(1u32), 1 => any::<u32>()],
            edits(4),
            edits(2),
            prop::option::weighted(0.1, any::<u32>()),
        )
            .prop_map(move |(version, he, ve, header_len)| {
                let mut h = header.clone();
                apply(&mut h, &he, DICTIONARY);
                let mut v = vectors.clone();
                apply(&mut v, &ve, DICTIONARY);
                assemble(version, &h, header_len, &v)
            })
    }

    /// Headers written from scratch: any model id (dimensions 0 and overflowing sizes
    /// included), any references, as many vector bytes as the header promises or not.
    fn any_header() -> impl Strategy<Value = Vec<u8>> {
        let dimensions = prop_oneof![
            0u64..=8,
            Just(1 << 62),
            Just(1 << 61),
            Just((1 << 62) + 1),
            Just(u64::MAX / 4 + 1),
            Just(u64::MAX),
            any::<u64>(),
        ];
        let reference = (
            prop_oneof![Just("A".to_owned()), ".{0,8}"],
            prop::option::of(".{0,8}"),
        );
        (
            ".{0,16}",
            prop_oneof![Just("ab".repeat(32)), ".{0,16}"],
            dimensions,
            prop::collection::vec(reference, 0..4),
            prop_oneof![Just(None), (0usize..64).prop_map(Some)],
        )
            .prop_map(|(name, sha256, dimensions, refs, floats)| {
                let references: Vec<_> = refs
                    .iter()
                    .map(|(sku, name)| {
                        serde_json::json!({"sku": sku, "name": name, "source": "s", "added": "t"})
                    })
                    .collect();
                let header = serde_json::json!({
                    "model": {"name": name, "sha256": sha256, "dimensions": dimensions},
                    "references": references,
                });
                let promised = (references.len() as u64).saturating_mul(dimensions);
                let floats = floats.unwrap_or(promised.min(64) as usize);
                let vectors: Vec<u8> = (0..floats)
                    .flat_map(|i| (i as f32 * 0.25 - 1.0).to_le_bytes())
                    .collect();
                assemble(1, header.to_string().as_bytes(), None, &vectors)
            })
    }

    thread_local! {
        // One gallery directory per test thread, rewritten case after case.
        static DIR: tempfile::TempDir = tempfile::tempdir().expect("a temporary directory");
    }

    fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
        DIR.with(|dir| check_in(dir, bytes))
    }

    /// Loads `bytes` as a gallery file; a gallery that loads must answer queries, list
    /// its SKUs and survive removals, as `identify`, `gallery list` and `gallery remove`
    /// do with it, and a refusal must name the file.
    fn check_in(dir: &tempfile::TempDir, bytes: &[u8]) -> Result<(), TestCaseError> {
        write_new(&Gallery::path(dir.path()), bytes);
        // The error a daemon or `identify` prints when the gallery is of another model.
        if let Err(e) = Gallery::load_for(dir.path(), &model()) {
            prop_assert!(e.to_string().contains("gallery.swg"), "{}", e);
        }
        let mut g = match Gallery::load(dir.path()) {
            Ok(g) => g,
            Err(e) => {
                prop_assert!(e.to_string().contains("gallery.swg"), "{}", e);
                return Ok(());
            }
        };
        // A query as the embedder makes it: the model's length (capped: a header may
        // claim any size), unit length.
        let d = g.model().dimensions.clamp(1, 1024);
        let mut query: Vec<f32> = (0..d).map(|i| (i % 3) as f32).collect();
        crate::vision::embed::normalise(&mut query);
        let a = answer(&g, &query, 3, 0.5);
        prop_assert!(a.matches.len() <= 3);
        let skus = g.skus();
        if let Some(first) = skus.first() {
            prop_assert!(g.similarity_to(&query, &first.sku).is_some());
        }
        let before = g.len();
        let sku = skus.first().map_or("A".to_owned(), |s| s.sku.clone());
        let removed = g.remove(&sku, None);
        prop_assert_eq!(g.len() + removed, before);
        Ok(())
    }

    proptest! {
        #![proptest_config(fuzz_config(5_000))]

        #[test]
        fn any_bytes_as_a_gallery_file_give_a_gallery_or_an_error_naming_the_file_never_a_panic(
            bytes in prop_oneof![
                any_bytes(512),
                // Past the magic and the version, into the length and checksum checks.
                any_bytes(512).prop_map(|b| [b"SWGALLRY\x01\0\0\0".as_slice(), &b].concat()),
            ],
        ) {
            check(&bytes)?;
        }

        #[test]
        fn a_mutated_real_gallery_gives_a_gallery_or_an_error_naming_the_file_never_a_panic(
            bytes in mutated(vec![real_gallery()], DICTIONARY, 4),
        ) {
            check(&bytes)?;
        }

        #[test]
        fn a_gallery_mutated_under_a_valid_checksum_loads_and_answers_or_is_refused_never_a_panic(
            bytes in prop_oneof![mutated_under_checksum(), any_header()],
        ) {
            check(&bytes)?;
        }
    }
}

/// Images (files, MJPEG frames, scanner uploads): arbitrary bytes, and mutations of
/// small images encoded here in every colour layout the decoders have paths for, plus
/// the real photos of tests/fixtures/.
pub(crate) mod images {
    use super::*;
    use crate::capture::decode_image;
    use image::{DynamicImage, ImageFormat};

    /// Markers and values the JPEG, PNG and BMP parsers branch on.
    pub(crate) const DICTIONARY: &[&[u8]] = &[
        b"\xff\xd8",
        b"\xff\xd9",
        b"\xff\xc0",
        b"\xff\xc2",
        b"\xff\xc4",
        b"\xff\xda",
        b"\xff\xdb",
        b"\xff\xdd\x00\x04\x00\x00",
        b"\xff\xe0",
        b"\xff\xee",
        b"\xff\x00",
        b"\xff\xff",
        b"\x89PNG\r\n\x1a\n",
        b"IHDR",
        b"IDAT",
        b"IEND",
        b"PLTE",
        b"tRNS",
        b"acTL",
        b"fcTL",
        b"BM",
        b"\x00\x00\x00\x00",
        b"\xff\xff\xff\xff",
        b"\x00\x00\x01\x00",
        b"\xff\xff\x00\x00",
    ];

    /// Small images in the layouts the decoders distinguish (grey, grey+alpha, RGB,
    /// RGBA, 16-bit), encoded as PNG, JPEG and BMP by the image crate.
    fn encoded() -> Vec<Vec<u8>> {
        let rgb = image::RgbImage::from_fn(13, 7, |x, y| {
            image::Rgb([(x * 19) as u8, (y * 37) as u8, (x * y) as u8])
        });
        let base = DynamicImage::ImageRgb8(rgb);
        let mut out = Vec::new();
        let encode = |img: &DynamicImage, format: ImageFormat| {
            let mut buf = std::io::Cursor::new(Vec::new());
            img.write_to(&mut buf, format).expect("encode a seed image");
            buf.into_inner()
        };
        for img in [
            base.clone(),
            DynamicImage::ImageLuma8(base.to_luma8()),
            DynamicImage::ImageLumaA8(base.to_luma_alpha8()),
            DynamicImage::ImageRgba8(base.to_rgba8()),
            DynamicImage::ImageRgb16(base.to_rgb16()),
            DynamicImage::ImageLuma16(base.to_luma16()),
        ] {
            out.push(encode(&img, ImageFormat::Png));
        }
        for img in [base.clone(), DynamicImage::ImageLuma8(base.to_luma8())] {
            out.push(encode(&img, ImageFormat::Jpeg));
        }
        out.push(encode(
            &DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
                64,
                48,
                image::Rgb([10, 200, 30]),
            )),
            ImageFormat::Jpeg,
        ));
        for img in [base.clone(), DynamicImage::ImageRgba8(base.to_rgba8())] {
            out.push(encode(&img, ImageFormat::Bmp));
        }
        out
    }

    /// Seeds: the encoded images and the smaller real photos (the big PNGs would only
    /// slow every case down; their decoder paths are those of `encoded`).
    pub(crate) fn seeds() -> Vec<Vec<u8>> {
        let mut seeds = encoded();
        for f in [
            "tests/fixtures/photos/rocket.jpg",
            "tests/fixtures/products/gold_fish.jpg",
            "tests/fixtures/bad/truncated.jpg",
            "tests/fixtures/bad/not-an-image.png",
        ] {
            seeds.push(read_tree_file(f));
        }
        seeds
    }

    /// Mutates inside a PNG's chunks and writes their CRCs again, so the decoder gets
    /// past its checksums; other images pass through.
    fn png_chunk_mutation(mut png: Vec<u8>, chunk: Index, e: &[Edit]) -> Vec<u8> {
        if !png.starts_with(b"\x89PNG\r\n\x1a\n") {
            return png;
        }
        let mut chunks = Vec::new();
        let mut at = 8;
        while at + 12 <= png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes")) as usize;
            if at + 12 + len > png.len() {
                break;
            }
            chunks.push((at, len));
            at += 12 + len;
        }
        if chunks.is_empty() {
            return png;
        }
        let (start, len) = chunks[chunk.index(chunks.len())];
        // Type and data, without the length; the CRC covers both.
        let mut body = png[start + 4..start + 8 + len].to_vec();
        let kind = body[..4].to_vec();
        let mut data = body.split_off(4);
        apply(&mut data, e, DICTIONARY);
        let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
        chunk.extend(&kind);
        chunk.extend(&data);
        chunk.extend(crc32(&[kind.as_slice(), &data].concat()).to_be_bytes());
        png.splice(start..start + 12 + len, chunk);
        png
    }

    /// Mutates a JPEG between its start and end markers, so it passes the completeness
    /// check and the edits reach the decoder.
    fn jpeg_inner_mutation(mut jpeg: Vec<u8>, e: &[Edit]) -> Vec<u8> {
        if !(jpeg.starts_with(b"\xff\xd8") && jpeg.ends_with(b"\xff\xd9")) {
            return jpeg;
        }
        let mut inner = jpeg[2..jpeg.len() - 2].to_vec();
        apply(&mut inner, e, DICTIONARY);
        jpeg.truncate(2);
        jpeg.extend(inner);
        jpeg.extend(b"\xff\xd9");
        jpeg
    }

    /// The CRC-32 of PNG chunks (ISO 3309), bit by bit: seeds are small.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// Mutated images: plain byte edits, edits inside PNG chunks with valid CRCs, and
    /// edits inside JPEGs that keep their markers.
    pub(crate) fn mutated_images() -> impl Strategy<Value = Vec<u8>> {
        let seeds = seeds();
        let n = seeds.len();
        prop_oneof![
            mutated(seeds.clone(), DICTIONARY, 8),
            (0..n, any::<Index>(), edits(6)).prop_map({
                let seeds = seeds.clone();
                move |(s, chunk, e)| png_chunk_mutation(seeds[s].clone(), chunk, &e)
            }),
            (0..n, edits(6)).prop_map(move |(s, e)| jpeg_inner_mutation(seeds[s].clone(), &e)),
        ]
    }

    /// Bombs included: the decode limits refuse them from the header (issue #19).
    fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
        if let Ok(img) = decode_image(bytes) {
            prop_assert_eq!(
                img.as_raw().len() as u64,
                u64::from(img.width()) * u64::from(img.height()) * 3
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(fuzz_config(10_000))]

        #[test]
        fn any_bytes_as_an_image_decode_or_give_an_error_never_a_panic(
            bytes in prop_oneof![
                any_bytes(1024),
                // Past format detection: a known signature, then anything.
                (0usize..3, any_bytes(1024)).prop_map(|(k, b)| {
                    let sig: &[u8] = [b"\x89PNG\r\n\x1a\n".as_slice(), b"\xff\xd8\xff", b"BM"][k];
                    let mut v = [sig, &b].concat();
                    if k == 1 {
                        v.extend(b"\xff\xd9");
                    }
                    v
                }),
            ],
        ) {
            check(&bytes)?;
        }

        #[test]
        fn mutated_png_jpeg_and_bmp_images_decode_or_give_an_error_never_a_panic(
            bytes in mutated_images(),
        ) {
            check(&bytes)?;
        }
    }
}

/// The camera converters: any pixel format, size, stride and buffer length.
mod convert {
    use super::*;
    use crate::capture::convert::{to_rgb, ConvertError, RawLayout, YuvEncoding};
    use crate::capture::DecodeLimits;
    use crate::capture::PixelFormat;
    use image::RgbImage;

    /// Sizes drivers report, and sizes chosen so that `stride * height` or
    /// `width * bytes per pixel * height` wrap around in 32 or 64 bits.
    fn side() -> impl Strategy<Value = u32> {
        prop_oneof![
            // Even sizes most often: 4:2:x chroma comes in pairs of pixels.
            4 => (0u32..=20).prop_map(|x| 2 * x),
            2 => 0u32..=40,
            1 => prop::sample::select(vec![
                63u32, 64, 65, 640, 1280, 4095, 4096, 32768, 65535, 65536,
                0x7fff_ffff, 0x8000_0000, 0x8000_8000, 0xffff_0001, u32::MAX / 3,
                u32::MAX - 1, u32::MAX,
            ]),
            1 => any::<u32>(),
        ]
    }

    /// Bytes per line: 0, around the packed line, padded, or anything.
    fn stride(width: u32, format: PixelFormat) -> impl Strategy<Value = u32> {
        let bpp = match format {
            PixelFormat::Yuyv | PixelFormat::Uyvy => 2,
            PixelFormat::Rgb3 | PixelFormat::Bgr3 => 3,
            _ => 1,
        };
        let line = width.saturating_mul(bpp);
        prop_oneof![
            4 => (0u32..=64).prop_map(move |pad| line.saturating_add(pad)),
            1 => (0u32..=8).prop_map(move |less| line.saturating_sub(less)),
            1 => Just(0u32),
            1 => any::<u32>(),
        ]
    }

    /// A layout and a buffer: the size the layout needs give or take a few bytes when it
    /// is small enough to allocate, else a short buffer.
    fn frame() -> impl Strategy<Value = (RawLayout, Vec<u8>)> {
        let formats: Vec<PixelFormat> = PixelFormat::ALL
            .into_iter()
            .filter(|f| *f != PixelFormat::Mjpg)
            .collect();
        (prop::sample::select(formats), side(), side())
            .prop_flat_map(|(format, width, height)| {
                (
                    Just(format),
                    Just(width),
                    Just(height),
                    stride(width, format),
                    any::<(bool, bool)>(),
                    prop_oneof![3 => 0isize..=16, 1 => -16isize..0],
                    any::<u8>(),
                )
            })
            .prop_map(
                |(format, width, height, stride, (full_range, bt709), slack, fill)| {
                    let need = format.min_size(width, height, stride).unwrap_or(0);
                    let len = if need <= 1 << 20 {
                        need.saturating_add_signed(slack)
                    } else {
                        slack.unsigned_abs() * 64
                    };
                    let layout = RawLayout {
                        format,
                        width,
                        height,
                        stride,
                        encoding: YuvEncoding { full_range, bt709 },
                        limits: DecodeLimits::default(),
                    };
                    let data = (0..len).map(|i| fill.wrapping_add((i * 7) as u8)).collect();
                    (layout, data)
                },
            )
    }

    fn check(layout: &RawLayout, data: &[u8], out: &mut RgbImage) -> Result<(), TestCaseError> {
        let guarded = Guarded::new(data);
        match to_rgb(layout, guarded.bytes(), out) {
            Ok(()) if layout.format != PixelFormat::Mjpg => {
                prop_assert_eq!(out.dimensions(), (layout.width, layout.height))
            }
            Ok(()) | Err(_) => {}
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(fuzz_config(30_000))]

        #[test]
        fn raw_frames_of_any_size_stride_and_length_convert_or_give_an_error_never_read_out_of_bounds(
            (layout, data) in frame(),
            reuse in any::<bool>(),
        ) {
            // The capture thread reuses one output image; a fresh one is resized.
            let mut out = if reuse && u64::from(layout.width) * u64::from(layout.height) < 1 << 20 {
                RgbImage::new(layout.width, layout.height)
            } else {
                RgbImage::new(1, 1)
            };
            check(&layout, &data, &mut out)?;
        }
    }

    proptest! {
        #![proptest_config(fuzz_config(10_000))]

        #[test]
        fn mutated_mjpeg_frames_convert_or_give_an_error_never_a_panic(
            bytes in super::images::mutated_images(),
            (width, height) in (side(), side()),
        ) {
            let layout = RawLayout {
                format: PixelFormat::Mjpg,
                width,
                height,
                stride: 0,
                encoding: YuvEncoding::default(),
                limits: DecodeLimits::default(),
            };
            let mut out = RgbImage::new(1, 1);
            let guarded = Guarded::new(&bytes);
            if let Err(e) = to_rgb(&layout, guarded.bytes(), &mut out) {
                prop_assert!(matches!(e, ConvertError::Jpeg(_)), "{}", e);
            }
        }
    }
}
