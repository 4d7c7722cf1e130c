//! A loopback TCP fault proxy the tests and `cargo xtask chaos` put between a client and a
//! server (the toxiproxy idea, in-process). Its [`Fault`] is switchable while traffic flows
//! and applies to the open connections and to new ones alike: [`Fault::Pass`] forwards,
//! [`Fault::Latency`] delays every chunk, [`Fault::Stall`] swallows every byte both ways
//! keeping the connections open (a dead network: the client sees silence, no reset),
//! [`Fault::Reset`] aborts every connection with an RST, [`Fault::Cut`] closes them (FIN),
//! [`Fault::Hold`] keeps every chunk (a gate: nothing is lost) until the fault changes.
//! Loopback only.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::{Result, err};

/// How often the threads look at the fault.
const TICK: Duration = Duration::from_millis(20);

/// What the proxy does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward every byte as it comes.
    Pass,
    /// Forward every chunk after this many milliseconds, both ways.
    Latency(u64),
    /// Swallow every byte both ways and keep the connections open; new connections are
    /// accepted and swallowed too (a black hole). Bytes swallowed stay lost after the switch
    /// back.
    Stall,
    /// Abort every connection with an RST (`SO_LINGER` 0); new ones are reset at once.
    Reset,
    /// Close every connection (FIN both ways); new ones are closed at once.
    Cut,
    /// Hold every chunk read from now on, both ways, and keep the connections open; when
    /// the fault changes the held chunks go on under the new one (forwarded under
    /// [`Fault::Pass`]): a gate that loses nothing, for a test that must let a reply through
    /// only once something else has happened.
    Hold,
}

impl Fault {
    fn encode(self) -> u64 {
        match self {
            Self::Pass => 0,
            Self::Stall => 1,
            Self::Reset => 2,
            Self::Cut => 3,
            Self::Hold => 5,
            // Latency in the upper bits, so that one atomic holds the whole fault.
            Self::Latency(ms) => 4 | (ms.min(u64::MAX >> 3) << 3),
        }
    }

    fn decode(raw: u64) -> Self {
        match raw & 0b111 {
            0 => Self::Pass,
            1 => Self::Stall,
            2 => Self::Reset,
            3 => Self::Cut,
            5 => Self::Hold,
            _ => Self::Latency(raw >> 3),
        }
    }
}

/// The proxy's shared state.
#[derive(Debug, Default)]
struct Shared {
    fault: AtomicU64,
    stop: AtomicBool,
    next_id: AtomicU64,
    /// Chunks from clients held on their way to the server right now ([`Fault::Hold`]).
    held_to_server: AtomicU64,
    /// A handle on both sockets of every open connection, to shut them down on drop;
    /// removed when the connection ends.
    sockets: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
}

impl Shared {
    fn fault(&self) -> Fault {
        Fault::decode(self.fault.load(Ordering::SeqCst))
    }

    fn sockets(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (TcpStream, TcpStream)>> {
        self.sockets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A fault proxy from a free port on 127.0.0.1 to `target`, passing traffic until told
/// otherwise; stops (and closes every connection) on drop.
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

    /// Switches to `fault`, for the open connections (within a few tens of milliseconds)
    /// and for new ones.
    pub fn set_fault(&self, fault: Fault) {
        self.shared.fault.store(fault.encode(), Ordering::SeqCst);
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        self.shared.fault()
    }

    /// How many connections are open through the proxy.
    pub fn connections(&self) -> usize {
        self.shared.sockets().len()
    }

    /// How many chunks a client sent are held right now, not yet at the server
    /// ([`Fault::Hold`]): a test that holds a reply can also see that the request was sent,
    /// without letting it through.
    pub fn held_to_server(&self) -> u64 {
        self.shared.held_to_server.load(Ordering::SeqCst)
    }

    /// [`Fault::Stall`]: swallows every byte from now on, both ways, keeping the
    /// connections open.
    pub fn black_hole(&self) {
        self.set_fault(Fault::Stall);
    }

    /// [`Fault::Pass`]: forwards again (bytes swallowed meanwhile stay lost).
    pub fn restore(&self) {
        self.set_fault(Fault::Pass);
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for (_, (client, server)) in self.shared.sockets().drain() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}

fn accept(listener: &TcpListener, target: SocketAddr, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                let shared = shared.clone();
                // The connect to the target may take a while (or fail): not on this thread.
                thread::spawn(move || connection(client, target, &shared));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(TICK),
            Err(_) => thread::sleep(TICK),
        }
    }
}

/// One accepted connection, from its first byte to its end.
fn connection(client: TcpStream, target: SocketAddr, shared: &Arc<Shared>) {
    match shared.fault() {
        Fault::Reset => return abort(&client),
        Fault::Cut => return close(&client),
        Fault::Stall => {
            // A black hole from the first byte: nothing reaches the server (it may be down
            // too). The client is held, silent, until the fault changes, then closed.
            swallow_until_switched(client, shared);
            return;
        }
        Fault::Pass | Fault::Latency(_) | Fault::Hold => {}
    }
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
        // The server is down: the client sees what it would see without the proxy.
        return abort(&client);
    };
    let handles = (
        client.try_clone(),
        server.try_clone(),
        client.try_clone(),
        server.try_clone(),
    );
    let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = handles else {
        return;
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared.sockets().insert(id, (c3, s3));
    let down_shared = shared.clone();
    let down = thread::spawn(move || pipe(s2, c2, &down_shared, None));
    pipe(client, server, shared, Some(&shared.held_to_server));
    let _ = down.join();
    shared.sockets().remove(&id);
}

/// Reads and drops what `client` sends while the fault is [`Fault::Stall`], then closes it.
fn swallow_until_switched(mut client: TcpStream, shared: &Shared) {
    let _ = client.set_read_timeout(Some(TICK));
    let mut buf = [0u8; 16 * 1024];
    while !shared.stop.load(Ordering::SeqCst) && shared.fault() == Fault::Stall {
        match client.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
    close(&client);
}

/// An abortive close: the peer gets an RST, not a FIN.
fn abort(stream: &TcpStream) {
    // The RST goes when the last handle closes (the other pipe sees the fault within a
    // tick and drops its handles); a shutdown would send a FIN first.
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

fn close(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Both);
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// The fault in force once it is not [`Fault::Hold`] (a chunk read under it waits for
/// that), or `Hold` if the forwarder stopped meanwhile. The chunk counts in `held` (if
/// given) while it waits.
fn held_until_switched(shared: &Shared, held: Option<&AtomicU64>) -> Fault {
    let mut fault = shared.fault();
    if fault != Fault::Hold {
        return fault;
    }
    if let Some(held) = held {
        held.fetch_add(1, Ordering::SeqCst);
    }
    while fault == Fault::Hold && !shared.stop.load(Ordering::SeqCst) {
        thread::sleep(TICK);
        fault = shared.fault();
    }
    if let Some(held) = held {
        held.fetch_sub(1, Ordering::SeqCst);
    }
    fault
}

/// Copies `from` to `to` until either ends, the forwarder stops or the fault ends the
/// connection; drops the bytes while stalled, delays them under latency. A chunk held
/// ([`Fault::Hold`]) counts in `held` while it waits, if given.
fn pipe(mut from: TcpStream, mut to: TcpStream, shared: &Shared, held: Option<&AtomicU64>) {
    let _ = from.set_read_timeout(Some(TICK));
    let _ = to.set_write_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 16 * 1024];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        match shared.fault() {
            Fault::Reset => {
                abort(&from);
                abort(&to);
                return;
            }
            Fault::Cut => {
                close(&from);
                close(&to);
                return;
            }
            Fault::Pass | Fault::Latency(_) | Fault::Stall | Fault::Hold => {}
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => match held_until_switched(shared, held) {
                Fault::Stall => {}
                Fault::Latency(ms) => {
                    thread::sleep(Duration::from_millis(ms));
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Fault::Pass => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                // The top of the loop ends the connection (or the forwarder stopped).
                Fault::Reset | Fault::Cut | Fault::Hold => {}
            },
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
    if shared.fault() == Fault::Reset {
        abort(&to);
    } else {
        let _ = to.shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests;
