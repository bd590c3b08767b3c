//! Features computed from state rather than read from the record: the card's own history
//! (time since its previous transaction, counts and means over time windows) and delayed fraud
//! labels of a context key (a terminal's fraud rate), plus calendar flags.
//!
//! Declarative: a spec lists them in TOML, e.g.
//! `{kind = "label_rate", key = "terminal_id", window = "7d", delay = "7d"}`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written like `1d`, `7d`, `12h`, `30m` or `90s` (humantime syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(u64);

impl Span {
    /// A span of whole seconds.
    pub const fn secs(s: u64) -> Span {
        Span(s)
    }

    /// A span of whole days.
    pub const fn days(d: u64) -> Span {
        Span(d * 86_400)
    }

    /// Its length in seconds.
    pub fn as_secs(self) -> u64 {
        self.0
    }

    /// Its length in seconds, as event times are kept.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64
    }
}

impl fmt::Display for Span {
    /// The shortest exact form: `7d`, `12h`, `30m`, `90s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, secs) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
            if self.0 > 0 && self.0.is_multiple_of(secs) {
                return write!(f, "{}{unit}", self.0 / secs);
            }
        }
        write!(f, "{}s", self.0)
    }
}

impl std::str::FromStr for Span {
    type Err = String;
    fn from_str(s: &str) -> Result<Span, String> {
        humantime::parse_duration(s.trim())
            .map(|d| Span(d.as_secs()))
            .map_err(|e| format!("{s:?} is not a duration like 7d, 12h or 30m: {e}"))
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Span, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A feature computed from the record and state rather than read as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Derived {
    /// log1p(seconds since the same card's previous transaction); 0 for a card's first one.
    SecondsSincePrevLog1p,
    /// Hour of day (UTC) of the event time as two columns, sin and cos, so 23:59 is next to 00:00.
    HourOfDay,
    /// log1p of a numeric field (clamped at 0): amounts are heavy-tailed.
    Log1p {
        /// A field listed in `numeric`.
        field: String,
    },
    /// 1 on Saturdays and Sundays (UTC), else 0.
    Weekend,
    /// 1 from 00:00 to 06:59 (UTC), else 0: the Fraud Detection Handbook's night.
    Night,
    /// Transactions of the key over the window ending with the current one (included).
    Count {
        /// The spec's card `key` field (the state that is partitioned with the card).
        key: String,
        /// How far back.
        window: Span,
    },
    /// Mean of a numeric field over the key's transactions in the window (current included).
    Mean {
        /// A field listed in `numeric`.
        field: String,
        /// The spec's card `key` field.
        key: String,
        /// How far back.
        window: Span,
    },
    /// The current value against the mean of the key's earlier values in the window:
    /// ln(1 + value) - ln(1 + mean), 0 when there is no earlier value. Positive when larger than
    /// usual for this card.
    Relative {
        /// A field listed in `numeric`.
        field: String,
        /// The spec's card `key` field.
        key: String,
        /// How far back.
        window: Span,
    },
    /// From delayed fraud labels of a context key: the frauds among labelled transactions of
    /// that key whose event time is in (t - delay - window, t - delay], counting only labels
    /// already known at t (0 when none), and how many labelled transactions that was.
    LabelRate {
        /// A `context` field (or the card key) the labels carry.
        key: String,
        /// How far back, before the delay.
        window: Span,
        /// How long before now the window ends: about how long labels take to be known.
        delay: Span,
    },
}

/// Whose state a derived feature needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateScope {
    /// Only the record itself.
    Record,
    /// The record's card's own history.
    Card,
    /// Labels of every card, by a context key: state every instance keeps whole.
    Labels,
}

impl Derived {
    /// Column names this feature contributes, in order.
    pub fn columns(&self) -> Vec<String> {
        match self {
            Derived::SecondsSincePrevLog1p => vec!["log1p_secs_since_prev".into()],
            Derived::HourOfDay => vec!["hour_sin".into(), "hour_cos".into()],
            Derived::Log1p { field } => vec![format!("log1p_{field}")],
            Derived::Weekend => vec!["weekend".into()],
            Derived::Night => vec!["night".into()],
            Derived::Count { key, window } => vec![format!("{key}_count_{window}")],
            Derived::Mean { field, key, window } => vec![format!("{key}_mean_{field}_{window}")],
            Derived::Relative { field, key, window } => {
                vec![format!("{key}_relative_{field}_{window}")]
            }
            Derived::LabelRate { key, window, delay } => vec![
                format!("{key}_labelled_{window}_delay_{delay}"),
                format!("{key}_fraud_rate_{window}_delay_{delay}"),
            ],
        }
    }

    /// Which state the feature reads.
    pub fn scope(&self) -> StateScope {
        match self {
            Derived::SecondsSincePrevLog1p
            | Derived::Count { .. }
            | Derived::Mean { .. }
            | Derived::Relative { .. } => StateScope::Card,
            Derived::LabelRate { .. } => StateScope::Labels,
            Derived::HourOfDay | Derived::Log1p { .. } | Derived::Weekend | Derived::Night => {
                StateScope::Record
            }
        }
    }

    /// The window of a card aggregate (count, mean, relative).
    pub fn card_window(&self) -> Option<Span> {
        match self {
            Derived::Count { window, .. }
            | Derived::Mean { window, .. }
            | Derived::Relative { window, .. } => Some(*window),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_and_print_compactly() {
        for (text, secs, shown) in [
            ("7d", 604_800, "7d"),
            ("12h", 43_200, "12h"),
            ("30m", 1_800, "30m"),
            ("90s", 90, "90s"),
            ("1day", 86_400, "1d"),
        ] {
            let s: Span = text.parse().unwrap();
            assert_eq!((s.as_secs(), s.to_string().as_str()), (secs, shown));
        }
        assert!("seven days".parse::<Span>().is_err());
    }

    #[test]
    fn columns_name_key_window_and_delay() {
        let d = Derived::LabelRate {
            key: "terminal_id".into(),
            window: Span::days(7),
            delay: Span::days(7),
        };
        assert_eq!(
            d.columns(),
            [
                "terminal_id_labelled_7d_delay_7d",
                "terminal_id_fraud_rate_7d_delay_7d"
            ]
        );
        assert_eq!(d.scope(), StateScope::Labels);
        let toml = "kind = \"count\"\nkey = \"card_id\"\nwindow = \"30d\"\n";
        let c: Derived = toml::from_str(toml).unwrap();
        assert_eq!(c.columns(), ["card_id_count_30d"]);
        assert_eq!(c.card_window(), Some(Span::days(30)));
    }
}
