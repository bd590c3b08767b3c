//! Context features from delayed labels on the broker: label-rate tables are restored from the
//! labels topic before transactions are consumed, and several detectors in one group compute
//! the same features (and so the same scores) as one detector, transaction for transaction.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::broker::{brokers, unique};
use common::detector::{Serve, TopicReader, create_topics, metric};
use fraudstream::features::{DEFAULT_LABEL_DELAY, fit_scaler};
use fraudstream::schema::{FeatureSpec, Format, load};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value;

/// Publishes every transaction's label, known a week after it, keyed by card.
fn publish_labels(file: &std::path::Path, topic: &str) -> usize {
    let spec = FeatureSpec::cards();
    let loaded = load(&file.to_string_lossy(), Format::Jsonl, &spec, 0, |_| {}).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let mut n = 0;
    for tx in &loaded.transactions {
        let msg = spec.label_message(tx, tx.ts + 7.0 * 86_400.0).unwrap();
        let payload = serde_json::to_vec(&msg).unwrap();
        loop {
            match producer.send(BaseRecord::to(topic).key(&tx.key).payload(&payload)) {
                Ok(()) => break,
                Err((_, _)) => producer.poll(Duration::from_millis(50)),
            };
        }
        n += 1;
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    n
}

/// Waits until a detector has restored `labels` labels and holds its partitions.
fn wait_restored(serve: &Serve, labels: usize) {
    let want = format!("fraudstream_labels_total{{source=\"history\"}} {labels}");
    serve.wait_metrics(Duration::from_secs(60), &want, |t| t.contains(&want));
}

fn scores(records: &[(i32, i64, Value)]) -> HashMap<String, f64> {
    records
        .iter()
        .map(|(_, _, v)| {
            (
                v["transaction_id"].as_str().unwrap().to_string(),
                v["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn two_detectors_compute_the_same_context_and_scores_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = common::simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "40", "--cards", "150"],
    );
    let n = std::fs::read_to_string(&file).unwrap().lines().count();
    let (input, labels, alerts) = (unique("tx"), unique("labels"), unique("alerts"));
    let (one, two_a, two_b) = (unique("one"), unique("two-a"), unique("two-b"));
    create_topics(&[&input, &labels], 4);
    create_topics(&[&alerts, &one, &two_a, &two_b], 1);
    let published = publish_labels(&file, &labels);
    assert_eq!(published, n);
    // A model with the label-rate features of the `cards` spec (random weights: only the
    // agreement of the detectors matters, and every feature moves the score).
    let model = dir.path().join("model");
    let spec = FeatureSpec::cards();
    let mut txs = load(&file.to_string_lossy(), Format::Jsonl, &spec, 0, |_| {})
        .unwrap()
        .transactions;
    txs.sort_by(|a, b| a.ts.total_cmp(&b.ts));
    let scaler = fit_scaler(&spec, &txs, DEFAULT_LABEL_DELAY, |_| true);
    common::bundle::random(&model, spec, 30, scaler);
    let model = model.to_string_lossy().into_owned();
    let serve = |group: &str, scores: &str| {
        Serve::start(&[
            "--model",
            &model,
            "--group",
            group,
            "--input-topic",
            &input,
            "--alerts-topic",
            &alerts,
            "--scores-topic",
            scores,
            "--labels-topic",
            &labels,
        ])
    };
    // One detector alone, and two sharing a group: all restore the same labels first.
    let (g1, g2) = (unique("g1"), unique("g2"));
    let single = serve(&g1, &one);
    let a = serve(&g2, &two_a);
    let b = serve(&g2, &two_b);
    for s in [&single, &a, &b] {
        wait_restored(s, n);
    }
    // The pair settles with two partitions each before any transaction exists, so no card
    // moves between them mid-stream.
    let settled = |log: &str| {
        log.lines()
            .rev()
            .find(|l| l.contains("partitions assigned"))
            .is_some_and(|l| l.contains("partitions=2"))
    };
    common::wait_until(Duration::from_secs(60), "the pair to settle", || {
        (settled(&a.log()) && settled(&b.log())).then_some(())
    });
    single.wait_ready(Duration::from_secs(60));
    common::fraudstream()
        .args([
            "replay",
            "--brokers",
            &brokers(),
            "--topic",
            &input,
            "--data",
        ])
        .arg(&file)
        .assert()
        .success();
    let (mut r1, mut ra, mut rb) = (
        TopicReader::new(&one),
        TopicReader::new(&two_a),
        TopicReader::new(&two_b),
    );
    let short = Duration::from_millis(200);
    common::wait_until(
        Duration::from_secs(180),
        "every transaction scored twice",
        || (r1.drain(short) >= n && ra.drain(short) + rb.drain(short) >= n).then_some(()),
    );
    let terminals = metric(
        &common::detector::get(&single.wait_http(Duration::from_secs(5)), "/metrics").1,
        "fraudstream_label_keys",
    );
    assert!(terminals > 100.0, "the tables hold terminals: {terminals}");
    for s in [single, a, b] {
        let (code, log) = s.stop(Duration::from_secs(30));
        assert_eq!(code, 0, "{log}");
    }
    let alone = scores(&r1.messages);
    let pair = scores(&[ra.messages.clone(), rb.messages.clone()].concat());
    assert!(
        !ra.messages.is_empty() && !rb.messages.is_empty(),
        "both members scored"
    );
    assert_eq!((alone.len(), pair.len()), (n, n));
    let differ: Vec<(&String, f64, f64)> = alone
        .iter()
        .map(|(id, s)| (id, *s, pair[id]))
        .filter(|(_, x, y)| (x - y).abs() > 1e-6)
        .collect();
    assert!(
        differ.is_empty(),
        "{} scores differ, e.g. {:?}",
        differ.len(),
        &differ[..differ.len().min(3)]
    );
}
