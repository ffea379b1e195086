//! Hot reload: watch the config file's directory and SIGHUP, then parse, validate, swap.
//!
//! The directory is watched rather than the file because the three ways a config changes all
//! replace directory entries: editors save by rename, `cp` rewrites in place, and Kubernetes
//! ConfigMap volumes swap a `..data` symlink without touching the file's own name. Any event in
//! the directory wakes the task; it waits for a quiet period, reads the file through its path
//! (following symlinks), and reloads only when the bytes differ from the last attempt. SIGHUP
//! always reloads.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::control::Control;
use crate::tls::CertStore;

/// Quiet period after the last file event before the file is read.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Poll interval when the OS file watcher cannot be used.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Starts the reload task for the config file at `path`.
pub fn spawn(path: PathBuf, control: Arc<Control>) -> std::io::Result<JoinHandle<()>> {
    let mut hup = signal(SignalKind::hangup())?;
    let wake = Arc::new(Notify::new());
    let watcher = watch_dir(&[&path], wake.clone());
    let mut last_text = std::fs::read_to_string(&path).ok();
    Ok(tokio::spawn(async move {
        // Dropping the watcher stops it; keep it for the task's lifetime.
        let _watcher = watcher;
        loop {
            let forced = tokio::select! {
                _ = wake.notified() => false,
                _ = hup.recv() => true,
            };
            if !forced {
                // Coalesce the burst of events one save produces.
                while tokio::time::timeout(DEBOUNCE, wake.notified())
                    .await
                    .is_ok()
                {}
            }
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(t) => t,
                Err(e) => {
                    let msg = format!("cannot read {}: {e}", path.display());
                    tracing::warn!(path = %path.display(), error = %e, "config reload rejected: file unreadable; keeping the running config");
                    control.reload_failed(msg);
                    continue;
                }
            };
            if !forced && last_text.as_deref() == Some(text.as_str()) {
                continue;
            }
            last_text = Some(text.clone());
            reload(
                &path,
                &text,
                &control,
                if forced { "SIGHUP" } else { "file change" },
            );
        }
    }))
}

/// Watches the TLS certificate and key; a change is loaded for new handshakes, a pair that does
/// not load is reported and the running certificate kept.
pub fn spawn_cert_watch(store: Arc<CertStore>) -> JoinHandle<()> {
    let wake = Arc::new(Notify::new());
    let files = store.files().clone();
    let watchers = if files.cert.parent() == files.key.parent() {
        vec![watch_dir(&[&files.cert, &files.key], wake.clone())]
    } else {
        vec![
            watch_dir(&[&files.cert], wake.clone()),
            watch_dir(&[&files.key], wake.clone()),
        ]
    };
    let read = move || {
        (
            std::fs::read(&files.cert).ok(),
            std::fs::read(&files.key).ok(),
        )
    };
    let mut last = read();
    tokio::spawn(async move {
        let _watchers = watchers;
        loop {
            wake.notified().await;
            while tokio::time::timeout(DEBOUNCE, wake.notified())
                .await
                .is_ok()
            {}
            let now = read();
            if now == last {
                continue;
            }
            last = now;
            match store.reload() {
                Ok(()) => {
                    tracing::info!(cert = %store.files().cert.display(), "TLS certificate reloaded")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate reload rejected; keeping the current certificate")
                }
            }
        }
    })
}

/// Parses `text` and applies it, or records why not.
pub fn reload(path: &Path, text: &str, control: &Control, trigger: &str) {
    let applied = Config::parse(text).and_then(|config| {
        let weights = describe_weights(&config);
        control.apply_config(config).map(|r| (r, weights))
    });
    match applied {
        Ok(((generation, restart_only), weights)) => {
            tracing::info!(path = %path.display(), trigger, generation, weights = %weights, "config reloaded");
            if !restart_only.is_empty() {
                tracing::warn!(
                    settings = %restart_only.join(", "),
                    "changed settings need a restart to take effect; running with the old values"
                );
            }
        }
        Err(errors) => {
            let msg = errors.to_string();
            tracing::warn!(
                path = %path.display(),
                trigger,
                errors = %msg.replace('\n', "; "),
                "config reload rejected; keeping the running config"
            );
            control.reload_failed(msg);
        }
    }
}

fn describe_weights(c: &Config) -> String {
    c.upstreams
        .iter()
        .map(|u| format!("{}={}", u.name, crate::routing::fmt_percent(u.weight_bp)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Watches the directory of `files` (which share it). Only events that name one of the files,
/// the file a symlinked one points to, or a `..`-prefixed entry (Kubernetes' atomic writer:
/// `..data`, `..data_tmp`, `..2026_...`) wake the task, so busy neighbours in the same
/// directory cost nothing.
fn watch_dir(files: &[&Path], wake: Arc<Notify>) -> Option<Box<dyn Watcher + Send>> {
    let first = files.first()?;
    let dir = match first.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut names: Vec<OsString> = Vec::new();
    for f in files {
        names.extend(f.file_name().map(OsStr::to_owned));
        if let Ok(target) = std::fs::read_link(f) {
            names.extend(target.file_name().map(OsStr::to_owned));
        }
    }
    let handler = move |res: notify::Result<notify::Event>| match res {
        Ok(ev) if relevant(&ev.kind) && names_match(&ev.paths, &names) => wake.notify_one(),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "config watcher error"),
    };
    let native = notify::recommended_watcher(handler.clone()).and_then(|mut w| {
        w.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(Box::new(w) as Box<dyn Watcher + Send>)
    });
    match native {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; polling every {POLL_INTERVAL:?} instead");
            let cfg = notify::Config::default().with_poll_interval(POLL_INTERVAL);
            let polled = notify::PollWatcher::new(handler, cfg).and_then(|mut w| {
                w.watch(&dir, RecursiveMode::NonRecursive)?;
                Ok(Box::new(w) as Box<dyn Watcher + Send>)
            });
            match polled {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "config file watching is off; reload with SIGHUP");
                    None
                }
            }
        }
    }
}

/// Whether an event concerns a watched file. Events without paths (overflow, rescan) count.
fn names_match(paths: &[PathBuf], names: &[OsString]) -> bool {
    paths.is_empty()
        || paths.iter().any(|p| {
            p.file_name().is_some_and(|n| {
                names.iter().any(|w| w == n) || n.as_encoded_bytes().starts_with(b"..")
            })
        })
}

/// Our own reads of the file produce open/close events; only writes and entry changes count.
fn relevant(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Any
        | EventKind::Create(_)
        | EventKind::Modify(_)
        | EventKind::Remove(_)
        | EventKind::Other => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_watched_files_and_kubernetes_entries_count() {
        let names = vec![OsString::from("canaryd.toml")];
        let p = |s: &str| vec![PathBuf::from(s)];
        assert!(names_match(&p("/etc/canaryd/canaryd.toml"), &names));
        assert!(names_match(&p("/etc/canaryd/..data"), &names));
        assert!(names_match(
            &p("/etc/canaryd/..2026_11_22_06_00_00.123"),
            &names
        ));
        assert!(names_match(&[], &names), "overflow events carry no path");
        assert!(!names_match(&p("/etc/canaryd/results.json"), &names));
        assert!(!names_match(&p("/etc/canaryd/.canaryd.toml.swp"), &names));
    }
}
