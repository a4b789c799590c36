//! The shop example as a load-test target: started on a free loopback port, with its
//! own request counter read over time, so a test can tell when requests stopped
//! arriving (the target's view, not the load generator's).

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::task::JoinHandle;

use crate::operator_process::{free_addr, workspace_binary};

/// A shop with `args` on a free loopback port; killed when the child is dropped.
pub fn start(args: &[&str]) -> (SocketAddr, tokio::process::Child) {
    let addr = free_addr();
    let child = tokio::process::Command::new(workspace_binary("shop", "shop").expect("shop"))
        .arg(format!("--listen={addr}"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("shop starts");
    (addr, child)
}

/// `GET path` on a plain HTTP server: the whole response ("" when it does not answer).
pub async fn get_text(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    text
}

/// The shop's own count of answered requests, but for its /metrics scrapes.
pub async fn requests(addr: SocketAddr) -> u64 {
    get_text(addr, "/metrics")
        .await
        .lines()
        .filter(|l| l.starts_with("shop_requests_total{") && !l.contains("route=\"metrics\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The shop's request count every 100 ms (at most `limit`), with when it was read.
#[derive(Debug)]
pub struct RequestLog {
    samples: Arc<Mutex<Vec<(SystemTime, u64)>>>,
    task: JoinHandle<()>,
}

impl RequestLog {
    /// Starts reading the count of the shop at `addr`.
    pub fn start(addr: SocketAddr, limit: Duration) -> Self {
        let samples: Arc<Mutex<Vec<(SystemTime, u64)>>> = Arc::default();
        let task = {
            let samples = Arc::clone(&samples);
            tokio::spawn(async move {
                let until = tokio::time::Instant::now() + limit;
                while tokio::time::Instant::now() < until {
                    let n = requests(addr).await;
                    samples
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((SystemTime::now(), n));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        Self { samples, task }
    }

    /// Stops reading; returns the total and when the count last changed.
    pub fn stop(self) -> (u64, Option<SystemTime>) {
        self.task.abort();
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let total = samples.last().map(|s| s.1).unwrap_or_default();
        let last_change = samples
            .windows(2)
            .rev()
            .find(|w| w[1].1 != w[0].1)
            .map(|w| w[1].0);
        (total, last_change)
    }
}
