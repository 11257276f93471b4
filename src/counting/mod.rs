//! Counting: detections per frame -> stable per-zone, per-label counts and stock events.
//!
//! A zone's count for a label changes only when a new value holds by consensus over a
//! window of frames (and optionally seconds); while an occluder (a person, a cart) overlaps
//! the zone, its counts are held rather than dropped. Each event fires once per
//! transition.

pub mod zone;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use zone::{Membership, Polygon};

use crate::vision::Detection;

/// Consensus and stock-timing parameters shared by the zones of a camera.
#[derive(Debug, Clone, PartialEq)]
pub struct CountingParams {
    /// Observations (frames) in the consensus window.
    pub window_frames: usize,
    /// Fraction of a full window that must agree on a new value.
    pub min_agreement: f32,
    /// Observations older than this leave the window, if set.
    pub window: Option<Duration>,
    /// A zone empty for this long is out of stock.
    pub out_of_stock_after: Duration,
    /// Labels that occlude a zone instead of being counted in it.
    pub occluders: BTreeSet<String>,
}

impl CountingParams {
    /// Agreeing observations needed to change a count.
    pub fn needed(&self) -> usize {
        ((self.min_agreement * self.window_frames as f32).ceil() as usize)
            .clamp(1, self.window_frames)
    }
}

/// A zone as counting sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneSpec {
    pub name: String,
    pub polygon: Polygon,
    pub membership: Membership,
    pub overlap_fraction: f32,
    /// Planogram: labels (or SKUs) expected here; empty means anything may stand here.
    pub expected: Vec<String>,
    pub min: Option<u32>,
    pub max: Option<u32>,
}

/// Stock level of a zone, from its stable counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StockStatus {
    Ok,
    Low,
    OutOfStock,
}

/// Something subscribers should hear about once.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    CountChanged {
        label: String,
        from: u32,
        to: u32,
    },
    LowStock {
        total: u32,
        min: u32,
    },
    OutOfStock {
        /// Seconds the zone has been empty.
        empty_for_s: f64,
    },
    Restocked {
        total: u32,
    },
    OverStock {
        total: u32,
        max: u32,
    },
    UnexpectedProduct {
        label: String,
        count: u32,
        expected: Vec<String>,
    },
    /// A product in a planogram zone is not (or does not look enough like) the SKU
    /// expected there: a misplaced or counterfeit product (needs `[identify]`).
    ProductMismatch {
        /// The SKU it matched best (`unknown` below the unknown threshold).
        label: String,
        similarity: f32,
        expected: Vec<String>,
        /// Similarity to the closest reference of the expected SKUs; absent when none of
        /// them is enrolled.
        #[serde(skip_serializing_if = "Option::is_none")]
        expected_similarity: Option<f32>,
    },
    CameraOffline {
        reason: String,
    },
    CameraOnline,
}

/// The stable state of one zone, as published and persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ZoneState {
    pub counts: BTreeMap<String, u32>,
    pub total: u32,
    pub status: StockStatus,
}

/// What one observation changed in a zone.
#[derive(Debug, Default, PartialEq)]
pub struct ZoneUpdate {
    pub events: Vec<EventKind>,
    /// The stable state changed (counts or status) and should be published.
    pub state_changed: bool,
    /// The zone was occluded in this frame and its counts held.
    pub occluded: bool,
}

/// Stable counting for one zone.
#[derive(Debug, Clone)]
pub struct ZoneCounter {
    spec: ZoneSpec,
    window: VecDeque<(Instant, BTreeMap<String, u32>)>,
    /// None until the first consensus (or a restored state): unknown is not zero.
    stable: Option<BTreeMap<String, u32>>,
    status: StockStatus,
    empty_since: Option<Instant>,
    over: bool,
    unexpected: BTreeSet<String>,
}

impl ZoneCounter {
    pub fn new(spec: ZoneSpec) -> Self {
        Self {
            spec,
            window: VecDeque::new(),
            stable: None,
            status: StockStatus::Ok,
            empty_since: None,
            over: false,
            unexpected: BTreeSet::new(),
        }
    }

    /// A counter that starts from a persisted state, so a restart publishes the last
    /// known counts instead of a false zero.
    pub fn restored(spec: ZoneSpec, state: &ZoneState) -> Self {
        let mut c = Self::new(spec);
        c.stable = Some(state.counts.clone());
        c.status = state.status;
        c.over = c.spec.max.is_some_and(|m| state.total > m);
        c.unexpected = c.unexpected_labels(&state.counts);
        c
    }

    pub fn spec(&self) -> &ZoneSpec {
        &self.spec
    }

    /// Replaces the zone's geometry and planogram (config reload), keeping its counts.
    pub fn set_spec(&mut self, spec: ZoneSpec) {
        self.spec = spec;
    }

    /// The stable state, once known.
    pub fn state(&self) -> Option<ZoneState> {
        self.stable.as_ref().map(|counts| ZoneState {
            total: self.total(counts),
            counts: counts.clone(),
            status: self.status,
        })
    }

    /// Counts the products this zone admits among `detections`, by label.
    pub fn raw_counts(
        &self,
        detections: &[Detection],
        params: &CountingParams,
    ) -> BTreeMap<String, u32> {
        let mut counts = BTreeMap::new();
        for d in detections.iter().filter(|d| self.admits(d, params)) {
            *counts.entry(d.label.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Whether this zone counts `d` (not an occluder, inside by the zone's rule).
    pub fn admits(&self, d: &Detection, params: &CountingParams) -> bool {
        !params.occluders.contains(&d.label)
            && self
                .spec
                .polygon
                .admits(&d.bbox, self.spec.membership, self.spec.overlap_fraction)
    }

    /// Whether this frame's `detections` (occluders not yet among them) leave the zone
    /// exactly where it stands: a known, non-zero stable total that the frame repeats.
    /// Such a frame cannot change a count or start a clock whether or not something
    /// stands in front of the shelf, so the worker need not run the occluder model on
    /// it. An empty or not yet settled zone is never "steady": there the occluder
    /// decides whether an empty-looking shelf is empty.
    pub fn steady_on(&self, detections: &[Detection], params: &CountingParams) -> bool {
        let Some(stable) = &self.stable else {
            return false;
        };
        let total: u32 = stable.values().sum();
        let seen = detections.iter().filter(|d| self.admits(d, params)).count();
        total > 0 && seen == total as usize
    }

    fn occluded_by(&self, detections: &[Detection], params: &CountingParams) -> bool {
        detections.iter().any(|d| {
            params.occluders.contains(&d.label)
                && self.spec.polygon.intersection_area(&d.bbox) > 0.0
        })
    }

    fn total(&self, counts: &BTreeMap<String, u32>) -> u32 {
        if self.spec.expected.is_empty() {
            counts.values().sum()
        } else {
            self.spec
                .expected
                .iter()
                .map(|l| counts.get(l).copied().unwrap_or(0))
                .sum()
        }
    }

    fn unexpected_labels(&self, counts: &BTreeMap<String, u32>) -> BTreeSet<String> {
        if self.spec.expected.is_empty() {
            return BTreeSet::new();
        }
        counts
            .iter()
            .filter(|(l, &n)| n > 0 && !self.spec.expected.contains(l))
            .map(|(l, _)| l.clone())
            .collect()
    }

    /// Feeds one frame's detections.
    pub fn observe(
        &mut self,
        now: Instant,
        detections: &[Detection],
        params: &CountingParams,
    ) -> ZoneUpdate {
        let mut update = ZoneUpdate::default();
        if self.occluded_by(detections, params) {
            // Hold: neither the window nor the out-of-stock clock sees a hidden shelf.
            update.occluded = true;
            return update;
        }
        let counts = self.raw_counts(detections, params);
        self.window.push_back((now, counts));
        while self.window.len() > params.window_frames {
            self.window.pop_front();
        }
        if let Some(max_age) = params.window {
            while self
                .window
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > max_age)
            {
                self.window.pop_front();
            }
        }

        let needed = params.needed();
        if self.window.len() >= needed {
            let mut labels: BTreeSet<String> = self
                .window
                .iter()
                .flat_map(|(_, c)| c.keys().cloned())
                .collect();
            if let Some(s) = &self.stable {
                labels.extend(s.keys().cloned());
            }
            labels.extend(self.spec.expected.iter().cloned());
            let first = self.stable.is_none();
            let mut next = self.stable.clone().unwrap_or_default();
            let mut decided_all = true;
            for label in &labels {
                match consensus(
                    self.window
                        .iter()
                        .map(|(_, c)| c.get(label).copied().unwrap_or(0)),
                    needed,
                ) {
                    Some(v) => {
                        let old = next.get(label).copied();
                        if old != Some(v) {
                            if !first && old.unwrap_or(0) != v {
                                update.events.push(EventKind::CountChanged {
                                    label: label.clone(),
                                    from: old.unwrap_or(0),
                                    to: v,
                                });
                            }
                            next.insert(label.clone(), v);
                        }
                    }
                    None => decided_all = false,
                }
            }
            // Labels no longer present anywhere drop out of the map once they are zero,
            // except planogram labels, which always show.
            next.retain(|l, n| *n > 0 || self.spec.expected.contains(l));
            if first && !decided_all {
                // The very first state must be a full agreement, not a partial one.
            } else if self.stable.as_ref() != Some(&next) {
                if first {
                    tracing::debug!(zone = %self.spec.name, "first stable counts");
                }
                self.stable = Some(next);
                update.state_changed = true;
            }
        }
        self.update_stock(now, params, &mut update);
        update
    }

    fn update_stock(&mut self, now: Instant, params: &CountingParams, update: &mut ZoneUpdate) {
        let Some(counts) = &self.stable else {
            return;
        };
        let total = self.total(counts);
        let before = self.status;
        if total == 0 {
            let since = *self.empty_since.get_or_insert(now);
            let empty_for = now.duration_since(since);
            if self.status != StockStatus::OutOfStock {
                if let Some(min) = self.spec.min {
                    if self.status == StockStatus::Ok && min > 0 {
                        update.events.push(EventKind::LowStock { total, min });
                        self.status = StockStatus::Low;
                    }
                }
            }
            if self.status != StockStatus::OutOfStock && empty_for >= params.out_of_stock_after {
                update.events.push(EventKind::OutOfStock {
                    empty_for_s: empty_for.as_secs_f64(),
                });
                self.status = StockStatus::OutOfStock;
            }
        } else {
            self.empty_since = None;
            let low = self.spec.min.is_some_and(|m| total < m);
            if low {
                if self.status == StockStatus::Ok {
                    update.events.push(EventKind::LowStock {
                        total,
                        min: self.spec.min.unwrap_or(0),
                    });
                }
                self.status = StockStatus::Low;
            } else if self.status != StockStatus::Ok {
                update.events.push(EventKind::Restocked { total });
                self.status = StockStatus::Ok;
            }
        }
        if let Some(max) = self.spec.max {
            let over = total > max;
            if over && !self.over {
                update.events.push(EventKind::OverStock { total, max });
            }
            self.over = over;
        }
        let unexpected = self.unexpected_labels(counts);
        for label in unexpected.difference(&self.unexpected) {
            update.events.push(EventKind::UnexpectedProduct {
                label: label.clone(),
                count: counts.get(label).copied().unwrap_or(0),
                expected: self.spec.expected.clone(),
            });
        }
        self.unexpected = unexpected;
        if self.status != before {
            update.state_changed = true;
        }
    }
}

/// The value at least `needed` observations agree on, if any.
fn consensus(values: impl Iterator<Item = u32>, needed: usize) -> Option<u32> {
    let mut tally: BTreeMap<u32, usize> = BTreeMap::new();
    for v in values {
        *tally.entry(v).or_insert(0) += 1;
    }
    tally
        .into_iter()
        .find(|&(_, n)| n >= needed)
        .map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::BBox;

    fn params() -> CountingParams {
        CountingParams {
            window_frames: 5,
            min_agreement: 0.6,
            window: None,
            out_of_stock_after: Duration::from_secs(10),
            occluders: ["Person".to_string()].into(),
        }
    }

    /// Top half of a 100x100 frame, two Bottles expected, at least 2 on the shelf.
    fn zone() -> ZoneCounter {
        ZoneCounter::new(ZoneSpec {
            name: "top".into(),
            polygon: Polygon::new(vec![(0.0, 0.0), (100.0, 0.0), (100.0, 50.0), (0.0, 50.0)]),
            membership: Membership::Centre,
            overlap_fraction: 0.5,
            expected: vec!["Bottle".into()],
            min: Some(2),
            max: Some(4),
        })
    }

    fn det(label: &str, x: f32, y: f32) -> Detection {
        Detection {
            label: label.into(),
            class_id: 0,
            score: 0.9,
            bbox: BBox {
                x1: x,
                y1: y,
                x2: x + 8.0,
                y2: y + 8.0,
            },
        }
    }

    fn bottles(n: usize) -> Vec<Detection> {
        (0..n)
            .map(|i| det("Bottle", 2.0 + 10.0 * i as f32, 10.0))
            .collect()
    }

    /// Feeds frames 1 s apart; returns every event in order.
    fn feed(
        z: &mut ZoneCounter,
        t0: Instant,
        start: u64,
        frames: &[Vec<Detection>],
    ) -> Vec<EventKind> {
        let p = params();
        let mut events = vec![];
        for (i, f) in frames.iter().enumerate() {
            let now = t0 + Duration::from_secs(start + i as u64);
            events.extend(z.observe(now, f, &p).events);
        }
        events
    }

    #[test]
    fn the_first_stable_count_needs_agreement_and_emits_no_change_event() {
        let mut z = zone();
        let t0 = Instant::now();
        assert!(feed(&mut z, t0, 0, &[bottles(3), bottles(3)]).is_empty());
        assert_eq!(z.state(), None, "two frames are not yet a consensus of 3");
        let ev = feed(&mut z, t0, 2, &[bottles(3)]);
        assert!(ev.is_empty(), "{ev:?}");
        assert_eq!(z.state().unwrap().counts["Bottle"], 3);
    }

    #[test]
    fn flapping_detections_do_not_change_the_stable_count() {
        let mut z = zone();
        let t0 = Instant::now();
        feed(&mut z, t0, 0, &[bottles(3), bottles(3), bottles(3)]);
        // A detector flickering between 2 and 3 never reaches 3 agreeing frames of 2.
        let ev = feed(
            &mut z,
            t0,
            3,
            &[
                bottles(2),
                bottles(3),
                bottles(2),
                bottles(3),
                bottles(3),
                bottles(2),
            ],
        );
        assert!(ev.is_empty(), "{ev:?}");
        assert_eq!(z.state().unwrap().total, 3);
    }

    #[test]
    fn a_real_change_fires_count_changed_once() {
        let mut z = zone();
        let t0 = Instant::now();
        feed(&mut z, t0, 0, &[bottles(3), bottles(3), bottles(3)]);
        let ev = feed(
            &mut z,
            t0,
            3,
            &[bottles(4), bottles(4), bottles(4), bottles(4), bottles(4)],
        );
        assert_eq!(
            ev,
            vec![EventKind::CountChanged {
                label: "Bottle".into(),
                from: 3,
                to: 4
            }]
        );
    }

    #[test]
    fn an_occluding_person_holds_the_count_instead_of_dropping_it() {
        let mut z = zone();
        let t0 = Instant::now();
        feed(&mut z, t0, 0, &[bottles(3), bottles(3), bottles(3)]);
        // A person in front of the shelf hides the bottles: the detector sees none.
        let person = vec![Detection {
            bbox: BBox {
                x1: 0.0,
                y1: 0.0,
                x2: 60.0,
                y2: 100.0,
            },
            ..det("Person", 0.0, 0.0)
        }];
        let p = params();
        for i in 0..10 {
            let u = z.observe(t0 + Duration::from_secs(3 + i), &person, &p);
            assert!(u.occluded && u.events.is_empty() && !u.state_changed);
        }
        assert_eq!(z.state().unwrap().counts["Bottle"], 3);
        assert_eq!(z.state().unwrap().status, StockStatus::Ok);
    }

    #[test]
    fn only_a_frame_repeating_a_settled_non_zero_count_is_steady() {
        let mut z = zone();
        let p = params();
        let t0 = Instant::now();
        // Not settled yet: the occluder must be asked.
        assert!(!z.steady_on(&bottles(3), &p));
        feed(&mut z, t0, 0, &[bottles(3), bottles(3), bottles(3)]);
        assert!(z.steady_on(&bottles(3), &p));
        // One fewer or one more could be a hand or a person: not steady.
        assert!(!z.steady_on(&bottles(2), &p));
        assert!(!z.steady_on(&bottles(4), &p));
        // Products outside the zone do not make a frame unsteady.
        let mut with_outside = bottles(3);
        with_outside.push(det("Bottle", 50.0, 90.0));
        assert!(z.steady_on(&with_outside, &p));
        // An empty shelf is never steady: only the occluder tells empty from hidden.
        feed(&mut z, t0, 3, &vec![bottles(0); 6]);
        assert_eq!(z.state().unwrap().total, 0);
        assert!(!z.steady_on(&bottles(0), &p));
    }

    #[test]
    fn stock_events_fire_once_per_transition() {
        let mut z = zone();
        let t0 = Instant::now();
        let mut ev = feed(&mut z, t0, 0, &[bottles(3), bottles(3), bottles(3)]);
        // Down to 1: low stock, once.
        ev.extend(feed(&mut z, t0, 3, &vec![bottles(1); 6]));
        // Empty: out of stock after 10 s empty, once.
        ev.extend(feed(&mut z, t0, 9, &vec![bottles(0); 20]));
        // Refilled to 3: restocked, once.
        ev.extend(feed(&mut z, t0, 29, &vec![bottles(3); 6]));
        // Over the max of 4: over stock, once.
        ev.extend(feed(&mut z, t0, 35, &vec![bottles(5); 6]));
        let kinds: Vec<String> = ev
            .iter()
            .map(|e| {
                serde_json::to_value(e).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "count-changed",
                "low-stock", // 3 -> 1
                "count-changed",
                "out-of-stock", // 1 -> 0, then 10 s empty
                "count-changed",
                "restocked", // 0 -> 3
                "count-changed",
                "over-stock", // 3 -> 5
            ]
        );
        assert_eq!(z.state().unwrap().status, StockStatus::Ok);
    }

    #[test]
    fn an_unexpected_product_is_reported_once_while_it_stays() {
        let mut z = zone();
        let t0 = Instant::now();
        let mut frame = bottles(2);
        frame.push(det("Mug", 60.0, 10.0));
        let ev = feed(&mut z, t0, 0, &vec![frame; 8]);
        let unexpected: Vec<_> = ev
            .iter()
            .filter(|e| matches!(e, EventKind::UnexpectedProduct { .. }))
            .collect();
        assert_eq!(unexpected.len(), 1, "{ev:?}");
        // The mug does not count towards the planogram total.
        assert_eq!(z.state().unwrap().total, 2);
    }

    #[test]
    fn a_restored_state_is_kept_and_the_same_counts_after_restart_emit_nothing() {
        let mut z = zone();
        let t0 = Instant::now();
        feed(&mut z, t0, 0, &[bottles(3), bottles(3), bottles(3)]);
        let saved = z.state().unwrap();
        let mut after = ZoneCounter::restored(zone().spec().clone(), &saved);
        assert_eq!(
            after.state().unwrap(),
            saved,
            "no false zero before the first frames"
        );
        let ev = feed(&mut after, t0, 100, &vec![bottles(3); 5]);
        assert!(ev.is_empty(), "{ev:?}");
    }

    #[test]
    fn the_seconds_window_drops_stale_observations() {
        let mut p = params();
        p.window = Some(Duration::from_secs(2));
        let mut z = zone();
        let t0 = Instant::now();
        for i in 0..3 {
            z.observe(t0 + Duration::from_secs(i * 10), &bottles(3), &p);
        }
        assert_eq!(
            z.state(),
            None,
            "three frames 10 s apart are never in one 2 s window"
        );
    }
}
