//! A runner under the operator's control (a LoadTest pod): register and wait for the
//! one start every runner shares, report results every few seconds and obey the
//! answer (hold at a ceiling, abort), and deliver the final results before exiting.
//! The protocol is [`trimtab_api::runner_protocol`].
//!
//! The operator may be briefly away (a restart, a leader change): reports are
//! cumulative, so a missed one costs nothing and the runner keeps running. Only the
//! final report must get through; the runner retries it, and exits with an error if it
//! cannot, so the test does not pass with results missing.

use std::{
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::Full;
use rand::{SeedableRng, rngs::SmallRng};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use trimtab_api::{
    results::Results,
    runner_protocol::{self, Directive, RunnerReport, RunnerStage, from_unix_micros, unix_micros},
};

use super::{gate::UNLIMITED, user::Shared};
use crate::{
    control_plane::{self, ControlPlaneError, HttpsClient, TrustAnchors},
    http_client::error_chain,
    retry,
};

/// The longest one report may take (a waiting runner's is held up to
/// [`runner_protocol::MAX_WAIT_SECONDS`] on purpose).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(runner_protocol::MAX_WAIT_SECONDS + 10);
/// Backoff between failed reports.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Quick retries of a running report, and the pause between them.
const QUICK_RETRIES: usize = 4;
const QUICK_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// The largest answer read.
const MAX_ANSWER_BYTES: usize = 64 << 10;

/// Where the runner reports and as whom.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// The operator's HTTPS URL.
    pub url: String,
    /// What signs its certificate.
    pub anchors: TrustAnchors,
    /// The test, `namespace/name`.
    pub test: String,
    /// This runner's index (its shard).
    pub index: u32,
    /// The test's runner token.
    pub token: String,
    /// How long to wait for every runner to register.
    pub start_deadline: Duration,
    /// How long to keep trying to deliver the final results.
    pub finish_deadline: Duration,
}

/// Why the runner cannot go on under the operator's control.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The URL or CA cannot work.
    #[error(transparent)]
    Settings(#[from] ControlPlaneError),
    /// `TRIMTAB_LOADTEST` is not `namespace/name`.
    #[error("TRIMTAB_LOADTEST {0:?}: expected NAMESPACE/NAME")]
    Test(String),
    /// The operator refused the runner for good (a wrong token, a bad index).
    #[error("the operator refused runner {index}: {status}: {message}")]
    Refused {
        /// The runner.
        index: u32,
        /// The status.
        status: StatusCode,
        /// The operator's explanation.
        message: String,
    },
    /// The operator did not answer in time.
    #[error("{what} within {after:?}; last error: {last}")]
    Timeout {
        /// What did not happen.
        what: &'static str,
        /// How long was tried.
        after: Duration,
        /// The last failure.
        last: String,
    },
}

/// A failed report: worth retrying, or not.
enum SendError {
    Refused(StatusCode, String),
    Transient(String),
}

/// The runner's side of the protocol.
#[derive(Debug)]
pub struct Control {
    client: HttpsClient,
    url: String,
    settings: ControlSettings,
    seq: std::sync::atomic::AtomicU64,
    /// Why the operator aborted the run, if it did.
    aborted: Mutex<Option<String>>,
}

impl Control {
    /// A client for `settings`; fails on settings that can never work.
    pub fn new(settings: ControlSettings) -> Result<Self, ControlError> {
        let (namespace, name) = settings
            .test
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
            .ok_or_else(|| ControlError::Test(settings.test.clone()))?;
        let url = format!(
            "{}{}",
            control_plane::base_url(&settings.url)?,
            runner_protocol::report_path(namespace, name, settings.index)
        );
        let client = control_plane::https_client(&settings.anchors, Duration::from_secs(3), false)?;
        Ok(Self {
            client,
            url,
            settings,
            seq: 0.into(),
            aborted: Mutex::new(None),
        })
    }

    /// Why the operator aborted the run, if it did.
    pub fn aborted(&self) -> Option<String> {
        self.aborted.lock().ok().and_then(|a| a.clone())
    }

    fn report(
        &self,
        stage: RunnerStage,
        started: Option<SystemTime>,
        active_users: u64,
        target_users: u64,
        results: Option<Results>,
    ) -> RunnerReport {
        RunnerReport {
            seq: self.seq.fetch_add(1, Relaxed) + 1,
            stage,
            started_at_unix_micros: started.map(unix_micros),
            active_users,
            target_users,
            results,
        }
    }

    async fn send(&self, report: &RunnerReport) -> Result<Directive, SendError> {
        let body = serde_json::to_vec(report)
            .map_err(|e| SendError::Transient(format!("encoding the report: {e}")))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.url)
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.settings.token),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SendError::Transient(format!("building the request: {e}")))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| SendError::Transient(error_chain(&e)))?;
            let status = response.status();
            let body = control_plane::read_body(response, MAX_ANSWER_BYTES)
                .await
                .map_err(SendError::Transient)?;
            Ok::<_, SendError>((status, body))
        };
        let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| SendError::Transient(format!("no answer within {REQUEST_TIMEOUT:?}")))??;
        let text = || String::from_utf8_lossy(&body).into_owned();
        match status {
            StatusCode::OK => serde_json::from_slice(&body).map_err(|e| {
                SendError::Transient(format!("an answer that is not a directive: {e}"))
            }),
            // Not the leader, starting, overloaded: another try may reach the leader.
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Err(SendError::Transient(format!("{s}: {}", text())))
            }
            s => Err(SendError::Refused(s, text())),
        }
    }

    /// Sends `make()` until it is answered, for at most `deadline`.
    async fn send_until(
        &self,
        what: &'static str,
        deadline: Duration,
        mut make: impl FnMut() -> RunnerReport,
        mut done: impl FnMut(&Directive) -> bool,
    ) -> Result<Directive, ControlError> {
        let until = Instant::now() + deadline;
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        let mut failures = 0;
        loop {
            let last = match self.send(&make()).await {
                Ok(directive) if done(&directive) => return Ok(directive),
                Ok(_) => {
                    failures = 0;
                    "not yet".to_owned()
                }
                Err(SendError::Refused(status, message)) => {
                    return Err(ControlError::Refused {
                        index: self.settings.index,
                        status,
                        message,
                    });
                }
                Err(SendError::Transient(message)) => {
                    tracing::debug!(%message, what, "report failed; retrying");
                    failures += 1;
                    message
                }
            };
            if Instant::now() >= until {
                return Err(ControlError::Timeout {
                    what,
                    after: deadline,
                    last,
                });
            }
            if failures > 0 {
                let wait = retry::backoff(failures - 1, BACKOFF_BASE, BACKOFF_CAP, &mut rng);
                tokio::time::sleep(wait.min(until.saturating_duration_since(Instant::now()))).await;
            }
        }
    }

    /// Registers and waits until every runner has: returns the shared start, which
    /// may still be a little ahead.
    pub async fn register(&self, target_users: u64) -> Result<SystemTime, ControlError> {
        let directive = self
            .send_until(
                "every runner registered",
                self.settings.start_deadline,
                || self.report(RunnerStage::Waiting, None, 0, target_users, None),
                |d| d.start_at_unix_micros.is_some() || d.abort.is_some(),
            )
            .await?;
        if let Some(reason) = directive.abort {
            self.obey_abort(reason);
        }
        Ok(directive
            .start_at_unix_micros
            .map_or_else(SystemTime::now, from_unix_micros))
    }

    fn obey_abort(&self, reason: String) {
        if let Ok(mut aborted) = self.aborted.lock()
            && aborted.is_none()
        {
            tracing::warn!(%reason, "the operator aborted the test");
            *aborted = Some(reason);
        }
    }

    /// Reports every `interval` until `finished` is cancelled, and works the gate as
    /// the operator says.
    ///
    /// Not until the deadline: after it the run still checks every invariant once more
    /// (a slow target can take a request timeout per invariant), and only an answer to
    /// a report can abort those checks. The caller cancels `finished` once the run has
    /// finished, then delivers the final results with [`Self::finish`].
    pub async fn follow(
        self: Arc<Self>,
        shared: Arc<Shared>,
        started: SystemTime,
        target_users: u64,
        interval: Duration,
        finished: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = finished.cancelled() => return,
            }
            let report = self.report(
                RunnerStage::Running,
                Some(started),
                shared.recorder.live.active_users.load(Relaxed),
                target_users,
                Some(shared.recorder.snapshot()),
            );
            // A report still on its way when the run finishes is dropped: the final
            // one carries everything it did, and waiting for an operator that does not
            // answer would hold the final results back by up to a request timeout.
            let sent = tokio::select! {
                sent = self.send_soon(&report) => sent,
                () = finished.cancelled() => return,
            };
            match sent {
                Ok(directive) => self.obey(&shared, directive),
                Err(SendError::Refused(status, message)) => {
                    tracing::warn!(%status, %message, "the operator refused a report");
                }
                // Reports are cumulative: the next one carries everything this one did.
                Err(SendError::Transient(message)) => {
                    tracing::debug!(%message, "a report failed; the next one carries it");
                }
            }
        }
    }

    /// Sends a running report, trying again a few times within a fraction of the
    /// interval when it fails transiently: with two operator replicas half the
    /// connections reach one that is not the leader (which closes them), and an abort
    /// must not wait for the next interval.
    async fn send_soon(&self, report: &RunnerReport) -> Result<Directive, SendError> {
        let mut result = self.send(report).await;
        for _ in 0..QUICK_RETRIES {
            match result {
                Err(SendError::Transient(_)) => {
                    tokio::time::sleep(QUICK_RETRY_PAUSE).await;
                    result = self.send(report).await;
                }
                done => return done,
            }
        }
        result
    }

    fn obey(&self, shared: &Shared, directive: Directive) {
        if let Some(reason) = directive.abort {
            self.obey_abort(reason);
            shared.gate.abort();
            return;
        }
        let ceiling = directive.ceiling.unwrap_or(UNLIMITED);
        if shared.gate.ceiling() != ceiling {
            tracing::info!(ceiling, "the operator set the ceiling on active users");
            shared.gate.set_ceiling(ceiling);
        }
    }

    /// Delivers the final results.
    pub async fn finish(
        &self,
        results: Results,
        started: SystemTime,
        target_users: u64,
    ) -> Result<(), ControlError> {
        self.send_until(
            "the final results delivered",
            self.settings.finish_deadline,
            || {
                self.report(
                    RunnerStage::Finished,
                    Some(started),
                    0,
                    target_users,
                    Some(results.clone()),
                )
            },
            |_| true,
        )
        .await
        .map(|_| ())
    }
}
