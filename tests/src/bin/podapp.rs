//! The application inside test pods.
//!
//! `podapp serve ADDR`: echo server. For each connection it first sends one line
//! `peer=<client address as the server sees it> local=<its own address>\n`, then echoes every
//! byte until EOF.
//!
//! `podapp connect ADDR BYTES CONNS [HOLD_MS]`: opens CONNS connections in parallel; on each,
//! reads the server's line, waits HOLD_MS (default 0), sends BYTES of a fixed pattern, half-closes, and checks the echo is identical.
//! Prints `ok local=… peer=… server_saw=… server_local=… bytes=…` or `error conn=N …` per
//! connection.
//!
//! For how connections end (all streams are the fixed pattern, checked by the reader):
//! - `podapp source ADDR BYTES END`: server; sends BYTES to each client, then `fin` (half-close,
//!   then wait for the client's end) or `reset` (wait 300 ms for the bytes to arrive, then
//!   reset); BYTES `endless` streams until the connection breaks.
//! - `podapp sink ADDR`: server; reads each connection to its end and prints
//!   `ended peer=… bytes=N how=eof|reset|error:…`.
//! - `podapp fetch ADDR`: client; reads to the end, prints `ended bytes=N how=…`.
//! - `podapp push ADDR BYTES END`: client; sends BYTES (or `endless`), then `fin` (half-close,
//!   wait for the server's end) or `reset` (after 300 ms); prints `ended bytes=N how=…` where
//!   `how` is how sending ended (`done` when all was sent).
//!
//! DNS (`podapp/dns.rs`): `podapp resolve SERVER NAME A|AAAA connected|unconnected|tcp|auto`
//! and `podapp dnsflood SERVER COUNT`.
use std::{
    env,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", addr] => serve(addr),
        ["connect", addr, bytes, conns] => connect(addr, bytes, conns, "0"),
        ["connect", addr, bytes, conns, hold_ms] => connect(addr, bytes, conns, hold_ms),
        ["source", addr, bytes, end] => ending::source(addr, bytes, end, "0"),
        ["source", addr, bytes, end, delay_ms] => ending::source(addr, bytes, end, delay_ms),
        ["sink", addr] => ending::sink(addr),
        ["fetch", addr] => ending::fetch(addr, false),
        ["fetch", addr, "half-close"] => ending::fetch(addr, true),
        ["push", addr, bytes, end] => ending::push(addr, bytes, end),
        ["resolve", server, name, qtype, mode] => dns::resolve(server, name, qtype, mode),
        ["dnsflood", server, count] => dns::flood(server, count),
        _ => Err(
            "usage: podapp serve ADDR | podapp connect ADDR BYTES CONNS [HOLD_MS] | \
                  podapp source ADDR BYTES fin|reset [DELAY_MS] | podapp sink ADDR | \
                  podapp fetch ADDR [half-close] | \
                  podapp push ADDR BYTES fin|reset | podapp resolve SERVER NAME TYPE MODE | \
                  podapp dnsflood SERVER COUNT"
                .to_owned(),
        ),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("podapp: {message}");
            ExitCode::from(2)
        }
    }
}

#[path = "podapp/dns.rs"]
mod dns;
#[path = "podapp/ending.rs"]
mod ending;

fn serve(addr: &str) -> Result<bool, String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!("listening {addr}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        thread::spawn(move || {
            let _ = echo(stream);
        });
    }
    Ok(true)
}

fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    let local = stream.local_addr()?;
    stream.write_all(format!("peer={peer} local={local}\n").as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n])?;
    }
    stream.shutdown(Shutdown::Write)
}

fn connect(addr: &str, bytes: &str, conns: &str, hold_ms: &str) -> Result<bool, String> {
    let hold = Duration::from_millis(
        hold_ms
            .parse()
            .map_err(|e| format!("hold {hold_ms}: {e}"))?,
    );
    let addr: SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    let bytes: usize = bytes.parse().map_err(|e| format!("bytes {bytes}: {e}"))?;
    let conns: usize = conns.parse().map_err(|e| format!("conns {conns}: {e}"))?;
    let handles: Vec<_> = (0..conns)
        .map(|_| thread::spawn(move || one_connection(addr, bytes, hold)))
        .collect();
    let mut all_ok = true;
    for (index, handle) in handles.into_iter().enumerate() {
        match handle
            .join()
            .unwrap_or_else(|_| Err("thread panicked".to_owned()))
        {
            Ok(line) => println!("ok {line}"),
            Err(message) => {
                all_ok = false;
                println!("error conn={index} {message}");
            }
        }
    }
    Ok(all_ok)
}

use mesh_tests::podapp::pattern;

fn one_connection(addr: SocketAddr, bytes: usize, hold: Duration) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("getsockname: {e}"))?;
    let peer = stream
        .peer_addr()
        .map_err(|e| format!("getpeername: {e}"))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("read server line: {e}"))?;
    let said = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .map(str::to_owned)
            .ok_or(format!("bad server line {line:?}"))
    };
    let (server_saw, server_local) = (said("peer=")?, said("local=")?);
    // Connected, and the server has spoken: keep the connection open this long before the
    // transfer, so a test can change the mesh under it.
    thread::sleep(hold);

    let mut writer = stream;
    let sender = thread::spawn(move || -> std::io::Result<()> {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            for (i, b) in chunk[..n].iter_mut().enumerate() {
                *b = pattern(sent + i);
            }
            writer.write_all(&chunk[..n])?;
            sent += n;
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut received = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("read echo after {received} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern(received + i)) {
            return Err(format!("echo differs at byte {}", received + i));
        }
        received += n;
    }
    sender
        .join()
        .map_err(|_| "sender panicked".to_owned())?
        .map_err(|e| format!("send: {e}"))?;
    if received != bytes {
        return Err(format!("echo returned {received} of {bytes} bytes"));
    }
    Ok(format!(
        "local={local} peer={peer} server_saw={server_saw} server_local={server_local} bytes={bytes}"
    ))
}
