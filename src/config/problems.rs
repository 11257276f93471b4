//! The collector of validation problems: every section reports what is wrong with it
//! under its key path, through one helper per kind of check, so each kind of check reads
//! the same whichever section it is about.

use std::fmt::Display;

/// The longest duration a config key may give: a year, in seconds.
pub const MAX_SECONDS: f64 = 366.0 * 86_400.0;

/// (key path, message) of every problem found so far, in the order found.
#[derive(Debug, Default)]
pub struct Problems(Vec<(String, String)>);

impl Problems {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<(String, String)> {
        self.0
    }

    /// A problem of its own kind, worded by the caller.
    pub fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push((key.into(), message.into()));
    }

    /// A share or a score: in (0, 1].
    pub fn unit(&mut self, key: impl Into<String>, v: f32) {
        if !(v > 0.0 && v <= 1.0) {
            self.push(key, format!("must be in (0, 1], got {v}"));
        }
    }

    /// A real number in (0, `hi`].
    pub fn up_to(&mut self, key: impl Into<String>, v: f64, hi: f64) {
        if !(v > 0.0 && v <= hi) {
            self.push(key, format!("must be in (0, {hi}], got {v}"));
        }
    }

    /// A real number above 0 (NaN is not).
    pub fn positive(&mut self, key: impl Into<String>, v: f64) {
        if v.is_nan() || v <= 0.0 {
            self.push(key, format!("must be positive, got {v}"));
        }
    }

    /// A real number of 0 or more (NaN is not).
    pub fn non_negative(&mut self, key: impl Into<String>, v: f64) {
        if v.is_nan() || v < 0.0 {
            self.push(key, format!("must be 0 or more, got {v}"));
        }
    }

    /// A duration in seconds, above 0 (or 0 and more with `zero_allowed`) and at most a
    /// year: `Duration::from_secs_f64` panics on infinity and on values past u64 seconds,
    /// and no timer here means anything longer.
    pub fn seconds(&mut self, key: impl Into<String>, v: f64, zero_allowed: bool) {
        let low_ok = if zero_allowed { v >= 0.0 } else { v > 0.0 };
        if !(low_ok && v <= MAX_SECONDS) {
            let low = if zero_allowed { "[0" } else { "(0" };
            self.push(
                key,
                format!("must be in {low}, {MAX_SECONDS}] seconds (a year), got {v}"),
            );
        }
    }

    /// A real number that is not infinite or NaN; true if it is one.
    pub fn finite(&mut self, key: impl Into<String>, v: f64) -> bool {
        if !v.is_finite() {
            self.push(key, format!("must be a finite number, got {v}"));
        }
        v.is_finite()
    }

    /// An integer of at least `min`; `why` (may be empty) says where the bound comes from.
    pub fn at_least<T: PartialOrd + Display>(
        &mut self,
        key: impl Into<String>,
        v: T,
        min: T,
        why: &str,
    ) {
        if v < min {
            self.push(
                key,
                format!("must be at least {min}{}, got {v}", because(why)),
            );
        }
    }

    /// An integer in `lo..=hi`; `why` (may be empty) says where the bounds come from.
    pub fn between<T: PartialOrd + Display>(
        &mut self,
        key: impl Into<String>,
        v: T,
        lo: T,
        hi: T,
        why: &str,
    ) {
        if v < lo || v > hi {
            self.push(
                key,
                format!("must be between {lo} and {hi}{}, got {v}", because(why)),
            );
        }
    }

    /// A name that ends up in topics and file names (see [`check_name`]); true if it is
    /// one.
    pub fn name(&mut self, key: impl Into<String>, name: &str) -> bool {
        match check_name(name) {
            Ok(()) => true,
            Err(m) => {
                self.push(key, m);
                false
            }
        }
    }
}

fn because(why: &str) -> String {
    if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    }
}

/// Names that end up in topics and file names: non-empty, letters, digits, `-`, `_`.
/// (No `/`, `+`, `#` or spaces: an MQTT topic built from them stays well-formed.)
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 64 {
        return Err(format!("{name:?} is longer than 64 characters"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "{name:?} contains {bad:?}; use letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(check: impl FnOnce(&mut Problems)) -> Vec<String> {
        let mut p = Problems::new();
        check(&mut p);
        p.into_vec().into_iter().map(|(_, m)| m).collect()
    }

    #[test]
    fn every_kind_of_check_names_the_value_it_refused() {
        assert_eq!(
            messages(|p| p.unit("k", 1.5)),
            ["must be in (0, 1], got 1.5"]
        );
        assert_eq!(
            messages(|p| p.up_to("k", 0.0, 1000.0)),
            ["must be in (0, 1000], got 0"]
        );
        assert_eq!(
            messages(|p| p.positive("k", -1.0)),
            ["must be positive, got -1"]
        );
        assert_eq!(
            messages(|p| p.non_negative("k", f64::NAN)),
            ["must be 0 or more, got NaN"]
        );
        assert_eq!(
            messages(|p| p.seconds("k", f64::INFINITY, true)),
            ["must be in [0, 31622400] seconds (a year), got inf"]
        );
        assert_eq!(
            messages(|p| p.seconds("k", 0.0, false)),
            ["must be in (0, 31622400] seconds (a year), got 0"]
        );
        assert!(messages(|p| p.seconds("k", 0.0, true)).is_empty());
        assert_eq!(
            messages(|p| p.at_least("k", 0, 1, "")),
            ["must be at least 1, got 0"]
        );
        assert_eq!(
            messages(|p| p.between("k", 1, 2, 32, "why")),
            ["must be between 2 and 32 (why), got 1"]
        );
    }

    #[test]
    fn values_inside_their_bounds_are_no_problem() {
        let mut p = Problems::new();
        p.unit("k", 1.0);
        p.up_to("k", 1000.0, 1000.0);
        p.positive("k", f64::MIN_POSITIVE);
        p.non_negative("k", 0.0);
        p.at_least("k", 1, 1, "");
        p.between("k", 32, 2, 32, "");
        assert!(p.name("k", "shelf_1-a"));
        assert!(p.is_empty(), "{p:?}");
    }
}
