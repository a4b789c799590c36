//! Which pod is asking. A sidecar presents its pod's projected service-account token
//! (audience `trimtab`); the API server's TokenReview says whether it is valid and which
//! pod it is bound to. Linkerd's identity controller trusts the same proof.
//!
//! Reviews are cached per token for at most [`CACHE_FOR`] and never past the token's own
//! expiry, so 2,000 sidecars long-polling cost a few reviews a second, not one per poll.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};

/// The audience every sidecar token must carry.
pub const AUDIENCE: &str = "trimtab";

/// The longest a review is trusted without asking again.
pub const CACHE_FOR: Duration = Duration::from_secs(60);

/// Reviews kept before expired ones are swept out.
const CACHE_SWEEP_AT: usize = 50_000;

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// The pod a token is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    /// The pod's namespace (the service account's).
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's UID: a new pod with the same name is a different pod.
    pub uid: String,
    /// The service account the token was issued to.
    pub service_account: String,
}

/// Why a request is not from a pod that may have config. Each maps to one status.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error(
        "no bearer token: send `Authorization: Bearer <the pod's projected service-account token with audience {AUDIENCE}>`"
    )]
    Missing,
    /// The API server did not authenticate the token.
    #[error("token rejected: {0}")]
    Rejected(String),
    /// A valid token, but not a pod-bound service-account token.
    #[error(
        "token of {user:?} is not bound to a pod; mount a projected service-account token (audience {AUDIENCE}) into the pod"
    )]
    NotPodBound {
        /// The authenticated user.
        user: String,
    },
    /// The pod the token was bound to is gone, or was replaced by one with the same name.
    #[error("pod {namespace}/{name} with uid {uid} does not exist (anymore)")]
    PodGone {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The UID the token names.
        uid: String,
    },
    /// The TokenReview call itself failed; the client should retry.
    #[error("TokenReview failed: {0}")]
    Review(kube::Error),
}

impl AuthError {
    /// The HTTP status for this refusal.
    pub fn status(&self) -> u16 {
        match self {
            Self::Missing | Self::Rejected(_) => 401,
            Self::NotPodBound { .. } | Self::PodGone { .. } => 403,
            Self::Review(_) => 503,
        }
    }
}

/// Reads the pod out of a TokenReview's status. Pure, so every refusal is unit-tested.
pub fn identity_from(status: &TokenReviewStatus) -> Result<PodIdentity, AuthError> {
    if status.authenticated != Some(true) {
        let reason = status
            .error
            .clone()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "not authenticated".into());
        return Err(AuthError::Rejected(reason));
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == AUDIENCE))
    {
        return Err(AuthError::Rejected(format!(
            "token is not for audience {AUDIENCE}"
        )));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let not_bound = || AuthError::NotPodBound {
        user: username.clone(),
    };
    let (namespace, service_account) = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(not_bound)?;
    let extra = user.extra.unwrap_or_default();
    let single = |key: &str| {
        extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let (Some(name), Some(uid)) = (single(POD_NAME), single(POD_UID)) else {
        return Err(not_bound());
    };
    Ok(PodIdentity {
        namespace: namespace.to_owned(),
        name,
        uid,
        service_account: service_account.to_owned(),
    })
}

/// When the token says it expires: its JWT `exp` claim. Only used to bound the cache,
/// after the API server has checked the signature, so an unreadable claim only means
/// "ask again soon".
pub fn expires_at(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(exp))
}

#[derive(Debug)]
struct Cached {
    identity: PodIdentity,
    until: Instant,
}

/// TokenReview with a cache.
#[derive(Debug)]
pub struct Authenticator {
    reviews: Api<TokenReview>,
    cache: Mutex<HashMap<String, Cached>>,
}

impl Authenticator {
    /// Reviews with `client` (which needs `create` on `tokenreviews`).
    pub fn new(client: Client) -> Self {
        Self {
            reviews: Api::all(client),
            cache: Mutex::default(),
        }
    }

    /// The pod `token` is bound to, from the cache or a TokenReview.
    pub async fn authenticate(&self, token: &str) -> Result<PodIdentity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let now = Instant::now();
        if let Some(hit) = self.lock().get(token).filter(|c| c.until > now) {
            return Ok(hit.identity.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let answer = self
            .reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(AuthError::Review)?;
        let identity = identity_from(&answer.status.unwrap_or_default())?;
        let lifetime = expires_at(token)
            .and_then(|exp| exp.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::ZERO)
            .min(CACHE_FOR);
        if !lifetime.is_zero() {
            let mut cache = self.lock();
            if cache.len() >= CACHE_SWEEP_AT {
                cache.retain(|_, c| c.until > now);
                if cache.len() >= CACHE_SWEEP_AT {
                    cache.clear();
                }
            }
            cache.insert(
                token.to_owned(),
                Cached {
                    identity: identity.clone(),
                    until: now + lifetime,
                },
            );
        }
        Ok(identity)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        // Every write is one insert or a sweep: a panicked holder left it consistent.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(username: &str, extra: &[(&str, &str)], audiences: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_owned()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    #[test]
    fn a_pod_bound_token_names_its_pod() {
        let s = status(
            "system:serviceaccount:shop:web",
            &[(POD_NAME, "web-1"), (POD_UID, "u-1")],
            &[AUDIENCE],
        );
        assert_eq!(
            identity_from(&s).expect("pod"),
            PodIdentity {
                namespace: "shop".into(),
                name: "web-1".into(),
                uid: "u-1".into(),
                service_account: "web".into(),
            }
        );
    }

    #[test]
    fn every_refusal_has_its_status_and_says_why() {
        let rejected = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token has expired".into()),
            ..TokenReviewStatus::default()
        };
        let e = identity_from(&rejected).expect_err("expired");
        assert_eq!(
            (e.status(), e.to_string()),
            (401, "token rejected: token has expired".into())
        );

        let other_audience = status(
            "system:serviceaccount:shop:web",
            &[(POD_NAME, "web-1"), (POD_UID, "u-1")],
            &["vault"],
        );
        let e = identity_from(&other_audience).expect_err("audience");
        assert_eq!(e.status(), 401);
        assert!(e.to_string().contains("audience trimtab"), "{e}");

        let unbound = status("system:serviceaccount:shop:web", &[], &[AUDIENCE]);
        let e = identity_from(&unbound).expect_err("not bound");
        assert_eq!(e.status(), 403);
        assert!(e.to_string().contains("not bound to a pod"), "{e}");

        let user = status("alice", &[(POD_NAME, "web-1"), (POD_UID, "u")], &[AUDIENCE]);
        assert_eq!(identity_from(&user).expect_err("user").status(), 403);
        assert_eq!(AuthError::Missing.status(), 401);
    }

    #[test]
    fn expiry_comes_from_the_exp_claim_and_garbage_has_none() {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let token = format!(
            "{}.{}.sig",
            engine.encode(br#"{"alg":"RS256"}"#),
            engine.encode(br#"{"aud":["trimtab"],"exp":2000000000}"#)
        );
        assert_eq!(
            expires_at(&token),
            Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000))
        );
        assert_eq!(expires_at("no-dots"), None);
        assert_eq!(expires_at("a.!!!.c"), None);
    }
}
