//! The per-test runner token: `base64url(HMAC-SHA256(key, test UID))`.
//!
//! Deriving the token from one operator-wide key, rather than storing a random token
//! per test, means the operator never reads a Secret outside its own namespace: it
//! creates each test's token Secret (and needs only `create` on Secrets cluster-wide,
//! never `get`, `list` or `patch`), and any replica can check a runner's token after a
//! restart or a leader change. The key lives in one Secret in the operator's namespace,
//! created by the first replica that finds none (as the TLS Secret is).

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use ring::{
    hmac,
    rand::{SecureRandom, SystemRandom},
};

/// The key's entry in its Secret.
const KEY_ENTRY: &str = "key";
/// 256 bits, the size of the HMAC-SHA256 output.
const KEY_BYTES: usize = 32;

/// The key could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    /// The API server refused or could not be reached.
    #[error("Secret {name}: {action}: {source}")]
    Api {
        /// The Secret.
        name: String,
        /// What was done.
        action: &'static str,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The Secret exists but holds no usable key.
    #[error("Secret {name}: data.{KEY_ENTRY} must hold {KEY_BYTES} or more bytes")]
    Malformed {
        /// The Secret.
        name: String,
    },
    /// The system's random source failed.
    #[error("no random bytes for a new key")]
    Random,
}

/// Signs and checks runner tokens.
#[derive(Clone)]
pub struct TokenKey(hmac::Key);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// Reads the key from Secret `name` in `api`'s namespace, or creates it. Two
    /// replicas starting at once both try to create; the loser reads the winner's.
    pub async fn ensure(api: &Api<Secret>, name: &str) -> Result<Self, TokenKeyError> {
        let error = |action| {
            move |source| TokenKeyError::Api {
                name: name.to_owned(),
                action,
                source,
            }
        };
        if let Some(secret) = api.get_opt(name).await.map_err(error("reading"))? {
            return Self::from_secret(&secret, name);
        }
        let mut bytes = [0u8; KEY_BYTES];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| TokenKeyError::Random)?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_owned(),
                        "trimtab-operator".to_owned(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            data: Some([(KEY_ENTRY.to_owned(), ByteString(bytes.to_vec()))].into()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(Self::from_bytes(&bytes)),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let secret = api.get(name).await.map_err(error("reading"))?;
                Self::from_secret(&secret, name)
            }
            Err(e) => Err(error("creating")(e)),
        }
    }

    fn from_secret(secret: &Secret, name: &str) -> Result<Self, TokenKeyError> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(KEY_ENTRY))
            .filter(|k| k.0.len() >= KEY_BYTES)
            .map(|k| Self::from_bytes(&k.0))
            .ok_or_else(|| TokenKeyError::Malformed {
                name: name.to_owned(),
            })
    }

    /// The token of the test with this UID.
    pub fn token(&self, uid: &str) -> String {
        URL_SAFE_NO_PAD.encode(hmac::sign(&self.0, uid.as_bytes()).as_ref())
    }

    /// Whether `token` is the token of the test with this UID (in constant time).
    pub fn verify(&self, uid: &str, token: &str) -> bool {
        URL_SAFE_NO_PAD
            .decode(token.trim())
            .is_ok_and(|tag| hmac::verify(&self.0, uid.as_bytes(), &tag).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_for_its_test_only() {
        let key = TokenKey::from_bytes(&[7; KEY_BYTES]);
        let token = key.token("uid-1");
        assert!(key.verify("uid-1", &token));
        assert!(!key.verify("uid-2", &token));
        assert!(!key.verify("uid-1", "not base64 at all!"));
        assert!(!key.verify("uid-1", ""));
        let other = TokenKey::from_bytes(&[8; KEY_BYTES]);
        assert!(!other.verify("uid-1", &token));
        // Deterministic: every replica derives the same token.
        assert_eq!(token, TokenKey::from_bytes(&[7; KEY_BYTES]).token("uid-1"));
    }
}
