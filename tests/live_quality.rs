//! The issue's "done when": a replay of labelled simulated traffic through `serve`, with the
//! labels following on their own topic, shows live precision and recall on `/metrics`, in a
//! real Prometheus server scraping the detector, and on the dashboard page in headless Chromium.
//! The expected values are computed independently, from the scores topic and the file's labels.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::broker::{brokers, unique};
use common::detector::{
    Serve, Topics, counter, create_topics, get, metric, produce_raw, read_topic,
};
use common::prometheus::Prometheus;
use common::{browser, fraudstream, simulate};

/// Transaction id -> is fraud, from the simulated CSV.
fn file_labels(path: &std::path::Path) -> HashMap<String, bool> {
    let mut rdr = csv::Reader::from_path(path).unwrap();
    let h = rdr.headers().unwrap().clone();
    let id = h.iter().position(|c| c == "transaction_id").unwrap();
    let fraud = h.iter().position(|c| c == "is_fraud").unwrap();
    rdr.records()
        .map(|r| {
            let r = r.unwrap();
            (r[id].to_string(), &r[fraud] == "1")
        })
        .collect()
}

/// Waits until `/metrics` satisfies `ok`; returns the text.
fn wait_metrics(addr: &str, timeout: Duration, what: &str, ok: impl Fn(&str) -> bool) -> String {
    common::wait_until(timeout, what, || {
        let (_, text) = get(addr, "/metrics");
        ok(&text).then_some(text)
    })
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn labelled_replay_shows_live_precision_and_recall_in_metrics_prometheus_and_dashboard() {
    let dir = tempfile::tempdir().unwrap();
    let file = simulate(dir.path(), "cards.csv", &["--days", "12"]);
    let labels_by_id = file_labels(&file);
    let topics = Topics::new();
    let Topics {
        input,
        alerts,
        scores,
        dlq,
    } = &topics;
    let labels = unique("labels");
    create_topics(&[input, alerts, scores, dlq, &labels], 2);
    let group = unique("quality");
    let serve = Serve::start_for(&topics, &group, &["--labels-topic", &labels]);
    let addr = serve.wait_ready(Duration::from_secs(90));
    let prometheus = Prometheus::start(dir.path(), &addr);

    // Transactions now, each label 2 seconds after its transaction.
    fraudstream()
        .args(["replay", "--brokers", &brokers(), "--topic", input])
        .args(["--labels-topic", &labels, "--label-delay", "2", "--data"])
        .arg(&file)
        .assert()
        .success();
    let n = labels_by_id.len();
    // Two bad labels: dead-lettered with the field at fault, counted, and nothing else lost.
    produce_raw(
        &labels,
        "bad",
        &[br#"{"transaction_id":"no-verdict"}"#, b"not json"],
    );

    // What precision and recall must be: every score (from the scores topic) against the file.
    let scored = read_topic(scores, n, Duration::from_secs(120));
    assert_eq!(scored.len(), n, "every transaction scored once");
    let (mut tp, mut fp, mut fn_) = (0u32, 0u32, 0u32);
    for (_, _, s) in &scored {
        let id = s["transaction_id"].as_str().unwrap();
        match (s["alert"].as_bool().unwrap(), labels_by_id[id]) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            _ => {}
        }
    }
    assert!(tp > 0 && fp + fn_ > 0, "tp {tp} fp {fp} fn {fn_}");
    let precision = f64::from(tp) / f64::from(tp + fp);
    let recall = f64::from(tp) / f64::from(tp + fn_);

    // /metrics: every label joined its score, the gauges show the expected values.
    let text = wait_metrics(
        &addr,
        Duration::from_secs(60),
        "all labels joined and gauges refreshed",
        |t| {
            t.contains(&format!(
                "fraudstream_labels_total{{source=\"topic\"}} {n}\n"
            )) && t.contains(&format!(
                "fraudstream_live_precision{{window=\"5m\"}} {}\n",
                metric_text(precision)
            )) && t.contains(&format!(
                "fraudstream_live_recall{{window=\"5m\"}} {}\n",
                metric_text(recall)
            ))
        },
    );
    assert_eq!(metric(&text, "fraudstream_labels_unmatched_total"), 0.0);
    for reason in ["invalid_label", "invalid_label_json"] {
        let name = format!("fraudstream_dead_letters_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&text, &name), 1.0, "{reason}");
    }
    assert_eq!(
        metric(&text, "fraudstream_transactions_total{outcome=\"invalid\"}"),
        0.0,
        "labels are not transactions"
    );
    let letters = read_topic(dlq, 2, Duration::from_secs(30));
    assert_eq!(letters.len(), 2);
    assert!(
        letters
            .iter()
            .any(|(_, _, l)| l["field"] == "is_fraud" && l["topic"] == labels.as_str()),
        "{letters:?}"
    );
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("fraudstream_label_outcomes_total{model_version=\""))
        .and_then(|l| l.split('"').next())
        .expect("outcomes by model version")
        .to_string();
    let outcome = |o: &str| {
        metric(
            &text,
            &format!(
                "fraudstream_label_outcomes_total{{model_version=\"{version}\",outcome=\"{o}\"}}"
            ),
        )
    };
    assert_eq!(outcome("true_positive"), f64::from(tp));
    assert_eq!(outcome("false_positive"), f64::from(fp));
    assert_eq!(outcome("false_negative"), f64::from(fn_));
    assert!(close(
        metric(&text, "fraudstream_live_f1{window=\"1h\"}"),
        2.0 * precision * recall / (precision + recall)
    ));
    // Labels came up to 2 s after their scores (the replay's delay, less the time a
    // transaction waited to be scored).
    let delay_sum = metric(&text, "fraudstream_label_delay_seconds_sum");
    let mean_delay = delay_sum / n as f64;
    assert!(
        (0.05..30.0).contains(&mean_delay),
        "mean delay {mean_delay}"
    );

    // Everything consumed: the lag librdkafka reports (every 5 s) falls to 0 on both partitions.
    wait_metrics(&addr, Duration::from_secs(30), "lag back to 0", |t| {
        (0..2).all(|p| {
            t.contains(&format!(
                "fraudstream_consumer_lag{{partition=\"{p}\",topic=\"{input}\"}} 0\n"
            ))
        })
    });

    // Prometheus scraped the same values; read them back through its HTTP API.
    let timeout = Duration::from_secs(30);
    let p = prometheus.wait_for(
        "fraudstream_live_precision{window=\"5m\",job=\"fraudstream\"}",
        timeout,
        |v| close(v, precision),
    );
    let r = prometheus.wait_for(
        "fraudstream_live_recall{window=\"5m\",job=\"fraudstream\"}",
        timeout,
        |v| close(v, recall),
    );
    eprintln!("live precision {p:.3} recall {r:.3} (tp {tp} fp {fp} fn {fn_}) in Prometheus");
    prometheus.wait_for(
        "sum(fraudstream_transactions_total{outcome=\"scored\"})",
        timeout,
        |v| v == n as f64,
    );
    prometheus.wait_for("up{job=\"fraudstream\"}", timeout, |v| v == 1.0);

    // The dashboard, in headless Chromium: no console messages, every chart has data, the
    // alert table lists alerts with their attention, the KPI shows the live precision.
    let url = format!("http://{addr}/");
    let profile = dir.path().join("chromium");
    let (dom, console) = browser::dump_dom(&url, &profile, 6000);
    assert!(console.is_empty(), "console messages: {console:#?}");
    assert!(
        dom.contains("id=\"status\" data-state=\"ok\""),
        "dashboard did not load its data:\n{dom}"
    );
    for chart in [
        "tx_per_s",
        "alerts_per_s",
        "precision",
        "recall",
        "f1",
        "p99_latency_ms",
        "lag",
    ] {
        let marker = format!("id=\"chart-{chart}\" data-points=\"");
        let points: usize = dom
            .split(&marker)
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no chart {chart} in:\n{dom}"));
        assert!(points > 0, "chart {chart} shows no data");
    }
    let rows = dom.matches("<tr class=\"alert-row\">").count();
    assert!(rows > 0 && rows <= 25, "{rows} alert rows");
    assert!(dom.contains("class=\"bar\""), "attention bars");
    // Each alert's reasons: a feature, its value, its typical value, the score without it.
    let why = dom
        .split("<td class=\"why\"><div>")
        .nth(1)
        .and_then(|rest| rest.split("</div>").next())
        .unwrap_or_else(|| panic!("no reasons in the alert table:\n{dom}"));
    assert!(
        why.contains(": ") && why.contains("(typ. ") && why.contains(" → "),
        "{why}"
    );
    // The KPI shows both windows to 3 decimals (JavaScript's rounding of halves may differ
    // from Rust's, hence the tolerance).
    let kpi: Vec<f64> = dom
        .split("id=\"k-precision\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .expect("precision KPI")
        .split(" / ")
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(kpi.len(), 2);
    assert!(
        kpi.iter().all(|v| (v - precision).abs() < 0.0011),
        "{kpi:?} vs {precision}"
    );
    let png = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    browser::screenshot(&url, &profile, 4000, &png);
    let size = std::fs::metadata(&png).unwrap().len();
    assert!(size > 20_000, "screenshot of {size} bytes");
    eprintln!("dashboard screenshot: {}", png.display());

    let (code, log) = serve.stop(Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
}

/// A float as the Prometheus text encoder writes it.
fn metric_text(x: f64) -> String {
    let mut s = String::new();
    use std::fmt::Write;
    write!(s, "{x}").unwrap();
    s
}

/// Labels follow the cards: with two members in a group, each joins the labels of the input
/// partitions it holds (labels are keyed by card, partitioned like the input) and leaves the
/// others' to them, so together they join every label once and neither counts the other's as
/// unmatched.
#[test]
fn two_members_split_the_labels_like_the_cards() {
    let dir = tempfile::tempdir().unwrap();
    let file = simulate(dir.path(), "cards.csv", &["--days", "5", "--cards", "400"]);
    let n = file_labels(&file).len();
    let topics = Topics::new();
    let labels = unique("labels");
    create_topics(&[&topics.input, &labels], 4);
    create_topics(&[&topics.alerts, &topics.scores, &topics.dlq], 1);
    let group = unique("split");
    let a = Serve::start_for(&topics, &group, &["--labels-topic", &labels]);
    let b = Serve::start_for(&topics, &group, &["--labels-topic", &labels]);
    let (addr_a, addr_b) = (
        a.wait_ready(Duration::from_secs(90)),
        b.wait_ready(Duration::from_secs(90)),
    );
    fraudstream()
        .args(["replay", "--brokers", &brokers(), "--topic", &topics.input])
        .args(["--labels-topic", &labels, "--label-delay", "1", "--data"])
        .arg(&file)
        .assert()
        .success();
    // Polled from the start: a member that has joined no label yet has no series.
    let joined = |t: &str| counter(t, "fraudstream_labels_total{source=\"topic\"}");
    let (ta, tb) = common::wait_until(Duration::from_secs(90), "every label joined", || {
        let (ta, tb) = (get(&addr_a, "/metrics").1, get(&addr_b, "/metrics").1);
        (joined(&ta) + joined(&tb) == n as f64).then_some((ta, tb))
    });
    for (name, t) in [("A", &ta), ("B", &tb)] {
        assert!(joined(t) > 0.0, "{name} joined labels of its own cards");
        assert_eq!(
            metric(t, "fraudstream_labels_unmatched_total"),
            0.0,
            "{name}"
        );
        let elsewhere = metric(t, "fraudstream_labels_total{source=\"elsewhere\"}");
        assert_eq!(elsewhere + joined(t), n as f64, "{name} saw every label");
    }
    assert_eq!(b.stop(Duration::from_secs(30)).0, 0);
    assert_eq!(a.stop(Duration::from_secs(30)).0, 0);
}

/// A labels topic partitioned unlike the input cannot follow the cards: refused at start-up.
#[test]
fn a_labels_topic_with_another_partition_count_is_refused_at_start_up() {
    let topics = Topics::new();
    let labels = unique("labels");
    create_topics(&[&topics.input], 2);
    create_topics(&[&labels], 1);
    let serve = Serve::start_for(&topics, &unique("g"), &["--labels-topic", &labels]);
    let (code, log) = serve.wait(Duration::from_secs(30));
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("has 1 partitions but input topic"), "{log}");
}
