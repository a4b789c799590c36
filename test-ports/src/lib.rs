//! Loopback ports for the servers a test starts: sidecars, operators, etcd, backends
//! that bind only after the test has chosen their port.
//!
//! The usual trick, binding port 0 and releasing it, hands out a port from the kernel's
//! ephemeral range. Between the release and the server's own bind, that port is free
//! for anyone: the next bind to port 0 in the same process (tests run in parallel
//! threads and bind dozens of backends) and, once its half of the range runs short,
//! any outgoing connection. Either makes a server fail to bind, and the test that
//! started it fails far from the cause.
//!
//! So ports come from below the ephemeral range, where the kernel never picks on its
//! own, and one counter per process makes every port handed out distinct. Each process
//! starts at its own place in the range, and every candidate is test-bound before it is
//! handed out, so parallel test processes and ports already in use are stepped over.
//! (Where the ephemeral range starts below 21000, the pool overlaps it and only the
//! distinctness holds.)

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The lowest port handed out: above the well-known and common service ports.
const POOL_START: u16 = 20_000;

/// Where Linux's ephemeral range starts when it cannot be read (its default).
const DEFAULT_EPHEMERAL_START: u16 = 32_768;

/// A port on 127.0.0.1 that nothing was bound to when asked, and that no other call in
/// this process gets until the whole pool (12,768 ports with Linux's default range) has
/// been handed out. Panics, naming the range, when the range is exhausted: tests cannot
/// go on without their ports.
pub fn free_port() -> u16 {
    try_free_port().unwrap_or_else(|e| panic!("no free loopback port for a test: {e}"))
}

/// [`free_port`] as a 127.0.0.1 address.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// [`free_port`], with exhaustion as an error for callers that report their own.
pub fn try_free_port() -> std::io::Result<u16> {
    let pool = pool();
    let width = usize::from(pool.end - POOL_START);
    for _ in 0..width {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = POOL_START + ((pool.offset + step) % width) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!(
            "every port in {POOL_START}..{} is in use or already handed out",
            pool.end
        ),
    ))
}

/// How many ports this process has handed out or stepped over.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The ports from [`POOL_START`] up to `end`.
struct Pool {
    end: u16,
    /// Where this process starts in the pool.
    offset: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let end = ephemeral_start().max(POOL_START + 1_000);
        let width = usize::from(end - POOL_START);
        // The process id spreads parallel test processes over the pool; the clock
        // separates consecutive runs with recycled ids.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize);
        let offset = (std::process::id() as usize)
            .wrapping_mul(7_919)
            .wrapping_add(nanos)
            % width;
        Pool { end, offset }
    })
}

/// The first port the kernel may pick for outgoing connections and port-0 binds.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ports_are_distinct_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..500).map(|_| free_port()).collect();
        assert_eq!(ports.iter().collect::<HashSet<_>>().len(), ports.len());
        let pool = pool();
        assert!(ports.iter().all(|p| (POOL_START..pool.end).contains(p)));
        assert!(pool.end <= ephemeral_start().max(POOL_START + 1_000));
    }
}
