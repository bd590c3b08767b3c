//! Card and terminal profiles, and which terminals each card uses.

use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Normal, Poisson};

use super::SimConfig;

/// A card's spending habits.
#[derive(Debug, Clone)]
pub struct CardProfile {
    /// Location on the 100×100 map.
    pub x: f64,
    /// Location on the 100×100 map.
    pub y: f64,
    /// Mean amount, uniform in [5, 100].
    pub mean_amount: f64,
    /// Amount distribution: Normal(mean, mean/2).
    pub amount: Normal<f64>,
    /// Mean transactions per day, uniform in [0, 4].
    pub mean_per_day: f64,
    /// Daily count distribution; None when the card makes no transactions (rate 0, or no
    /// terminal within reach).
    pub per_day: Option<Poisson<f64>>,
}

/// Every card, every terminal, and each card's reachable terminals.
#[derive(Debug, Clone)]
pub struct Profiles {
    /// Cards by id.
    pub cards: Vec<CardProfile>,
    /// Terminal locations by id.
    pub terminals: Vec<(f64, f64)>,
    /// For each card, the ids of terminals within `radius`, ascending.
    pub card_terminals: Vec<Vec<u32>>,
}

impl Profiles {
    /// Draws profiles: cards first, then terminals, all from one stream.
    pub fn generate(cfg: &SimConfig, rng: &mut ChaCha8Rng) -> Self {
        let mut cards: Vec<CardProfile> = (0..cfg.cards)
            .map(|_| {
                let x = rng.random_range(0.0..100.0);
                let y = rng.random_range(0.0..100.0);
                let mean_amount = rng.random_range(5.0..100.0);
                let mean_per_day = rng.random_range(0.0..4.0);
                CardProfile {
                    x,
                    y,
                    mean_amount,
                    amount: Normal::new(mean_amount, mean_amount / 2.0).expect("positive std"),
                    mean_per_day,
                    per_day: Poisson::new(mean_per_day).ok(),
                }
            })
            .collect();
        let terminals: Vec<(f64, f64)> = (0..cfg.terminals)
            .map(|_| (rng.random_range(0.0..100.0), rng.random_range(0.0..100.0)))
            .collect();
        let grid = Grid::new(&terminals, cfg.radius);
        let card_terminals: Vec<Vec<u32>> = cards
            .iter()
            .map(|c| grid.within(&terminals, c.x, c.y, cfg.radius))
            .collect();
        for (card, near) in cards.iter_mut().zip(&card_terminals) {
            if near.is_empty() {
                card.per_day = None;
            }
        }
        Profiles {
            cards,
            terminals,
            card_terminals,
        }
    }
}

/// Buckets terminals into square cells of side `radius`, so finding a card's terminals looks at
/// 9 cells instead of every terminal (needed for a million cards).
struct Grid {
    side: usize,
    cell: f64,
    buckets: Vec<Vec<u32>>,
}

impl Grid {
    fn new(points: &[(f64, f64)], radius: f64) -> Self {
        let cell = radius.max(1e-9);
        let side = (100.0 / cell).ceil() as usize + 1;
        let mut buckets = vec![Vec::new(); side * side];
        for (i, &(x, y)) in points.iter().enumerate() {
            let (cx, cy) = (Self::coord(x, cell, side), Self::coord(y, cell, side));
            buckets[cy * side + cx].push(i as u32);
        }
        Grid {
            side,
            cell,
            buckets,
        }
    }

    fn coord(v: f64, cell: f64, side: usize) -> usize {
        ((v / cell) as usize).min(side - 1)
    }

    fn within(&self, points: &[(f64, f64)], x: f64, y: f64, radius: f64) -> Vec<u32> {
        let (cx, cy) = (
            Self::coord(x, self.cell, self.side),
            Self::coord(y, self.cell, self.side),
        );
        let mut out = Vec::new();
        for gy in cy.saturating_sub(1)..=(cy + 1).min(self.side - 1) {
            for gx in cx.saturating_sub(1)..=(cx + 1).min(self.side - 1) {
                for &t in &self.buckets[gy * self.side + gx] {
                    let (tx, ty) = points[t as usize];
                    if (tx - x).powi(2) + (ty - y).powi(2) <= radius * radius {
                        out.push(t);
                    }
                }
            }
        }
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn grid_finds_exactly_the_brute_force_neighbours() {
        let cfg = SimConfig {
            cards: 200,
            terminals: 2_000,
            ..SimConfig::default()
        };
        let p = Profiles::generate(&cfg, &mut ChaCha8Rng::seed_from_u64(1));
        let mut total = 0;
        for (c, card) in p.cards.iter().enumerate() {
            let brute: Vec<u32> = (0..p.terminals.len() as u32)
                .filter(|&t| {
                    let (x, y) = p.terminals[t as usize];
                    (x - card.x).powi(2) + (y - card.y).powi(2) <= 25.0
                })
                .collect();
            assert_eq!(p.card_terminals[c], brute);
            total += brute.len();
        }
        // pi * 5^2 / 100^2 * 2000 terminals ~ 15.7 per card (fewer near the edges).
        let mean = total as f64 / 200.0;
        assert!((10.0..18.0).contains(&mean), "{mean}");
    }
}
