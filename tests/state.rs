//! Card state that survives: a detector with `--changelog-topic`, killed or joined by another
//! member mid-stream, restores its cards from the changelog and scores every transaction exactly
//! as an uninterrupted run does (against the real broker).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::broker::{brokers, unique};
use common::detector::{Serve, TopicReader, Topics, create_topics, metric, read_all};
use common::{fraudstream, simulate};
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

/// Every transaction's score in an uninterrupted file-mode run.
fn reference_scores(dir: &Path, file: &Path) -> HashMap<String, f64> {
    let scores = dir.join("reference-scores.jsonl");
    fraudstream()
        .args(["serve", "--input"])
        .arg(format!("file:{}", file.display()))
        .args(["--output", "file:/dev/null", "--scores-output"])
        .arg(format!("file:{}", scores.display()))
        .assert()
        .success();
    std::fs::read_to_string(&scores)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (text(&v["transaction_id"]), v["score"].as_f64().unwrap())
        })
        .collect()
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// Score records that differ from the reference, as (id, score, reference).
fn differing(records: &[(i32, i64, Value)], reference: &HashMap<String, f64>) -> Vec<String> {
    records
        .iter()
        .filter_map(|(_, _, v)| {
            let id = text(&v["transaction_id"]);
            let score = v["score"].as_f64().unwrap();
            let want = reference[&id];
            ((score - want).abs() > 2e-6).then(|| format!("{id}: {score} vs {want}"))
        })
        .collect()
}

fn scored(metrics: &str) -> f64 {
    metric(
        metrics,
        "fraudstream_transactions_total{outcome=\"scored\"}",
    )
}

/// SIGKILL at about 40% of the stream, start again: the restarted detector restores the cards
/// from the changelog (as of the committed offsets), reads the rest, and every score, including
/// the re-scored ones between the last commit and the kill, equals the uninterrupted run's.
#[test]
fn a_detector_killed_mid_stream_restores_its_cards_and_scores_like_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "30", "--cards", "200"],
    );
    let reference = reference_scores(dir.path(), &file);
    let total = reference.len();
    let topics = Topics::new();
    let changelog = unique("changelog");
    create_topics(&[&topics.input, &changelog], 2);
    create_topics(&[&topics.alerts, &topics.scores, &topics.dlq], 1);
    replay(&file, &topics.input);
    let group = unique("group");
    let flags = [
        "--changelog-topic",
        changelog.as_str(),
        // Offsets committed often, so the kill leaves little to read again.
        "--kafka",
        "auto.commit.interval.ms=500",
    ];
    let a = Serve::start_for(&topics, &group, &flags);
    let at = (total * 2 / 5) as f64;
    a.wait_metrics(Duration::from_secs(120), "40% scored", |t| scored(t) >= at);
    let log_a = a.kill();
    let before_restart = read_all(&topics.scores).len();
    assert!(before_restart < total, "killed before the end:\n{log_a}");

    let b = Serve::start_for(&topics, &group, &flags);
    let mut reader = TopicReader::new(&topics.scores);
    common::wait_until(Duration::from_secs(120), "every transaction scored", || {
        (reader.drain(Duration::from_millis(300)) >= total).then_some(())
    });
    let metrics = b.wait_metrics(Duration::from_secs(10), "restore metrics", |t| {
        t.contains("fraudstream_state_restored_cards_total")
    });
    let (code, log_b) = b.stop(Duration::from_secs(30));
    assert_eq!(code, 0, "{log_b}");
    let records = read_all(&topics.scores);
    let ids: std::collections::HashSet<String> = records
        .iter()
        .map(|(_, _, v)| text(&v["transaction_id"]))
        .collect();
    assert_eq!(ids.len(), total, "every transaction scored");
    let wrong = differing(&records, &reference);
    assert!(
        wrong.is_empty(),
        "{} of {} score records differ from the uninterrupted run, e.g. {:?}\n{log_b}",
        wrong.len(),
        records.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert!(
        log_b.contains("card state restored from the changelog"),
        "{log_b}"
    );
    let restored = metric(&metrics, "fraudstream_state_restored_cards_total");
    // The broker may serve one partition before the other: the cards of at least one partition
    // (about half of the 200) had state when the first detector was killed.
    assert!(restored >= 50.0, "cards restored: {restored}\n{log_b}");
    assert!(metric(&metrics, "fraudstream_changelog_records_total") > 0.0);
}

/// A second member joins after 40% of the stream: the partitions it takes over keep their cards
/// (restored from the changelog the first member wrote), so every score equals the
/// uninterrupted run's.
#[test]
fn a_member_joining_mid_stream_restores_the_cards_of_the_partitions_it_takes() {
    let dir = tempfile::tempdir().unwrap();
    let file = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "30", "--cards", "200"],
    );
    let reference = reference_scores(dir.path(), &file);
    let total = reference.len();
    let text_of = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text_of.lines().collect();
    let first = lines.len() * 2 / 5;
    let (head, tail) = (dir.path().join("head.jsonl"), dir.path().join("tail.jsonl"));
    std::fs::write(&head, lines[..first].join("\n")).unwrap();
    std::fs::write(&tail, lines[first..].join("\n")).unwrap();
    let topics = Topics::new();
    let changelog = unique("changelog");
    create_topics(&[&topics.input, &changelog], 4);
    create_topics(&[&topics.alerts, &topics.scores, &topics.dlq], 1);
    replay(&head, &topics.input);
    let group = unique("group");
    let flags = ["--changelog-topic", changelog.as_str()];
    let a = Serve::start_for(&topics, &group, &flags);
    a.wait_metrics(Duration::from_secs(120), "the first 40% scored", |t| {
        scored(t) >= first as f64
    });
    let b = Serve::start_for(&topics, &group, &flags);
    b.wait_ready(Duration::from_secs(60));
    replay(&tail, &topics.input);
    let mut reader = TopicReader::new(&topics.scores);
    common::wait_until(Duration::from_secs(120), "every transaction scored", || {
        (reader.drain(Duration::from_millis(300)) >= total).then_some(())
    });
    let metrics_b = b.wait_metrics(Duration::from_secs(10), "restore metrics", |t| {
        t.contains("fraudstream_state_restored_cards_total")
    });
    let (code_b, log_b) = b.stop(Duration::from_secs(30));
    let (code_a, log_a) = a.stop(Duration::from_secs(30));
    assert_eq!((code_a, code_b), (0, 0), "A:\n{log_a}\nB:\n{log_b}");
    let records = read_all(&topics.scores);
    let ids: std::collections::HashSet<String> = records
        .iter()
        .map(|(_, _, v)| text(&v["transaction_id"]))
        .collect();
    assert_eq!(ids.len(), total, "every transaction scored");
    let wrong = differing(&records, &reference);
    assert!(
        wrong.is_empty(),
        "{} of {} score records differ from the uninterrupted run, e.g. {:?}\nA:\n{log_a}\nB:\n{log_b}",
        wrong.len(),
        records.len(),
        &wrong[..wrong.len().min(5)]
    );
    let restored = metric(&metrics_b, "fraudstream_state_restored_cards_total");
    assert!(
        restored >= 50.0,
        "B restored the cards of the partitions it took: {restored}\n{log_b}"
    );
}

/// Exactly-once: outputs, changelog records and offsets in one transaction. SIGKILL at 40%
/// leaves a transaction open; the restarted member (same `--instance-id`, so the same
/// transactional id) aborts it, restores the committed card states and reads from the committed
/// offsets: a `read_committed` reader sees every transaction's score and alert exactly once, each
/// equal to the uninterrupted run's.
#[test]
fn exactly_once_outputs_each_score_once_across_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let file = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "30", "--cards", "200"],
    );
    let reference = reference_scores(dir.path(), &file);
    let total = reference.len();
    let topics = Topics::new();
    let changelog = unique("changelog");
    create_topics(&[&topics.input, &changelog], 2);
    create_topics(&[&topics.alerts, &topics.scores, &topics.dlq], 1);
    replay(&file, &topics.input);
    let group = unique("group");
    let flags = [
        "--changelog-topic",
        changelog.as_str(),
        "--exactly-once",
        "--instance-id",
        "member-1",
    ];
    let a = Serve::start_for(&topics, &group, &flags);
    let at = (total * 2 / 5) as f64;
    a.wait_metrics(Duration::from_secs(120), "40% scored", |t| scored(t) >= at);
    let log_a = a.kill();
    assert!(log_a.contains("exactly-once"), "{log_a}");

    let b = Serve::start_for(&topics, &group, &flags);
    let mut reader = TopicReader::new(&topics.scores);
    common::wait_until(Duration::from_secs(120), "every transaction scored", || {
        (reader.drain(Duration::from_millis(300)) >= total).then_some(())
    });
    let (code, log_b) = b.stop(Duration::from_secs(30));
    assert_eq!(code, 0, "{log_b}");
    // Read to the end only now: an output committed twice would show as a longer result.
    let records = read_all(&topics.scores);
    let mut seen = HashMap::new();
    for (_, _, v) in &records {
        *seen.entry(text(&v["transaction_id"])).or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} scored twice, e.g. {:?}\n{log_b}",
        twice.len(),
        &twice[..twice.len().min(3)]
    );
    assert_eq!(
        records.len(),
        total,
        "every transaction scored once\n{log_b}"
    );
    let wrong = differing(&records, &reference);
    assert!(
        wrong.is_empty(),
        "{} score records differ from the uninterrupted run, e.g. {:?}\n{log_b}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    let alerts = read_all(&topics.alerts);
    let alert_ids: std::collections::HashSet<String> = alerts
        .iter()
        .map(|(_, _, v)| text(&v["transaction_id"]))
        .collect();
    assert_eq!(alert_ids.len(), alerts.len(), "each alert once");
    let alerted = records
        .iter()
        .filter(|(_, _, v)| v["alert"] == true)
        .count();
    assert_eq!(alerts.len(), alerted, "an alert for every alerting score");
}

/// A changelog topic whose partition count differs from the input's is refused at start-up with
/// a message that says so.
#[test]
fn a_changelog_with_another_partition_count_is_refused_at_start_up() {
    let topics = Topics::new();
    let changelog = unique("changelog");
    create_topics(&[&topics.input], 2);
    create_topics(&[&changelog], 3);
    let serve = Serve::start_for(
        &topics,
        &unique("group"),
        &["--changelog-topic", &changelog],
    );
    let (code, log) = serve.wait(Duration::from_secs(30));
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("has 3 partitions but input topic"), "{log}");
}

/// The broker unreachable for longer than the session timeout (every connection cut by a proxy,
/// the broker's data kept) and back: the detector reports it (`/readyz` 503,
/// `fraudstream_broker_up` 0), loses its partitions, and once the broker is back gets them
/// again, restores their cards from the changelog and scores everything that came meanwhile and
/// after, each score equal to the uninterrupted run's; then it shuts down cleanly.
#[test]
fn a_broker_outage_keeps_the_cards_and_loses_nothing() {
    use common::proxy::Proxy;
    let dir = tempfile::tempdir().unwrap();
    let file = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "20", "--cards", "150"],
    );
    let reference = reference_scores(dir.path(), &file);
    let total = reference.len();
    let text_of = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text_of.lines().collect();
    let first = lines.len() / 2;
    let (head, tail) = (dir.path().join("head.jsonl"), dir.path().join("tail.jsonl"));
    std::fs::write(&head, lines[..first].join("\n")).unwrap();
    std::fs::write(&tail, lines[first..].join("\n")).unwrap();

    let port = common::free_port();
    let (mut tansu, real) = common::broker::own_tansu_behind(port);
    let proxy = Proxy::start(port, real);
    let brokers = format!("127.0.0.1:{port}");
    let topics = Topics::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let changelog = unique("changelog");
    rt.block_on(fraudstream::stream::kafka::ensure_topics(
        &brokers,
        &[],
        &[&topics.input, &topics.alerts, &topics.scores, &changelog],
        2,
    ))
    .unwrap();
    let replay_to = |f: &Path| {
        fraudstream()
            .args([
                "replay",
                "--brokers",
                &brokers,
                "--topic",
                &topics.input,
                "--data",
            ])
            .arg(f)
            .assert()
            .success();
    };
    replay_to(&head);
    let serve = Serve::start_on(
        &brokers,
        &[
            "--group",
            &unique("outage"),
            "--input-topic",
            &topics.input,
            "--alerts-topic",
            &topics.alerts,
            "--scores-topic",
            &topics.scores,
            "--changelog-topic",
            &changelog,
            "--kafka",
            "statistics.interval.ms=1000",
        ],
    );
    serve.wait_metrics(Duration::from_secs(90), "the first half scored", |t| {
        scored(t) >= first as f64
    });
    let addr = serve.wait_ready(Duration::from_secs(10));

    proxy.cut();
    common::wait_until(
        Duration::from_secs(30),
        "/readyz 503 while the broker is out",
        || {
            common::detector::get(&addr, "/readyz")
                .0
                .contains("503")
                .then_some(())
        },
    );
    let (_, during) = common::detector::get(&addr, "/metrics");
    assert_eq!(metric(&during, "fraudstream_broker_up"), 0.0);
    // Longer than the session timeout (6 s in tests): the group gives the partitions away.
    std::thread::sleep(Duration::from_secs(15));

    proxy.restore();
    common::wait_until(
        Duration::from_secs(60),
        "/readyz 200 once the broker is back",
        || {
            common::detector::get(&addr, "/readyz")
                .0
                .contains("200")
                .then_some(())
        },
    );
    replay_to(&tail);
    let mut reader = TopicReader::on(&brokers, &topics.scores);
    common::wait_until(Duration::from_secs(120), "every transaction scored", || {
        (reader.drain(Duration::from_millis(300)) >= total).then_some(())
    });
    let (_, after) = common::detector::get(&addr, "/metrics");
    let (code, log) = serve.stop(Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    let restored = metric(&after, "fraudstream_state_restored_cards_total");
    assert!(
        restored >= 50.0,
        "cards restored after the outage: {restored}\n{log}"
    );
    reader.drain(Duration::from_secs(1));
    let ids: std::collections::HashSet<String> = reader
        .messages
        .iter()
        .map(|(_, _, v)| text(&v["transaction_id"]))
        .collect();
    assert_eq!(ids.len(), total, "every transaction scored");
    let wrong = differing(&reader.messages, &reference);
    assert!(
        wrong.is_empty(),
        "{} differ, e.g. {:?}\n{log}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    let _ = tansu.kill();
    let _ = tansu.wait();
}

/// `--state-dir`: a clean stop writes a snapshot; the restart restores from it and reads only
/// the changelog written since; a corrupted snapshot is detected and the next restart restores
/// from the changelog alone. Every score of the three runs equals the uninterrupted run's.
#[test]
fn a_restart_uses_the_local_snapshot_and_a_corrupt_one_falls_back_to_the_changelog() {
    let dir = tempfile::tempdir().unwrap();
    let file = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "30", "--cards", "200"],
    );
    let reference = reference_scores(dir.path(), &file);
    let total = reference.len();
    let text_of = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text_of.lines().collect();
    let (a, b) = (lines.len() / 2, lines.len() * 9 / 10);
    let parts: Vec<std::path::PathBuf> = [(0, a), (a, b), (b, lines.len())]
        .iter()
        .enumerate()
        .map(|(i, &(from, to))| {
            let p = dir.path().join(format!("part{i}.jsonl"));
            std::fs::write(&p, lines[from..to].join("\n")).unwrap();
            p
        })
        .collect();
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let topics = Topics::new();
    let changelog = unique("changelog");
    create_topics(&[&topics.input, &changelog], 2);
    create_topics(&[&topics.alerts, &topics.scores, &topics.dlq], 1);
    let group = unique("group");
    let flags = [
        "--changelog-topic",
        changelog.as_str(),
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--snapshot-interval-s",
        "1",
    ];
    let mut done = 0;
    let mut logs = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if i == 2 {
            // Corrupt the snapshot the second run left.
            let snap = std::fs::read_dir(&state_dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.to_string_lossy().ends_with(".snapshot"))
                .expect("a snapshot file");
            let mut bytes = std::fs::read(&snap).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            std::fs::write(&snap, bytes).unwrap();
        }
        replay(part, &topics.input);
        done += std::fs::read_to_string(part).unwrap().lines().count();
        let serve = Serve::start_for(&topics, &group, &flags);
        let mut reader = TopicReader::new(&topics.scores);
        common::wait_until(Duration::from_secs(120), "this part scored", || {
            (reader.drain(Duration::from_millis(300)) >= done).then_some(())
        });
        let (code, log) = serve.stop(Duration::from_secs(30));
        assert_eq!(code, 0, "{log}");
        assert!(log.contains("card store snapshot written"), "{log}");
        logs.push(log);
    }
    let restore_line = |log: &str| {
        log.lines()
            .find(|l| l.contains("card state restored from the changelog"))
            .unwrap_or_default()
            .to_string()
    };
    let second = restore_line(&logs[1]);
    assert!(
        second.contains("snapshot=\"used\"") || second.contains("snapshot=used"),
        "{second}"
    );
    assert!(!second.contains("from_snapshot=0"), "{second}");
    let third = restore_line(&logs[2]);
    assert!(logs[2].contains("corrupt snapshot"), "{}", logs[2]);
    assert!(
        third.contains("from_snapshot=0") && !third.contains(" cards=0"),
        "{third}"
    );

    let records = read_all(&topics.scores);
    let ids: std::collections::HashSet<String> = records
        .iter()
        .map(|(_, _, v)| text(&v["transaction_id"]))
        .collect();
    assert_eq!(ids.len(), total, "every transaction scored");
    let wrong = differing(&records, &reference);
    assert!(
        wrong.is_empty(),
        "{} differ, e.g. {:?}\n{}",
        wrong.len(),
        &wrong[..wrong.len().min(5)],
        logs.join("\n---\n")
    );
}
