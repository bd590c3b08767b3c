//! The deployment files are valid and agree with the binary: `docker-compose config` parses the
//! compose file, `promtool` checks the Prometheus config and alert rules (and runs their unit
//! tests), every metric a Grafana panel or an alert rule queries is one the detector exports, and
//! the Kubernetes manifests and the compose file run it from configuration files it accepts
//! (`deploy/fraudstream.toml` documents every setting) and probe routes it serves.
//! docker-compose and promtool are installed by .ci/test (no Docker engine is needed).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use promql_parser::parser::{Expr, parse};
use promql_parser::util::{ExprVisitor, walk_expr};
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn serve_help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fraudstream"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// `serve --config FILE --help`: succeeds only when every key of FILE is a serve setting of a
/// type it takes (the file is read before the help is printed, its values as the defaults).
fn serve_accepts_config(file: &Path) -> String {
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_fraudstream"))
            .args(["serve", "--help", "--config"])
            .arg(file),
    )
}

/// The uncommented `key = value` lines of a TOML file, before its first table.
fn top_level_keys(text: &str) -> HashMap<String, String> {
    text.lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the tool is installed by .ci/test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn compose_file_validates_and_runs_the_whole_stack() {
    let config = run_ok(
        Command::new("docker-compose")
            .args(["-f", "docker-compose.yml", "config"])
            .current_dir(root()),
    );
    for service in [
        "kafka:",
        "create-topics:",
        "detector:",
        "replay:",
        "prometheus:",
        "grafana:",
    ] {
        assert!(config.contains(service), "{service} missing");
    }
    assert!(config.contains("dockerfile: deploy/Dockerfile"));
    assert!(config.contains("--labels-topic labels --label-delay 60"));
    // The detector runs from deploy/fraudstream.toml, which the binary accepts, with these.
    assert!(config.contains("--config=/etc/fraudstream/fraudstream.toml"));
    assert!(config.contains("deploy/fraudstream.toml:/etc/fraudstream/fraudstream.toml:ro"));
    let file = root().join("deploy/fraudstream.toml");
    serve_accepts_config(&file);
    let keys = top_level_keys(&std::fs::read_to_string(&file).unwrap());
    for key in [
        "brokers",
        "group",
        "input-topic",
        "alerts-topic",
        "scores-topic",
        "dead-letter-topic",
        "labels-topic",
        "changelog-topic",
        "state-dir",
        "http",
    ] {
        assert!(
            keys.contains_key(key),
            "{key} not set in deploy/fraudstream.toml"
        );
    }
    // The changelog topic is created compacted.
    assert!(config.contains("--topic transactions-changelog"));
    assert!(config.contains("cleanup.policy=compact"));
    // Every file the compose file mounts exists.
    for line in config.lines() {
        if let Some(src) = line.trim().strip_prefix("source: ") {
            assert!(Path::new(src).exists(), "mounted {src} is missing");
        }
    }
}

/// deploy/fraudstream.toml documents every setting of `serve` (set, or commented out with its
/// default).
#[test]
fn the_example_config_documents_every_serve_setting() {
    let text = std::fs::read_to_string(root().join("deploy/fraudstream.toml")).unwrap();
    let help = serve_help();
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-'))
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        .collect();
    assert!(flags.len() > 30, "{flags:?}");
    for flag in flags {
        if matches!(flag, "help" | "version" | "config" | "log-format") {
            continue;
        }
        let documented = if flag == "kafka" {
            text.contains("\n[kafka]\n")
        } else {
            text.contains(&format!("\n{flag} = ")) || text.contains(&format!("\n# {flag} = "))
        };
        assert!(documented, "--{flag} is not in deploy/fraudstream.toml");
    }
}

#[test]
fn promtool_accepts_the_config_and_the_rules_pass_their_unit_tests() {
    let dir = root().join("deploy/prometheus");
    let out = run_ok(
        Command::new("promtool")
            .args(["check", "config", "prometheus.yml"])
            .current_dir(&dir),
    );
    assert!(out.contains("1 rule files found"), "{out}");
    let out = run_ok(
        Command::new("promtool")
            .args(["check", "rules", "alerts.yml"])
            .current_dir(&dir),
    );
    assert!(out.contains("7 rules found"), "{out}");
    let out = run_ok(
        Command::new("promtool")
            .args(["test", "rules", "alerts_test.yml"])
            .current_dir(&dir),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Collects the metric names an expression selects.
struct Names(BTreeSet<String>);

impl ExprVisitor for Names {
    type Error = ();
    fn pre_visit(&mut self, e: &Expr) -> Result<bool, ()> {
        match e {
            Expr::VectorSelector(vs) => self.0.extend(vs.name.clone()),
            Expr::MatrixSelector(ms) => self.0.extend(ms.vs.name.clone()),
            _ => {}
        }
        Ok(true)
    }
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let ast = parse(expr).unwrap_or_else(|e| panic!("PromQL {expr:?} does not parse: {e}"));
    let mut names = Names(BTreeSet::new());
    walk_expr(&mut names, &ast).unwrap();
    assert!(!names.0.is_empty(), "{expr:?} selects no metric");
    names.0
}

/// Every PromQL expression of the Grafana dashboard and the alert rules.
fn deployed_expressions() -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dashboards/fraudstream.json"))
            .unwrap(),
    )
    .unwrap();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            exprs.push((format!("panel {title}"), t["expr"].as_str().unwrap().into()));
        }
    }
    let rules = &yaml_docs(&root().join("deploy/prometheus/alerts.yml"))[0];
    for group in rules["groups"].as_vec().unwrap() {
        for rule in group["rules"].as_vec().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            exprs.push((
                format!("rule {name}"),
                rule["expr"].as_str().unwrap().into(),
            ));
        }
    }
    exprs
}

#[test]
fn every_queried_metric_is_exported_by_the_detector() {
    let metrics = fraudstream::observe::Metrics::new(prometheus::Registry::new()).unwrap();
    let exported: BTreeSet<String> = metrics.exported_names().into_iter().collect();
    // `up` is Prometheus's own, per scrape target.
    let prometheus_own = ["up"];
    let exprs = deployed_expressions();
    assert!(exprs.len() >= 15, "{} expressions", exprs.len());
    let mut used = BTreeSet::new();
    for (place, expr) in &exprs {
        for name in metric_names(expr) {
            assert!(
                exported.contains(&name) || prometheus_own.contains(&name.as_str()),
                "{place} queries {name}, which the detector does not export ({expr})"
            );
            used.insert(name);
        }
    }
    // The dashboard contents are all there.
    for must in [
        "fraudstream_live_precision",
        "fraudstream_live_recall",
        "fraudstream_live_f1",
        "fraudstream_alerts_total",
        "fraudstream_transactions_total",
        "fraudstream_end_to_end_latency_seconds_bucket",
        "fraudstream_consumer_lag",
        "fraudstream_dead_letters_total",
    ] {
        assert!(used.contains(must), "nothing shows {must}");
    }
    // The dashboard's datasource is the provisioned one.
    let ds = yaml_docs(&root().join("deploy/grafana/provisioning/datasources/prometheus.yml"));
    let uid = ds[0]["datasources"][0]["uid"].as_str().unwrap();
    let dash =
        std::fs::read_to_string(root().join("deploy/grafana/dashboards/fraudstream.json")).unwrap();
    assert!(dash.contains(&format!("\"uid\": \"{uid}\"")));
}

#[test]
fn kubernetes_manifests_match_the_binary() {
    let dir = root().join("deploy/k8s");
    let mut objects: HashMap<String, Yaml> = HashMap::new();
    let kustomization = &yaml_docs(&dir.join("kustomization.yaml"))[0];
    for file in kustomization["resources"].as_vec().unwrap() {
        for doc in yaml_docs(&dir.join(file.as_str().unwrap())) {
            for key in ["apiVersion", "kind"] {
                assert!(doc[key].as_str().is_some(), "{file:?}: no {key}");
            }
            let name = doc["metadata"]["name"].as_str().expect("metadata.name");
            assert!(name.starts_with("fraudstream"), "{name}");
            objects.insert(doc["kind"].as_str().unwrap().to_string(), doc);
        }
    }
    for kind in ["ConfigMap", "Deployment", "Service", "PodMonitor", "Job"] {
        assert!(objects.contains_key(kind), "no {kind}");
    }
    let config = objects["ConfigMap"]["data"].as_hash().unwrap();
    // The Job creates the changelog topic the detector is given, compacted, from the ConfigMap.
    let job = &objects["Job"]["spec"]["template"]["spec"]["containers"][0];
    let script = job["args"][0].as_str().unwrap();
    assert!(script.contains("cleanup.policy=compact"), "{script}");
    for var in ["BROKERS", "INPUT_TOPIC", "CHANGELOG_TOPIC"] {
        assert!(script.contains(&format!("\"${var}\"")), "{var}");
        assert!(
            config.contains_key(&Yaml::String(var.into())),
            "{var} not in the ConfigMap"
        );
    }
    let deployment = &objects["Deployment"];
    let pod = &deployment["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // serve --config FILE, FILE mounted from the ConfigMap's fraudstream.toml, which the
    // binary accepts.
    assert_eq!(
        args,
        ["serve", "--config=/etc/fraudstream/config/fraudstream.toml"]
    );
    let mount = container["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/etc/fraudstream/config"))
        .expect("the config directory is mounted");
    let volume = pod["spec"]["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"].as_str(), Some("fraudstream"));
    assert_eq!(
        volume["configMap"]["items"][0]["key"].as_str(),
        Some("fraudstream.toml")
    );
    let toml = config[&Yaml::String("fraudstream.toml".into())]
        .as_str()
        .expect("fraudstream.toml in the ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fraudstream.toml");
    std::fs::write(&file, toml).unwrap();
    serve_accepts_config(&file);
    let http_port = top_level_keys(toml)
        .get("http")
        .and_then(|h| h.rsplit(':').next().map(|p| p.parse::<i64>().unwrap()));
    let port = container["ports"][0]["containerPort"].as_i64().unwrap();
    assert_eq!(http_port, Some(port), "--http and containerPort differ");
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(port.to_string().as_str())
    );
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    // The Service and the PodMonitor select the pods.
    let labels = &pod["metadata"]["labels"];
    assert_eq!(&objects["Service"]["spec"]["selector"], labels);
    assert_eq!(
        &objects["PodMonitor"]["spec"]["selector"]["matchLabels"],
        labels
    );
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
}
