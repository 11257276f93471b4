//! What the publisher has published, as the pages and `/metrics` show it: each zone's
//! stable state, the last events and how many of each type. It is a sink like the
//! others, so the page shows exactly the messages subscribers got, with their `seq`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::counting::ZoneState;
use crate::publish::{Body, Envelope, Sink, SinkError};

/// The events kept for the health page and `/api/events`.
pub const EVENTS_KEPT: usize = 50;

/// A zone's last published state.
#[derive(Debug, Clone, Serialize)]
pub struct ZoneEntry {
    #[serde(flatten)]
    pub state: ZoneState,
    pub seq: u64,
    pub ts: String,
}

#[derive(Debug, Default)]
struct Inner {
    zones: BTreeMap<(String, String), ZoneEntry>,
    events: VecDeque<serde_json::Value>,
    /// Events published since start, by type.
    event_counts: BTreeMap<String, u64>,
}

/// Shared between the publisher (through [`BoardSink`]) and the server.
#[derive(Debug, Default)]
pub struct Board(Mutex<Inner>);

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last published state of `camera`/`zone`.
    pub fn zone(&self, camera: &str, zone: &str) -> Option<ZoneEntry> {
        self.lock()
            .zones
            .get(&(camera.to_owned(), zone.to_owned()))
            .cloned()
    }

    /// Every zone's last state, by (camera, zone).
    pub fn zones(&self) -> BTreeMap<(String, String), ZoneEntry> {
        self.lock().zones.clone()
    }

    /// The last events, newest first, as published.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.lock().events.iter().rev().cloned().collect()
    }

    /// Events published since start, by type.
    pub fn event_counts(&self) -> BTreeMap<String, u64> {
        self.lock().event_counts.clone()
    }

    fn record(&self, msg: &Envelope, json: &str) {
        let mut inner = self.lock();
        match &msg.body {
            Body::State {
                camera,
                zone,
                state,
            } => {
                inner.zones.insert(
                    (camera.clone(), zone.clone()),
                    ZoneEntry {
                        state: state.clone(),
                        seq: msg.seq,
                        ts: msg.ts.clone(),
                    },
                );
            }
            Body::Event { .. } => {
                let value: serde_json::Value = match serde_json::from_str(json) {
                    Ok(v) => v,
                    Err(_) => return,
                };
                let kind = value
                    .get("event")
                    .and_then(|e| e.as_str())
                    .unwrap_or("unknown")
                    .to_owned();
                *inner.event_counts.entry(kind).or_default() += 1;
                if inner.events.len() == EVENTS_KEPT {
                    inner.events.pop_front();
                }
                inner.events.push_back(value);
            }
            Body::Health(_) => {}
        }
    }
}

/// The publisher's side of the board.
pub struct BoardSink(pub Arc<Board>);

impl Sink for BoardSink {
    fn name(&self) -> String {
        "http".into()
    }

    fn publish(&mut self, msg: &Envelope, json: &str) -> Result<(), SinkError> {
        self.0.record(msg, json);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counting::{EventKind, StockStatus};

    fn envelope(seq: u64, body: Body) -> Envelope {
        Envelope {
            schema: crate::publish::SCHEMA,
            device: "d".into(),
            seq,
            ts: "2026-12-07T00:00:00.000Z".into(),
            body,
        }
    }

    fn publish(sink: &mut BoardSink, msg: Envelope) {
        let json = serde_json::to_string(&msg).unwrap();
        sink.publish(&msg, &json).unwrap();
    }

    #[test]
    fn the_board_keeps_the_last_state_of_each_zone_and_counts_events_by_type() {
        let board = Arc::new(Board::default());
        let mut sink = BoardSink(board.clone());
        for (seq, total) in [(1, 3), (2, 5)] {
            publish(
                &mut sink,
                envelope(
                    seq,
                    Body::State {
                        camera: "c".into(),
                        zone: "top".into(),
                        state: ZoneState {
                            counts: [("product".to_string(), total)].into(),
                            total,
                            status: StockStatus::Ok,
                        },
                    },
                ),
            );
        }
        for seq in 3..3 + EVENTS_KEPT as u64 + 5 {
            publish(
                &mut sink,
                envelope(
                    seq,
                    Body::Event {
                        camera: "c".into(),
                        zone: None,
                        event: EventKind::CameraOnline,
                    },
                ),
            );
        }
        let top = board.zone("c", "top").unwrap();
        assert_eq!((top.state.total, top.seq), (5, 2));
        let events = board.events();
        assert_eq!(events.len(), EVENTS_KEPT);
        assert_eq!(events[0]["seq"], 3 + EVENTS_KEPT as u64 + 4, "newest first");
        assert_eq!(
            board.event_counts()["camera-online"],
            EVENTS_KEPT as u64 + 5
        );
    }
}
