//! API keys of LLM provider policies: each `apiKey.secretKeyRef` is read from the
//! policy's own namespace and carried in the route to the sidecars the policy selects —
//! never to another namespace's pods, never into status, Events or logs.
//!
//! Keys are read with a `get` of the one Secret named, at every reconcile of the policy
//! ([`RECHECK`] apart at the most), rather than from a watch of every Secret: the operator
//! then needs `get` on Secrets, not `list`/`watch` (which would hand it every Secret's
//! data), and a rotated key reaches the sidecars within one recheck.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use trimtab_api::sidecar_config::{LlmRoute, SecretValue};

/// How often a provider policy's Secrets are read again: the longest a rotated key takes
/// to reach the sidecars.
pub const RECHECK: Duration = Duration::from_secs(15);

/// Why a key could not be read. The messages name the Secret and the key, never a value.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No such Secret in the policy's namespace.
    #[error("Secret {namespace}/{name} not found")]
    NoSecret {
        /// The policy's namespace.
        namespace: String,
        /// The Secret.
        name: String,
    },
    /// The Secret has no such key.
    #[error("Secret {namespace}/{name} has no key {key:?}")]
    NoKey {
        /// The policy's namespace.
        namespace: String,
        /// The Secret.
        name: String,
        /// The key asked for.
        key: String,
    },
    /// The value is empty or not text.
    #[error("the value of {key:?} in Secret {namespace}/{name} is empty or not UTF-8 text")]
    NotText {
        /// The policy's namespace.
        namespace: String,
        /// The Secret.
        name: String,
        /// The key.
        key: String,
    },
    /// The operator may not read it (the chart grants `get` on Secrets; a narrower
    /// install can use `apiKey.file` with the Secret mounted into the client pods).
    #[error(
        "the operator may not read Secret {namespace}/{name} (grant it get on secrets, or use apiKey.file with the Secret mounted in the client pods)"
    )]
    Forbidden {
        /// The policy's namespace.
        namespace: String,
        /// The Secret.
        name: String,
    },
    /// Any other API failure (retried at the next recheck).
    #[error("reading Secret {namespace}/{name}: {source}")]
    Api {
        /// The policy's namespace.
        namespace: String,
        /// The Secret.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// Fills the key of every provider of `llm` whose `apiKey` is a `secretKeyRef`, from
/// Secrets in `namespace`. A provider whose key cannot be read is left without one (its
/// requests fail over to the others, and the sidecar says why); the errors, with the
/// field they concern, are returned for the policy's conditions.
pub async fn fill(client: &Client, namespace: &str, llm: &mut LlmRoute) -> Vec<(String, KeyError)> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let mut problems = Vec::new();
    for (i, provider) in llm.providers.iter_mut().enumerate() {
        let Some(reference) = provider
            .provider
            .api_key
            .as_ref()
            .and_then(|k| k.secret_key_ref.as_ref())
        else {
            continue;
        };
        let secret = secrets.get_opt(&reference.name).await;
        match key_of(namespace, &reference.name, &reference.key, secret) {
            Ok(value) => provider.secret_key = Some(value),
            Err(e) => {
                provider.secret_key = None;
                problems.push((format!("spec.providers[{i}].apiKey.secretKeyRef"), e));
            }
        }
    }
    problems
}

/// The key `key` of the Secret `name` as the API answered for it. Pure, for tests.
fn key_of(
    namespace: &str,
    name: &str,
    key: &str,
    answer: Result<Option<Secret>, kube::Error>,
) -> Result<SecretValue, KeyError> {
    let (namespace, name) = (namespace.to_owned(), name.to_owned());
    let secret = match answer {
        Ok(Some(secret)) => secret,
        Ok(None) => return Err(KeyError::NoSecret { namespace, name }),
        Err(kube::Error::Api(s)) if s.code == 403 => {
            return Err(KeyError::Forbidden { namespace, name });
        }
        Err(source) => {
            return Err(KeyError::Api {
                namespace,
                name,
                source,
            });
        }
    };
    // `stringData` is write-only: the API server answers with `data` alone.
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .ok_or_else(|| KeyError::NoKey {
            namespace: namespace.clone(),
            name: name.clone(),
            key: key.to_owned(),
        })?;
    // `echo key | kubectl create secret --from-file` leaves a newline: the key is what
    // is around it, as the sidecar reads a key file.
    match String::from_utf8(bytes).map(|s| s.trim().to_owned()) {
        Ok(text) if !text.is_empty() => Ok(SecretValue::new(text)),
        _ => Err(KeyError::NotText {
            namespace,
            name,
            key: key.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    fn secret(key: &str, value: &[u8]) -> Secret {
        Secret {
            data: Some(BTreeMap::from([(
                key.to_owned(),
                ByteString(value.to_vec()),
            )])),
            ..Secret::default()
        }
    }

    #[test]
    fn a_key_is_read_trimmed_and_every_failure_names_the_secret() {
        let read = |answer| key_of("shop", "llm-keys", "openai", answer);
        let value = read(Ok(Some(secret("openai", b"sk-test-1\n")))).expect("a key");
        assert_eq!(value.expose(), "sk-test-1");
        let message = |r: Result<SecretValue, KeyError>| r.err().map(|e| e.to_string());
        assert_eq!(
            message(read(Ok(None))).as_deref(),
            Some("Secret shop/llm-keys not found")
        );
        assert_eq!(
            message(read(Ok(Some(secret("anthropic", b"x"))))).as_deref(),
            Some(r#"Secret shop/llm-keys has no key "openai""#)
        );
        for bad in [&b"  \n"[..], &[0xff, 0xfe][..]] {
            let e = message(read(Ok(Some(secret("openai", bad))))).expect("refused");
            assert!(e.contains("empty or not UTF-8"), "{e}");
        }
        let forbidden = kube::Error::Api(
            kube::core::Status {
                code: 403,
                ..kube::core::Status::failure("secrets \"llm-keys\" is forbidden", "Forbidden")
            }
            .boxed(),
        );
        let e = message(read(Err(forbidden))).expect("refused");
        assert!(e.contains("may not read Secret shop/llm-keys"), "{e}");
    }
}
