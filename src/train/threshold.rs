//! Choosing the alert threshold on the VALIDATION period, by one of three rules (the rule and
//! choice types live with the model bundle that records them).

use super::metrics::{PrPoint, f1, pr_curve};
use crate::model::{Choice, ThresholdRule};

impl ThresholdRule {
    /// Applies the rule to scores and labels. With no data, the threshold is 0.5.
    pub fn choose(&self, scores: &[f32], labels: &[bool]) -> Choice {
        let curve = pr_curve(scores, labels);
        let choice = |p: &PrPoint, met: bool| Choice {
            threshold: p.threshold,
            precision: p.precision,
            recall: p.recall,
            f1: f1(p.precision, p.recall),
            alert_rate: p.alert_rate,
            rule_met: met,
        };
        let Some(first) = curve.first() else {
            return Choice {
                threshold: 0.5,
                precision: 0.0,
                recall: 0.0,
                f1: 0.0,
                alert_rate: 0.0,
                rule_met: false,
            };
        };
        // Among equal objectives prefer the higher threshold (fewer alerts): the curve runs from
        // high to low thresholds and only a strictly better point replaces the best.
        let best_by = |key: &dyn Fn(&PrPoint) -> f64, ok: &dyn Fn(&PrPoint) -> bool| {
            curve
                .iter()
                .filter(|p| ok(p))
                .fold(None::<&PrPoint>, |best, p| match best {
                    Some(b) if key(b) >= key(p) => Some(b),
                    _ => Some(p),
                })
        };
        match *self {
            ThresholdRule::MaxF1 => {
                let best = best_by(&|p| f1(p.precision, p.recall), &|_| true);
                choice(best.unwrap_or(first), true)
            }
            ThresholdRule::MinPrecision { precision } => {
                match best_by(&|p| p.recall, &|p| p.precision >= precision) {
                    Some(p) => choice(p, true),
                    None => choice(best_by(&|p| p.precision, &|_| true).unwrap_or(first), false),
                }
            }
            ThresholdRule::AlertRate { rate } => {
                // The lowest threshold that alerts on at most `rate` of transactions.
                let p = curve
                    .iter()
                    .take_while(|p| p.alert_rate <= rate)
                    .last()
                    .unwrap_or(first);
                choice(p, p.alert_rate <= rate)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Scores high to low with labels: 0.9 F, 0.8 T, 0.7 T, 0.6 F, 0.5 T, 0.4 F, 0.3 F, 0.2 F.
    // Thresholds:  0.9: P 0/1 R 0    0.8: P 1/2 R 1/3   0.7: P 2/3 R 2/3   0.6: P 2/4 R 2/3
    //              0.5: P 3/5 R 1    0.4: P 3/6 R 1 ...
    // F1: 0.7 -> 2/3;  0.5 -> 0.75 (best).
    const S: [f32; 8] = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2];
    const Y: [bool; 8] = [false, true, true, false, true, false, false, false];

    #[test]
    fn max_f1() {
        let c = ThresholdRule::MaxF1.choose(&S, &Y);
        assert_eq!(c.threshold, f64::from(0.5f32));
        assert!((c.f1 - 0.75).abs() < 1e-12 && c.rule_met);
    }

    #[test]
    fn min_precision_takes_best_recall_above_it() {
        let c = ThresholdRule::MinPrecision { precision: 0.6 }.choose(&S, &Y);
        assert_eq!(c.threshold, f64::from(0.5f32), "P 0.6, recall 1");
        let c = ThresholdRule::MinPrecision { precision: 0.65 }.choose(&S, &Y);
        assert_eq!(c.threshold, f64::from(0.7f32), "P 2/3, recall 2/3");
        let c = ThresholdRule::MinPrecision { precision: 1.01 }.choose(&S, &Y);
        assert!(!c.rule_met);
    }

    #[test]
    fn alert_rate_alerts_on_that_fraction() {
        let c = ThresholdRule::AlertRate { rate: 0.25 }.choose(&S, &Y);
        assert_eq!(c.threshold, f64::from(0.8f32));
        assert_eq!(c.alert_rate, 0.25);
        let c = ThresholdRule::AlertRate { rate: 0.3 }.choose(&S, &Y);
        assert_eq!(c.alert_rate, 0.25, "never more than the rate");
    }
}
