//! podapp's modes for how connections end: servers that finish cleanly or reset, clients
//! that read or write to the end and say how it ended.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use mesh_tests::podapp::pattern;

/// How long a resetting side waits after its last byte, so that every byte has arrived at the
/// far application before the reset: byte counts are then exact.
const SETTLE: Duration = Duration::from_millis(300);

#[derive(Clone, Copy)]
enum End {
    Fin,
    Reset,
}

fn end(text: &str) -> Result<End, String> {
    match text {
        "fin" => Ok(End::Fin),
        "reset" => Ok(End::Reset),
        other => Err(format!("end {other:?}: fin or reset")),
    }
}

/// `None`: endless.
fn amount(text: &str) -> Result<Option<u64>, String> {
    if text == "endless" {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|e| format!("bytes {text}: {e}"))
}

fn listen(addr: &str) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!("listening {addr}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    Ok(listener)
}

/// Serves `bytes` on each connection, `delay_ms` after accepting it, then ends as told.
pub fn source(addr: &str, bytes: &str, end_text: &str, delay_ms: &str) -> Result<bool, String> {
    let (bytes, end) = (amount(bytes)?, end(end_text)?);
    let delay = Duration::from_millis(
        delay_ms
            .parse()
            .map_err(|e| format!("delay {delay_ms}: {e}"))?,
    );
    for stream in listen(addr)?.incoming() {
        let Ok(stream) = stream else { continue };
        thread::spawn(move || {
            thread::sleep(delay);
            let _ = send_then_end(stream, bytes, end);
        });
    }
    Ok(true)
}

pub fn sink(addr: &str) -> Result<bool, String> {
    for stream in listen(addr)?.incoming() {
        let Ok(mut stream) = stream else { continue };
        thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map_or_else(|_| "?".to_owned(), |p| p.to_string());
            let (bytes, how) = read_to_end(&mut stream);
            println!("ended peer={peer} bytes={bytes} how={how}");
            let _ = std::io::stdout().flush();
        });
    }
    Ok(true)
}

/// Reads to the end; with `half_close`, having first ended its own direction (so the far
/// side's end is the last thing the connection carries).
pub fn fetch(addr: &str, half_close: bool) -> Result<bool, String> {
    let mut stream = connect(addr)?;
    if half_close {
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
    }
    let (bytes, how) = read_to_end(&mut stream);
    println!("ended bytes={bytes} how={how}");
    Ok(true)
}

pub fn push(addr: &str, bytes: &str, end_text: &str) -> Result<bool, String> {
    let (bytes, end) = (amount(bytes)?, end(end_text)?);
    let stream = connect(addr)?;
    let (sent, how) = send_then_end(stream, bytes, end);
    println!("ended bytes={sent} how={how}");
    Ok(true)
}

fn connect(addr: &str) -> Result<TcpStream, String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Reads to the end, checking the pattern: the bytes read and how it ended.
fn read_to_end(stream: &mut TcpStream) -> (u64, String) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (received, "eof".to_owned()),
            Ok(n) => {
                if let Some(i) = (0..n).find(|&i| buf[i] != pattern(received as usize + i)) {
                    return (
                        received,
                        format!("error:corrupt-at-{}", received as usize + i),
                    );
                }
                received += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return (received, "reset".to_owned());
            }
            Err(e) => return (received, format!("error:{}", e.kind())),
        }
    }
}

/// Sends `bytes` (or until the connection breaks), then ends as told: the bytes sent and
/// `done` (ended as told) or how sending broke.
fn send_then_end(mut stream: TcpStream, bytes: Option<u64>, end: End) -> (u64, String) {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while bytes.is_none_or(|total| sent < total) {
        let n = bytes.map_or(chunk.len(), |total| {
            chunk.len().min((total - sent) as usize)
        });
        for (i, b) in chunk[..n].iter_mut().enumerate() {
            *b = pattern(sent as usize + i);
        }
        if let Err(e) = stream.write_all(&chunk[..n]) {
            let how = if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) {
                "reset".to_owned()
            } else {
                format!("error:{}", e.kind())
            };
            return (sent, how);
        }
        sent += n as u64;
    }
    match end {
        End::Fin => {
            let _ = stream.shutdown(Shutdown::Write);
            // Wait for the other side's end, so the close that follows is orderly.
            let mut rest = [0u8; 1024];
            while matches!(stream.read(&mut rest), Ok(n) if n > 0) {}
        }
        End::Reset => {
            thread::sleep(SETTLE);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    }
    (sent, "done".to_owned())
}
