//! Shop replicas of different sizes, each on its own OS thread with its own
//! single-threaded Tokio runtime, as separate nodes would be.
//!
//! The shop emulates capacity with worker slots held for a service time (a timer, not
//! CPU), so a replica is only as faithful as its timers are punctual. Sharing the bots'
//! runtime would let a busy bot worker delay every shop's timers alike, and the
//! 1:2:4 sizes would blur into "everything is slow"; on their own threads the replicas
//! are scheduled by the OS like three small machines.

use std::{net::SocketAddr, sync::Arc, thread::JoinHandle, time::Duration};

use shop::{Oversold, Shop, ShopError};
use tokio::sync::oneshot;

/// Why the replicas did not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The OS refused another thread.
    #[error("shop replica {index} (capacity {capacity}): cannot start its thread: {source}")]
    Thread {
        /// Position of the replica.
        index: usize,
        /// Its capacity.
        capacity: f64,
        /// Why.
        source: std::io::Error,
    },
    /// Its runtime could not be built (out of file descriptors, typically).
    #[error("shop replica {index} (capacity {capacity}): cannot start its runtime: {source}")]
    Runtime {
        /// Position of the replica.
        index: usize,
        /// Its capacity.
        capacity: f64,
        /// Why.
        source: std::io::Error,
    },
    /// The shop refused its config or could not listen.
    #[error("shop replica {index} (capacity {capacity}): {}", with_causes(source))]
    Shop {
        /// Position of the replica.
        index: usize,
        /// Its capacity.
        capacity: f64,
        /// Why (print the chain with `{:#}` for the cause).
        source: ShopError,
    },
    /// The thread ended before saying whether the shop started (it panicked).
    #[error("shop replica {index} (capacity {capacity}): its thread ended before the shop started")]
    Vanished {
        /// Position of the replica.
        index: usize,
        /// Its capacity.
        capacity: f64,
    },
}

/// `error` and its causes, `outer: inner: innermost`: the shop's errors keep their
/// cause in `source()` only, and a message without it ("cannot listen on …") does
/// not say what to fix.
fn with_causes(error: &ShopError) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// What a replica left behind when it stopped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stopped {
    /// Its capacity.
    pub capacity: f64,
    /// Its address while it ran.
    pub addr: SocketAddr,
    /// The shop's own count of products below zero stock (`--bug oversell`).
    pub oversold: Oversold,
}

/// One running replica.
#[derive(Debug)]
struct Replica {
    capacity: f64,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    stopped: Option<oneshot::Receiver<Oversold>>,
    thread: Option<JoinHandle<()>>,
}

/// Running shop replicas. Dropping them stops them without waiting;
/// [`Replicas::stop`] waits for in-flight requests and the threads.
#[derive(Debug)]
pub struct Replicas {
    replicas: Vec<Replica>,
}

impl Replicas {
    /// Starts one replica per entry of `capacities`, each from `config` with its own
    /// capacity (the listen address should be port 0: each gets an ephemeral port).
    /// If one fails, the ones already started are stopped.
    pub async fn start(capacities: &[f64], config: &shop::Config) -> Result<Self, ReplicaError> {
        let mut started = Self {
            replicas: Vec::with_capacity(capacities.len()),
        };
        // One store for all, as replicas share a database: a user logged in on one
        // replica shops on any, and checkouts on different replicas race for one stock.
        let store = shop::Store::new(config).map_err(|source| ReplicaError::Shop {
            index: 0,
            capacity: capacities.first().copied().unwrap_or(1.0),
            source,
        })?;
        for (index, &capacity) in capacities.iter().enumerate() {
            let config = shop::Config {
                capacity,
                ..config.clone()
            };
            match start_one(index, config, store.clone()).await {
                Ok(replica) => started.replicas.push(replica),
                Err(e) => {
                    started.stop().await;
                    return Err(e);
                }
            }
        }
        Ok(started)
    }

    /// The replicas' addresses, in the order of the capacities.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(|r| r.addr).collect()
    }

    /// The replicas' capacities, in order.
    pub fn capacities(&self) -> Vec<f64> {
        self.replicas.iter().map(|r| r.capacity).collect()
    }

    /// Stops every replica (in-flight requests finish, up to the shop's grace period)
    /// and joins its thread.
    pub async fn stop(mut self) -> Vec<Stopped> {
        for replica in &mut self.replicas {
            if let Some(stop) = replica.stop.take() {
                // An error means the thread already ended; the join below says how.
                let _ = stop.send(());
            }
        }
        let mut stopped = Vec::with_capacity(self.replicas.len());
        for replica in &mut self.replicas {
            let oversold = match replica.stopped.take() {
                Some(rx) => rx.await.unwrap_or_default(),
                None => Oversold::default(),
            };
            if let Some(thread) = replica.thread.take() {
                // The thread has sent its last word (or died): joining is immediate,
                // but it is still a blocking call, so keep it off the async workers.
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
            stopped.push(Stopped {
                capacity: replica.capacity,
                addr: replica.addr,
                oversold,
            });
        }
        stopped
    }
}

/// Starts one shop on a thread of its own and waits until it listens.
async fn start_one(
    index: usize,
    config: shop::Config,
    store: Arc<shop::Store>,
) -> Result<Replica, ReplicaError> {
    let capacity = config.capacity;
    let (ready_tx, ready_rx) = oneshot::channel::<Result<SocketAddr, ReplicaError>>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (stopped_tx, stopped_rx) = oneshot::channel::<Oversold>();
    let thread = std::thread::Builder::new()
        .name(format!("shop-{index}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(source) => {
                    let _ = ready_tx.send(Err(ReplicaError::Runtime {
                        index,
                        capacity,
                        source,
                    }));
                    return;
                }
            };
            runtime.block_on(async move {
                let (addr, shop) = match Shop::bind_replica(config, store).await {
                    Ok(started) => started,
                    Err(source) => {
                        let _ = ready_tx.send(Err(ReplicaError::Shop {
                            index,
                            capacity,
                            source,
                        }));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(addr));
                // A dropped sender (the Replicas dropped without `stop`) stops it too.
                let _ = stop_rx.await;
                let oversold = shop.oversold();
                shop.shutdown().await;
                let _ = stopped_tx.send(oversold);
            });
            // Whatever the shop left running (connection tasks past the grace period)
            // goes with the runtime, without waiting.
            runtime.shutdown_timeout(Duration::ZERO);
        })
        .map_err(|source| ReplicaError::Thread {
            index,
            capacity,
            source,
        })?;
    let addr = match ready_rx.await {
        Ok(Ok(addr)) => addr,
        Ok(Err(e)) => {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            return Err(e);
        }
        Err(_) => return Err(ReplicaError::Vanished { index, capacity }),
    };
    Ok(Replica {
        capacity,
        addr,
        stop: Some(stop_tx),
        stopped: Some(stopped_rx),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replicas_listen_on_their_own_ports_with_their_own_capacities() {
        let replicas = Replicas::start(&[1.0, 2.0], &shop::Config::ephemeral())
            .await
            .expect("replicas start");
        let addrs = replicas.addresses();
        assert_eq!(addrs.len(), 2);
        assert_ne!(addrs[0], addrs[1]);
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() != 0));
        for addr in &addrs {
            tokio::net::TcpStream::connect(addr)
                .await
                .expect("the replica accepts connections");
        }
        let stopped = replicas.stop().await;
        assert_eq!(
            stopped.iter().map(|s| s.capacity).collect::<Vec<_>>(),
            [1.0, 2.0]
        );
        assert_eq!(stopped[0].oversold, Oversold::default());
    }

    #[tokio::test]
    async fn a_bad_config_is_refused_naming_the_replica() {
        let config = shop::Config {
            products: 0,
            ..shop::Config::ephemeral()
        };
        let error = Replicas::start(&[1.0], &config)
            .await
            .expect_err("no products");
        assert_eq!(
            error.to_string(),
            "shop replica 0 (capacity 1): invalid config: products = 0: expected 1 to 1000000"
        );
    }
}
