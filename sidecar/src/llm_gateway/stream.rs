//! A provider's stream forwarded to the application event by event, in its dialect.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

use super::{LlmGateway, humanize, lock};
use crate::{
    forward::{BoxError, ProxyBody},
    llm::{routing::Outcome, stream::StreamMapper, translate::ErrorKind},
};

/// A provider's stream on its way to the application. Dropped before its end (the
/// application went away), it records the attempt as cancelled.
pub(super) struct StreamState {
    pub(super) gateway: Arc<LlmGateway>,
    pub(super) provider: usize,
    pub(super) mapper: StreamMapper,
    pub(super) first: Option<Bytes>,
    pub(super) body: Incoming,
    pub(super) started: Instant,
    pub(super) ttft: Duration,
    pub(super) finished: bool,
}

impl StreamState {
    /// The stream as a response body: each provider chunk is mapped and sent as soon as
    /// it arrives; nothing is buffered beyond the current event.
    pub(super) fn into_body(self) -> ProxyBody {
        let frames = futures_util::stream::unfold(self, |mut state| async move {
            loop {
                if state.finished {
                    return None;
                }
                let idle = state.gateway.config.failover.first_byte_timeout.get();
                let out = if let Some(first) = state.first.take() {
                    state.mapper.push(&first)
                } else {
                    match tokio::time::timeout(idle, state.body.frame()).await {
                        Err(_) => {
                            state.end(false);
                            state.mapper.abort(
                                ErrorKind::Timeout,
                                &format!(
                                    "the provider sent nothing for {} (failover.firstByteTimeout) in the middle of its stream",
                                    humanize(idle)
                                ),
                            )
                        }
                        Ok(frame) => match frame {
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(data) => state.mapper.push(&data),
                                Err(_) => Vec::new(),
                            },
                            Some(Err(e)) => {
                                state.end(false);
                                state.mapper.abort(
                                    ErrorKind::ServerError,
                                    &format!("the provider's stream failed: {e}"),
                                )
                            }
                            None => {
                                // Ended before its last event: the mapper reports the cut.
                                let complete = state.mapper.is_done();
                                let out = state.mapper.finish();
                                state.end(complete);
                                out
                            }
                        },
                    }
                };
                if state.mapper.is_done() && !state.finished {
                    // Complete (or failed) by its own events: stop reading the provider.
                    state.end(true);
                }
                if !out.is_empty() {
                    return Some((Ok::<_, BoxError>(Frame::data(Bytes::from(out))), state));
                }
            }
        });
        StreamBody::new(frames).boxed_unsync()
    }

    /// Records how the stream ended, once.
    fn end(&mut self, clean: bool) {
        if self.finished {
            return;
        }
        self.finished = true;
        let gateway = &self.gateway;
        // A stream cut or failed before its last event counts against the provider.
        let outcome = if !clean {
            gateway.count_attempt(self.provider, "stream_failed");
            Outcome::Failed
        } else {
            gateway.count_attempt(self.provider, "success");
            Outcome::Success {
                ttft: self.ttft,
                total: self.started.elapsed(),
                output_tokens: 1,
            }
        };
        lock(&gateway.router).record(self.provider, Instant::now(), outcome);
    }
}

impl Drop for StreamState {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            lock(&self.gateway.router).record(self.provider, Instant::now(), Outcome::Cancelled);
        }
    }
}
