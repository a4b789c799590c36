//! Invariants: business rules checked against the target while the bots run (every
//! `every`) and once more at the end, when the last in-flight order has landed.
//!
//! A check on each user's own response cannot see a rule that only breaks across
//! users (stock driven negative by concurrent checkouts); an invariant reads the
//! shared state and says whether the rule still holds.

use std::sync::Arc;

use tokio::time::{Instant, MissedTickBehavior};

use super::{
    check,
    http::send,
    results::{FailureExample, FailureKind},
    scenario::CompiledInvariant,
    user::{Shared, excerpt},
};

/// The user id invariant requests render with (`user.id`), outside every bot's range.
pub const INVARIANT_USER: u64 = u64::MAX;

/// Checks `invariant` every `every` until the deadline (not at the deadline itself:
/// the final check is [`check_once`] after the users stop).
pub async fn poll(shared: Arc<Shared>, invariant: Arc<CompiledInvariant>) {
    if invariant.every.is_zero() {
        return;
    }
    let mut ticker = tokio::time::interval_at(Instant::now() + invariant.every, invariant.every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::time::sleep_until(shared.deadline) => return,
            () = shared.gate.aborted() => return,
        }
        if Instant::now() >= shared.deadline {
            return;
        }
        check_once(&shared, &invariant).await;
    }
}

/// One check: send the request, evaluate `expect`, record a violation with the
/// response when it does not hold (a failed request is a violation too: the rule
/// could not be shown to hold).
pub async fn check_once(shared: &Shared, invariant: &CompiledInvariant) {
    let ctx = minijinja::context! { user => minijinja::context! { id => INVARIANT_USER }, vars => minijinja::context! {} };
    let violation = |status: Option<u16>, detail: String, response: String, request: String| {
        Some(FailureExample {
            user: INVARIANT_USER,
            state: format!("invariant {}", invariant.name),
            kind: FailureKind::Check,
            request,
            status,
            detail,
            response,
        })
    };
    let verdict = match invariant
        .request
        .render(shared.scenario.templates.env(), &ctx)
    {
        Err(e) => violation(None, e.to_string(), String::new(), String::new()),
        Ok(rendered) => {
            let line = rendered.line();
            let sent = match invariant.request.uri(&shared.base, &rendered) {
                Ok(uri) => send(&shared.client, uri, rendered, None, shared.request_timeout).await,
                Err(e) => Err(e),
            };
            match sent {
                Err(e) => violation(None, e.to_string(), String::new(), line),
                Ok(response) => {
                    let json = serde_json::from_slice::<serde_json::Value>(&response.body).ok();
                    let ctx = check::context(
                        response.status,
                        &response.headers,
                        json.as_ref(),
                        &[],
                        INVARIANT_USER,
                    );
                    match invariant.expect.evaluate(&ctx) {
                        Ok(true) => None,
                        Ok(false) => violation(
                            Some(response.status),
                            format!("expect `{}` is false", invariant.expect.source),
                            excerpt(&response.body),
                            line,
                        ),
                        Err(e) => violation(
                            Some(response.status),
                            format!("expect `{}`: {e}", invariant.expect.source),
                            excerpt(&response.body),
                            line,
                        ),
                    }
                }
            }
        }
    };
    shared.recorder.invariant(&invariant.name, verdict);
}
