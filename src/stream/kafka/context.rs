//! The consumer group's context: what happens on rebalances (revoked work dropped, published
//! work acknowledged, offsets committed, cards of lost partitions forgotten; readiness), and
//! what librdkafka's statistics say (consumer lag per held partition, broker reachability).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Statistics, TopicPartitionList};

use super::txn::Transactor;
use crate::state::Restorer;
use crate::stream::{Assignment, Detector};

/// How long the group's committed offsets may take to arrive before a restore.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a revocation waits for already-published outputs of the revoked partitions to be
/// acknowledged before committing: well under the group's session timeout (tests run with
/// 6 s), far above a broker round trip.
pub const REVOKE_DRAIN_WAIT: Duration = Duration::from_secs(2);

/// The detector's consumer context.
pub struct GroupContext {
    detector: Arc<Detector>,
    assignment: Arc<Assignment>,
    /// Partitions held since the last rebalance: only these have a lag series.
    held: Mutex<HashSet<(String, i32)>>,
    on_assigned: Option<Arc<tokio::sync::Notify>>,
    /// Restores newly assigned partitions' cards from the changelog.
    restorer: Option<Restorer>,
    /// Exactly-once: the transaction is committed before partitions are given up.
    transactor: Option<Arc<Transactor>>,
}

impl GroupContext {
    /// A context that reports to the detector's metrics and revokes through `assignment`.
    pub fn new(
        detector: Arc<Detector>,
        assignment: Arc<Assignment>,
        on_assigned: Option<Arc<tokio::sync::Notify>>,
    ) -> Self {
        GroupContext {
            detector,
            assignment,
            held: Mutex::default(),
            on_assigned,
            restorer: None,
            transactor: None,
        }
    }

    /// Exactly-once: commit the open transaction (outputs and offsets) when partitions are
    /// revoked, instead of committing consumer offsets.
    pub fn with_transactor(mut self, transactor: Arc<Transactor>) -> Self {
        self.transactor = Some(transactor);
        self
    }

    /// Restores the cards of assigned partitions from the changelog before their records are
    /// scored.
    pub fn with_restorer(mut self, restorer: Restorer) -> Self {
        self.restorer = Some(restorer);
        self
    }

    /// Reads the cards of newly assigned partitions from the changelog, applying the records
    /// below the group's committed offsets (see [`crate::state`]). Runs inside the rebalance
    /// callback: no record of these partitions is delivered before it returns. A failure is
    /// logged and counted, and those cards start empty.
    fn restore(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList, r: &Restorer) {
        let m = self.detector.metrics();
        let committed = match consumer.committed_offsets(tpl.clone(), COMMITTED_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("no committed offsets to restore against, cards start empty: {e}");
                m.restore_failures.inc();
                return;
            }
        };
        let parts: Vec<(i32, Option<i64>)> = committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                rdkafka::Offset::Offset(n) => (e.partition(), Some(n)),
                _ => (e.partition(), None),
            })
            .collect();
        match r.restore(&parts, self.detector.window_builder()) {
            Ok((cards, stats)) => {
                m.restore_seconds.observe(stats.seconds);
                for (reason, n) in &stats.skipped {
                    m.restore_skipped.with_label_values(&[reason]).inc_by(*n);
                }
                tracing::info!(
                    topic = r.topic(),
                    partitions = parts.len(),
                    cards = stats.cards,
                    records = stats.records,
                    ahead_of_commit = stats.ahead,
                    skipped = stats.skipped.values().sum::<u64>(),
                    seconds = stats.seconds,
                    cards_per_s = (stats.cards as f64 / stats.seconds.max(1e-9)).round(),
                    from_snapshot = stats.from_snapshot,
                    snapshot = stats.snapshot,
                    "card state restored from the changelog"
                );
                self.detector.restore_cards(cards);
            }
            Err(e) => {
                tracing::error!("restoring card state failed, those cards start empty: {e}");
                m.restore_failures.inc();
            }
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<(String, i32)>> {
        self.held.lock().expect("held lock")
    }

    /// Takes partitions away: drops their queued work, waits for their published outputs,
    /// forgets their cards and their lag series. The caller commits afterwards.
    fn revoke(&self, tpl: &TopicPartitionList) {
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let numbers: Vec<i32> = parts.iter().map(|p| p.1).collect();
        if !self.assignment.revoke(&numbers, REVOKE_DRAIN_WAIT) {
            tracing::warn!(
                "revoked partitions still had unacknowledged outputs after {REVOKE_DRAIN_WAIT:?}: \
                 their next owner may publish those transactions again"
            );
        }
        let forgotten = self.detector.forget_partitions(&numbers);
        let lag = &self.detector.metrics().consumer_lag;
        let mut held = self.held();
        for (topic, partition) in &parts {
            let _ = lag.remove_label_values(&[topic, &partition.to_string()]);
            held.remove(&(topic.clone(), *partition));
        }
        tracing::info!(
            partitions = parts.len(),
            cards = forgotten,
            "partitions revoked"
        );
    }

    /// Updates the lag gauges of held partitions from one statistics report and removes those
    /// of partitions not held; returns whether some broker connection is up.
    pub fn apply_statistics(&self, stats: &Statistics) -> bool {
        let m = self.detector.metrics();
        let held = self.held();
        for (topic, t) in &stats.topics {
            for p in t.partitions.values().filter(|p| p.partition >= 0) {
                let partition = p.partition.to_string();
                let labels = [topic.as_str(), partition.as_str()];
                // Behind the stored offset when one is stored, else behind the committed one.
                let lag = if p.consumer_lag_stored >= 0 {
                    p.consumer_lag_stored
                } else {
                    p.consumer_lag
                };
                if lag >= 0 && held.contains(&(topic.clone(), p.partition)) {
                    m.consumer_lag.with_label_values(&labels).set(lag);
                } else {
                    let _ = m.consumer_lag.remove_label_values(&labels);
                }
            }
        }
        stats.brokers.values().any(|b| b.state == "UP")
    }
}

impl ClientContext for GroupContext {
    fn stats(&self, stats: Statistics) {
        let up = self.apply_statistics(&stats);
        let m = self.detector.metrics();
        if up != m.is_broker_reachable() {
            tracing::warn!(up, "broker reachability changed");
        }
        m.set_broker_reachable(up);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.revoke(tpl);
                match (&self.transactor, consumer.group_metadata()) {
                    (Some(t), Some(group)) => {
                        if let Err(e) = t.commit(&group) {
                            // Fenced or failed: this member must not go on (a zombie); its
                            // partitions' next owner resumes from the last committed transaction.
                            eprintln!("error: exactly-once: {e}");
                            std::process::exit(3);
                        }
                    }
                    _ => {
                        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                            tracing::debug!("commit on revoke: {e}");
                        }
                    }
                }
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned")
            }
            Rebalance::Error(e) => tracing::warn!("rebalance error: {e}"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let (Rebalance::Assign(tpl), Some(r)) = (rebalance, &self.restorer)
            && tpl.count() > 0
        {
            self.restore(consumer, tpl, r);
        }
        let assigned: HashSet<(String, i32)> = consumer
            .assignment()
            .map(|a| {
                a.elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect()
            })
            .unwrap_or_default();
        // Ready while this member holds partitions.
        self.detector.metrics().set_ready(!assigned.is_empty());
        // Labels follow the cards: this member joins the labels of the partitions it holds.
        self.detector
            .set_held(Some(assigned.iter().map(|(_, p)| *p).collect()));
        *self.held() = assigned;
        if let (Rebalance::Assign(tpl), Some(n)) = (rebalance, &self.on_assigned)
            && tpl.count() > 0
        {
            n.notify_waiters();
            n.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Bundle;
    use crate::observe::Metrics;
    use crate::stream::DetectorSettings;

    fn context() -> GroupContext {
        let bundle = Bundle::embedded_default(&candle_core::Device::Cpu).unwrap();
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let detector = Arc::new(Detector::new(&bundle, DetectorSettings::default(), metrics));
        GroupContext::new(detector, Arc::new(Assignment::default()), None)
    }

    /// A statistics report with partitions 0 and 1 of `tx` (lags 7 and 40) and one broker.
    fn statistics(broker_state: &str) -> Statistics {
        use rdkafka::statistics::{Broker, Partition, Topic};
        let partition = |partition: i32, lag: i64| Partition {
            partition,
            consumer_lag: lag,
            consumer_lag_stored: lag,
            ..Partition::default()
        };
        let topic = Topic {
            topic: "tx".into(),
            partitions: [
                (0, partition(0, 7)),
                (1, partition(1, 40)),
                (-1, partition(-1, -1)),
            ]
            .into_iter()
            .collect(),
            ..Topic::default()
        };
        let broker = Broker {
            name: "b1".into(),
            state: broker_state.into(),
            ..Broker::default()
        };
        Statistics {
            brokers: [("b1".to_string(), broker)].into_iter().collect(),
            topics: [("tx".to_string(), topic)].into_iter().collect(),
            ..Statistics::default()
        }
    }

    #[test]
    fn lag_is_exported_for_held_partitions_only() {
        let c = context();
        c.held().insert(("tx".into(), 0));
        assert!(c.apply_statistics(&statistics("UP")));
        let lag = &c.detector.metrics().consumer_lag;
        assert_eq!(lag.with_label_values(&["tx", "0"]).get(), 7);
        let text = c.detector.metrics().render();
        assert!(
            !text.contains("partition=\"1\""),
            "partition 1 is not held: no series\n{text}"
        );
        // Revoking partition 0 removes its series at once, before the next statistics.
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("tx", 0);
        c.revoke(&tpl);
        assert!(
            !c.detector
                .metrics()
                .render()
                .contains("fraudstream_consumer_lag{")
        );
        assert!(!c.apply_statistics(&statistics("DOWN")), "no broker up");
        assert!(
            !c.detector
                .metrics()
                .render()
                .contains("fraudstream_consumer_lag{")
        );
    }
}
