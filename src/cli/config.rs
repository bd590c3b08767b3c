//! `serve`'s configuration from three places besides its flags: a TOML file (`--config`),
//! environment variables (`FRAUDSTREAM_<FLAG>`, e.g. `FRAUDSTREAM_INPUT_TOPIC`), and the
//! defaults. Precedence, as Kafka services have it: flags > environment > file > defaults.
//!
//! How: every `serve` flag gets its environment variable, and each key of the file becomes that
//! flag's default, so clap itself applies the order. The file's keys are the long flag names
//! (`input-topic` or `input_topic`); `kafka` is a table of librdkafka settings. A key that is no
//! flag is an error naming it. What took effect (and from where) is logged at start-up with
//! secrets redacted.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};

use super::Cli;

/// The subcommand configured this way.
const SERVICE: &str = "serve";
/// Environment variables' prefix.
pub const ENV_PREFIX: &str = "FRAUDSTREAM_";

/// Errors reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not TOML.
    #[error("config {path}: {source}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: toml::de::Error,
    },
    /// A key no flag has.
    #[error(
        "config {path}: unknown key `{key}` (keys are serve's long flag names, see `fraudstream serve --help`)"
    )]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A value of a type a flag cannot take.
    #[error("config {path}: key `{key}`: {why}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        why: String,
    },
}

/// One setting as it took effect: flag name, value (secrets redacted) and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// Long flag name.
    pub name: String,
    /// Its value(s), comma separated, secrets as `***`.
    pub value: String,
    /// `flag`, `env`, `file` or `default`.
    pub source: &'static str,
}

static EFFECTIVE: OnceLock<Vec<Setting>> = OnceLock::new();
static FILE_KAFKA: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// The file's `[kafka]` settings: applied before the `--kafka` flags (which win key by key), not
/// replaced by them.
pub fn file_kafka() -> &'static [(String, String)] {
    FILE_KAFKA.get().map_or(&[], Vec::as_slice)
}

/// What `serve`'s settings were and where each came from (empty for other commands).
pub fn effective() -> &'static [Setting] {
    EFFECTIVE.get().map_or(&[], Vec::as_slice)
}

/// The environment variable of flag `long` (`input-topic` -> `FRAUDSTREAM_INPUT_TOPIC`).
pub fn env_name(long: &str) -> String {
    format!("{ENV_PREFIX}{}", long.replace('-', "_").to_uppercase())
}

/// Parses the command line with `serve`'s environment variables and config file applied.
pub fn parse_from(args: Vec<OsString>) -> Result<Cli, anyhow::Error> {
    let mut cmd = Cli::command();
    cmd = cmd.mut_subcommand(SERVICE, |sc| {
        let ids: Vec<String> = sc
            .get_arguments()
            .filter(|a| a.get_long().is_some())
            .map(|a| a.get_id().to_string())
            .collect();
        ids.iter().fold(sc, |sc, id| {
            sc.mut_arg(id, |a| {
                let env = env_name(a.get_long().expect("long flags only"));
                a.env(env)
            })
        })
    });
    let is_service = args.get(1..).into_iter().flatten().any(|a| a == SERVICE);
    let file = if is_service { config_path(&args) } else { None };
    let mut file_ids = Vec::new();
    if let Some(path) = &file {
        let (defaults, kafka) = file_defaults(path, cmd.find_subcommand(SERVICE).expect("serve"))?;
        let _ = FILE_KAFKA.set(kafka);
        file_ids = defaults.iter().map(|(id, _)| id.clone()).collect();
        cmd = cmd.mut_subcommand(SERVICE, |sc| {
            defaults.iter().fold(sc, |sc, (id, values)| {
                sc.mut_arg(id, |a| a.default_values(values.clone()))
            })
        });
    }
    let matches = cmd.try_get_matches_from(args).map_err(|e| {
        // clap's own errors (help, version, usage) print and exit as clap does.
        e.exit()
    })?;
    if let Some(sm) = matches.subcommand_matches(SERVICE) {
        let sc = Cli::command();
        let sc = sc.find_subcommand(SERVICE).expect("serve").clone();
        let _ = EFFECTIVE.set(settings(&sc, sm, &file_ids));
    }
    Ok(Cli::from_arg_matches(&matches)?)
}

/// `--config PATH` or `--config=PATH` after the subcommand, else `FRAUDSTREAM_CONFIG`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os(env_name("config")).map(PathBuf::from)
}

/// The file's keys as (argument id, default values).
#[allow(clippy::type_complexity)]
fn file_defaults(
    path: &Path,
    sc: &clap::Command,
) -> Result<(Vec<(String, Vec<String>)>, Vec<(String, String)>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table = text.parse().map_err(|source| ConfigError::Toml {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |key: &str, why: &str| ConfigError::Value {
        path: path.to_path_buf(),
        key: key.to_string(),
        why: why.to_string(),
    };
    let mut out = Vec::new();
    let mut kafka = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = sc
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| ConfigError::UnknownKey {
                path: path.to_path_buf(),
                key: key.clone(),
            })?;
        let values = match (&value, long.as_str()) {
            (toml::Value::Table(t), "kafka") => {
                for (k, v) in t {
                    let v = scalar(v).ok_or_else(|| {
                        bad(&key, "kafka settings must be strings, numbers or booleans")
                    })?;
                    kafka.push((k.clone(), v));
                }
                continue;
            }
            (_, "kafka") => return Err(bad(&key, "a table: [kafka] \"key\" = value")),
            (toml::Value::Array(items), _) => items
                .iter()
                .map(scalar)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(&key, "a list of strings, numbers or booleans"))?,
            (v, _) => vec![scalar(v).ok_or_else(|| bad(&key, "a string, number or boolean"))?],
        };
        out.push((arg.get_id().to_string(), values));
    }
    Ok((out, kafka))
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Whether a setting's value must not be printed.
pub fn is_secret(name: &str) -> bool {
    let n = name.to_lowercase();
    [
        "password",
        "secret",
        "token",
        "jaas",
        "private",
        "credential",
    ]
    .iter()
    .any(|s| n.contains(s))
        || n.ends_with(".key.pem")
        || n == "ssl.key.location"
}

fn settings(sc: &clap::Command, m: &ArgMatches, file_ids: &[String]) -> Vec<Setting> {
    let mut out: Vec<Setting> = file_kafka()
        .iter()
        .map(|(k, v)| Setting {
            name: "kafka".into(),
            value: format!("{k}={}", if is_secret(k) { "***" } else { v }),
            source: "file",
        })
        .collect();
    for arg in sc.get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        if matches!(long, "help" | "version") {
            continue;
        }
        let Some(source) = m.value_source(id) else {
            continue;
        };
        let source = match source {
            ValueSource::CommandLine => "flag",
            ValueSource::EnvVariable => "env",
            // A default is the file's when the file set that key.
            ValueSource::DefaultValue if file_ids.iter().any(|f| f == id) => "file",
            _ => "default",
        };
        let raw: Vec<String> = m
            .get_raw(id)
            .map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let value = raw
            .iter()
            .map(|v| match v.split_once('=') {
                Some((k, _)) if long == "kafka" && is_secret(k) => format!("{k}=***"),
                _ if is_secret(long) => "***".into(),
                _ => v.clone(),
            })
            .collect::<Vec<_>>()
            .join(",");
        out.push(Setting {
            name: long.to_string(),
            value,
            source,
        });
    }
    out
}
