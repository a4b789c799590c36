//! Where a provider's API key comes from when a request is sent: a file (a mounted
//! Secret, re-read when it changes), an environment variable, or the value the operator
//! read from a Secret. Keys are held as [`SecretValue`]s, so they never show in `Debug`
//! output or logs.
//!
//! A mounted Secret is updated by the kubelet swapping a symlink, so the file's
//! metadata (followed through the link) changes: the file is stat'ed before each use
//! and read again only when its modification time or length differs from the cached
//! copy. A stat is a cheap syscall next to an LLM request.
//!
//! In a local run (no operator), a provider whose key comes from a Secret, or that
//! names no key at all, reads `OPENAI_API_KEY` or `ANTHROPIC_API_KEY` by its type — the
//! variables the providers' own SDKs read. With no key anywhere, the request is sent
//! without one (a local model server behind an OpenAI-compatible API needs none).

use std::{path::PathBuf, sync::Mutex, time::SystemTime};

use trimtab_api::{
    balancer_policy::ProviderKind,
    sidecar_config::{LlmProvider, SecretValue},
};

/// A key that should exist but cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `apiKey.file` cannot be read.
    #[error("providers[{provider}].apiKey.file: cannot read {path}: {source}")]
    File {
        /// The provider's name.
        provider: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `apiKey.file` holds only whitespace.
    #[error("providers[{provider}].apiKey.file: {path} is empty")]
    EmptyFile {
        /// The provider's name.
        provider: String,
        /// The file.
        path: PathBuf,
    },
    /// `apiKey.env` names a variable that is not set.
    #[error("providers[{provider}].apiKey.env: the environment variable {var} is not set")]
    Env {
        /// The provider's name.
        provider: String,
        /// The variable.
        var: String,
    },
}

/// The standalone variable of a provider type, as the official SDKs name it.
pub fn standalone_env(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Openai => "OPENAI_API_KEY",
        ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
    }
}

#[derive(Debug)]
enum Source {
    File {
        path: PathBuf,
        cached: Mutex<Option<(SystemTime, u64, SecretValue)>>,
    },
    Env {
        var: String,
        value: Option<SecretValue>,
    },
    Value(SecretValue),
    None,
}

/// One provider's key source.
#[derive(Debug)]
pub struct ApiKey {
    provider: String,
    source: Source,
}

impl ApiKey {
    /// The key source of `provider`; environment variables are read now (they do not
    /// change while the process runs).
    pub fn new(provider: &LlmProvider) -> Self {
        let spec = &provider.provider;
        let env = |var: &str| Source::Env {
            var: var.to_owned(),
            value: std::env::var(var)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| SecretValue::new(v.trim())),
        };
        let source = match (&spec.api_key, &provider.secret_key) {
            (_, Some(value)) => Source::Value(value.clone()),
            (Some(k), None) if k.file.is_some() => Source::File {
                path: PathBuf::from(k.file.clone().unwrap_or_default()),
                cached: Mutex::new(None),
            },
            (Some(k), None) if k.env.is_some() => env(k.env.as_deref().unwrap_or_default()),
            // A Secret nobody read (a local run), or no key named: the SDKs' variable.
            _ => match env(standalone_env(spec.kind)) {
                Source::Env { value: None, .. } if spec.api_key.is_none() => Source::None,
                source => source,
            },
        };
        Self {
            provider: spec.name.clone(),
            source,
        }
    }

    /// The key to send now; `None` when the provider is configured without one.
    pub fn get(&self) -> Result<Option<SecretValue>, KeyError> {
        match &self.source {
            Source::None => Ok(None),
            Source::Value(v) => Ok(Some(v.clone())),
            Source::Env { var, value } => value.clone().map(Some).ok_or_else(|| KeyError::Env {
                provider: self.provider.clone(),
                var: var.clone(),
            }),
            Source::File { path, cached } => {
                let file_error = |source| KeyError::File {
                    provider: self.provider.clone(),
                    path: path.clone(),
                    source,
                };
                let meta = std::fs::metadata(path).map_err(file_error)?;
                let stamp = (
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                );
                // A poisoned lock only means another request panicked mid-read; the
                // cache is re-validated below either way.
                let mut cached = cached.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((modified, len, value)) = cached.as_ref()
                    && (*modified, *len) == stamp
                {
                    return Ok(Some(value.clone()));
                }
                let text = std::fs::read_to_string(path).map_err(file_error)?;
                let key = text.trim();
                if key.is_empty() {
                    return Err(KeyError::EmptyFile {
                        provider: self.provider.clone(),
                        path: path.clone(),
                    });
                }
                let value = SecretValue::new(key);
                *cached = Some((stamp.0, stamp.1, value.clone()));
                Ok(Some(value))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use trimtab_api::balancer_policy::{ApiKeySource, Provider};

    use super::*;

    fn provider(api_key: Option<ApiKeySource>) -> LlmProvider {
        LlmProvider {
            provider: Provider {
                name: "p".into(),
                kind: ProviderKind::Openai,
                base_url: "http://127.0.0.1:1/v1".into(),
                model: "m".into(),
                model_aliases: Default::default(),
                context_window: 8192,
                weight: 1,
                api_key,
            },
            secret_key: None,
        }
    }

    #[test]
    fn rereads_a_key_file_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "sk-one\n").unwrap();
        let key = ApiKey::new(&provider(Some(ApiKeySource {
            secret_key_ref: None,
            file: Some(path.display().to_string()),
            env: None,
        })));
        assert_eq!(key.get().unwrap().unwrap().expose(), "sk-one");
        std::fs::write(&path, "sk-second-key").unwrap();
        assert_eq!(key.get().unwrap().unwrap().expose(), "sk-second-key");
        std::fs::remove_file(&path).unwrap();
        let err = key.get().unwrap_err().to_string();
        assert!(
            err.starts_with("providers[p].apiKey.file: cannot read"),
            "{err}"
        );
        assert!(!format!("{key:?}").contains("sk-"));
    }

    #[test]
    fn a_missing_environment_variable_is_named() {
        let key = ApiKey::new(&provider(Some(ApiKeySource {
            secret_key_ref: None,
            file: None,
            env: Some("TRIMTAB_TEST_SURELY_UNSET_KEY".into()),
        })));
        assert_eq!(
            key.get().unwrap_err().to_string(),
            "providers[p].apiKey.env: the environment variable TRIMTAB_TEST_SURELY_UNSET_KEY is not set"
        );
    }

    #[test]
    fn the_operators_value_wins_and_stays_redacted() {
        let mut p = provider(None);
        p.secret_key = Some(SecretValue::new("sk-from-secret"));
        let key = ApiKey::new(&p);
        assert_eq!(key.get().unwrap().unwrap().expose(), "sk-from-secret");
        assert!(!format!("{key:?}").contains("sk-from-secret"));
    }
}
