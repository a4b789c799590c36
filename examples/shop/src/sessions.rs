//! Login sessions: opaque random tokens, each mapped to a user name and that session's
//! cart. The map is split into shards, each behind its own read-write lock, so a
//! hundred thousand bots logging in and looking up tokens spread over many locks and
//! never queue behind one global lock; the cart lock is per session.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
};

use crate::cart::Cart;

/// Independent shards of the token map: enough that contention is rare on a machine
/// with dozens of cores, few enough to cost nothing when idle.
const SHARDS: usize = 64;

/// One logged-in session.
#[derive(Debug)]
pub struct Session {
    /// The name the session logged in with.
    pub user: String,
    cart: Mutex<Cart>,
}

impl Session {
    /// The session's cart. Held only for in-memory edits, never across an `.await`.
    /// A poisoned lock (a panic while holding it, which no code path here can cause)
    /// still yields the cart: a cart has no invariant a half-done edit could break.
    pub fn cart(&self) -> MutexGuard<'_, Cart> {
        self.cart.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

type Shard = RwLock<HashMap<String, Arc<Session>>>;

/// All sessions, by token.
#[derive(Debug)]
pub struct Sessions {
    shards: [Shard; SHARDS],
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new()
    }
}

impl Sessions {
    /// No sessions.
    pub fn new() -> Self {
        Self {
            shards: std::array::from_fn(|_| RwLock::default()),
            hasher: Default::default(),
        }
    }

    fn shard(&self, token: &str) -> &Shard {
        // The remainder is below `SHARDS`, so the index is always in range.
        &self.shards[(self.hasher.hash_one(token) % SHARDS as u64) as usize]
    }

    /// Starts a session for `user` with an empty cart and returns its token: 128 random
    /// bits from a cryptographic generator, hex-encoded, so tokens cannot be guessed.
    pub fn login(&self, user: &str) -> (String, Arc<Session>) {
        let token = format!("{:032x}", rand::random::<u128>());
        let session = Arc::new(Session {
            user: user.to_owned(),
            cart: Mutex::default(),
        });
        self.shard(&token)
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token.clone(), Arc::clone(&session));
        (token, session)
    }

    /// The session for `token`, if it exists.
    pub fn get(&self, token: &str) -> Option<Arc<Session>> {
        self.shard(token)
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .cloned()
    }

    /// Sessions open now (summed shard by shard, so only approximate under load).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether nobody has logged in.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_returns_a_token_that_finds_the_session() {
        let sessions = Sessions::new();
        let (token, _) = sessions.login("alice");
        assert_eq!(token.len(), 32);
        assert_eq!(
            sessions.get(&token).map(|s| s.user.clone()),
            Some("alice".to_owned())
        );
        assert!(sessions.get("not-a-token").is_none());
    }

    #[test]
    fn each_login_is_its_own_session_with_its_own_cart() {
        let sessions = Sessions::new();
        let (first, a) = sessions.login("bob");
        let (second, b) = sessions.login("bob");
        assert_ne!(first, second);
        a.cart().add(1, 1).expect("fits");
        assert!(b.cart().is_empty());
        assert_eq!(sessions.len(), 2);
    }
}
