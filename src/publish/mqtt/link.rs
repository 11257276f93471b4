//! At-least-once delivery on one connection, as bookkeeping only: which spooled
//! messages are handed to rumqttc, which packet id carries which spool entry, and which
//! entry a PUBACK releases. No network here; the client task feeds it what the event
//! loop reports.
//!
//! The rules: spooled messages are handed over in order, never more than the window at
//! once; a lost connection forgets everything in flight (clean sessions: the broker
//! keeps nothing of ours), so the next connection starts again from the oldest
//! unacknowledged message; a message leaves the spool only on its PUBACK.

use std::collections::{HashMap, VecDeque};

use crate::publish::spool::{Entry, Spool};

/// Messages handed to rumqttc but not yet acknowledged: a small window, so a reconnect
/// never has much to resend and the client's request channel never fills.
pub(super) const WINDOW: usize = 32;

/// What is in flight on the current connection.
#[derive(Debug, Default)]
pub(super) struct Link {
    connected: bool,
    /// Publishes handed to rumqttc, waiting for their packet id: the spool id, or None
    /// for publishes outside the spool.
    sent: VecDeque<Option<u64>>,
    /// Packet id -> spool id, waiting for PUBACK.
    inflight: HashMap<u16, u64>,
    /// The next spool id to send.
    cursor: u64,
    /// Messages allowed in flight on this connection.
    window: usize,
}

impl Link {
    pub(super) fn is_connected(&self) -> bool {
        self.connected
    }

    /// A connection was established (CONNACK). An MQTT 5 broker's receive maximum
    /// bounds the window.
    pub(super) fn connection_up(&mut self, receive_max: Option<u16>) {
        self.connection_lost();
        self.connected = true;
        // Half the broker's receive maximum: status and discovery publishes travel
        // outside the window, and rumqttc stalls on a packet id collision when more is
        // in flight than the broker allows.
        self.window = receive_max.map_or(WINDOW, |r| (r as usize / 2).clamp(1, WINDOW));
    }

    /// A lost connection: whatever was in flight is resent from the spool on the next one
    /// (a clean session, so the broker keeps nothing of ours).
    pub(super) fn connection_lost(&mut self) {
        self.connected = false;
        self.sent.clear();
        self.inflight.clear();
        self.cursor = 0;
    }

    /// Hands spooled messages over, in order, while connected and there is room in the
    /// window. `hand_over` fails when rumqttc's request channel is full; the same message
    /// is then offered first next time.
    pub(super) fn feed(
        &mut self,
        spool: &Spool,
        mut hand_over: impl FnMut(&Entry) -> Result<(), String>,
    ) {
        if !self.connected {
            return;
        }
        while self.sent.len() + self.inflight.len() < self.window {
            let Some(e) = spool.next_from(self.cursor) else {
                break;
            };
            if hand_over(e).is_err() {
                break;
            }
            self.sent.push_back(Some(e.id));
            self.cursor = e.id + 1;
        }
    }

    /// Records a publish that is not from the spool, so packet ids stay matched.
    pub(super) fn untracked(&mut self, handed_over: Result<(), String>) {
        if handed_over.is_ok() {
            self.sent.push_back(None);
        }
    }

    /// rumqttc sent a publish with packet id `pkid`. Every publish handed over is
    /// reported, in order: spool entries carry their id, status, discovery, snapshot and
    /// reply publishes do not.
    pub(super) fn sent(&mut self, pkid: u16) {
        if let Some(Some(id)) = self.sent.pop_front() {
            self.inflight.insert(pkid, id);
        }
    }

    /// The broker acknowledged `pkid`: the spool id to acknowledge, when the packet
    /// carried a spool entry.
    pub(super) fn acked(&mut self, pkid: u16) -> Option<u64> {
        self.inflight.remove(&pkid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool_with(dir: &std::path::Path, messages: usize) -> Spool {
        let mut spool = Spool::open(dir, 1 << 20).unwrap();
        for i in 0..messages {
            spool.append("t/events", false, &format!("{{\"n\":{i}}}"));
        }
        spool
    }

    /// Spool ids handed over by one feed.
    fn feed(link: &mut Link, spool: &Spool) -> Vec<u64> {
        let mut handed = Vec::new();
        link.feed(spool, |e| {
            handed.push(e.id);
            Ok(())
        });
        handed
    }

    /// Reports packet ids `from..` for what was handed over, as rumqttc does.
    fn report_sent(link: &mut Link, from: u16, count: usize) -> Vec<u16> {
        let pkids: Vec<u16> = (from..).take(count).collect();
        for &pkid in &pkids {
            link.sent(pkid);
        }
        pkids
    }

    #[test]
    fn nothing_is_handed_over_while_disconnected() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with(dir.path(), 3);
        let mut link = Link::default();
        assert!(feed(&mut link, &spool).is_empty());
        link.connection_up(None);
        link.connection_lost();
        assert!(feed(&mut link, &spool).is_empty());
    }

    #[test]
    fn spooled_messages_are_handed_over_in_order_and_only_once_per_connection() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = spool_with(dir.path(), 3);
        let ids: Vec<u64> = spool.pending().map(|e| e.id).collect();
        let mut link = Link::default();
        link.connection_up(None);
        assert_eq!(feed(&mut link, &spool), ids);
        assert!(feed(&mut link, &spool).is_empty());
        let later = spool.append("t/events", false, "{}");
        assert_eq!(feed(&mut link, &spool), [later]);
    }

    #[test]
    fn unacked_messages_are_resent_first_after_a_reconnect() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = spool_with(dir.path(), 5);
        let ids: Vec<u64> = spool.pending().map(|e| e.id).collect();
        let mut link = Link::default();
        link.connection_up(None);
        assert_eq!(feed(&mut link, &spool), ids);
        report_sent(&mut link, 1, 5);
        for pkid in [1, 2] {
            let id = link.acked(pkid).unwrap();
            spool.ack(id);
        }
        let newer = spool.append("t/events", false, "{}");
        link.connection_lost();
        link.connection_up(None);
        let mut expected = ids[2..].to_vec();
        expected.push(newer);
        assert_eq!(feed(&mut link, &spool), expected);
    }

    #[test]
    fn an_ack_from_the_previous_connection_releases_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with(dir.path(), 2);
        let mut link = Link::default();
        link.connection_up(None);
        feed(&mut link, &spool);
        report_sent(&mut link, 1, 2);
        link.connection_lost();
        link.connection_up(None);
        assert_eq!(link.acked(1), None);
        assert_eq!(link.acked(2), None);
    }

    #[test]
    fn acks_release_spool_entries_in_order_and_untracked_publishes_keep_packet_ids_matched() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = spool_with(dir.path(), 3);
        let ids: Vec<u64> = spool.pending().map(|e| e.id).collect();
        let mut link = Link::default();
        link.connection_up(None);
        // The `online` status goes first, outside the spool; a publish rumqttc refused
        // is not counted.
        link.untracked(Ok(()));
        link.untracked(Err("request channel full".into()));
        assert_eq!(feed(&mut link, &spool), ids);
        report_sent(&mut link, 1, 4);
        assert_eq!(link.acked(1), None, "the status carried no spool entry");
        assert_eq!(link.acked(2), Some(ids[0]));
        assert_eq!(link.acked(3), Some(ids[1]));
        // PUBACKs come in publish order: acknowledging the newest releases every
        // entry before it that is still spooled.
        spool.ack(link.acked(4).unwrap());
        assert!(spool.is_empty());
    }

    #[test]
    fn no_more_than_the_window_is_in_flight_and_each_ack_makes_room_for_one_more() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = spool_with(dir.path(), WINDOW + 10);
        let ids: Vec<u64> = spool.pending().map(|e| e.id).collect();
        let mut link = Link::default();
        link.connection_up(None);
        assert_eq!(feed(&mut link, &spool), ids[..WINDOW]);
        assert!(feed(&mut link, &spool).is_empty());
        report_sent(&mut link, 1, WINDOW);
        assert!(
            feed(&mut link, &spool).is_empty(),
            "sent is still in flight"
        );
        spool.ack(link.acked(1).unwrap());
        assert_eq!(feed(&mut link, &spool), [ids[WINDOW]]);
    }

    #[test]
    fn the_window_is_half_the_brokers_receive_maximum_and_never_zero_nor_above_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with(dir.path(), WINDOW + 10);
        let mut link = Link::default();
        for (receive_max, window) in [(Some(10), 5), (Some(1), 1), (Some(u16::MAX), WINDOW)] {
            link.connection_up(receive_max);
            assert_eq!(feed(&mut link, &spool).len(), window, "{receive_max:?}");
        }
    }

    #[test]
    fn a_full_request_channel_stops_the_hand_over_and_the_next_feed_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with(dir.path(), 4);
        let ids: Vec<u64> = spool.pending().map(|e| e.id).collect();
        let mut link = Link::default();
        link.connection_up(None);
        let mut handed = Vec::new();
        link.feed(&spool, |e| {
            if handed.len() == 2 {
                return Err("request channel full".into());
            }
            handed.push(e.id);
            Ok(())
        });
        assert_eq!(handed, ids[..2]);
        assert_eq!(feed(&mut link, &spool), ids[2..]);
    }

    #[test]
    fn what_was_spooled_and_not_acknowledged_before_a_restart_is_handed_over_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<u64> = {
            let mut spool = spool_with(dir.path(), 3);
            let ids: Vec<u64> = spool.pending().map(|e| e.id).collect();
            let mut link = Link::default();
            link.connection_up(None);
            feed(&mut link, &spool);
            report_sent(&mut link, 1, 3);
            spool.ack(link.acked(1).unwrap());
            spool.sync();
            ids
        };
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut link = Link::default();
        link.connection_up(None);
        // The acknowledged mark is written every 64 acks (or when the spool drains), so
        // the acknowledged message may come again: a duplicate, never a loss.
        let handed = feed(&mut link, &spool);
        assert!(handed.ends_with(&ids[1..]), "{handed:?} vs {ids:?}");
        assert!(handed.len() <= ids.len(), "{handed:?}");
    }
}
