//! The consumer group as a pipeline source: messages become envelopes stamped with their
//! partition's generation; handled offsets are stored for librdkafka to commit.

use std::sync::Arc;

use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};

use super::context::GroupContext;
use crate::stream::acks::{Assignment, OffsetStore};
use crate::stream::{Envelope, Source};

/// The detector's consumer group on the input topic.
pub struct KafkaSource {
    consumer: Arc<StreamConsumer<GroupContext>>,
    assignment: Arc<Assignment>,
    /// Until this says true, nothing is consumed (label tables are being restored).
    restored: Option<tokio::sync::watch::Receiver<bool>>,
    /// Exactly-once: offsets are committed by the transactions, never stored or committed here.
    transactional: bool,
    /// The fatal error that stopped consuming, if one did.
    failure: Option<String>,
    /// Runs after the final commit, while the cards are still held (the last snapshot).
    before_close: Option<Box<dyn FnOnce() + Send + Sync>>,
}

/// Errors that retrying cannot fix (librdkafka's fatal errors, a refused authorization): the
/// detector stops with a message instead of spinning on them.
pub fn is_fatal(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::Fatal
                | C::TopicAuthorizationFailed
                | C::GroupAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed
                | C::SaslAuthenticationFailed
                | C::Authentication
                | C::ProducerFenced
                | C::FencedInstanceId
        )
    )
}

impl KafkaSource {
    /// A source on a subscribed consumer whose context revokes through `assignment`; with
    /// `restored`, it consumes nothing until that turns true.
    pub fn new(
        consumer: Arc<StreamConsumer<GroupContext>>,
        assignment: Arc<Assignment>,
        restored: Option<tokio::sync::watch::Receiver<bool>>,
        transactional: bool,
    ) -> Self {
        KafkaSource {
            consumer,
            assignment,
            restored,
            transactional,
            failure: None,
            before_close: None,
        }
    }

    /// Runs `f` (blocking) at close, after the final commit and before the partitions are given
    /// back.
    pub fn before_close(mut self, f: Box<dyn FnOnce() + Send + Sync>) -> Self {
        self.before_close = Some(f);
        self
    }

    /// The final commit of stored offsets (exactly-once: done by the last transaction).
    async fn commit(&self) {
        if self.transactional {
            tracing::info!("offsets committed with the last transaction");
            return;
        }
        self.commit_stored().await;
    }
}

/// A consumed message as the transport-independent envelope (the payload is copied so the
/// message can be released at once).
pub fn envelope(m: &impl Message, generation: u64) -> Envelope {
    Envelope {
        payload: m.payload().unwrap_or_default().to_vec(),
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        generation,
    }
}

impl Source for KafkaSource {
    async fn next(&mut self) -> Option<Envelope> {
        if let Some(mut r) = self.restored.take() {
            // A closed channel (the labels task ended) releases the gate too.
            let _ = r.wait_for(|done| *done).await;
        }
        loop {
            match self.consumer.recv().await {
                Ok(m) => {
                    let generation = self.assignment.generation(m.partition());
                    return Some(envelope(&m, generation));
                }
                Err(e) if is_fatal(&e) => {
                    tracing::error!("consumer: {e}: stopping (a fatal error is not retried)");
                    self.failure = Some(format!("consumer: {e}"));
                    return None;
                }
                Err(e) => tracing::warn!("consumer: {e}"),
            }
        }
    }

    fn offsets(&self) -> Arc<dyn OffsetStore> {
        if self.transactional {
            Arc::new(InTransactions)
        } else {
            Arc::new(Offsets(self.consumer.clone()))
        }
    }

    fn assignment(&self) -> Arc<Assignment> {
        self.assignment.clone()
    }

    fn failure(&self) -> Option<String> {
        self.failure.clone()
    }

    async fn close(mut self) {
        let last = self.before_close.take();
        self.commit().await;
        if let Some(f) = last {
            let _ = tokio::task::spawn_blocking(f).await;
        }
    }
}

impl KafkaSource {
    async fn commit_stored(&self) {
        // A synchronous commit waits for the broker: off the runtime's threads, so that a
        // shutdown deadline can give up on it.
        let consumer = self.consumer.clone();
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
                .await;
        let Ok(committed) = committed else {
            tracing::error!("final commit: the commit task failed");
            return;
        };
        match committed {
            Ok(()) => tracing::info!("offsets committed"),
            // Nothing stored since the last automatic commit: everything is already committed.
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => tracing::info!("offsets already committed"),
            Err(e) => tracing::warn!("final commit: {e}"),
        }
    }
}

/// librdkafka's offset store: stored offsets are committed by the auto-commit timer, on
/// revocation and at shutdown.
struct Offsets(Arc<StreamConsumer<GroupContext>>);

/// Exactly-once: the transaction that carries a message's outputs commits its offset.
struct InTransactions;

impl OffsetStore for InTransactions {
    fn store(&self, _: &crate::stream::Origin) -> Result<(), String> {
        Ok(())
    }
}

impl OffsetStore for Offsets {
    fn store(&self, o: &crate::stream::Origin) -> Result<(), String> {
        self.0
            .store_offset(&o.topic, o.partition, o.offset)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode as C;

    #[test]
    fn authorization_and_fencing_are_fatal_a_lost_connection_is_not() {
        for code in [
            C::TopicAuthorizationFailed,
            C::GroupAuthorizationFailed,
            C::Fatal,
            C::FencedInstanceId,
        ] {
            assert!(is_fatal(&KafkaError::MessageConsumption(code)), "{code:?}");
        }
        for code in [
            C::BrokerTransportFailure,
            C::AllBrokersDown,
            C::UnknownTopicOrPartition,
            C::RequestTimedOut,
        ] {
            assert!(!is_fatal(&KafkaError::MessageConsumption(code)), "{code:?}");
        }
    }
}
