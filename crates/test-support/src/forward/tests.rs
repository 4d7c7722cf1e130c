#![allow(clippy::unwrap_used)]

use std::time::Instant;

use super::*;

/// An echo server on a free port: every connection gets its bytes back.
fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A client of the proxy whose reads give up after 300 ms.
fn client(fwd: &TcpForwarder) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", fwd.port())).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    c
}

fn round_trip(c: &mut TcpStream, bytes: &[u8; 4]) -> io::Result<[u8; 4]> {
    c.write_all(bytes)?;
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf)?;
    Ok(buf)
}

/// Polls `cond` every 10 ms for at most 5 s.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn the_fault_round_trips_through_its_encoding() {
    for fault in [
        Fault::Pass,
        Fault::Stall,
        Fault::Reset,
        Fault::Cut,
        Fault::Hold,
        Fault::Latency(0),
        Fault::Latency(1),
        Fault::Latency(250),
    ] {
        assert_eq!(Fault::decode(fault.encode()), fault);
    }
}

#[test]
fn hold_keeps_the_bytes_until_the_fault_changes_and_loses_none() {
    let fwd = TcpForwarder::start(echo()).unwrap();
    let mut c = client(&fwd);
    assert_eq!(&round_trip(&mut c, b"ping").unwrap(), b"ping");
    // The pipe looks at the fault after each read: set before the write, it holds it.
    fwd.set_fault(Fault::Hold);
    assert_eq!(fwd.held_to_server(), 0);
    c.write_all(b"held").unwrap();
    let mut buf = [0u8; 4];
    let e = c.read(&mut buf).unwrap_err();
    assert!(is_timeout(&e), "held, no answer yet: {e}");
    // The echo never saw it: the one chunk held is the client's, on its way to the server.
    let started = Instant::now();
    while fwd.held_to_server() != 1 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the chunk is not held"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    fwd.restore();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"held");
    assert_eq!(fwd.held_to_server(), 0, "let through, held no more");
}

#[test]
fn passes_then_swallows_then_passes_again_on_the_same_connection() {
    let fwd = TcpForwarder::start(echo()).unwrap();
    let mut c = client(&fwd);
    assert_eq!(&round_trip(&mut c, b"ping").unwrap(), b"ping");
    fwd.black_hole();
    assert_eq!(fwd.fault(), Fault::Stall);
    c.write_all(b"lost").unwrap();
    let mut buf = [0u8; 4];
    let e = c.read(&mut buf).unwrap_err();
    assert!(is_timeout(&e), "silence, no reset or close: {e}");
    fwd.restore();
    assert_eq!(&round_trip(&mut c, b"back").unwrap(), b"back");
    assert!(TcpForwarder::start("10.0.0.1:5432".parse().unwrap()).is_err());
}

#[test]
fn a_stall_accepts_new_connections_and_swallows_them_while_the_server_is_down() {
    // The target is a port nobody listens on: a stalled connection never reaches it.
    let nobody = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let fwd = TcpForwarder::start(nobody).unwrap();
    fwd.set_fault(Fault::Stall);
    let mut c = client(&fwd);
    c.write_all(b"hello").unwrap();
    let mut buf = [0u8; 4];
    let e = c.read(&mut buf).unwrap_err();
    assert!(is_timeout(&e), "a black hole answers nothing: {e}");
    // Back to passing, the held connection is closed; a new one to the dead server is reset.
    fwd.set_fault(Fault::Pass);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    let mut c = client(&fwd);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let e = c.read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
}

#[test]
fn latency_delays_every_chunk_and_can_be_switched_off() {
    let fwd = TcpForwarder::start(echo()).unwrap();
    let mut c = client(&fwd);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    fwd.set_fault(Fault::Latency(150));
    let started = Instant::now();
    assert_eq!(&round_trip(&mut c, b"slow").unwrap(), b"slow");
    // Delayed once each way.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    fwd.set_fault(Fault::Pass);
    assert_eq!(&round_trip(&mut c, b"fast").unwrap(), b"fast");
}

#[test]
fn reset_aborts_open_connections_and_new_ones_with_an_rst() {
    let fwd = TcpForwarder::start(echo()).unwrap();
    let mut c = client(&fwd);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(&round_trip(&mut c, b"ping").unwrap(), b"ping");
    fwd.set_fault(Fault::Reset);
    let mut buf = [0u8; 4];
    let e = c.read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    let mut c = client(&fwd);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let e = c.read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    assert!(eventually(|| fwd.connections() == 0));
    fwd.set_fault(Fault::Pass);
    let mut c = client(&fwd);
    assert_eq!(&round_trip(&mut c, b"back").unwrap(), b"back");
}

#[test]
fn cut_closes_open_connections_and_new_ones_with_a_fin() {
    let fwd = TcpForwarder::start(echo()).unwrap();
    let mut c = client(&fwd);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(&round_trip(&mut c, b"ping").unwrap(), b"ping");
    assert_eq!(fwd.connections(), 1);
    fwd.set_fault(Fault::Cut);
    let mut buf = [0u8; 4];
    assert_eq!(c.read(&mut buf).unwrap(), 0, "an orderly close");
    let mut c = client(&fwd);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    assert!(eventually(|| fwd.connections() == 0));
    fwd.set_fault(Fault::Pass);
    let mut c = client(&fwd);
    assert_eq!(&round_trip(&mut c, b"back").unwrap(), b"back");
}

#[test]
fn a_fault_switched_while_traffic_flows_takes_effect_on_that_traffic() {
    let fwd = TcpForwarder::start(echo()).unwrap();
    let mut c = client(&fwd);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut writer = c.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    // A steady stream of bytes into the proxy while the fault changes.
    let sender = thread::spawn(move || {
        while !stopping.load(Ordering::SeqCst) {
            if writer.write_all(b"tick").is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(2));
        }
    });
    let mut buf = [0u8; 1024];
    assert!(c.read(&mut buf).unwrap() > 0, "flowing");
    fwd.set_fault(Fault::Stall);
    // Whatever was in flight drains; then nothing comes back at all.
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let silent = eventually(|| c.read(&mut buf).is_err_and(|e| is_timeout(&e)));
    assert!(silent, "bytes still flow through a stall");
    fwd.set_fault(Fault::Pass);
    assert!(c.read(&mut buf).unwrap() > 0, "flowing again");
    fwd.set_fault(Fault::Reset);
    let reset = eventually(|| {
        c.read(&mut buf)
            .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset)
    });
    stop.store(true, Ordering::SeqCst);
    let _ = sender.join();
    assert!(reset, "no reset under traffic");
}
