//! The man page of the config file, `shelfwatch.toml(5)`, must name every key the
//! config accepts. The keys are asked of the config types themselves, through serde, so
//! a key added to any section (in this module or with its settings type elsewhere)
//! fails this test until the man page describes it.

use super::Config;

/// A key the probe puts into a table: no section has it, so serde names the ones it has.
const PROBE: &str = "zz-probe";

/// A step of a key path: a key, whether its value is an array of tables, and the
/// `kind` that selects the variant of an internally tagged table.
#[derive(Clone)]
struct Step {
    key: String,
    array: bool,
    kind: Option<String>,
}

/// What serde says of a table at `path` that holds only [`PROBE`] (and its `kind`).
fn probe(path: &[Step]) -> Option<String> {
    let mut value = toml::Value::Table(toml::map::Map::from_iter([(
        PROBE.to_owned(),
        toml::Value::Integer(0),
    )]));
    for step in path.iter().rev() {
        if let (Some(kind), toml::Value::Table(t)) = (&step.kind, &mut value) {
            t.insert("kind".into(), toml::Value::String(kind.clone()));
        }
        if step.array {
            value = toml::Value::Array(vec![value]);
        }
        value = toml::Value::Table(toml::map::Map::from_iter([(step.key.clone(), value)]));
    }
    let text = toml::to_string(&value).expect("a table of tables serialises");
    toml::from_str::<Config>(&text)
        .err()
        .map(|e| e.message().to_owned())
}

/// The names serde lists after "expected" in an unknown-field or unknown-variant error.
fn expected(message: &str) -> Vec<String> {
    let Some((_, list)) = message.split_once(", expected ") else {
        return Vec::new();
    };
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The keys of the table at `path` as dotted paths, with those of the tables below them.
fn walk(path: &[Step], keys: &mut Vec<String>) {
    let Some(message) = probe(path) else {
        return;
    };
    if message == "missing field `kind`" {
        let last = path.len() - 1;
        let mut tagged = path.to_vec();
        tagged[last].kind = Some(PROBE.into());
        let variants = probe(&tagged).map(|m| expected(&m)).unwrap_or_default();
        assert!(!variants.is_empty(), "no variants of {}", dotted(path));
        keys.push(format!("{}.kind", dotted(path)));
        for variant in variants {
            tagged[last].kind = Some(variant);
            walk(&tagged, keys);
        }
        return;
    }
    if !message.starts_with(&format!("unknown field `{PROBE}`")) {
        return;
    }
    for key in expected(&message) {
        let mut below = path.to_vec();
        below.push(Step {
            key,
            array: false,
            kind: None,
        });
        keys.push(dotted(&below));
        if probe(&below).is_some_and(|m| m.contains("expected a sequence")) {
            let last = below.len() - 1;
            below[last].array = true;
        }
        walk(&below, keys);
    }
}

fn dotted(path: &[Step]) -> String {
    path.iter()
        .map(|s| s.key.as_str())
        .collect::<Vec<_>>()
        .join(".")
}

/// Every key path of the config file, sub-tables' keys included, each once.
fn key_paths() -> Vec<String> {
    let mut keys = Vec::new();
    walk(&[], &mut keys);
    keys.sort();
    keys.dedup();
    keys
}

/// The man page's sections (`.SH`), each with its heading and its macro lines (`.TP`,
/// `.BR key ...`, `.SS`, ...), where keys are set in bold; roff's escapes of `-` and `"`
/// undone. A key that only the prose mentions is not described.
fn man_sections() -> Vec<(String, String)> {
    let page =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/man/shelfwatch.toml.5");
    let text = std::fs::read_to_string(&page)
        .expect("the man page")
        .replace("\\-", "-")
        .replace("\\(dq", "\"");
    let mut sections = Vec::new();
    for part in text.split("\n.SH ").skip(1) {
        let (heading, body) = part.split_once('\n').unwrap_or((part, ""));
        let macros: Vec<&str> = body.lines().filter(|l| l.starts_with('.')).collect();
        sections.push((heading.trim_matches('"').to_owned(), macros.join("\n")));
    }
    sections
}

/// `word` as a whole key name in `text`, not as a part of a longer one.
fn names(text: &str, word: &str) -> bool {
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices(word).any(|(i, _)| {
        !text[..i].chars().next_back().is_some_and(is_key_char)
            && !text[i + word.len()..]
                .chars()
                .next()
                .is_some_and(is_key_char)
    })
}

#[test]
fn the_key_walk_finds_keys_of_every_depth_and_variant() {
    let keys = key_paths();
    for key in [
        "device.id",
        "model.rescale-interval-s",
        "model.label-thresholds",
        "cameras.source.kind",
        "cameras.source.frame-timeout-ms",
        "cameras.source.every-frame",
        "cameras.zones.overlap-fraction",
        "sinks.skip-health",
        "sinks.embedded-listen",
        "sinks.tls.client-key",
        "sinks.home-assistant.discovery-prefix",
        "decode.max-side",
        "identify.request-burst",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
    }
}

#[test]
fn the_man_page_names_every_config_key_in_its_section() {
    let sections = man_sections();
    let mut missing = Vec::new();
    for key in key_paths() {
        let (top, leaf) = match key.split_once('.') {
            Some((top, _)) => (top, key.rsplit('.').next().unwrap_or(&key)),
            None => (key.as_str(), key.as_str()),
        };
        let section = sections.iter().find(|(heading, _)| {
            heading == &format!("[{top}]") || heading == &format!("[[{top}]]")
        });
        match section {
            Some((_, body)) if key == top || names(body, leaf) => {}
            _ => missing.push(key),
        }
    }
    assert!(
        missing.is_empty(),
        "packaging/man/shelfwatch.toml.5 does not describe {missing:?}"
    );
}
