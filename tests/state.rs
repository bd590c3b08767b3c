//! Card state that survives: a detector with `--changelog-topic`, killed, restarted, joined by
//! another member or cut off from its broker mid-stream, restores its cards from the changelog
//! (or its local snapshot) and scores every transaction exactly as an uninterrupted run does;
//! with `--exactly-once`, each output once (against the real broker).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::broker::{brokers, unique};
use common::detector::{Serve, TopicReader, Topics, create_topics, metric, read_all};
use common::{fraudstream, simulate};
use serde_json::Value;

type Records = Vec<(i32, i64, Value)>;

fn replay_on(brokers: &str, file: &Path, topic: &str) {
    fraudstream()
        .args(["replay", "--brokers", brokers, "--topic", topic, "--data"])
        .arg(file)
        .assert()
        .success();
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

fn scored(metrics: &str) -> f64 {
    metric(
        metrics,
        "fraudstream_transactions_total{outcome=\"scored\"}",
    )
}

/// A simulated stream (30 days, 200 cards unless said), its scores in an uninterrupted file-mode
/// run, and a detector group's topics on the shared broker (input and changelog with
/// `partitions` partitions).
struct Case {
    dir: tempfile::TempDir,
    file: PathBuf,
    lines: Vec<String>,
    reference: HashMap<String, f64>,
    topics: Topics,
    changelog: String,
    group: String,
}

impl Case {
    fn new(days: &str, cards: &str, partitions: i32) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let file = simulate(
            dir.path(),
            "cards.jsonl",
            &["--days", days, "--cards", cards],
        );
        let scores = dir.path().join("reference-scores.jsonl");
        fraudstream()
            .args(["serve", "--input"])
            .arg(format!("file:{}", file.display()))
            .args(["--output", "file:/dev/null", "--scores-output"])
            .arg(format!("file:{}", scores.display()))
            .assert()
            .success();
        let reference = std::fs::read_to_string(&scores)
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (text(&v["transaction_id"]), v["score"].as_f64().unwrap())
            })
            .collect();
        let lines = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        let (topics, changelog) = (Topics::new(), unique("changelog"));
        create_topics(&[&topics.input, &changelog], partitions);
        create_topics(&[&topics.alerts, &topics.scores, &topics.dlq], 1);
        Case {
            dir,
            file,
            lines,
            reference,
            topics,
            changelog,
            group: unique("group"),
        }
    }

    fn total(&self) -> usize {
        self.reference.len()
    }

    /// Lines `from..to` of the stream as a file.
    fn part(&self, from: usize, to: usize) -> PathBuf {
        let p = self.dir.path().join(format!("part-{from}-{to}.jsonl"));
        std::fs::write(&p, self.lines[from..to].join("\n")).unwrap();
        p
    }

    fn replay(&self, file: &Path) {
        replay_on(&brokers(), file, &self.topics.input);
    }

    /// A detector of the case's group with the changelog and `extra` flags.
    fn serve(&self, extra: &[&str]) -> Serve {
        let flags = [&["--changelog-topic", self.changelog.as_str()], extra].concat();
        Serve::start_for(&self.topics, &self.group, &flags)
    }

    /// Waits until the scores topic holds at least `n` records.
    fn wait_scored(&self, n: usize) {
        wait_scored_on(TopicReader::new(&self.topics.scores), n);
    }
}

fn wait_scored_on(mut reader: TopicReader, n: usize) {
    common::wait_until(Duration::from_secs(120), &format!("{n} scored"), || {
        (reader.drain(Duration::from_millis(300)) >= n).then_some(())
    });
}

/// The offsets `group` has committed on `topic`'s partitions `0..partitions` (0 where none).
fn committed_offsets(group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => (e.partition(), o),
            _ => (e.partition(), 0),
        })
        .collect()
}

/// Every transaction scored, and every score record equal to the uninterrupted run's.
fn assert_like_uninterrupted(records: &Records, reference: &HashMap<String, f64>, log: &str) {
    let ids: HashSet<String> = records
        .iter()
        .map(|(_, _, v)| text(&v["transaction_id"]))
        .collect();
    assert_eq!(
        ids.len(),
        reference.len(),
        "every transaction scored\n{log}"
    );
    let wrong: Vec<String> = records
        .iter()
        .filter_map(|(_, _, v)| {
            let id = text(&v["transaction_id"]);
            let (score, want) = (v["score"].as_f64().unwrap(), reference[&id]);
            ((score - want).abs() > 2e-6).then(|| format!("{id}: {score} vs {want}"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} score records differ from the uninterrupted run, e.g. {:?}\n{log}",
        wrong.len(),
        records.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// SIGKILL at about 40% of the stream, start again: the restarted detector restores the cards
/// from the changelog (as of the committed offsets), reads the rest, and every score, including
/// the re-scored ones between the last commit and the kill, equals the uninterrupted run's.
#[test]
fn a_detector_killed_mid_stream_restores_its_cards_and_scores_like_an_uninterrupted_run() {
    let case = Case::new("30", "200", 2);
    case.replay(&case.file);
    // Offsets committed often, so the kill leaves little to read again; the longest changelog
    // flush interval, so many card changes are coalesced and commits can only fall on flushes.
    let flags = [
        "--kafka",
        "auto.commit.interval.ms=500",
        "--changelog-flush-ms",
        "1000",
    ];
    let a = case.serve(&flags);
    let at = (case.total() * 2 / 5) as f64;
    a.wait_metrics(Duration::from_secs(120), "40% scored", |t| scored(t) >= at);
    let log_a = a.kill();
    assert!(
        read_all(&case.topics.scores).len() < case.total(),
        "killed before the end:\n{log_a}"
    );

    let b = case.serve(&flags);
    case.wait_scored(case.total());
    let metrics = b.wait_metrics(Duration::from_secs(10), "restore metrics", |t| {
        t.contains("fraudstream_state_restored_cards_total")
    });
    let (code, log_b) = b.stop(Duration::from_secs(30));
    assert_eq!(code, 0, "{log_b}");
    assert_like_uninterrupted(&read_all(&case.topics.scores), &case.reference, &log_b);
    assert!(
        log_b.contains("card state restored from the changelog"),
        "{log_b}"
    );
    let restored = metric(&metrics, "fraudstream_state_restored_cards_total");
    // The broker may serve one partition before the other: the cards of at least one partition
    // (about half of the 200) had state when the first detector was killed.
    assert!(restored >= 50.0, "cards restored: {restored}\n{log_b}");
    assert!(metric(&metrics, "fraudstream_changelog_records_total") > 0.0);
    let coalesced = metric(&metrics, "fraudstream_changelog_coalesced_total");
    assert!(
        coalesced > 0.0,
        "catching up, a card's changes within 1 s are coalesced: {coalesced}\n{log_b}"
    );
}

/// A second member joins after 40% of the stream: the partitions it takes over keep their cards
/// (restored from the changelog the first member wrote), so every score equals the
/// uninterrupted run's.
#[test]
fn a_member_joining_mid_stream_restores_the_cards_of_the_partitions_it_takes() {
    let case = Case::new("30", "200", 4);
    let first = case.lines.len() * 2 / 5;
    case.replay(&case.part(0, first));
    let a = case.serve(&[]);
    a.wait_metrics(Duration::from_secs(120), "the first 40% scored", |t| {
        scored(t) >= first as f64
    });
    let b = case.serve(&[]);
    b.wait_ready(Duration::from_secs(60));
    case.replay(&case.part(first, case.lines.len()));
    case.wait_scored(case.total());
    let metrics_b = b.wait_metrics(Duration::from_secs(10), "restore metrics", |t| {
        t.contains("fraudstream_state_restored_cards_total")
    });
    let (code_b, log_b) = b.stop(Duration::from_secs(30));
    let (code_a, log_a) = a.stop(Duration::from_secs(30));
    let logs = format!("A:\n{log_a}\nB:\n{log_b}");
    assert_eq!((code_a, code_b), (0, 0), "{logs}");
    assert_like_uninterrupted(&read_all(&case.topics.scores), &case.reference, &logs);
    let restored = metric(&metrics_b, "fraudstream_state_restored_cards_total");
    assert!(
        restored >= 50.0,
        "B restored the cards of the partitions it took: {restored}\n{log_b}"
    );
}

/// Exactly-once: outputs, changelog records and offsets in one transaction. SIGKILL at 40%
/// leaves a transaction open; the restarted member (same `--instance-id`, so the same
/// transactional id) restores the committed card states and reads from the committed offsets:
/// every score equals the uninterrupted run's, and only the transaction the kill abandoned can
/// repeat: every repeated score is of an input record at or after the offset the group had
/// committed (with its last transaction) when the kill came. (Apache Kafka aborts an abandoned transaction when its transactional id starts
/// again, so a `read_committed` reader sees none of it; the test broker, tansu, leaves its
/// records visible, which a probe showed. The at-least-once run of the same scenario repeats
/// everything since the last auto-commit.)
#[test]
fn exactly_once_repeats_at_most_the_abandoned_transaction_across_a_sigkill() {
    let case = Case::new("30", "200", 2);
    case.replay(&case.file);
    let flags = ["--exactly-once", "--instance-id", "member-1"];
    let a = case.serve(&flags);
    let at = (case.total() * 2 / 5) as f64;
    a.wait_metrics(Duration::from_secs(120), "40% scored", |t| scored(t) >= at);
    let log_a = a.kill();
    assert!(log_a.contains("exactly-once"), "{log_a}");
    let committed = committed_offsets(&case.group, &case.topics.input, 2);

    let b = case.serve(&flags);
    case.wait_scored(case.total());
    let (code, log_b) = b.stop(Duration::from_secs(30));
    assert_eq!(code, 0, "{log_b}");
    // Read to the end only now: an output committed twice would show as a longer result.
    let records = read_all(&case.topics.scores);
    assert_like_uninterrupted(&records, &case.reference, &log_b);
    // The first member's scores come first in the (one-partition) scores topic; a repeat's first
    // copy is the first member's. Each must be of input the group had not committed at the kill:
    // the abandoned transaction.
    let mut first_seen: HashMap<String, &Value> = HashMap::new();
    let mut repeated = Vec::new();
    for (_, _, v) in &records {
        if let Some(first) = first_seen.insert(text(&v["transaction_id"]), v) {
            repeated.push(first);
        }
    }
    let committed_by_kill: Vec<String> = repeated
        .iter()
        .filter(|v| {
            let (p, o) = (&v["source"]["partition"], &v["source"]["offset"]);
            o.as_i64().unwrap() < committed[&(p.as_i64().unwrap() as i32)]
        })
        .map(|v| text(&v["transaction_id"]))
        .collect();
    assert!(
        committed_by_kill.is_empty(),
        "{} repeated scores were of input committed before the kill (committed {committed:?}), \
         e.g. {:?}\n{log_b}",
        committed_by_kill.len(),
        &committed_by_kill[..committed_by_kill.len().min(5)]
    );
    eprintln!(
        "exactly-once across SIGKILL: {} repeated, all of the abandoned transaction (committed \
         at the kill: {committed:?})",
        repeated.len()
    );
    let alerts = read_all(&case.topics.alerts);
    let alert_ids: HashSet<String> = alerts
        .iter()
        .map(|(_, _, v)| text(&v["transaction_id"]))
        .collect();
    let alerting: HashSet<String> = records
        .iter()
        .filter(|(_, _, v)| v["alert"] == true)
        .map(|(_, _, v)| text(&v["transaction_id"]))
        .collect();
    assert_eq!(
        alert_ids, alerting,
        "an alert for every alerting score, and no other"
    );
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
    // The case's topics on the shared broker go unused: this test needs a broker of its own.
    let case = Case::new("20", "150", 1);
    let port = common::free_port();
    let (mut tansu, real) = common::broker::own_tansu_behind(port);
    let proxy = Proxy::start(port, real);
    let brokers = format!("127.0.0.1:{port}");
    let t = &case.topics;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(fraudstream::stream::kafka::ensure_topics(
        &brokers,
        &[],
        &[&t.input, &t.alerts, &t.scores, &case.changelog],
        2,
    ))
    .unwrap();
    let first = case.lines.len() / 2;
    replay_on(&brokers, &case.part(0, first), &t.input);
    let serve = Serve::start_on(
        &brokers,
        &[
            "--group",
            &case.group,
            "--input-topic",
            &t.input,
            "--alerts-topic",
            &t.alerts,
            "--scores-topic",
            &t.scores,
            "--changelog-topic",
            &case.changelog,
            "--kafka",
            "statistics.interval.ms=1000",
        ],
    );
    serve.wait_metrics(Duration::from_secs(90), "the first half scored", |m| {
        scored(m) >= first as f64
    });
    let addr = serve.wait_ready(Duration::from_secs(10));
    let get = |path| common::detector::get(&addr, path);

    proxy.cut();
    common::wait_until(Duration::from_secs(30), "/readyz 503 while out", || {
        get("/readyz").0.contains("503").then_some(())
    });
    assert_eq!(metric(&get("/metrics").1, "fraudstream_broker_up"), 0.0);
    // Longer than the session timeout (6 s in tests): the group gives the partitions away.
    std::thread::sleep(Duration::from_secs(15));

    proxy.restore();
    common::wait_until(Duration::from_secs(60), "/readyz 200 once back", || {
        get("/readyz").0.contains("200").then_some(())
    });
    replay_on(&brokers, &case.part(first, case.lines.len()), &t.input);
    wait_scored_on(TopicReader::on(&brokers, &t.scores), case.total());
    let restored = metric(&get("/metrics").1, "fraudstream_state_restored_cards_total");
    let reassigned = serve.log().matches("partitions assigned").count() > 1;
    let (code, log) = serve.stop(Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    // Whether the group gave the partitions away meanwhile depends on when the broker notices
    // the member gone; if it did, their cards came back from the changelog, unless the group's
    // commit had not passed them before the cut (then every record is ahead of the commit and
    // rightly ignored: the input is read again from the commit and rebuilds the same state,
    // which the score comparison below checks).
    let ahead_of_commit: u64 = log
        .rsplit("ahead_of_commit=")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        !reassigned || restored >= 50.0 || ahead_of_commit > 0,
        "cards restored after the outage: {restored}, records ahead of the commit: {ahead_of_commit}\n{log}"
    );
    let mut reader = TopicReader::on(&brokers, &t.scores);
    reader.drain(Duration::from_secs(1));
    assert_like_uninterrupted(&reader.messages, &case.reference, &log);
    let _ = tansu.kill();
    let _ = tansu.wait();
}

/// `--state-dir`: a clean stop writes a snapshot; the restart restores from it and reads only
/// the changelog written since; a corrupted snapshot is detected and the next restart restores
/// from the changelog alone. Every score of the three runs equals the uninterrupted run's.
#[test]
fn a_restart_uses_the_local_snapshot_and_a_corrupt_one_falls_back_to_the_changelog() {
    let case = Case::new("30", "200", 2);
    let n = case.lines.len();
    let parts = [(0, n / 2), (n / 2, n * 9 / 10), (n * 9 / 10, n)];
    let state_dir = case.dir.path().join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let flags = [
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--snapshot-interval-s",
        "1",
    ];
    let mut logs = Vec::new();
    for (i, &(from, to)) in parts.iter().enumerate() {
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
        case.replay(&case.part(from, to));
        let serve = case.serve(&flags);
        case.wait_scored(to);
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
    assert!(second.contains("snapshot=\"used\""), "{second}");
    assert!(!second.contains("from_snapshot=0"), "{second}");
    let third = restore_line(&logs[2]);
    assert!(logs[2].contains("corrupt snapshot"), "{}", logs[2]);
    assert!(
        third.contains("from_snapshot=0") && !third.contains(" cards=0"),
        "{third}"
    );
    let all = logs.join("\n---\n");
    assert_like_uninterrupted(&read_all(&case.topics.scores), &case.reference, &all);
}

/// The zombie stops: a second process starting with the same `--instance-id` in exactly-once
/// mode takes over the first's transactional id and static membership: the first exits
/// non-zero with the reason instead of going on, and the second scores the rest, each score
/// equal to the uninterrupted run's. (Apache Kafka refuses the fenced producer's next commit at
/// once with PRODUCER_FENCED; the test broker, tansu, lets it time out and then still applies
/// the zombie's in-flight transaction without its offsets, so its records appear twice here:
/// "each output once" across a live zombie cannot be checked on this broker.)
#[test]
fn a_fenced_exactly_once_member_stops_and_the_new_one_scores_the_rest() {
    let case = Case::new("30", "200", 2);
    let flags = ["--exactly-once", "--instance-id", "twin"];
    let a = case.serve(&flags);
    a.wait_ready(Duration::from_secs(60));
    // Traffic throughout: the first member keeps trying to commit after the second starts.
    let producer = std::process::Command::new(assert_cmd::cargo::cargo_bin("fraudstream"))
        .args([
            "replay",
            "--brokers",
            &brokers(),
            "--topic",
            &case.topics.input,
        ])
        .args(["--rate", "400", "--data"])
        .arg(&case.file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _producer = common::KillOnDrop(producer);
    a.wait_metrics(Duration::from_secs(60), "A scoring", |t| scored(t) >= 400.0);
    let b = case.serve(&flags);
    let (code_a, log_a) = a.wait(Duration::from_secs(90));
    assert_ne!(code_a, 0, "the fenced member exits non-zero:\n{log_a}");
    assert!(log_a.contains("exactly-once:"), "{log_a}");
    case.wait_scored(case.total());
    let (code_b, log_b) = b.stop(Duration::from_secs(30));
    assert_eq!(code_b, 0, "{log_b}");
    assert_like_uninterrupted(&read_all(&case.topics.scores), &case.reference, &log_b);
}
