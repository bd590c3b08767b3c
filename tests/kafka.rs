//! `fraudstream serve` and `replay` against a real Kafka-protocol broker (tansu, or the broker
//! in FRAUDSTREAM_TEST_BROKERS).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::broker::{brokers, unique};
use common::detector::{Serve, create_topics, http_get, metric, produce_raw, read_topic};
use common::{fraudstream, simulate};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

fn replay(file: &Path, topic: &str) {
    fraudstream()
        .args([
            "replay",
            "--brokers",
            &brokers(),
            "--topic",
            topic,
            "--data",
        ])
        .arg(file)
        .assert()
        .success();
}

fn ids_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["transaction_id"]
                .to_string()
                .trim_matches('"')
                .to_string()
        })
        .collect()
}

#[test]
fn end_to_end_alerts_dead_letters_offsets_and_file_mode_parity() {
    let dir = tempfile::tempdir().unwrap();
    let file = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "12", "--cards", "300"],
    );
    let ids = ids_of(&file);
    let (input, alerts, scores, dlq) = (
        unique("tx"),
        unique("alerts"),
        unique("scores"),
        unique("dlq"),
    );
    create_topics(&[&input], 3);
    create_topics(&[&alerts, &scores, &dlq], 1);
    // Bad records first: everything after them must still be scored.
    produce_raw(
        &input,
        "17",
        &[
            b"{not json",
            b"{\"transaction_id\":\"b\",\"ts\":1522540900,\"card_id\":\"17\",\"amount\":\"lots\"}",
        ],
    );
    replay(&file, &input);
    let group = unique("group");
    let serve = Serve::start(&[
        "--group",
        &group,
        "--input-topic",
        &input,
        "--alerts-topic",
        &alerts,
        "--scores-topic",
        &scores,
        "--dead-letter-topic",
        &dlq,
    ]);
    let scored = read_topic(&scores, ids.len(), Duration::from_secs(90));
    let dead = read_topic(&dlq, 2, Duration::from_secs(10));
    // Give the acknowledger a moment to store the last offsets.
    std::thread::sleep(Duration::from_secs(1));
    // The HTTP endpoints report what happened.
    let log = serve.log();
    assert!(http_get(&log, "/healthz").0.contains("200"));
    assert!(
        http_get(&log, "/readyz").0.contains("200"),
        "partitions are assigned"
    );
    let (status, text) = http_get(&log, "/metrics");
    assert!(status.contains("200"));
    assert_eq!(
        metric(&text, "fraudstream_transactions_total{outcome=\"scored\"}") as usize,
        ids.len()
    );
    assert_eq!(
        metric(&text, "fraudstream_transactions_total{outcome=\"invalid\"}"),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "fraudstream_dead_letters_total{reason=\"invalid_json\"}"
        ),
        1.0
    );
    let alerts_metric = metric(&text, "fraudstream_alerts_total");
    assert!(metric(&text, "fraudstream_inference_batch_size_count") >= 1.0);
    assert_eq!(
        metric(&text, "fraudstream_end_to_end_latency_seconds_count") as usize,
        ids.len()
    );
    assert!(
        text.contains("fraudstream_model_info{name=\"attention-lstm\""),
        "{text}"
    );
    assert!(text.contains("process_resident_memory_bytes"));
    // Then stop gracefully.
    let (code, log) = serve.stop(Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("offsets"), "{log}");

    // Every transaction scored exactly once.
    let scored_ids: Vec<String> = scored
        .iter()
        .map(|(_, _, v)| v["transaction_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(scored_ids.len(), ids.len(), "{log}");
    assert_eq!(
        scored_ids.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );

    // Dead letters name the field and where the record was.
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].2["reason"], "invalid_json");
    assert_eq!(dead[1].2["field"], "amount");
    assert_eq!(dead[1].2["topic"], input.as_str());
    assert!(dead[1].2["offset"].as_i64().unwrap() >= 1);

    // Alerts: one per alerting score, documented shape.
    let n_alerting = scored.iter().filter(|(_, _, v)| v["alert"] == true).count();
    let alert_msgs = read_topic(&alerts, n_alerting, Duration::from_secs(10));
    assert_eq!(alert_msgs.len(), n_alerting);
    assert_eq!(alerts_metric as usize, n_alerting);
    assert!(n_alerting > 0);
    for (_, _, a) in &alert_msgs {
        assert!(a["score"].as_f64().unwrap() >= a["threshold"].as_f64().unwrap());
        assert_eq!(a["source"]["topic"], input.as_str());
        assert!(a["top_attention"].as_array().unwrap().len() <= 3);
    }

    // Committed offsets after the graceful shutdown = last processed offset + 1, per partition.
    let mut last: HashMap<i64, i64> = HashMap::new();
    for v in scored
        .iter()
        .map(|(_, _, v)| &v["source"])
        .chain(dead.iter().map(|(_, _, v)| v))
    {
        let e = last.entry(v["partition"].as_i64().unwrap()).or_insert(-1);
        *e = (*e).max(v["offset"].as_i64().unwrap());
    }
    assert_eq!(last.len(), 3, "every partition had records");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(&input, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    for (p, last) in last {
        let c = committed.find_partition(&input, p as i32).unwrap().offset();
        assert_eq!(c, Offset::Offset(last + 1), "partition {p}");
    }

    // The embedded file mode gives the same scores for the same input.
    let (file_scores, alerts_file) = (
        dir.path().join("scores.jsonl"),
        dir.path().join("alerts.jsonl"),
    );
    fraudstream()
        .args(["serve", "--input"])
        .arg(format!("file:{}", file.display()))
        .arg("--output")
        .arg(format!("file:{}", alerts_file.display()))
        .arg("--scores-output")
        .arg(format!("file:{}", file_scores.display()))
        .assert()
        .success();
    let by_id: HashMap<String, f64> = std::fs::read_to_string(&file_scores)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["transaction_id"].as_str().unwrap().to_string(),
                v["score"].as_f64().unwrap(),
            )
        })
        .collect();
    for (_, _, v) in &scored {
        let id = v["transaction_id"].as_str().unwrap();
        assert!(
            (v["score"].as_f64().unwrap() - by_id[id]).abs() < 2e-6,
            "{id}"
        );
    }
}

/// `/readyz` says whether the detector can work: 503 before it holds partitions, 200 while it
/// does, 503 again once its broker is gone (librdkafka's statistics show no connection up).
#[test]
fn readiness_follows_partitions_and_broker_reachability() {
    let (mut tansu, brokers) = common::broker::own_tansu();
    let topic = unique("ready");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(fraudstream::stream::kafka::ensure_topics(
        &brokers,
        &[],
        &[&topic],
        1,
    ))
    .unwrap();
    let serve = Serve::start_on(
        &brokers,
        &["--group", &unique("ready"), "--input-topic", &topic],
    );
    let addr = serve.wait_ready(Duration::from_secs(60));
    assert!(common::detector::get(&addr, "/healthz").0.contains("200"));
    tansu.kill().unwrap();
    tansu.wait().unwrap();
    let began = Instant::now();
    loop {
        let (status, _) = common::detector::get(&addr, "/readyz");
        if status.contains("503") {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "still {status} 30 s after the broker died:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let (_, text) = common::detector::get(&addr, "/metrics");
    assert_eq!(metric(&text, "fraudstream_ready"), 0.0);
    // Still alive: liveness does not depend on the broker.
    assert!(common::detector::get(&addr, "/healthz").0.contains("200"));
}

#[test]
fn two_consumers_split_partitions_and_score_each_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "6", "--cards", "300"],
    );
    let ids = ids_of(&file);
    let (input, alerts, scores_a, scores_b) =
        (unique("tx"), unique("alerts"), unique("sa"), unique("sb"));
    create_topics(&[&input], 4);
    create_topics(&[&alerts, &scores_a, &scores_b], 1);
    let group = unique("group");
    let common = [
        "--group",
        group.as_str(),
        "--input-topic",
        input.as_str(),
        "--alerts-topic",
        alerts.as_str(),
    ];
    let a = Serve::start(&[&common[..], &["--scores-topic", &scores_a]].concat());
    let b = Serve::start(&[&common[..], &["--scores-topic", &scores_b]].concat());
    // Wait until the group has settled with both members holding partitions.
    let began = Instant::now();
    let settled = |log: &str| {
        log.lines()
            .rev()
            .find(|l| l.contains("partitions assigned"))
            .is_some_and(|l| l.contains("partitions=2"))
    };
    while !(settled(&a.log()) && settled(&b.log())) {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "group did not settle:\nA:\n{}\nB:\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    replay(&file, &input);
    let began = Instant::now();
    let (mut sa, mut sb) = (Vec::new(), Vec::new());
    while sa.len() + sb.len() < ids.len() && began.elapsed() < Duration::from_secs(90) {
        sa = read_topic(&scores_a, usize::MAX, Duration::from_secs(2));
        sb = read_topic(&scores_b, usize::MAX, Duration::from_secs(2));
    }
    let (ca, _) = a.stop(Duration::from_secs(30));
    let (cb, _) = b.stop(Duration::from_secs(30));
    assert_eq!((ca, cb), (0, 0));
    let id = |v: &(i32, i64, Value)| v.2["transaction_id"].as_str().unwrap().to_string();
    let set_a: HashSet<String> = sa.iter().map(id).collect();
    let set_b: HashSet<String> = sb.iter().map(id).collect();
    assert!(
        !set_a.is_empty() && !set_b.is_empty(),
        "both members scored"
    );
    assert!(set_a.is_disjoint(&set_b), "no record scored by both");
    assert_eq!(sa.len() + sb.len(), ids.len(), "each record scored once");
    let parts = |s: &[(i32, i64, Value)]| {
        s.iter()
            .map(|v| v.2["source"]["partition"].as_i64().unwrap())
            .collect::<HashSet<_>>()
    };
    assert!(
        parts(&sa).is_disjoint(&parts(&sb)),
        "the members split the partitions"
    );
}
