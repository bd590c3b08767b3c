//! The synthetic card-stream simulator, after the design in the Fraud Detection Handbook
//! (Le Borgne et al., Université Libre de Bruxelles): card and terminal profiles on a 100×100
//! map, daily Poisson transaction counts, and three fraud scenarios.
//!
//! Generation goes day by day, so memory holds one day's transactions however many days or
//! cards are asked for; each day has its own seeded random stream, so output is deterministic.

mod profiles;
mod write;

use std::collections::HashMap;

use chrono::NaiveDate;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::Serialize;

pub use profiles::{CardProfile, Profiles};
pub use write::{SimWriter, Summary};

const DAY: i64 = 86_400;

/// What to simulate. Defaults reproduce the handbook's data set (about 1.75 M transactions).
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Number of cards.
    pub cards: usize,
    /// Number of terminals.
    pub terminals: usize,
    /// Number of days.
    pub days: u32,
    /// The first day (UTC midnight).
    pub start: NaiveDate,
    /// Seed for every random draw.
    pub seed: u64,
    /// A card uses every terminal within this distance of its location.
    pub radius: f64,
    /// Scenario 1: amounts strictly above this are fraud.
    pub fraud_amount: f64,
    /// Scenario 2: terminals compromised each day, and for how many days.
    pub compromised_terminals: (usize, u32),
    /// Scenario 3: cards compromised each day, and for how many days.
    pub compromised_cards: (usize, u32),
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            cards: 5_000,
            terminals: 10_000,
            days: 183,
            start: NaiveDate::from_ymd_opt(2018, 4, 1).expect("valid date"),
            seed: 42,
            radius: 5.0,
            fraud_amount: 220.0,
            compromised_terminals: (2, 28),
            compromised_cards: (3, 14),
        }
    }
}

/// One simulated transaction: the columns of the simulator's output file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimTx {
    /// Sequential id in time order.
    pub transaction_id: u64,
    /// Unix seconds.
    pub ts: i64,
    /// The card.
    pub card_id: u32,
    /// The terminal.
    pub terminal_id: u32,
    /// Amount, rounded to cents.
    pub amount: f64,
    /// Whether it is fraud.
    pub is_fraud: bool,
    /// 0 for legitimate; 1 large amount, 2 compromised terminal, 3 compromised card.
    pub scenario: u8,
}

impl SimTx {
    /// The record as the simulator's JSONL writes it (a label of 0 or 1, the scenario).
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("transaction_id".into(), self.transaction_id.into());
        m.insert("ts".into(), self.ts.into());
        m.insert("card_id".into(), self.card_id.into());
        m.insert("terminal_id".into(), self.terminal_id.into());
        m.insert("amount".into(), self.amount.into());
        m.insert("is_fraud".into(), u8::from(self.is_fraud).into());
        m.insert("scenario".into(), self.scenario.into());
        m
    }
}

/// Generates the stream one day at a time.
pub struct Simulator {
    cfg: SimConfig,
    profiles: Profiles,
    /// Compromised terminal -> first day it is clean again.
    bad_terminals: HashMap<u32, u32>,
    /// Compromised card -> first day it is clean again.
    bad_cards: HashMap<u32, u32>,
    next_day: u32,
    next_id: u64,
    start_ts: i64,
}

impl Simulator {
    /// Draws the card and terminal profiles.
    pub fn new(cfg: SimConfig) -> Self {
        let profiles = Profiles::generate(&cfg, &mut stream(cfg.seed, 0));
        let start_ts = cfg
            .start
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp();
        Simulator {
            cfg,
            profiles,
            bad_terminals: HashMap::new(),
            bad_cards: HashMap::new(),
            next_day: 0,
            next_id: 0,
            start_ts,
        }
    }

    /// The profiles in use.
    pub fn profiles(&self) -> &Profiles {
        &self.profiles
    }

    /// The next day's transactions in time order, or None after the last day.
    pub fn next_day(&mut self) -> Option<Vec<SimTx>> {
        let day = self.next_day;
        if day >= self.cfg.days {
            return None;
        }
        self.next_day += 1;
        let mut rng = stream(self.cfg.seed, u64::from(day) + 1);
        self.compromise(day, &mut rng);
        let mut txs = self.legitimate_day(day, &mut rng);
        for tx in &mut txs {
            self.label(day, tx, &mut rng);
            tx.transaction_id = self.next_id;
            self.next_id += 1;
        }
        Some(txs)
    }

    /// Scenarios 2 and 3: new terminals and cards go bad today, for a fixed number of days.
    fn compromise(&mut self, day: u32, rng: &mut ChaCha8Rng) {
        self.bad_terminals.retain(|_, until| *until > day);
        self.bad_cards.retain(|_, until| *until > day);
        let (n, days) = self.cfg.compromised_terminals;
        for t in rand::seq::index::sample(rng, self.cfg.terminals, n.min(self.cfg.terminals)) {
            let until = self.bad_terminals.entry(t as u32).or_default();
            *until = (*until).max(day + days);
        }
        let (n, days) = self.cfg.compromised_cards;
        for c in rand::seq::index::sample(rng, self.cfg.cards, n.min(self.cfg.cards)) {
            let until = self.bad_cards.entry(c as u32).or_default();
            *until = (*until).max(day + days);
        }
    }

    /// Each card's transactions for one day, sorted by time (ties by card, then draw order).
    fn legitimate_day(&self, day: u32, rng: &mut ChaCha8Rng) -> Vec<SimTx> {
        let second = Normal::new(43_200.0, 20_000.0).expect("valid normal");
        let mut txs = Vec::new();
        for (card_id, card) in self.profiles.cards.iter().enumerate() {
            let Some(count) = &card.per_day else { continue };
            let n = count.sample(rng) as u64;
            for _ in 0..n {
                let s = second.sample(rng) as i64;
                // Like the handbook, a draw outside the day is dropped, consuming no further draws.
                if s <= 0 || s >= DAY {
                    continue;
                }
                let mut amount = card.amount.sample(rng);
                if amount < 0.0 {
                    amount = rng.random_range(0.0..2.0 * card.mean_amount);
                }
                let terminals = &self.profiles.card_terminals[card_id];
                let terminal_id = terminals[rng.random_range(0..terminals.len())];
                txs.push(SimTx {
                    transaction_id: 0,
                    ts: self.start_ts + i64::from(day) * DAY + s,
                    card_id: card_id as u32,
                    terminal_id,
                    amount: (amount * 100.0).round() / 100.0,
                    is_fraud: false,
                    scenario: 0,
                });
            }
        }
        // Stable sort keeps each card's draw order among equal seconds.
        txs.sort_by_key(|t| (t.ts, t.card_id));
        txs
    }

    /// Applies the fraud scenarios; a later scenario overrides an earlier one's label.
    fn label(&self, day: u32, tx: &mut SimTx, rng: &mut ChaCha8Rng) {
        if tx.amount > self.cfg.fraud_amount {
            tx.is_fraud = true;
            tx.scenario = 1;
        }
        if self
            .bad_terminals
            .get(&tx.terminal_id)
            .is_some_and(|&u| day < u)
        {
            tx.is_fraud = true;
            tx.scenario = 2;
        }
        // One draw per transaction of a compromised card, whatever the outcome, keeps the
        // random stream independent of earlier labels.
        if self.bad_cards.get(&tx.card_id).is_some_and(|&u| day < u) && rng.random_bool(1.0 / 3.0) {
            tx.amount = ((tx.amount * 5.0) * 100.0).round() / 100.0;
            tx.is_fraud = true;
            tx.scenario = 3;
        }
    }
}

impl Iterator for Simulator {
    type Item = Vec<SimTx>;
    fn next(&mut self) -> Option<Vec<SimTx>> {
        self.next_day()
    }
}

/// An independent, reproducible random stream per (seed, purpose): 0 for profiles, d+1 for day d.
fn stream(seed: u64, id: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(id);
    rng
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimConfig {
        SimConfig {
            cards: 300,
            terminals: 600,
            days: 20,
            ..SimConfig::default()
        }
    }

    #[test]
    fn same_seed_same_stream_other_seed_other_stream() {
        let a: Vec<SimTx> = Simulator::new(small()).flatten().collect();
        let b: Vec<SimTx> = Simulator::new(small()).flatten().collect();
        assert!(!a.is_empty());
        assert_eq!(a, b);
        let c: Vec<SimTx> = Simulator::new(SimConfig { seed: 7, ..small() })
            .flatten()
            .collect();
        assert_ne!(a, c);
    }

    #[test]
    fn stream_is_sorted_with_sequential_ids_and_valid_fields() {
        let cfg = small();
        let txs: Vec<SimTx> = Simulator::new(cfg.clone()).flatten().collect();
        let start = cfg
            .start
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp();
        for (i, w) in txs.windows(2).enumerate() {
            assert!(w[0].ts <= w[1].ts);
            assert_eq!(w[0].transaction_id, i as u64);
        }
        for t in &txs {
            assert!(t.ts > start && t.ts < start + i64::from(cfg.days) * DAY);
            assert!(
                t.amount >= 0.0 && (t.amount * 100.0 - (t.amount * 100.0).round()).abs() < 1e-6
            );
            assert_eq!(t.is_fraud, t.scenario != 0);
            if t.scenario == 0 {
                assert!(t.amount <= cfg.fraud_amount);
            }
        }
    }

    #[test]
    fn cards_only_use_terminals_within_the_radius() {
        let sim = Simulator::new(small());
        let p = sim.profiles();
        for (c, card) in p.cards.iter().enumerate() {
            for &t in &p.card_terminals[c] {
                let (x, y) = p.terminals[t as usize];
                assert!(((x - card.x).powi(2) + (y - card.y).powi(2)).sqrt() <= 5.0);
            }
        }
        for tx in Simulator::new(small()).flatten() {
            assert!(p.card_terminals[tx.card_id as usize].contains(&tx.terminal_id));
        }
    }

    /// The handbook's defaults: ~1.75 M transactions, ~0.84% fraud, all three scenarios.
    #[test]
    fn default_run_statistics() {
        let cfg = SimConfig::default();
        let days = cfg.days as f64;
        let mut n = 0u64;
        let mut by_scenario = [0u64; 4];
        for day in Simulator::new(cfg) {
            n += day.len() as u64;
            for t in day {
                by_scenario[t.scenario as usize] += 1;
            }
        }
        let frauds: u64 = by_scenario[1..].iter().sum();
        let rate = frauds as f64 / n as f64;
        let per_day = n as f64 / days;
        assert!((0.006..=0.011).contains(&rate), "fraud rate {rate}");
        assert!(
            (8_500.0..=11_500.0).contains(&per_day),
            "{per_day} transactions a day"
        );
        assert!(by_scenario[1] > 300, "scenario 1: {by_scenario:?}");
        assert!(by_scenario[2] > 3_000, "scenario 2: {by_scenario:?}");
        assert!(by_scenario[3] > 1_500, "scenario 3: {by_scenario:?}");
    }
}
