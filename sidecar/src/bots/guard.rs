//! Local guards: a standalone run judges what its own bots see (error rate and p99 over
//! `guards.window`) with the shared decision in [`trimtab_api::guard`], and works the
//! [`super::gate`]: hold the ramp at `maxLoad`, stop every user at `criticalLoad`.
//!
//! `cpu` limits need the target pods' metrics, which only the operator reads; a local
//! run reports that it ignores them. A runner under the operator's control runs no
//! local guard: the operator judges all runners' merged results and sends the verdict
//! ([`super::control`]).

use std::{sync::Arc, time::Duration};

use tokio::time::{Instant, MissedTickBehavior};
pub use trimtab_api::guard::{Decision, Guard, GuardEvent, GuardState};
use trimtab_api::guard::{Sample, Window};

use super::{gate::UNLIMITED, user::Shared};

/// Samples the run every tick and works the gate until the deadline or an abort;
/// returns the guard's events.
pub async fn watch(shared: Arc<Shared>, mut guard: Guard, span: Duration) -> Vec<GuardEvent> {
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Window::tick(span));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut window = Window::new(span);
    let mut events = Vec::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = tokio::time::sleep_until(shared.deadline) => break,
            () = shared.gate.aborted() => break,
        }
        let live = &shared.recorder.live;
        let stats = window.push(Sample {
            at: std::time::Instant::now(),
            requests: live.requests.load(std::sync::atomic::Ordering::Relaxed),
            failures: live.failures.load(std::sync::atomic::Ordering::Relaxed),
            latency: shared.recorder.corrected(),
        });
        let active = live.active_users.load(std::sync::atomic::Ordering::Relaxed);
        let Some(decision) = guard.observe(&stats, active) else {
            continue;
        };
        let event = GuardEvent::new(&decision, start.elapsed().as_secs_f64());
        match decision {
            Decision::Hold { ceiling, .. } => shared.gate.set_ceiling(ceiling),
            Decision::Resume => shared.gate.set_ceiling(UNLIMITED),
            Decision::Abort { .. } => shared.gate.abort(),
        }
        tracing::warn!(state = ?event.state, ceiling = ?event.ceiling, reason = %event.reason, "guard");
        events.push(event);
    }
    events
}
