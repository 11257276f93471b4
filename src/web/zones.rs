//! The zone editor's write: one camera's zones replaced in the config text, everything
//! else (comments, order, other cameras, the zones' own extra keys) left as it was.

use serde::{Deserialize, Serialize};
use toml_edit::{value, Array, ArrayOfTables, DocumentMut, Item, Table};

/// A zone as the editor sends it: normalised coordinates (0..1 of the frame).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ZoneEdit {
    pub name: String,
    pub polygon: Vec<[f32; 2]>,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub min: Option<u32>,
    #[serde(default)]
    pub max: Option<u32>,
}

/// Why the text could not be edited (before any validation of the result).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EditError {
    #[error("the config file does not parse: {0}")]
    Parse(String),
    #[error("no [[cameras]] entry with id = {0:?} in the config file")]
    NoCamera(String),
    #[error("cameras is not an array of tables in the config file")]
    Layout,
}

/// Four decimals: a tenth of a pixel on a 1920-pixel frame, and a readable file.
fn coordinate(v: f32) -> f64 {
    (f64::from(v) * 1e4).round() / 1e4
}

/// `text` with the zones of `camera` replaced by `zones`. A zone whose name was there
/// before keeps its table (comments and keys the editor does not know: membership,
/// overlap-fraction); its polygon is written in normalised coordinates.
pub fn rewrite(text: &str, camera: &str, zones: &[ZoneEdit]) -> Result<String, EditError> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| EditError::Parse(e.message().to_owned()))?;
    let cameras = doc
        .get_mut("cameras")
        .ok_or_else(|| EditError::NoCamera(camera.to_owned()))?
        .as_array_of_tables_mut()
        .ok_or(EditError::Layout)?;
    let table = cameras
        .iter_mut()
        .find(|t| t.get("id").and_then(Item::as_str) == Some(camera))
        .ok_or_else(|| EditError::NoCamera(camera.to_owned()))?;
    let mut old = existing_zones(table);
    let mut aot = ArrayOfTables::new();
    for z in zones {
        let mut t = old
            .iter()
            .position(|(name, _)| *name == z.name)
            .map(|i| old.remove(i).1)
            .unwrap_or_default();
        fill(&mut t, z);
        aot.push(t);
    }
    if aot.is_empty() {
        table.remove("zones");
    } else {
        table.insert("zones", Item::ArrayOfTables(aot));
    }
    Ok(doc.to_string())
}

/// The camera's zone tables by name, whichever way the file wrote them
/// (`[[cameras.zones]]` or an inline array).
fn existing_zones(camera: &mut Table) -> Vec<(String, Table)> {
    let Some(item) = camera.remove("zones") else {
        return Vec::new();
    };
    let tables: Vec<Table> = match item {
        Item::ArrayOfTables(a) => a.into_iter().collect(),
        Item::Value(toml_edit::Value::Array(a)) => a
            .into_iter()
            .filter_map(|v| match v {
                toml_edit::Value::InlineTable(t) => Some(t.into_table()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    tables
        .into_iter()
        .map(|t| {
            let name = t
                .get("name")
                .and_then(Item::as_str)
                .unwrap_or("")
                .to_owned();
            (name, t)
        })
        .collect()
}

fn fill(t: &mut Table, z: &ZoneEdit) {
    t.set_implicit(false);
    t.insert("name", value(z.name.as_str()));
    let mut polygon = Array::new();
    for p in &z.polygon {
        let mut point = Array::new();
        point.push(coordinate(p[0]));
        point.push(coordinate(p[1]));
        polygon.push(point);
    }
    t.insert("polygon", value(polygon));
    t.remove("coordinates");
    if z.labels.is_empty() {
        t.remove("labels");
    } else {
        t.insert(
            "labels",
            value(z.labels.iter().map(String::as_str).collect::<Array>()),
        );
    }
    for (key, v) in [("min", z.min), ("max", z.max)] {
        match v {
            Some(n) => {
                t.insert(key, value(i64::from(n)));
            }
            None => {
                t.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# The shop floor.
[device]
id = "aisle-3"   # kept

[[cameras]]
id = "left"
source = { kind = "files", path = "frames" }

# The top shelf: facings of one product.
[[cameras.zones]]
name = "top"
polygon = [[0.0, 0.0], [1.0, 0.0], [1.0, 0.5]]
membership = "centre"   # a comment the editor must keep
min = 2

[[cameras.zones]]
name = "bottom"
polygon = [[0, 200], [640, 200], [640, 480]]
coordinates = "pixels"

[[cameras]]
id = "right"
source = { kind = "files", path = "other" }
zones = [{ name = "only", polygon = [[0.1, 0.1], [0.9, 0.1], [0.9, 0.9]] }]

[[sinks]]
kind = "stdout"
"#;

    fn zone(name: &str, polygon: &[[f32; 2]]) -> ZoneEdit {
        ZoneEdit {
            name: name.into(),
            polygon: polygon.to_vec(),
            labels: Vec::new(),
            min: None,
            max: None,
        }
    }

    fn cameras(text: &str) -> Vec<crate::config::CameraConfig> {
        #[derive(serde::Deserialize)]
        struct Only {
            cameras: Vec<crate::config::CameraConfig>,
        }
        let v: toml::Value = toml::from_str(text).unwrap();
        let only = Only {
            cameras: v["cameras"].clone().try_into().unwrap(),
        };
        only.cameras
    }

    #[test]
    fn an_edited_zone_keeps_its_comments_and_unknown_keys_and_others_are_untouched() {
        let mut top = zone("top", &[[0.0, 0.0], [1.0, 0.0], [1.0, 0.4], [0.0, 0.4]]);
        top.min = Some(3);
        top.labels = vec!["SKU-1".into()];
        let bottom = zone("bottom", &[[0.0, 0.5], [1.0, 0.5], [1.0, 1.0]]);
        let out = rewrite(TEXT, "left", &[top, bottom]).unwrap();
        assert!(out.starts_with("# The shop floor.\n[device]\nid = \"aisle-3\"   # kept\n"));
        assert!(
            out.contains(
                "# The top shelf: facings of one product.\n[[cameras.zones]]\nname = \"top\""
            ),
            "{out}"
        );
        assert!(out.contains("membership = \"centre\"   # a comment the editor must keep"));
        assert!(
            out.contains("zones = [{ name = \"only\""),
            "the other camera is untouched: {out}"
        );
        let cams = cameras(&out);
        let left = &cams[0];
        assert_eq!(left.zones.len(), 2);
        assert_eq!(left.zones[0].polygon[2], [1.0, 0.4]);
        assert_eq!(left.zones[0].min, Some(3));
        assert_eq!(left.zones[0].labels, ["SKU-1"]);
        assert_eq!(
            left.zones[1].coordinates,
            crate::config::Coordinates::Normalised,
            "the editor writes normalised coordinates"
        );
        assert_eq!(cams[1].zones[0].name, "only");
    }

    #[test]
    fn a_new_zone_is_added_and_a_missing_one_removed() {
        let drawn = zone("drawn", &[[0.1, 0.2], [0.3333333, 0.2], [0.3, 0.6]]);
        let out = rewrite(TEXT, "left", &[drawn]).unwrap();
        let cams = cameras(&out);
        assert_eq!(cams[0].zones.len(), 1);
        assert_eq!(cams[0].zones[0].name, "drawn");
        assert_eq!(
            cams[0].zones[0].polygon[1],
            [0.3333, 0.2],
            "rounded to 4 decimals"
        );
        assert!(!out.contains("name = \"top\""));
        assert_eq!(cams.len(), 2);
    }

    #[test]
    fn an_inline_zone_array_is_edited_too() {
        let out = rewrite(
            TEXT,
            "right",
            &[zone("only", &[[0.0, 0.0], [0.5, 0.0], [0.5, 0.5]])],
        )
        .unwrap();
        let cams = cameras(&out);
        assert_eq!(cams[1].zones[0].polygon[1], [0.5, 0.0]);
        assert_eq!(cams[0].zones.len(), 2, "the left camera is untouched");
    }

    #[test]
    fn no_zones_left_removes_the_key() {
        let out = rewrite(TEXT, "left", &[]).unwrap();
        assert!(cameras(&out)[0].zones.is_empty());
    }

    #[test]
    fn an_unknown_camera_is_named() {
        assert_eq!(
            rewrite(TEXT, "middle", &[]),
            Err(EditError::NoCamera("middle".into()))
        );
    }
}
