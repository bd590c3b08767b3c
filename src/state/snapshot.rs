//! A local snapshot of the card store for fast restarts (`--state-dir`): every card's latest
//! changelog record, with the input offsets it covers and when it was taken. On assignment a
//! partition whose committed offset is past what the snapshot covers starts from the snapshot
//! and reads only the changelog written since (by time); otherwise (no snapshot, corrupt, another
//! model, or behind the commit) from the changelog's beginning, never from a wrong state.
//!
//! The file: `FSSNAP1\n`, the SHA-256 of the body, the body (postcard). Written to a temporary
//! file, fsynced, renamed over the old one, and the directory fsynced: a crash leaves the old
//! snapshot or the new one, never half of one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

const MAGIC: &[u8; 8] = b"FSSNAP1\n";

/// One card in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotCard {
    /// The card.
    pub key: String,
    /// Its input partition.
    pub shard: i32,
    /// Its state as a changelog record ([`super::encode`]).
    pub record: Vec<u8>,
}

/// The card store at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was taken (milliseconds since the epoch, the producer's clock): changelog records
    /// of later changes are newer than this.
    pub created_ms: i64,
    /// The window recipe's fingerprint.
    pub recipe: u64,
    /// Per input partition, the last input offset whose change the snapshot holds.
    pub covered: HashMap<i32, i64>,
    /// The cards.
    pub cards: Vec<SnapshotCard>,
}

/// Why a snapshot cannot be used.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// No snapshot yet.
    #[error("no snapshot at {0}")]
    Missing(PathBuf),
    /// Reading or writing failed.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// Not a snapshot, truncated, or its checksum does not match.
    #[error("{0}: corrupt snapshot (bad header or checksum)")]
    Corrupt(PathBuf),
}

impl SnapshotError {
    /// The `status` of a restore that could not use it.
    pub fn status(&self) -> &'static str {
        match self {
            SnapshotError::Missing(_) => "none",
            SnapshotError::Io { .. } | SnapshotError::Corrupt(_) => "corrupt",
        }
    }
}

/// The snapshot file of consumer group `group` in `dir`.
pub fn path(dir: &Path, group: &str) -> PathBuf {
    dir.join(format!("{group}.cards.snapshot"))
}

/// Writes `snapshot` to `path` atomically (temporary file, fsync, rename, directory fsync);
/// returns its size in bytes.
pub fn write(path: &Path, snapshot: &Snapshot) -> Result<u64, SnapshotError> {
    let io = |error| SnapshotError::Io {
        path: path.to_path_buf(),
        error,
    };
    let body = postcard::to_stdvec(snapshot).expect("a snapshot serialises");
    let tmp = path.with_extension("snapshot.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(MAGIC).map_err(io)?;
    f.write_all(&Sha256::digest(&body)).map_err(io)?;
    f.write_all(&body).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok((MAGIC.len() + 32 + body.len()) as u64)
}

/// Reads and verifies the snapshot at `path`.
pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
    let bytes = std::fs::read(path).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => SnapshotError::Missing(path.to_path_buf()),
        _ => SnapshotError::Io {
            path: path.to_path_buf(),
            error,
        },
    })?;
    let corrupt = || SnapshotError::Corrupt(path.to_path_buf());
    let header = MAGIC.len() + 32;
    if bytes.len() < header || &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt());
    }
    let (sum, body) = (&bytes[MAGIC.len()..header], &bytes[header..]);
    if Sha256::digest(body).as_slice() != sum {
        return Err(corrupt());
    }
    postcard::from_bytes(body).map_err(|_| corrupt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            created_ms: 1_700_000_000_000,
            recipe: 42,
            covered: HashMap::from([(0, 99), (3, 7)]),
            cards: vec![SnapshotCard {
                key: "card-1".into(),
                shard: 3,
                record: vec![1, 2, 3, 4],
            }],
        }
    }

    #[test]
    fn a_snapshot_reads_back_as_written_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "g");
        assert!(matches!(read(&p), Err(SnapshotError::Missing(_))));
        write(&p, &snapshot()).unwrap();
        assert_eq!(read(&p).unwrap(), snapshot());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // A second write replaces the first.
        let mut newer = snapshot();
        newer.created_ms += 1;
        write(&p, &newer).unwrap();
        assert_eq!(read(&p).unwrap(), newer);
    }

    #[test]
    fn a_flipped_byte_or_a_truncated_file_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "g");
        write(&p, &snapshot()).unwrap();
        let good = std::fs::read(&p).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&p, &flipped).unwrap();
        assert!(matches!(read(&p), Err(SnapshotError::Corrupt(_))));
        std::fs::write(&p, &good[..good.len() / 2]).unwrap();
        assert!(matches!(read(&p), Err(SnapshotError::Corrupt(_))));
        std::fs::write(&p, b"hello").unwrap();
        assert_eq!(read(&p).unwrap_err().status(), "corrupt");
    }
}
