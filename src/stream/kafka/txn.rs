//! Exactly-once (`--exactly-once`): alerts, scores, dead letters and changelog records are
//! produced by a transactional producer, and the input offsets they consumed are committed in
//! the same transaction (send offsets to transaction, KIP-447 style with the consumer's group
//! metadata). A `read_committed` reader of the output topics sees each transaction's outputs once,
//! even across a SIGKILL: an unfinished transaction is aborted when the next incarnation of the
//! member (same transactional id) starts, or after `transaction.timeout.ms`.
//!
//! A transaction is committed every [`DEFAULT_TRANSACTION_INTERVAL`], when the pipeline is idle,
//! before partitions are revoked, and at shutdown. Any transaction error is fatal for the process
//! (logged, exit non-zero): a restart restores card state from the committed changelog and reads
//! from the committed offsets, which is exactly the state the committed outputs left.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::stream::Origin;

/// How long a transaction stays open at most while records keep coming (100 ms: the latency
/// exactly-once adds before `read_committed` readers see an alert).
pub const DEFAULT_TRANSACTION_INTERVAL: Duration = Duration::from_millis(100);

/// How long the broker waits for an abandoned transaction before aborting it (10 s: a member
/// killed without a stable `--instance-id` blocks `read_committed` readers of its partitions for
/// at most this long).
pub const TRANSACTION_TIMEOUT_MS: &str = "10000";

/// Transaction coordinator calls (init, send offsets, commit, abort).
const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Txn {
    open: bool,
    began: Option<Instant>,
    /// The next offset to consume of each (topic, partition) published in this transaction.
    offsets: HashMap<(String, i32), i64>,
    records: u64,
}

/// The transactional producer's transactions.
pub struct Transactor {
    producer: FutureProducer,
    txn: Mutex<Txn>,
    interval: Duration,
    failed: Mutex<Option<String>>,
    /// Hands records held back (the changelog cache) to the producer inside the transaction,
    /// just before it commits.
    before_commit: Mutex<Option<BeforeCommit>>,
}

/// What runs inside each transaction just before its commit.
pub type BeforeCommit = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for Transactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactor")
            .field("interval", &self.interval)
            .finish()
    }
}

impl Transactor {
    /// Initialises transactions for `producer` (configured with a `transactional.id`): fences any
    /// earlier producer with the same id and aborts its open transaction. Blocking.
    pub fn new(producer: FutureProducer, interval: Duration) -> Result<Self, String> {
        producer
            .init_transactions(TXN_CALL_TIMEOUT)
            .map_err(|e| format!("initialising transactions: {e}"))?;
        Ok(Transactor {
            producer,
            txn: Mutex::default(),
            interval,
            failed: Mutex::default(),
            before_commit: Mutex::default(),
        })
    }

    /// Runs `f` inside every transaction just before it commits (the changelog cache's flush).
    pub fn before_commit(&self, f: BeforeCommit) {
        *self.before_commit.lock().expect("before-commit lock") = Some(f);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Txn> {
        self.txn.lock().expect("transaction lock")
    }

    /// Runs `produce` (which hands records to the producer) inside the open transaction,
    /// beginning one if needed, and records `origin`'s offset as consumed by it.
    pub fn within<T, E: From<String>>(
        &self,
        origin: &Origin,
        produce: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        self.check()?;
        let mut txn = self.lock();
        if !txn.open {
            if let Err(e) = self.producer.begin_transaction() {
                return Err(self.fail(format!("beginning a transaction: {e}")).into());
            }
            txn.open = true;
            txn.began = Some(Instant::now());
        }
        let out = produce()?;
        txn.offsets
            .insert((origin.topic.clone(), origin.partition), origin.offset + 1);
        txn.records += 1;
        Ok(out)
    }

    /// Whether the open transaction has run its interval.
    pub fn due(&self) -> bool {
        let txn = self.lock();
        txn.open && txn.began.is_some_and(|b| b.elapsed() >= self.interval)
    }

    /// Commits the open transaction with its consumed offsets (nothing to do when none is open).
    /// Blocking. An error is fatal: it is remembered, and every later call fails with it.
    pub fn commit(&self, group: &ConsumerGroupMetadata) -> Result<(), String> {
        self.check()?;
        let mut txn = self.lock();
        if !txn.open {
            return Ok(());
        }
        if let Some(f) = &*self.before_commit.lock().expect("before-commit lock") {
            f();
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &txn.offsets {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                .map_err(|e| self.fail(format!("offsets for the transaction: {e}")))?;
        }
        let committed = (if tpl.count() > 0 {
            self.producer
                .send_offsets_to_transaction(&tpl, group, TXN_CALL_TIMEOUT)
        } else {
            Ok(())
        })
        .and_then(|()| self.producer.commit_transaction(TXN_CALL_TIMEOUT));
        let records = txn.records;
        *txn = Txn::default();
        match committed {
            Ok(()) => {
                tracing::debug!(records, partitions = tpl.count(), "transaction committed");
                Ok(())
            }
            Err(e) => {
                let _ = self.producer.abort_transaction(TXN_CALL_TIMEOUT);
                Err(self.fail(format!(
                    "committing a transaction of {records} record(s) failed (aborted; the \
                     process stops, and a restart resumes from the last committed transaction): {e}"
                )))
            }
        }
    }

    /// The error that stopped transactions, if one did.
    pub fn check(&self) -> Result<(), String> {
        match &*self.failed.lock().expect("failed lock") {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn fail(&self, error: String) -> String {
        tracing::error!("exactly-once: {error}");
        let mut failed = self.failed.lock().expect("failed lock");
        failed.get_or_insert(error).clone()
    }
}
