//! The one HTTP client stack of the data plane: the proxy's upstream connections and the
//! bots' requests come from the same pooled keep-alive hyper-util client setup.

use std::time::Duration;

use hyper::body::Body;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// Idle pooled connections are closed after this long.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A pooled keep-alive client (TCP_NODELAY) whose connects give up after
/// `connect_timeout`, for request bodies of type `B`.
pub fn pooled<B>(connect_timeout: Duration) -> Client<HttpConnector, B>
where
    B: Body + Send,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector)
}

/// An HTTP client error and its causes, `: `-joined: hyper's top-level message alone
/// ("client error (Connect)") does not say what went wrong.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
