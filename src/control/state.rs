//! The state file: admin weight overrides and tripped arms that survive restarts.
//!
//! Written atomically (temp file in the same directory, fsync, rename, fsync of the directory),
//! so a crash leaves either the old or the new file. A file that cannot be parsed is moved aside
//! and reported; it never stops the proxy from serving its config.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Format version written to the file.
pub const VERSION: u32 = 1;

/// Everything persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// Weights set through the admin API, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_weights: Option<AdminWeights>,
    /// Tripped arms by name.
    #[serde(default)]
    pub tripped: BTreeMap<String, Trip>,
    /// The progressive rollout's state, as the rollout writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<serde_json::Value>,
}

/// An admin weight override and the file weights it replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminWeights {
    /// Weights in basis points by arm name.
    pub weights_bp: BTreeMap<String, u16>,
    /// The config file's weights when the override was made: if the file's weights differ at
    /// the next start or reload, the file wins.
    pub file_weights_bp: BTreeMap<String, u16>,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// Set by the progressive rollout (not by an admin call).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_rollout: bool,
}

/// Why and when an arm was tripped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trip {
    /// `error_rate`, `error_rate_increase`, `latency`, `analysis`, `webhook` or `manual`.
    pub reason: String,
    /// The numbers that tripped it, in words.
    pub detail: String,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// The arm's URL when it tripped; a new URL (a new build) clears the trip.
    pub url: String,
}

/// A state file problem.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading, writing or renaming failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid state JSON.
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads the state file; `Ok(None)` when it does not exist.
pub fn load(path: &Path) -> Result<Option<State>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StateError::Corrupt {
            path: path.to_owned(),
            source,
        })
}

/// Moves an unreadable state file aside to `<path>.corrupt-<unix ms>`; returns the new path.
pub fn quarantine(path: &Path) -> std::io::Result<PathBuf> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{}", now_ms()));
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

/// Writes `state` atomically.
pub fn save(path: &Path, state: &State) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let json = serde_json::to_vec_pretty(state).map_err(|e| io(std::io::Error::other(e)))?;
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_quarantine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        assert_eq!(load(&path).expect("missing is fine"), None);
        let mut s = State {
            version: VERSION,
            ..State::default()
        };
        s.tripped.insert(
            "canary".into(),
            Trip {
                reason: "manual".into(),
                detail: "POST /rollback".into(),
                at_ms: 1,
                url: "http://127.0.0.1:9001/".into(),
            },
        );
        save(&path, &s).expect("save");
        assert_eq!(load(&path).expect("load"), Some(s));

        std::fs::write(&path, b"{not json").expect("write");
        assert!(matches!(load(&path), Err(StateError::Corrupt { .. })));
        let aside = quarantine(&path).expect("quarantine");
        assert!(aside.exists() && !path.exists());
    }
}
