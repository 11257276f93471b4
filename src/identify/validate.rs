//! The checks of `[identify]` for the config's validation: bounds of the tracking and
//! request budgets, the reply topics, and an embedding model and gallery that belong
//! together.

use super::requests::{MAX_REPLY_TOPIC_BYTES, MAX_TOP_K};
use super::{Gallery, GalleryError, IdentifyConfig};
use crate::config::{LoadedConfig, Problems};
use crate::vision::embed::ModelId;
use crate::vision::Manifest;

impl IdentifyConfig {
    /// `loaded` locates the embedding model and the gallery.
    pub(crate) fn validate(&self, key: &str, loaded: &LoadedConfig, problems: &mut Problems) {
        problems.unit(format!("{key}.unknown-threshold"), self.unknown_threshold);
        problems.unit(format!("{key}.mismatch-threshold"), self.mismatch_threshold);
        problems.unit(format!("{key}.reuse-iou"), self.reuse_iou);
        problems.between(format!("{key}.top-k"), self.top_k, 1, MAX_TOP_K, "");
        let rate = format!("{key}.requests-per-s");
        if problems.finite(&*rate, self.requests_per_s) {
            problems.positive(rate, self.requests_per_s);
        }
        problems.at_least(format!("{key}.request-burst"), self.request_burst, 1, "");
        problems.at_least(
            format!("{key}.max-request-pixels"),
            self.max_request_pixels,
            64 * 64,
            "64 x 64",
        );
        for (n, f) in self.reply_topics.iter().enumerate() {
            if let Err(m) = check_topic_filter(f) {
                problems.push(format!("{key}.reply-topics[{n}]"), m);
            }
        }
        problems.at_least(
            format!("{key}.max-embeddings-per-frame"),
            self.max_embeddings_per_frame,
            1,
            "",
        );
        let refresh = format!("{key}.refresh-s");
        if problems.finite(&*refresh, self.refresh_s) {
            problems.non_negative(refresh, self.refresh_s);
        }
        // The MQTT client takes packets up to 16 MiB; a base64 envelope is 4/3 larger.
        problems.between(
            format!("{key}.max-request-bytes"),
            self.max_request_bytes,
            1024,
            12 << 20,
            "",
        );
        let model = loaded.model_file(&self.model);
        let manifest = match Manifest::load(&model) {
            Ok(m) => m,
            Err(e) => return problems.push(format!("{key}.model"), e.to_string()),
        };
        let Some(id) = ModelId::of(&manifest) else {
            return problems.push(
                format!("{key}.model"),
                format!("{}: a detector, not an embedding model", model.display()),
            );
        };
        // A gallery that does not exist yet is fine (enrol, then SIGHUP); one that
        // cannot be read or belongs to another model is not.
        let gallery = loaded.resolve(&self.gallery);
        match Gallery::load(&gallery) {
            Ok(g) if g.model() != &id => problems.push(
                format!("{key}.gallery"),
                GalleryError::ModelMismatch {
                    path: Gallery::path(&gallery),
                    gallery: Box::new(g.model().clone()),
                    model: Box::new(id),
                }
                .to_string(),
            ),
            Ok(_) | Err(GalleryError::Missing { .. }) => {}
            Err(e) => problems.push(format!("{key}.gallery"), e.to_string()),
        }
    }
}

/// An MQTT topic filter a request may reply on: valid syntax, not a `$` topic.
fn check_topic_filter(f: &str) -> Result<(), String> {
    let max = MAX_REPLY_TOPIC_BYTES;
    if f.is_empty() || f.len() > max || f.contains('\0') {
        return Err(format!("must be a topic filter of 1 to {max} bytes"));
    }
    if f.starts_with('$') || f.starts_with('+') || f.starts_with('#') {
        return Err(format!(
            "{f:?} would match broker ($) topics or every topic; name a first level"
        ));
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (n, level) in levels.iter().enumerate() {
        let wild = level.contains(['+', '#']);
        if wild && *level != "+" && *level != "#" || *level == "#" && n + 1 != levels.len() {
            return Err(format!(
                "{f:?}: + and # stand for whole levels, and # only at the end"
            ));
        }
    }
    Ok(())
}
