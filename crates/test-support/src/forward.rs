//! A loopback TCP forwarder the tests put between a client and a server, to cut the
//! connection without closing it: [`TcpForwarder::black_hole`] swallows every byte both
//! ways on the open connections (and on new ones), as a dead network does, so the client
//! sees no reset, only silence; [`TcpForwarder::restore`] forwards again. Loopback only.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::{Result, err};

/// How often the threads look at the flags.
const TICK: Duration = Duration::from_millis(20);

/// The forwarder's shared state.
#[derive(Debug, Default)]
struct Shared {
    black_hole: AtomicBool,
    stop: AtomicBool,
    /// Every socket opened, to shut them down on drop.
    sockets: Mutex<Vec<TcpStream>>,
}

/// A forwarder from a free port on 127.0.0.1 to `target`; stops (and closes every
/// connection) on drop.
#[derive(Debug)]
pub struct TcpForwarder {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl TcpForwarder {
    /// Listens on 127.0.0.1 (a free port) and forwards each connection to `target`, which
    /// must be a loopback address.
    pub fn start(target: SocketAddr) -> Result<Self> {
        if !target.ip().is_loopback() {
            return Err(err(format!(
                "the forwarder's target {target} is not loopback"
            )));
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| err(format!("forwarder: cannot listen: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| err(format!("forwarder: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err(format!("forwarder: {e}")))?;
        let shared = Arc::new(Shared::default());
        let accepting = shared.clone();
        thread::spawn(move || accept(&listener, target, &accepting));
        Ok(Self { addr, shared })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Swallows every byte from now on, both ways, keeping the connections open.
    pub fn black_hole(&self) {
        self.shared.black_hole.store(true, Ordering::SeqCst);
    }

    /// Forwards again (bytes swallowed meanwhile stay lost).
    pub fn restore(&self) {
        self.shared.black_hole.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for socket in self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

fn accept(listener: &TcpListener, target: SocketAddr, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let pair = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                );
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = pair else {
                    continue;
                };
                shared
                    .sockets
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend([c3, s3]);
                let (up, down) = (shared.clone(), shared.clone());
                thread::spawn(move || pipe(client, server, &up));
                thread::spawn(move || pipe(s2, c2, &down));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(TICK),
            Err(_) => thread::sleep(TICK),
        }
    }
}

/// Copies `from` to `to` until either ends or the forwarder stops; drops the bytes while
/// black-holed.
fn pipe(mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = [0u8; 16 * 1024];
    while !shared.stop.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if shared.black_hole.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn forwards_then_swallows_then_forwards_again() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let fwd = TcpForwarder::start(target).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", fwd.port())).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 4];
        c.write_all(b"ping").unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        fwd.black_hole();
        c.write_all(b"lost").unwrap();
        assert!(c.read(&mut buf).is_err(), "nothing comes back, no reset");
        fwd.restore();
        c.write_all(b"back").unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"back");
        assert!(TcpForwarder::start("10.0.0.1:5432".parse().unwrap()).is_err());
    }
}
