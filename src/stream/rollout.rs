//! Rolling models into a running detector: load a bundle beside the running one, verify it
//! (checksum, shapes, spec, scaler, a finite score), and put it in place between batches, as
//! champion (its scores alert) or shadow challenger (scored on the same windows, never
//! alerting). A bundle that fails any check never replaces a working one: the running model
//! keeps scoring, and the failure is logged and counted (`fraudstream_model_reloads_total`).
//!
//! Triggers, all in `serve`: a change in a watched bundle directory (`--watch-model`), SIGHUP
//! (reload both directories), and the admin endpoints (`--admin-addr`, off by default).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Device;
use serde_json::{Value, json};

use super::detector::Detector;
use super::lineup::{Lineup, Scorer};
use crate::model::Bundle;
use crate::observe::Role;
use crate::schema::Confusion;

/// Fewer labelled frauds than this in a window and the comparison says so instead of naming a
/// better model.
pub const MIN_FRAUDS_TO_COMPARE: u64 = 10;

/// Loads, verifies and installs bundles; remembers what each watched directory held.
#[derive(Debug)]
pub struct Rollout {
    detector: Arc<Detector>,
    /// The directory `--model` named (None: the built-in model, nothing to reload).
    model_dir: Option<PathBuf>,
    /// What each directory held when it was last loaded or tried.
    seen: Mutex<HashMap<PathBuf, u64>>,
}

impl Rollout {
    /// Rolls models into `detector`, whose champion came from `model_dir`.
    pub fn new(detector: Arc<Detector>, model_dir: Option<PathBuf>) -> Self {
        let r = Rollout {
            detector,
            model_dir,
            seen: Mutex::default(),
        };
        if let Some(d) = &r.model_dir {
            r.saw(d);
        }
        r
    }

    /// The detector it installs into.
    pub fn detector(&self) -> &Arc<Detector> {
        &self.detector
    }

    fn saw(&self, dir: &Path) -> u64 {
        let f = fingerprint(dir);
        self.seen
            .lock()
            .expect("seen lock")
            .insert(dir.to_path_buf(), f);
        f
    }

    /// Loads the bundle in `dir` and puts it in `role`. Errors name the directory and why.
    pub fn load(&self, role: Role, dir: &Path) -> Result<Arc<Lineup>, String> {
        self.saw(dir);
        let bundle = match verified(dir) {
            Ok(b) => b,
            Err(e) => {
                self.detector.refuse(role, &e);
                return Err(e);
            }
        };
        self.detector
            .install(role, Some((&bundle, Some(dir.to_path_buf()))))
            .map_err(|e| format!("{}: {e}", dir.display()))
    }

    /// Removes the challenger.
    pub fn drop_challenger(&self) -> Arc<Lineup> {
        self.detector
            .install(Role::Challenger, None)
            .expect("removing a challenger cannot fail")
    }

    /// The challenger becomes the champion.
    pub fn promote(&self) -> Result<Arc<Lineup>, String> {
        self.detector.promote()
    }

    /// Where the champion is reloaded from: its own directory, else `--model`'s.
    pub fn champion_dir(&self) -> Option<PathBuf> {
        let lineup = self.detector.models().current();
        lineup
            .champion
            .dir
            .clone()
            .or_else(|| self.model_dir.clone())
    }

    /// Reloads the champion's and the challenger's directories (SIGHUP); returns what each
    /// load said.
    pub fn reload(&self) -> Vec<(Role, Result<Arc<Lineup>, String>)> {
        let mut out = Vec::new();
        if let Some(dir) = self.champion_dir() {
            out.push((Role::Champion, self.load(Role::Champion, &dir)));
        }
        let challenger = self.detector.models().current().challenger.clone();
        if let Some(dir) = challenger.and_then(|c| c.dir) {
            out.push((Role::Challenger, self.load(Role::Challenger, &dir)));
        }
        out
    }

    /// One watch pass: loads each role's directory whose files changed since it was last
    /// loaded or tried (a half-written bundle fails its checksum; it is tried again when its
    /// files change again).
    pub fn poll(&self) -> Vec<(Role, Result<Arc<Lineup>, String>)> {
        let lineup = self.detector.models().current();
        let dirs = [
            (Role::Champion, self.champion_dir()),
            (
                Role::Challenger,
                lineup.challenger.as_ref().and_then(|c| c.dir.clone()),
            ),
        ];
        let mut out = Vec::new();
        for (role, dir) in dirs {
            let Some(dir) = dir else { continue };
            let before = self.seen.lock().expect("seen lock").get(&dir).copied();
            if before != Some(fingerprint(&dir)) {
                tracing::info!(role = role.as_str(), dir = %dir.display(), "model directory changed: loading it");
                out.push((role, self.load(role, &dir)));
            }
        }
        out
    }

    /// Polls every `every` until the runtime stops.
    pub fn spawn_watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let r = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let r = r.clone();
                // Loading reads and checks files: off the reactor.
                let _ = tokio::task::spawn_blocking(move || r.poll()).await;
            }
        })
    }

    /// Reloads on every SIGHUP until the runtime stops.
    #[cfg(unix)]
    pub fn spawn_sighup(self: &Arc<Self>) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        let r = self.clone();
        Ok(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the model directories");
                let r = r.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload()).await;
            }
        }))
    }

    /// The lineup and how the two models did on labels over the last hour and day: what
    /// `/models` answers.
    pub fn report(&self) -> Value {
        models_report(&self.detector, chrono::Utc::now().timestamp_millis())
    }
}

/// Loads `dir` and checks it can score: the bundle's own checks (checksum, shapes, spec,
/// scaler), then one forward pass on an empty and a constant window, which must give finite
/// scores in [0, 1].
pub fn verified(dir: &Path) -> Result<Bundle, String> {
    let bundle =
        Bundle::load(dir, &Device::Cpu).map_err(|e| format!("loading {}: {e}", dir.display()))?;
    let b = bundle.window_builder();
    let (w, n) = (b.window_len(), b.width());
    let zeros = vec![0f32; w * n];
    let ones = vec![1f32; w * n];
    let (scores, _) = bundle.fast.predict(&[&zeros, &ones], &[1, w]);
    if let Some(bad) = scores.iter().find(|s| !(0.0..=1.0).contains(*s)) {
        return Err(format!(
            "{}: the model scores {bad} on a test window (not a probability): its weights are broken",
            dir.display()
        ));
    }
    Ok(bundle)
}

/// Identifies a directory's files (names, sizes, modification times, and the manifest's
/// bytes): a change means a new bundle may be there.
pub fn fingerprint(dir: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut entries: Vec<(String, u64, Option<std::time::SystemTime>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            m.is_file().then(|| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    m.len(),
                    m.modified().ok(),
                )
            })
        })
        .collect();
    entries.sort();
    entries.hash(&mut h);
    std::fs::read(dir.join(crate::model::BUNDLE_MANIFEST))
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

/// One model of the lineup, as JSON.
fn describe(s: &Scorer) -> Value {
    json!({
        "name": s.model_ref.name,
        "version": s.model_ref.version,
        "sha256": s.model_ref.sha256,
        "threshold": s.threshold,
        "dir": s.dir.as_ref().map(|d| d.display().to_string()),
        "rescaled_windows": s.adapt.is_some(),
    })
}

fn confusion(c: &Confusion) -> Value {
    json!({
        "true_positives": c.tp,
        "false_positives": c.fp,
        "true_negatives": c.tn,
        "false_negatives": c.fn_,
        "labelled": c.tp + c.fp + c.tn + c.fn_,
        "labelled_frauds": c.tp + c.fn_,
        "precision": c.precision(),
        "recall": c.recall(),
        "f1": c.f1(),
    })
}

/// Which of two models did better on the same labelled decisions: higher F1 at its own
/// threshold, once enough frauds were labelled.
pub fn better(champion: &Confusion, challenger: &Confusion) -> (&'static str, String) {
    let frauds = champion.tp + champion.fn_;
    if frauds < MIN_FRAUDS_TO_COMPARE {
        return (
            "undecided",
            format!(
                "{frauds} labelled frauds; at least {MIN_FRAUDS_TO_COMPARE} are needed to compare"
            ),
        );
    }
    let (a, b) = (champion.f1().unwrap_or(0.0), challenger.f1().unwrap_or(0.0));
    let why = format!(
        "F1 {b:.4} (challenger) vs {a:.4} (champion) over {frauds} labelled frauds and {} labelled transactions",
        champion.tp + champion.fp + champion.tn + champion.fn_
    );
    let verdict = if b > a {
        "challenger"
    } else if a > b {
        "champion"
    } else {
        "tie"
    };
    (verdict, why)
}

/// The lineup and the per-model quality over the last hour and day at `now_ms`.
pub fn models_report(detector: &Detector, now_ms: i64) -> Value {
    let lineup = detector.models().current();
    let q = detector.quality();
    let mut windows = serde_json::Map::new();
    for (name, ms) in [("1h", 3_600_000), ("1d", 24 * 3_600_000)] {
        let champion = q.model_window(
            Role::Champion,
            &lineup.champion.model_ref.version,
            ms,
            now_ms,
        );
        let mut w = json!({ "champion": confusion(&champion) });
        if let Some(c) = &lineup.challenger {
            let challenger = q.model_window(Role::Challenger, &c.model_ref.version, ms, now_ms);
            let (verdict, why) = better(&champion, &challenger);
            w["challenger"] = confusion(&challenger);
            w["better"] = json!(verdict);
            w["why"] = json!(why);
        }
        windows.insert(name.into(), w);
    }
    json!({
        "champion": describe(&lineup.champion),
        "challenger": lineup.challenger.as_ref().map(describe),
        "windows": windows,
    })
}

/// What an admin request asks for.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminBody {
    /// A bundle directory.
    dir: Option<PathBuf>,
}

type AdminReply = (axum::http::StatusCode, axum::Json<Value>);

fn body(bytes: &[u8]) -> Result<AdminBody, AdminReply> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(AdminBody::default());
    }
    serde_json::from_slice(bytes).map_err(|e| {
        reply(Err(format!(
            "the body must be JSON like {{\"dir\": \"/models/new\"}}: {e}"
        )))
    })
}

fn reply(result: Result<Arc<Lineup>, String>) -> AdminReply {
    use axum::http::StatusCode;
    match result {
        Ok(_) => (StatusCode::OK, axum::Json(json!({"ok": true}))),
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"ok": false, "error": e})),
        ),
    }
}

/// Runs a rollout step off the reactor and answers with its result and the lineup after it.
async fn step(
    r: Arc<Rollout>,
    f: impl FnOnce(&Rollout) -> Result<Arc<Lineup>, String> + Send + 'static,
) -> AdminReply {
    let r2 = r.clone();
    let result = tokio::task::spawn_blocking(move || f(&r2))
        .await
        .unwrap_or_else(|e| Err(format!("the load failed: {e}")));
    let (status, axum::Json(mut v)) = reply(result);
    v["models"] = r.report();
    (status, axum::Json(v))
}

/// Loads the bundle the body's `dir` names into `role` (the champion's own directory when the
/// body names none).
async fn load_step(r: Arc<Rollout>, bytes: axum::body::Bytes, role: Role) -> AdminReply {
    let b = match body(&bytes) {
        Ok(b) => b,
        Err(e) => return e,
    };
    step(r, move |r| {
        let dir = match (b.dir, role) {
            (Some(dir), _) => dir,
            (None, Role::Champion) => r.champion_dir().ok_or_else(|| {
                "the built-in model has no directory to reload: give {\"dir\": DIR}".to_string()
            })?,
            (None, Role::Challenger) => {
                return Err("give the challenger's bundle: {\"dir\": DIR}".to_string());
            }
        };
        r.load(role, &dir)
    })
    .await
}

/// The admin endpoints (serve `--admin-addr`, off by default: anyone who reaches them can
/// change the model):
/// - `POST /admin/model` (`{"dir": DIR}` optional): load the champion from DIR, or reload its
///   own directory;
/// - `POST /admin/challenger` (`{"dir": DIR}`): load a shadow challenger; `DELETE` removes it;
/// - `POST /admin/promote`: the challenger becomes the champion;
/// - `GET /admin/models`: the lineup and the comparison (as `/models`).
///
/// Answers `{"ok": true, "models": ...}`, or 422 with `{"ok": false, "error": ...}` when the
/// bundle was refused (the running models keep scoring).
pub fn admin_router(r: Arc<Rollout>) -> axum::Router {
    use axum::extract::State;
    use axum::routing::{get, post};
    axum::Router::new()
        .route(
            "/admin/model",
            post(|State(r): State<Arc<Rollout>>, bytes: axum::body::Bytes| {
                load_step(r, bytes, Role::Champion)
            }),
        )
        .route(
            "/admin/challenger",
            post(|State(r): State<Arc<Rollout>>, bytes: axum::body::Bytes| {
                load_step(r, bytes, Role::Challenger)
            })
            .delete(|State(r): State<Arc<Rollout>>| async move {
                step(r, |r| Ok(r.drop_challenger())).await
            }),
        )
        .route(
            "/admin/promote",
            post(|State(r): State<Arc<Rollout>>| async move { step(r, Rollout::promote).await }),
        )
        .route(
            "/admin/models",
            get(|State(r): State<Arc<Rollout>>| async move { axum::Json(r.report()) }),
        )
        .with_state(r)
}

/// Serves [`admin_router`] on `addr` (with the metrics server's connection limits); returns
/// the bound address.
pub async fn spawn_admin(
    addr: std::net::SocketAddr,
    r: Arc<Rollout>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(crate::observe::http::serve(listener, admin_router(r)));
    tracing::info!(%bound, "serving the admin endpoints (/admin/model, /admin/challenger, /admin/promote, /admin/models)");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_better_model_is_named_only_with_enough_frauds() {
        let c = |tp, fp, fn_| Confusion {
            tp,
            fp,
            tn: 100,
            fn_,
        };
        assert_eq!(better(&c(3, 1, 2), &c(5, 0, 0)).0, "undecided");
        assert_eq!(better(&c(8, 4, 4), &c(10, 2, 2)).0, "challenger");
        assert_eq!(better(&c(10, 2, 2), &c(8, 4, 4)).0, "champion");
        assert_eq!(better(&c(10, 2, 2), &c(10, 2, 2)).0, "tie");
    }

    #[test]
    fn a_fingerprint_changes_with_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = fingerprint(dir.path());
        std::fs::write(dir.path().join("manifest.json"), "{}").unwrap();
        let b = fingerprint(dir.path());
        assert_ne!(a, b);
        assert_eq!(b, fingerprint(dir.path()));
        std::fs::write(dir.path().join("manifest.json"), "{ }").unwrap();
        assert_ne!(b, fingerprint(dir.path()));
    }
}
