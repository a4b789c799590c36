//! Where configs come from: BalancerPolicy YAML files (`--policy`, multi-document,
//! hot-reloaded) and the state directory that keeps the last good config for
//! fail-static restarts. The operator's config server is the other source
//! ([`crate::control_plane`]); it falls back to the same state directory.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use trimtab_api::{
    BalancerPolicy,
    sidecar_config::{FromPolicyError, Route, SidecarConfig},
};

use crate::sidecar::Sidecar;

/// The file in `--state-dir` holding the last good config.
pub const STATE_FILE: &str = "sidecar-config.json";

/// A config source that could not produce a config.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A YAML document did not parse as a BalancerPolicy.
    #[error("{path}: document {document}: {message}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// 1-based document index.
        document: usize,
        /// The parser's message (with line and column where known).
        message: String,
    },
    /// A policy that cannot be served without the operator, or is invalid.
    #[error("{path}: document {document}: {source}")]
    Policy {
        /// The file.
        path: PathBuf,
        /// 1-based document index.
        document: usize,
        /// Why (boxed: it carries a whole config error).
        source: Box<FromPolicyError>,
    },
    /// The kept state could not be written or read.
    #[error("{path}: {message}")]
    State {
        /// The state file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Reads BalancerPolicy documents from YAML text: every document of kind
/// `BalancerPolicy` becomes a route; other kinds (a LoadTest in the same file) and
/// empty documents are skipped.
pub fn parse_policies(text: &str, path: &Path) -> Result<Vec<Route>, SourceError> {
    let mut routes = Vec::new();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let yaml_error = |e: serde_yaml_ng::Error| SourceError::Yaml {
            path: path.to_owned(),
            document: i + 1,
            message: e.to_string(),
        };
        let value = serde_yaml_ng::Value::deserialize(document).map_err(yaml_error)?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("BalancerPolicy");
        if kind != "BalancerPolicy" {
            tracing::debug!(path = %path.display(), document = i + 1, kind, "skipping a document that is not a BalancerPolicy");
            continue;
        }
        let policy: BalancerPolicy = serde_yaml_ng::from_value(value).map_err(yaml_error)?;
        let route = Route::from_policy(&policy).map_err(|source| SourceError::Policy {
            path: path.to_owned(),
            document: i + 1,
            source: Box::new(source),
        })?;
        routes.push(route);
    }
    Ok(routes)
}

/// The text of every policy file, in order.
pub fn read_policy_files(paths: &[PathBuf]) -> Result<Vec<(PathBuf, String)>, SourceError> {
    paths
        .iter()
        .map(|path| {
            std::fs::read_to_string(path)
                .map(|text| (path.clone(), text))
                .map_err(|source| SourceError::Read {
                    path: path.clone(),
                    source,
                })
        })
        .collect()
}

/// The routes of every policy in `files`.
pub fn routes_from(files: &[(PathBuf, String)]) -> Result<Vec<Route>, SourceError> {
    let mut routes = Vec::new();
    for (path, text) in files {
        routes.extend(parse_policies(text, path)?);
    }
    Ok(routes)
}

/// The directory where the last good config is kept.
#[derive(Debug, Clone)]
pub struct StateDir(PathBuf);

impl StateDir {
    /// The state directory at `dir` (created on first save).
    pub fn new(dir: PathBuf) -> Self {
        Self(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join(STATE_FILE)
    }

    /// Writes `config` atomically: to a temporary file, then renamed over the old one,
    /// so that a crash mid-write never leaves a torn config. Readable by this user only:
    /// it can hold LLM providers' API keys (the injected volume is in memory too).
    pub fn save(&self, config: &SidecarConfig) -> Result<(), SourceError> {
        let file = self.file();
        let state_error = |message: String| SourceError::State {
            path: file.clone(),
            message,
        };
        std::fs::create_dir_all(&self.0)
            .map_err(|e| state_error(format!("cannot create the directory: {e}")))?;
        let json = serde_json::to_vec_pretty(config).map_err(|e| state_error(e.to_string()))?;
        let tmp = self.0.join(format!(".{STATE_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
            // A leftover from a crash may have other permissions: start afresh.
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()
        };
        write().map_err(|e| state_error(format!("cannot write: {e}")))?;
        std::fs::rename(&tmp, &file).map_err(|e| state_error(format!("cannot replace: {e}")))?;
        Ok(())
    }

    /// The kept config, `None` if there is none.
    pub fn load(&self) -> Result<Option<SidecarConfig>, SourceError> {
        let file = self.file();
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(SourceError::State {
                    path: file,
                    message: format!("cannot read: {e}"),
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SourceError::State {
                path: file,
                message: format!("not a sidecar config: {e}"),
            })
    }
}

/// Applies the policies in `files` as the next version.
pub async fn apply_files(sidecar: &Sidecar, files: &[(PathBuf, String)]) -> Result<(), LoadError> {
    let config = SidecarConfig {
        version: sidecar.version() + 1,
        routes: routes_from(files)?,
    };
    sidecar.apply(config).await?;
    Ok(())
}

/// Why a load failed: the source, or the sidecar refusing the config.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The files could not be read or parsed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The sidecar refused the config.
    #[error(transparent)]
    Refused(#[from] crate::sidecar::ApplyError),
}

/// Starts serving: the policy files if they load, else the kept config (fail static).
/// Returns the contents of the policy files as read, applied or not.
pub async fn start(sidecar: &Sidecar, paths: &[PathBuf]) -> Option<Vec<(PathBuf, String)>> {
    let mut read = None;
    if !paths.is_empty() {
        match read_policy_files(paths) {
            Ok(files) => match apply_files(sidecar, &files).await {
                Ok(()) => return Some(files),
                Err(e) => {
                    tracing::error!(error = %e, "policy files refused; trying the kept config");
                    read = Some(files);
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "policy files unreadable; trying the kept config")
            }
        }
    }
    serve_kept(sidecar).await;
    read
}

/// Serves the last good config from the state directory (fail static), when there is
/// one: what every source falls back to when it has nothing at start. Returns whether
/// a kept config is now served.
pub async fn serve_kept(sidecar: &Sidecar) -> bool {
    let Some(dir) = sidecar.state_dir() else {
        tracing::warn!("no config to serve yet; not ready until one loads");
        return false;
    };
    match dir.load() {
        Ok(Some(kept)) => {
            let version = kept.version;
            match sidecar.apply(kept).await {
                Ok(()) => {
                    tracing::warn!(
                        version,
                        "serving the last good config from the state directory (fail static)"
                    );
                    return true;
                }
                Err(e) => tracing::error!(error = %e, "the kept config was refused"),
            }
        }
        Ok(None) => tracing::warn!("no config to serve yet: nothing loaded and nothing kept"),
        Err(e) => tracing::error!(error = %e, "the kept config could not be read"),
    }
    false
}

/// Reloads the policy files whenever they change: on file-system events (inotify via
/// `notify`, watching the parent directories so that editors' rename-over and
/// Kubernetes ConfigMap symlink swaps are seen) and, as a safety net, every
/// `poll_interval`. Unchanged contents are not re-applied. A refused config is logged
/// naming the field, and the running config keeps serving.
pub async fn watch_files(
    sidecar: Arc<Sidecar>,
    paths: Vec<PathBuf>,
    mut last: Option<Vec<(PathBuf, String)>>,
    poll_interval: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the files ourselves raises access events: react to changes only.
        if event.is_ok_and(|e| e.kind.is_create() || e.kind.is_modify() || e.kind.is_remove()) {
            let _ = tx.send(());
        }
    });
    let _watcher = match watcher {
        Ok(mut w) => {
            for dir in paths.iter().filter_map(|p| p.parent()).map(|d| {
                if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                }
            }) {
                if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch; polling only");
                }
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "file watching unavailable; polling only");
            None
        }
    };
    let mut unreadable_logged = false;
    loop {
        tokio::select! {
            _ = rx.recv() => {
                // Let a burst of events (write, rename, chmod) settle into one reload.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(poll_interval) => {}
        }
        let files = match read_policy_files(&paths) {
            Ok(files) => files,
            Err(e) => {
                // Mid-swap or deleted: keep serving, say so once until it reads again.
                if !unreadable_logged {
                    tracing::error!(error = %e, "policy files unreadable; the running config keeps serving");
                    unreadable_logged = true;
                }
                continue;
            }
        };
        unreadable_logged = false;
        if last.as_ref() == Some(&files) {
            continue;
        }
        // Remembered whether applied or refused, so one bad file is reported once.
        let result = apply_files(&sidecar, &files).await;
        last = Some(files);
        if let Err(e) = result {
            tracing::error!(error = %e, "new config refused; the running config keeps serving");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_POLICIES: &str = r#"
apiVersion: trimtab.dev/v1alpha1
kind: BalancerPolicy
metadata: {name: a, namespace: default}
spec:
  clients: {podSelector: {}}
  listener: {port: 15001}
  endpoints: ["127.0.0.1:18081"]
---
apiVersion: trimtab.dev/v1alpha1
kind: LoadTest
metadata: {name: ignored}
---
apiVersion: trimtab.dev/v1alpha1
kind: BalancerPolicy
metadata: {name: b, namespace: default}
spec:
  clients: {podSelector: {}}
  listener: {port: 15002}
  endpoints: ["127.0.0.1:18082"]
  algorithm: roundRobin
"#;

    #[test]
    fn reads_every_balancer_policy_of_a_multi_document_file() {
        let routes = parse_policies(TWO_POLICIES, Path::new("p.yaml")).expect("valid");
        let ports: Vec<u16> = routes.iter().map(|r| r.listener.port).collect();
        assert_eq!(ports, [15001, 15002]);
    }

    #[test]
    fn names_the_file_and_document_of_a_bad_policy() {
        let text = format!(
            "{TWO_POLICIES}---\nkind: BalancerPolicy\nmetadata: {{name: c}}\nspec: {{listener: {{}}}}\n"
        );
        let err = parse_policies(&text, Path::new("p.yaml")).expect_err("invalid");
        assert!(err.to_string().starts_with("p.yaml: document 4:"), "{err}");
    }

    #[test]
    fn keeps_and_restores_the_last_good_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path().join("state"));
        assert!(state.load().expect("readable").is_none());
        let routes = parse_policies(TWO_POLICIES, Path::new("p.yaml")).expect("valid");
        let config = SidecarConfig { version: 7, routes };
        state.save(&config).expect("saved");
        assert_eq!(state.load().expect("readable"), Some(config.clone()));
        // It may hold API keys: only this user reads it, after an overwrite too.
        state.save(&config).expect("saved again");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("state").join(STATE_FILE))
                .expect("the state file")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
}
