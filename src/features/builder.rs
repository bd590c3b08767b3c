//! The one path from a transaction to its window, shared by training (offline, a time-sorted
//! file) and serving (online, one record at a time from many partitions).

use std::collections::HashMap;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use super::featurizer::{CardHistory, Featurizer};
use super::labels::LabelTables;
use super::offline::{Step, label_events, merged};
use super::scaler::RobustScaler;
use super::window::Window;
use crate::schema::{FeatureSpec, LabelEvent, Span, Transaction};

/// The model's default window length (transactions per card).
pub const DEFAULT_WINDOW: usize = 30;

/// Everything one card carries between its transactions.
#[derive(Debug, Clone)]
pub struct CardState {
    /// State for derived features (time since previous transaction).
    pub history: CardHistory,
    /// The last N scaled feature vectors.
    pub window: Window,
    /// When the card was last seen online (clock milliseconds), for idle eviction.
    pub last_seen_ms: u64,
    /// The input partition its latest transaction came from (online), so the cards of a revoked
    /// partition can be forgotten.
    pub shard: i32,
}

/// The window ending with one transaction, ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowSample {
    /// The card.
    pub key: String,
    /// The transaction this window ends with.
    pub id: Option<String>,
    /// Its event time.
    pub ts: f64,
    /// Its label, when known.
    pub label: Option<bool>,
    /// Real transactions in the window (the rest is left padding).
    pub len: usize,
    /// `window_len * width` scaled features, padding first, current transaction last.
    pub data: Vec<f32>,
    /// The current transaction's raw (unscaled) features, for explaining an alert.
    pub raw: Vec<f64>,
}

/// What observing a transaction did.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    /// The transaction entered its card's window; this is the window to score.
    Window(WindowSample),
    /// Its id is already in the card's window (a redelivery): state is unchanged.
    Duplicate,
}

/// Featurizer + fitted scaler + window length: the whole transaction-to-window recipe.
#[derive(Debug, Clone)]
pub struct WindowBuilder {
    featurizer: Featurizer,
    scaler: RobustScaler,
    window_len: usize,
}

impl WindowBuilder {
    /// Combines a spec with its fitted scaler.
    pub fn new(spec: FeatureSpec, scaler: RobustScaler, window_len: usize) -> Self {
        assert_eq!(
            spec.feature_names(),
            scaler.names,
            "scaler was fitted for other features"
        );
        WindowBuilder {
            featurizer: Featurizer::new(spec),
            scaler,
            window_len,
        }
    }

    /// Features per transaction.
    pub fn width(&self) -> usize {
        self.featurizer.width()
    }

    /// Transactions per window.
    pub fn window_len(&self) -> usize {
        self.window_len
    }

    /// The feature spec.
    pub fn spec(&self) -> &FeatureSpec {
        self.featurizer.spec()
    }

    /// The fitted scaler.
    pub fn scaler(&self) -> &RobustScaler {
        &self.scaler
    }

    /// How many numeric fields card aggregates sum.
    pub fn aggregated_fields(&self) -> usize {
        self.featurizer.aggregated_fields()
    }

    /// Identifies the recipe (spec, scaler, window length): a card state saved by one recipe
    /// means nothing to another (its rows are scaled features of that spec). The first 8 bytes
    /// of a SHA-256, stable across processes and builds.
    pub fn fingerprint(&self) -> u64 {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let spec = serde_json::to_vec(self.featurizer.spec()).expect("a spec serialises");
        h.update(&spec);
        for v in self.scaler.center.iter().chain(&self.scaler.scale) {
            h.update(v.to_le_bytes());
        }
        h.update((self.window_len as u64).to_le_bytes());
        let digest = h.finalize();
        u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
    }

    /// A new card's empty state.
    pub fn new_card(&self) -> CardState {
        CardState {
            history: CardHistory::default(),
            window: Window::new(self.window_len, self.width()),
            last_seen_ms: 0,
            shard: 0,
        }
    }

    /// Empty label-rate tables for this spec.
    pub fn new_tables(&self) -> LabelTables {
        LabelTables::new(self.featurizer.spec())
    }

    /// Adds `tx` to its card's state and returns the window that ends with it. Label-rate
    /// features read `tables` as of `tx`'s event time.
    pub fn observe(
        &self,
        card: &mut CardState,
        tables: &LabelTables,
        tx: &Transaction,
    ) -> Observed {
        if let Some(id) = &tx.id
            && card.window.contains_id(id)
        {
            return Observed::Duplicate;
        }
        let mut raw = Vec::with_capacity(self.width());
        self.featurizer.raw(&mut card.history, tables, tx, &mut raw);
        let mut scaled = vec![0f32; self.width()];
        self.scaler.transform_into(&raw, &mut scaled);
        card.window.push(&scaled, tx.id.as_deref(), tx.ts);
        let mut data = vec![0f32; self.window_len * self.width()];
        let len = card.window.write_padded(&mut data);
        Observed::Window(WindowSample {
            key: tx.key.clone(),
            id: tx.id.clone(),
            ts: tx.ts,
            label: tx.label,
            len,
            data,
            raw,
        })
    }

    /// Offline: replays time-sorted transactions, with their labels merged in at their known
    /// times (see [`offline`](super::offline)), through per-card state and label tables,
    /// calling `sink` with each transaction and its window. Every transaction enters its card's
    /// window, so transactions the sink ignores (an earlier period) are still history.
    pub fn replay(
        &self,
        sorted: &[Transaction],
        label_delay: Span,
        mut sink: impl FnMut(&Transaction, WindowSample),
    ) {
        let tables = self.new_tables();
        let labels = label_events(self.featurizer.spec(), sorted, label_delay);
        let mut cards: HashMap<&str, CardState> = HashMap::new();
        merged(sorted, &labels, |step| match step {
            Step::Label(l) => tables.apply(l),
            Step::Transaction(tx) => {
                tables.advance(0, tx.ts);
                let card = cards.entry(&tx.key).or_insert_with(|| self.new_card());
                if let Observed::Window(w) = self.observe(card, &tables, tx) {
                    sink(tx, w);
                }
            }
        });
    }

    /// The windows of the transactions `target` selects (see [`WindowBuilder::replay`]).
    pub fn build_offline(
        &self,
        sorted: &[Transaction],
        label_delay: Span,
        mut target: impl FnMut(&Transaction) -> bool,
    ) -> Vec<WindowSample> {
        let mut out = Vec::new();
        self.replay(sorted, label_delay, |tx, w| {
            if target(tx) {
                out.push(w);
            }
        });
        out
    }
}

/// Fits the robust scaler on the raw features of the transactions `fit` selects, with every
/// earlier transaction feeding the cards' history (so a card's first training transaction still
/// sees its gap since the previous one). `sorted` must be in time order.
pub fn fit_scaler(
    spec: &FeatureSpec,
    sorted: &[Transaction],
    label_delay: Span,
    mut fit: impl FnMut(&Transaction) -> bool,
) -> RobustScaler {
    let featurizer = Featurizer::new(spec.clone());
    let tables = LabelTables::new(spec);
    let labels = label_events(spec, sorted, label_delay);
    let mut histories: HashMap<&str, CardHistory> = HashMap::new();
    let mut columns = vec![Vec::new(); featurizer.width()];
    let mut raw = Vec::new();
    merged(sorted, &labels, |step| match step {
        Step::Label(l) => tables.apply(l),
        Step::Transaction(tx) => {
            tables.advance(0, tx.ts);
            let history = histories.entry(&tx.key).or_default();
            featurizer.raw(history, &tables, tx, &mut raw);
            if fit(tx) {
                for (col, x) in columns.iter_mut().zip(&raw) {
                    col.push(*x);
                }
            }
        }
    });
    RobustScaler::fit(spec.feature_names(), columns)
}

/// How much card state the detector keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLimits {
    /// At most this many cards; beyond it the least recently seen are evicted.
    pub max_cards: usize,
    /// Cards not seen for this long are evicted (milliseconds).
    pub idle_ttl_ms: u64,
}

impl StateLimits {
    /// A million cards: about 2.2 GB of windows at the ~2.2 KB per card `fraudstream bench`
    /// measures.
    pub const DEFAULT_MAX_CARDS: usize = 1_000_000;
    /// 30 days: a card idle longer starts over, as the model's longest context window does.
    pub const DEFAULT_IDLE_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
}

impl Default for StateLimits {
    fn default() -> Self {
        StateLimits {
            max_cards: Self::DEFAULT_MAX_CARDS,
            idle_ttl_ms: Self::DEFAULT_IDLE_TTL_MS,
        }
    }
}

/// Milliseconds on some clock: wall time in serving, a hand-moved clock in tests.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The wall clock, in milliseconds since the epoch.
pub fn wall_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    })
}

/// Online: every live card's state, shared by the consumer tasks, bounded by [`StateLimits`].
///
/// Each call locks only its own card's shard entry, and never across an await.
pub struct CardStore {
    builder: WindowBuilder,
    cards: DashMap<String, CardState>,
    /// Label-rate state, shared by every card (and fed by every label, whatever its card).
    tables: LabelTables,
    limits: StateLimits,
    clock: Clock,
    evicted: AtomicU64,
}

impl std::fmt::Debug for CardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardStore")
            .field("cards", &self.cards.len())
            .field("limits", &self.limits)
            .finish()
    }
}

impl CardStore {
    /// An empty store with default limits on the wall clock.
    pub fn new(builder: WindowBuilder) -> Self {
        Self::with_limits(builder, StateLimits::default(), wall_clock())
    }

    /// An empty store with explicit limits and clock.
    pub fn with_limits(builder: WindowBuilder, limits: StateLimits, clock: Clock) -> Self {
        CardStore {
            tables: builder.new_tables(),
            builder,
            cards: DashMap::new(),
            limits,
            clock,
            evicted: AtomicU64::new(0),
        }
    }

    /// The builder the store applies.
    pub fn builder(&self) -> &WindowBuilder {
        &self.builder
    }

    /// Adds one transaction to its card and returns the window to score.
    pub fn observe(&self, tx: &Transaction) -> Observed {
        self.observe_with_ids(tx, 0)
            .map_or(Observed::Duplicate, |(w, _)| Observed::Window(w))
    }

    /// Like [`CardStore::observe`] for a transaction read from input partition `shard`, also
    /// returning the window's transaction ids aligned with its rows (None for padding), so an
    /// alert can name the transactions the model attended to.
    pub fn observe_with_ids(
        &self,
        tx: &Transaction,
        shard: i32,
    ) -> Option<(WindowSample, Vec<Option<std::sync::Arc<str>>>)> {
        let now = (self.clock)();
        let result = {
            let mut card = self
                .cards
                .entry(tx.key.clone())
                .or_insert_with(|| self.builder.new_card());
            card.last_seen_ms = now;
            card.shard = shard;
            self.tables.advance(shard, tx.ts);
            match self.builder.observe(&mut card, &self.tables, tx) {
                Observed::Window(w) => Some((w, card.window.padded_ids())),
                Observed::Duplicate => None,
            }
        };
        // Amortised: let the store overshoot by 10% before sweeping inline.
        if self.cards.len() > self.limits.max_cards + self.limits.max_cards / 10 {
            self.evict();
        }
        result
    }

    /// Takes in a label for the label-rate features (any card's: the tables are global).
    pub fn label(&self, event: &LabelEvent) {
        self.tables.apply(event);
    }

    /// The label-rate tables.
    pub fn tables(&self) -> &LabelTables {
        &self.tables
    }

    /// Offline warm-up: replays a labelled, time-sorted history through this store exactly as
    /// [`WindowBuilder::replay`] would (labels at their known times), without scoring, so the
    /// stream continues from the state a detector that had seen the history would hold.
    /// Returns (transactions, labels) taken in.
    pub fn warm(&self, sorted: &[Transaction], label_delay: Span) -> (usize, usize) {
        let labels = label_events(self.builder.featurizer.spec(), sorted, label_delay);
        let mut n = 0;
        merged(sorted, &labels, |step| match step {
            Step::Label(l) => self.label(l),
            Step::Transaction(tx) => {
                n += 1;
                self.observe(tx);
            }
        });
        (n, labels.len())
    }

    /// Evicts idle cards, then the least recently seen ones beyond the cap, and prunes label
    /// buckets no feature can read any more. Returns how many cards were evicted.
    pub fn evict(&self) -> usize {
        self.tables.prune();
        let now = (self.clock)();
        let before = self.cards.len();
        self.cards
            .retain(|_, c| now.saturating_sub(c.last_seen_ms) < self.limits.idle_ttl_ms);
        let excess = self.cards.len().saturating_sub(self.limits.max_cards);
        if excess > 0 {
            let mut seen: Vec<(u64, String)> = self
                .cards
                .iter()
                .map(|e| (e.value().last_seen_ms, e.key().clone()))
                .collect();
            seen.sort_unstable();
            for (_, key) in seen.into_iter().take(excess) {
                self.cards.remove(&key);
            }
        }
        let evicted = before.saturating_sub(self.cards.len());
        self.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
        evicted
    }

    /// Cards evicted so far.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Forgets every card last seen on one of these shards (input partitions taken away from
    /// this instance); returns how many. Not counted as evictions.
    pub fn forget_shards(&self, shards: &[i32]) -> usize {
        self.tables.forget_shards(shards);
        let before = self.cards.len();
        self.cards.retain(|_, c| !shards.contains(&c.shard));
        before.saturating_sub(self.cards.len())
    }

    /// Runs `f` on a card's state, if the card is held.
    pub fn with_card<R>(&self, key: &str, f: impl FnOnce(&CardState) -> R) -> Option<R> {
        self.cards.get(key).map(|c| f(&c))
    }

    /// Calls `f` with every held card (for a snapshot; concurrent changes may or may not be seen).
    pub fn for_each_card(&self, mut f: impl FnMut(&str, &CardState)) {
        for entry in &self.cards {
            f(entry.key(), entry.value());
        }
    }

    /// Puts restored cards in place (replacing any held under the same key).
    pub fn restore(&self, cards: Vec<(String, CardState)>) {
        for (key, card) in cards {
            self.cards.insert(key, card);
        }
    }

    /// Live cards.
    pub fn len(&self) -> usize {
        self.cards.len()
    }

    /// Whether no card is held.
    pub fn is_empty(&self) -> bool {
        self.cards.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::DEFAULT_LABEL_DELAY;

    fn tx(card: &str, id: &str, ts: f64, amount: f64) -> Transaction {
        Transaction {
            key: card.into(),
            ts,
            id: Some(id.into()),
            label: Some(false),
            labelled_at: None,
            numeric: vec![amount],
            context: vec!["T1".into()],
        }
    }

    /// The card features without aggregates: amount, gap, hour (2), log1p amount.
    fn spec() -> FeatureSpec {
        let mut spec = FeatureSpec::cards();
        spec.derived.truncate(3);
        spec
    }

    fn builder(len: usize) -> WindowBuilder {
        let spec = spec();
        WindowBuilder::new(
            spec.clone(),
            RobustScaler::identity(spec.feature_names()),
            len,
        )
    }

    #[test]
    fn redelivered_transaction_does_not_enter_twice() {
        let store = CardStore::new(builder(4));
        let t = tx("c1", "t1", 10.0, 5.0);
        assert!(matches!(store.observe(&t), Observed::Window(w) if w.len == 1));
        assert_eq!(store.observe(&t), Observed::Duplicate);
        let Observed::Window(w) = store.observe(&tx("c1", "t2", 20.0, 6.0)) else {
            panic!("new id must be scored")
        };
        assert_eq!(w.len, 2);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn history_before_the_target_period_feeds_windows() {
        let b = builder(3);
        let txs = vec![
            tx("a", "1", 1.0, 1.0),
            tx("b", "2", 2.0, 2.0),
            tx("a", "3", 3.0, 3.0),
        ];
        let w = b.build_offline(&txs, DEFAULT_LABEL_DELAY, |t| t.ts >= 3.0);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].len, 2, "the earlier transaction is history");
        // Row layout: [padding row][card a at t=1][card a at t=3]; column 0 is the amount.
        assert_eq!(w[0].data[..5], [0.0; 5]);
        assert_eq!((w[0].data[5], w[0].data[10]), (1.0, 3.0));
        assert_eq!(
            w[0].data[11],
            2f32.ln_1p(),
            "gap since the history transaction"
        );
    }

    #[test]
    fn idle_cards_expire_and_the_cap_evicts_the_least_recent() {
        let now = Arc::new(AtomicU64::new(0));
        let clock: Clock = {
            let now = now.clone();
            Arc::new(move || now.load(Ordering::Relaxed))
        };
        let limits = StateLimits {
            max_cards: 3,
            idle_ttl_ms: 1_000,
        };
        let store = CardStore::with_limits(builder(4), limits, clock);
        for (i, card) in ["a", "b", "c"].iter().enumerate() {
            now.store(i as u64 * 100, Ordering::Relaxed);
            store.observe(&tx(card, &format!("t{i}"), i as f64, 1.0));
        }
        now.store(1_050, Ordering::Relaxed);
        assert_eq!(store.evict(), 1, "a is idle past the TTL");
        now.store(1_060, Ordering::Relaxed);
        store.observe(&tx("d", "t3", 3.0, 1.0));
        now.store(1_070, Ordering::Relaxed);
        store.observe(&tx("e", "t4", 4.0, 1.0));
        // Four cards exceed the cap of 3: the inline sweep evicts b, the least recently seen.
        assert_eq!(store.len(), 3);
        assert_eq!(store.evicted(), 2);
        assert_eq!(store.evict(), 0, "nothing idle, nothing over the cap");
        // An evicted card starts over with an empty window.
        let Observed::Window(w) = store.observe(&tx("b", "t5", 5.0, 1.0)) else {
            panic!()
        };
        assert_eq!(w.len, 1);
    }

    #[test]
    fn scaler_sees_only_selected_rows() {
        let spec = spec();
        let txs = vec![
            tx("a", "1", 1.0, 1.0),
            tx("a", "2", 2.0, 3.0),
            tx("a", "3", 3.0, 1000.0),
        ];
        let s = fit_scaler(&spec, &txs, DEFAULT_LABEL_DELAY, |t| t.ts < 3.0);
        assert_eq!(s.fitted_rows, 2);
        assert_eq!(s.center[0], 2.0);
    }
}
