//! systemd integration without linking libsystemd: `sd_notify` messages over the datagram
//! socket named by `NOTIFY_SOCKET`, and a watchdog fed by a health check.
//!
//! `READY=1` is sent once every model is loaded and warm; `WATCHDOG=1` only after the daemon
//! answered its own liveness probe over HTTP within the interval (so a wedged accept loop or
//! runtime stops the pings and systemd restarts the service); `STATUS=` lines say what it is
//! doing; `STOPPING=1` when it starts draining. Outside systemd (no `NOTIFY_SOCKET`), all of
//! this is a no-op.

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where to send notifications, when running under systemd with `Type=notify`.
pub struct Notifier {
    socket: UnixDatagram,
    target: std::os::unix::net::SocketAddr,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace); `None` when unset or
    /// unusable (logged).
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let text = path.to_string_lossy().into_owned();
        let target = if let Some(name) = text.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        } else {
            std::os::unix::net::SocketAddr::from_pathname(&text)
        };
        let made = target.and_then(|t| UnixDatagram::unbound().map(|s| (s, t)));
        match made {
            Ok((socket, target)) => Some(Notifier { socket, target }),
            Err(e) => {
                tracing::warn!(socket = %text, error = %e, "NOTIFY_SOCKET is set but unusable; not notifying systemd");
                None
            }
        }
    }

    /// Sends one notification (newline-separated assignments).
    pub fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.target) {
            tracing::warn!(error = %e, message, "sd_notify failed");
        }
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this process per
/// `WATCHDOG_PID`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval, each time only after the server answered
/// `GET /v2/health/live` on `addr` within that half interval.
pub async fn feed_watchdog(notifier: std::sync::Arc<Notifier>, addr: SocketAddr, interval: Duration) {
    let every = interval / 2;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match tokio::time::timeout(every, live(addr)).await {
            Ok(Ok(())) => notifier.send("WATCHDOG=1"),
            Ok(Err(e)) => tracing::error!(error = %e, "health check failed; not feeding the watchdog"),
            Err(_) => tracing::error!(
                timeout_ms = every.as_millis() as u64,
                "health check timed out; not feeding the watchdog"
            ),
        }
    }
}

/// One liveness request to the server itself.
async fn live(addr: SocketAddr) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await?;
    if &head[..] == b"HTTP/1.1 200" {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("liveness answered {}", String::from_utf8_lossy(&head))))
    }
}
