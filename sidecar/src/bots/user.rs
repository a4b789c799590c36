//! One bot user: walks the compiled scenario's Markov chain with its own deterministic
//! RNG, keeping what it extracted (`vars`) and the cookies it was given.
//!
//! A user is small on purpose (an id, an RNG, its vars and cookies; the scenario,
//! templates and client are shared), so a million of them fit in one process. The
//! RNG is seeded from (run seed, user id) and is drawn only for transitions and think
//! times, so a user's journey replays exactly with the same `--seed`, whatever the
//! target answered.

use std::{sync::Arc, time::Duration};

use http::HeaderValue;
use rand::{SeedableRng, rngs::SmallRng};
use serde::{Serialize, Serializer, ser::SerializeMap};
use tokio::time::Instant;

use super::{
    check,
    gate::{Admission, Gate},
    http::{BotClient, Response, SendError, send},
    recorder::{Outcome, Recorder},
    results::{FailureExample, FailureKind},
    scenario::{CompiledScenario, CompiledState},
};

/// How much of a response body a failure example keeps.
pub const EXCERPT_BYTES: usize = 256;

/// Everything the users of one run share.
#[derive(Debug)]
pub struct Shared {
    /// The compiled scenario.
    pub scenario: CompiledScenario,
    /// The pooled client.
    pub client: BotClient,
    /// The target URL without a trailing slash.
    pub base: String,
    /// Where outcomes go.
    pub recorder: Recorder,
    /// The run's seed.
    pub seed: u64,
    /// When every user stops.
    pub deadline: Instant,
    /// The guard's ceiling on active users and its abort switch.
    pub gate: Gate,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// A user whose journey is journaled (for `--trace-user` and replay tests).
    pub trace_user: Option<u64>,
    /// The traced user's journey.
    pub journey: std::sync::Mutex<Vec<JourneyStep>>,
}

/// One step of a traced user's journey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JourneyStep {
    /// The state visited.
    pub state: String,
    /// The think time drawn after it.
    pub think: Duration,
}

/// splitmix64: a fixed, well-mixed map from (seed, id) to a per-user seed, so
/// neighbouring ids do not get correlated streams.
pub fn user_seed(seed: u64, user: u64) -> u64 {
    let mut z = seed ^ user.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// A terminal state was reached; the next session may start at this time.
    Completed(Instant),
    /// The run's deadline passed.
    Deadline,
}

/// A bot user's own state.
#[derive(Debug)]
pub struct User {
    /// The user's id, unique across all runners.
    pub id: u64,
    rng: SmallRng,
    vars: Vec<(Arc<str>, serde_json::Value)>,
    cookies: Vec<(String, String)>,
}

/// What templates see: `user.id` and `vars.*`.
struct TemplateContext<'a> {
    id: u64,
    vars: &'a [(Arc<str>, serde_json::Value)],
}

struct UserView(u64);
struct VarsView<'a>(&'a [(Arc<str>, serde_json::Value)]);

impl Serialize for UserView {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry("id", &self.0)?;
        map.end()
    }
}

impl Serialize for VarsView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(&**k, v)?;
        }
        map.end()
    }
}

impl Serialize for TemplateContext<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("user", &UserView(self.id))?;
        map.serialize_entry("vars", &VarsView(self.vars))?;
        map.end()
    }
}

impl User {
    /// A user with its deterministic RNG.
    pub fn new(id: u64, seed: u64) -> Self {
        Self {
            id,
            rng: SmallRng::seed_from_u64(user_seed(seed, id)),
            vars: Vec::new(),
            cookies: Vec::new(),
        }
    }

    /// Runs sessions back to back (closed model) until the deadline, the first
    /// starting at `start`.
    pub async fn run_closed(&mut self, shared: &Shared, start: Instant) {
        let mut next = start;
        while let SessionEnd::Completed(at) = self.session(shared, next).await {
            next = at;
        }
    }

    /// One session from the start state to a terminal state (or the deadline). The
    /// first request is due at `intended`; latency is measured from when each request
    /// was due, so a late generator cannot hide a slow target.
    pub async fn session(&mut self, shared: &Shared, mut intended: Instant) -> SessionEnd {
        self.vars.clear();
        self.cookies.clear();
        if intended >= shared.deadline {
            return SessionEnd::Deadline;
        }
        shared.recorder.session(self.id, false);
        let scenario = &shared.scenario;
        let mut current = scenario.start;
        loop {
            if intended >= shared.deadline || !shared.gate.sleep_until(intended).await {
                return SessionEnd::Deadline;
            }
            let state = &scenario.states[current];
            if state.request.is_some() {
                match shared
                    .gate
                    .admit(&shared.recorder.live.active_users, shared.deadline)
                    .await
                {
                    Admission::Now => {}
                    Admission::Resumed(at) => intended = intended.max(at),
                    Admission::Stopped => return SessionEnd::Deadline,
                }
            }
            let finished_at = match &state.request {
                Some(_) => match self.visit(shared, current, state, intended).await {
                    Some(at) => at,
                    None => return SessionEnd::Deadline,
                },
                None => {
                    shared.recorder.record(
                        self.id,
                        &Outcome {
                            state: current,
                            latency: None,
                            checks: (0, 0),
                            failure: None,
                        },
                    );
                    Instant::now().max(intended)
                }
            };
            // The draws happen in a fixed order (transition, then think time) so the
            // journey depends only on the seed and the user id.
            let next = state.next.as_ref().map(|t| t.choose(&mut self.rng));
            let think = state.think.sample(&mut self.rng);
            if shared.trace_user == Some(self.id)
                && let Ok(mut journey) = shared.journey.lock()
            {
                journey.push(JourneyStep {
                    state: state.name.clone(),
                    think,
                });
            }
            intended = finished_at + think;
            match next {
                Some(to) => {
                    shared.recorder.transition(self.id, current, to);
                    current = to;
                }
                None => {
                    shared.recorder.session(self.id, true);
                    return SessionEnd::Completed(intended);
                }
            }
        }
    }

    /// Sends a state's request, extracts and checks; returns when the response
    /// arrived, or `None` when the deadline cut the request short.
    async fn visit(
        &mut self,
        shared: &Shared,
        index: usize,
        state: &CompiledState,
        intended: Instant,
    ) -> Option<Instant> {
        let Some(template) = &state.request else {
            return Some(intended);
        };
        let ctx = if template.needs_context() {
            minijinja::Value::from(minijinja::value::Serde(TemplateContext {
                id: self.id,
                vars: &self.vars,
            }))
        } else {
            minijinja::Value::UNDEFINED
        };
        let rendered = match template.render(shared.scenario.templates.env(), &ctx) {
            Ok(r) => r,
            Err(e) => {
                self.fail(
                    shared,
                    index,
                    state,
                    FailureKind::Render,
                    None,
                    None,
                    e.to_string(),
                    None,
                );
                return Some(Instant::now());
            }
        };
        let line = shared.recorder.wants_example().then(|| rendered.line());
        let sent = Instant::now();
        let remaining = shared.deadline.saturating_duration_since(sent);
        if remaining.is_zero() {
            return None;
        }
        let timeout = shared.request_timeout.min(remaining);
        let result = match template.uri(&shared.base, &rendered) {
            Ok(uri) => send(&shared.client, uri, rendered, self.cookie_header(), timeout).await,
            Err(e) => Err(e),
        };
        let done = Instant::now();
        let latency = Some((done - intended.min(sent), done - sent));
        let response = match result {
            Ok(r) => r,
            Err(SendError::Timeout { .. }) if timeout < shared.request_timeout => {
                // The run ended mid-request: neither a success nor the target's fault.
                return None;
            }
            Err(e) => {
                let kind = match e {
                    SendError::Connect { .. } => FailureKind::Connect,
                    SendError::Timeout { .. } => FailureKind::Timeout,
                    SendError::Uri { .. }
                    | SendError::OtherHost { .. }
                    | SendError::Transport { .. } => FailureKind::Transport,
                };
                self.fail(
                    shared,
                    index,
                    state,
                    kind,
                    latency,
                    None,
                    e.to_string(),
                    line,
                );
                return Some(done);
            }
        };
        self.keep_cookies(&response);
        let json = if state.needs_json {
            serde_json::from_slice::<serde_json::Value>(&response.body).ok()
        } else {
            None
        };
        for (name, extractor) in &state.extract {
            if let Some(value) = extractor.apply(&response.headers, json.as_ref()) {
                match self.vars.iter_mut().find(|(k, _)| k == name) {
                    Some(slot) => slot.1 = value,
                    None => self.vars.push((name.clone(), value)),
                }
            }
        }
        let (mut passed, mut failed) = (0, 0);
        let mut first_failure = None;
        if !state.checks.is_empty() {
            let ctx = check::context(
                response.status,
                &response.headers,
                json.as_ref(),
                &self.vars,
                self.id,
            );
            for c in &state.checks {
                match c.evaluate(&ctx) {
                    Ok(true) => passed += 1,
                    Ok(false) => {
                        failed += 1;
                        first_failure
                            .get_or_insert_with(|| format!("check `{}` is false", c.source));
                    }
                    Err(e) => {
                        failed += 1;
                        first_failure.get_or_insert_with(|| format!("check `{}`: {e}", c.source));
                    }
                }
            }
        }
        let failure = match (&first_failure, state.checks.is_empty()) {
            (Some(_), _) => Some(FailureKind::Check),
            (None, true) if response.status >= 400 => Some(FailureKind::Status),
            _ => None,
        };
        shared.recorder.record(
            self.id,
            &Outcome {
                state: index,
                latency,
                checks: (passed, failed),
                failure,
            },
        );
        if let Some(kind) = failure
            && shared.recorder.wants_example()
        {
            let detail = first_failure.unwrap_or_else(|| format!("status {}", response.status));
            shared.recorder.example(FailureExample {
                user: self.id,
                state: state.name.clone(),
                kind,
                request: line.unwrap_or_default(),
                status: Some(response.status),
                detail,
                response: excerpt(&response.body),
            });
        }
        Some(done)
    }

    #[allow(clippy::too_many_arguments)]
    fn fail(
        &self,
        shared: &Shared,
        index: usize,
        state: &CompiledState,
        kind: FailureKind,
        latency: Option<(Duration, Duration)>,
        status: Option<u16>,
        detail: String,
        line: Option<String>,
    ) {
        shared.recorder.record(
            self.id,
            &Outcome {
                state: index,
                latency,
                checks: (0, 0),
                failure: Some(kind),
            },
        );
        if shared.recorder.wants_example() {
            shared.recorder.example(FailureExample {
                user: self.id,
                state: state.name.clone(),
                kind,
                request: line.unwrap_or_default(),
                status,
                detail,
                response: String::new(),
            });
        }
    }

    fn cookie_header(&self) -> Option<HeaderValue> {
        if self.cookies.is_empty() {
            return None;
        }
        let text = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        HeaderValue::try_from(text).ok()
    }

    fn keep_cookies(&mut self, response: &Response) {
        for (name, value) in super::extract::set_cookies(&response.headers) {
            match self.cookies.iter_mut().find(|(k, _)| k == name) {
                Some(slot) => slot.1 = value.to_owned(),
                None => self.cookies.push((name.to_owned(), value.to_owned())),
            }
        }
    }
}

/// The start of a body as text, cut at a character boundary.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)]);
    text.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_seeds_differ_between_neighbours_and_repeat_for_the_same_user() {
        assert_eq!(user_seed(1, 42), user_seed(1, 42));
        assert_ne!(user_seed(1, 42), user_seed(1, 43));
        assert_ne!(user_seed(1, 42), user_seed(2, 42));
    }

    #[test]
    fn template_context_exposes_user_id_and_vars() {
        let vars = vec![(Arc::from("token"), serde_json::json!("abc"))];
        let ctx = minijinja::Value::from(minijinja::value::Serde(TemplateContext {
            id: 9,
            vars: &vars,
        }));
        let env = minijinja::Environment::new();
        let out = env
            .render_str("{{ user.id }}-{{ vars.token }}", ctx)
            .expect("renders");
        assert_eq!(out, "9-abc");
    }
}
