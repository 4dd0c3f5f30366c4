//! The benchmark's load generator and its server, run inside pods (see `mesh_tests::bench`).
//!
//! Deterministic: fixed payloads, fixed schedules, no randomness. Clients use blocking sockets on
//! their own threads and time with `Instant` (monotonic); figures from the warm-up are discarded.
//!
//! `loadgen serve ADDR` — one server for every mode; the first byte a client sends selects it:
//! - `S` (sink): reads until EOF, then answers the byte count as a big-endian u64;
//! - `E` (echo): echoes every byte, the `S`/`E` byte included, until EOF.
//!
//! Clients print one line `result key=value …` (times in µs):
//! - `loadgen throughput ADDR STREAMS WARMUP_MS DURATION_MS` — bulk upload on STREAMS connections;
//!   `bytes` is what the server counted, `measured_bytes` what was written after the warm-up,
//!   `seconds` from the end of the warm-up until the last server count arrived.
//! - `loadgen latency ADDR CONNS RATE WARMUP_MS DURATION_MS` — 1 KiB request, 1 KiB response,
//!   RATE requests per second spread evenly over CONNS persistent connections.
//! - `loadgen connrate ADDR THREADS WARMUP_MS DURATION_MS` — each thread loops: connect, send one
//!   byte, read it back, close.
//! - `loadgen hold ADDR N` — opens N connections (one-byte exchange each), prints
//!   `held ok=… errors=…`, keeps them open until stdin closes.
//! - `loadgen soak ADDR CONNS SECONDS TRICKLE_MS RATE` — opens CONNS echo connections (prints
//!   `opened ok=… errors=…`), then for SECONDS sends 32 bytes on each every TRICKLE_MS (spread
//!   evenly) and checks the echo, while opening RATE new connections per second (1 KiB echoed,
//!   closed); prints `progress …` every 10 s, then closes the held connections cleanly and
//!   prints `result trickles=… trickle_errors=… new_ok=… new_errors=… closed_ok=… lost=…`.
use std::{
    env,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    sync::{Barrier, OnceLock},
    thread,
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SINK: u8 = b'S';
const ECHO: u8 = b'E';
const WRITE_CHUNK: usize = 256 * 1024;
const REQUEST: usize = 1024;
/// A read that takes this long means the path is stuck: fail rather than hang.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["serve", addr] => serve(addr),
        ["throughput", addr, streams, warmup, duration] => (|| {
            throughput(
                arg("ADDR", addr)?,
                arg("STREAMS", streams)?,
                millis("WARMUP_MS", warmup)?,
                millis("DURATION_MS", duration)?,
            )
        })(),
        ["latency", addr, conns, rate, warmup, duration] => (|| {
            latency(
                arg("ADDR", addr)?,
                arg("CONNS", conns)?,
                arg("RATE", rate)?,
                millis("WARMUP_MS", warmup)?,
                millis("DURATION_MS", duration)?,
            )
        })(),
        ["connrate", addr, threads, warmup, duration] => (|| {
            connrate(
                arg("ADDR", addr)?,
                arg("THREADS", threads)?,
                millis("WARMUP_MS", warmup)?,
                millis("DURATION_MS", duration)?,
            )
        })(),
        ["hold", addr, n] => (|| hold(arg("ADDR", addr)?, arg("N", n)?))(),
        ["soak", addr, conns, seconds, trickle, rate] => (|| {
            soak(Soak {
                addr: arg("ADDR", addr)?,
                conns: arg("CONNS", conns)?,
                duration: Duration::from_secs(arg("SECONDS", seconds)?),
                trickle: millis("TRICKLE_MS", trickle)?,
                rate: arg("RATE", rate)?,
            })
        })(),
        _ => Err(
            "usage: loadgen serve ADDR | throughput ADDR STREAMS WARMUP_MS DURATION_MS | \
                  latency ADDR CONNS RATE WARMUP_MS DURATION_MS | \
                  connrate ADDR THREADS WARMUP_MS DURATION_MS | hold ADDR N | \
                  soak ADDR CONNS SECONDS TRICKLE_MS RATE"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("loadgen: {error}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Parses one command-line argument, naming it when it is malformed.
fn arg<T: std::str::FromStr>(name: &str, text: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    text.parse()
        .map_err(|error| format!("{name} {text:?}: {error}").into())
}

fn millis(name: &str, text: &str) -> Result<Duration> {
    arg(name, text).map(Duration::from_millis)
}

fn serve(addr: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("listening {addr}");
        std::io::stdout().flush()?;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = answer(stream).await;
            });
        }
    })
}

async fn answer(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    match stream.read_u8().await? {
        SINK => {
            let mut count = 0u64;
            loop {
                match stream.read(&mut buf).await? {
                    0 => break,
                    n => count += n as u64,
                }
            }
            stream.write_u64(count).await?;
        }
        ECHO => {
            stream.write_u8(ECHO).await?;
            loop {
                match stream.read(&mut buf).await? {
                    0 => break,
                    n => stream.write_all(&buf[..n]).await?,
                }
            }
        }
        other => {
            return Err(std::io::Error::other(format!("unknown mode byte {other}")));
        }
    }
    stream.shutdown().await
}

/// Connects and exchanges the echo-mode byte, so the whole path is known to be open.
fn open_echo(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(&[ECHO])?;
    let mut byte = [0u8];
    stream.read_exact(&mut byte)?;
    if byte[0] != ECHO {
        return Err(std::io::Error::other(
            "the echo server answered a wrong byte",
        ));
    }
    Ok(stream)
}

struct Upload {
    counted: u64,
    before_warmup_end: u64,
    finished: Instant,
}

fn throughput(
    addr: SocketAddr,
    streams: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<()> {
    let chunk: Vec<u8> = (0..WRITE_CHUNK).map(|i| (i * 7) as u8).collect();
    let (t0, uploads) = in_step(
        streams,
        |_| {
            let mut stream = TcpStream::connect(addr)?;
            stream.write_all(&[SINK])?;
            Ok(stream)
        },
        |_, mut stream, t0| {
            let (warm_end, end) = (t0 + warmup, t0 + warmup + duration);
            let (mut written, mut before_warmup_end) = (0u64, None);
            loop {
                let now = Instant::now();
                if before_warmup_end.is_none() && now >= warm_end {
                    before_warmup_end = Some(written);
                }
                if now >= end {
                    break;
                }
                stream.write_all(&chunk)?;
                written += chunk.len() as u64;
            }
            stream.shutdown(Shutdown::Write)?;
            let mut count = [0u8; 8];
            stream.read_exact(&mut count)?;
            let finished = Instant::now();
            let counted = u64::from_be_bytes(count);
            // The mode byte is not counted by the server.
            if counted != written {
                return Err(format!("wrote {written} bytes, server counted {counted}").into());
            }
            Ok(Upload {
                counted,
                before_warmup_end: before_warmup_end.unwrap_or(written),
                finished,
            })
        },
    )?;
    let bytes: u64 = uploads.iter().map(|u| u.counted).sum();
    let measured: u64 = uploads
        .iter()
        .map(|u| u.counted - u.before_warmup_end)
        .sum();
    let last = uploads
        .iter()
        .map(|u| u.finished)
        .max()
        .ok_or("no streams")?;
    let seconds = last.duration_since(t0 + warmup).as_secs_f64();
    println!("result bytes={bytes} measured_bytes={measured} seconds={seconds:.6}");
    Ok(())
}

/// The `k`th request of connection `conn`: distinct per request, so a stale or misrouted answer
/// cannot pass the check.
fn request(conn: usize, k: u64) -> Vec<u8> {
    (0..REQUEST)
        .map(|i| (i as u64 ^ k.wrapping_mul(131) ^ (conn as u64 * 17)) as u8)
        .collect()
}

fn latency(
    addr: SocketAddr,
    conns: usize,
    rate: u32,
    warmup: Duration,
    duration: Duration,
) -> Result<()> {
    if conns == 0 || rate == 0 {
        return Err("latency needs at least one connection and a positive rate".into());
    }
    // Each connection sends every `interval`; connection i is offset by i/conns of it.
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let (_, results) = in_step(
        conns,
        |_| open_echo(addr),
        |conn, mut stream, t0| {
            let first = t0 + interval.mul_f64(conn as f64 / conns as f64);
            let (warm_end, end) = (t0 + warmup, t0 + warmup + duration);
            let (mut samples, mut errors) = (Vec::new(), 0u64);
            let mut answer = vec![0u8; REQUEST];
            for k in 0u64.. {
                let due = first + interval.mul_f64(k as f64);
                if due >= end {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                let body = request(conn, k);
                let sent = Instant::now();
                let exchanged = stream
                    .write_all(&body)
                    .and_then(|()| stream.read_exact(&mut answer));
                let took = sent.elapsed();
                if exchanged.is_err() || answer != body {
                    errors += 1;
                    break;
                }
                if due >= warm_end {
                    samples.push(took.as_nanos() as u64);
                }
            }
            Ok((samples, errors))
        },
    )?;
    let (mut samples, mut errors) = (Vec::new(), 0);
    for (s, e) in results {
        samples.extend(s);
        errors += e;
    }
    samples.sort_unstable();
    println!(
        "result count={} errors={errors} p50_us={:.1} p90_us={:.1} p99_us={:.1} max_us={:.1}",
        samples.len(),
        micros(percentile(&samples, 0.50)),
        micros(percentile(&samples, 0.90)),
        micros(percentile(&samples, 0.99)),
        micros(samples.last().copied().unwrap_or(0)),
    );
    Ok(())
}

fn connrate(addr: SocketAddr, threads: usize, warmup: Duration, duration: Duration) -> Result<()> {
    let (_, results) = in_step(
        threads,
        |_| Ok(()),
        |_, (), t0| {
            let (warm_end, end) = (t0 + warmup, t0 + warmup + duration);
            let (mut connect, mut exchange, mut errors) = (Vec::new(), Vec::new(), 0u64);
            let mut byte = [0u8];
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let outcome = TcpStream::connect(addr).and_then(|mut stream| {
                    let connected = began.elapsed();
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(IO_TIMEOUT))?;
                    stream.write_all(&[ECHO])?;
                    stream.read_exact(&mut byte)?;
                    Ok((connected, began.elapsed()))
                });
                match outcome {
                    Ok((connected, answered)) if byte[0] == ECHO => {
                        if began >= warm_end {
                            connect.push(connected.as_nanos() as u64);
                            exchange.push(answered.as_nanos() as u64);
                        }
                    }
                    Ok(_) => errors += 1,
                    Err(error) => {
                        if errors == 0 {
                            eprintln!("loadgen: connection to {addr}: {error}");
                        }
                        errors += 1;
                    }
                }
            }
            Ok((connect, exchange, errors))
        },
    )?;
    let (mut connect, mut exchange, mut errors) = (Vec::new(), Vec::new(), 0);
    for (c, x, e) in results {
        connect.extend(c);
        exchange.extend(x);
        errors += e;
    }
    connect.sort_unstable();
    exchange.sort_unstable();
    println!(
        "result conns={} seconds={:.6} errors={errors} connect_p50_us={:.1} connect_p99_us={:.1} \
         exchange_p50_us={:.1} exchange_p99_us={:.1}",
        connect.len(),
        duration.as_secs_f64(),
        micros(percentile(&connect, 0.50)),
        micros(percentile(&connect, 0.99)),
        micros(percentile(&exchange, 0.50)),
        micros(percentile(&exchange, 0.99)),
    );
    Ok(())
}

/// Runs `n` threads in step: each runs `prepare` (say, connects), all wait for each other,
/// then each runs `body` with the same start instant, which is returned with the results in
/// thread order. A thread whose `prepare` failed still takes part in the wait, then fails.
fn in_step<P, T: Send>(
    n: usize,
    prepare: impl Fn(usize) -> std::io::Result<P> + Sync,
    body: impl Fn(usize, P, Instant) -> Result<T> + Sync,
) -> Result<(Instant, Vec<T>)> {
    // All prepared, then the start instant is taken, then all go.
    let (ready, go) = (Barrier::new(n + 1), Barrier::new(n + 1));
    let t0 = OnceLock::new();
    thread::scope(|scope| {
        let workers: Vec<_> = (0..n)
            .map(|i| {
                let (ready, go, t0, prepare, body) = (&ready, &go, &t0, &prepare, &body);
                scope.spawn(move || -> Result<T> {
                    let prepared = prepare(i);
                    ready.wait();
                    go.wait();
                    let t0 = *t0.get().ok_or("no start time")?;
                    body(i, prepared?, t0)
                })
            })
            .collect();
        ready.wait();
        let now = *t0.get_or_init(Instant::now);
        go.wait();
        let results = workers
            .into_iter()
            .map(|worker| worker.join().map_err(|_| "worker thread panicked")?)
            .collect::<Result<Vec<T>>>()?;
        Ok((now, results))
    })
}

fn hold(addr: SocketAddr, n: usize) -> Result<()> {
    let mut open = Vec::with_capacity(n);
    let mut errors = 0usize;
    for _ in 0..n {
        match open_echo(addr) {
            Ok(stream) => open.push(stream),
            Err(error) => {
                if errors == 0 {
                    eprintln!("loadgen: connection to {addr}: {error}");
                }
                errors += 1;
            }
        }
    }
    println!("held ok={} errors={errors}", open.len());
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest)?;
    drop(open);
    Ok(())
}

struct Soak {
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    trickle: Duration,
    rate: u32,
}

#[derive(Default)]
struct SoakCounts {
    trickles: std::sync::atomic::AtomicU64,
    trickle_errors: std::sync::atomic::AtomicU64,
    new_ok: std::sync::atomic::AtomicU64,
    new_errors: std::sync::atomic::AtomicU64,
}

/// Opens an echo connection (async): the mode byte sent and answered.
async fn open_echo_async(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let mut stream = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    stream.set_nodelay(true)?;
    stream.write_u8(ECHO).await?;
    match tokio::time::timeout(IO_TIMEOUT, stream.read_u8()).await {
        Ok(Ok(ECHO)) => Ok(stream),
        Ok(Ok(_)) => Err(std::io::Error::other(
            "the echo server answered a wrong byte",
        )),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(std::io::Error::other("no answer to the mode byte")),
    }
}

/// Sends `message` and reads it back, within [`IO_TIMEOUT`].
async fn echo_once(stream: &mut tokio::net::TcpStream, message: &[u8]) -> std::io::Result<()> {
    stream.write_all(message).await?;
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(IO_TIMEOUT, stream.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::other("echo timed out"))??;
    if back != message {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

fn soak(config: Soak) -> Result<()> {
    use std::sync::{Arc, atomic::Ordering::Relaxed};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let counts = Arc::new(SoakCounts::default());
        // Opening: 64 at a time.
        let mut held = Vec::with_capacity(config.conns);
        let mut open_errors = 0usize;
        let mut first_error = None;
        for batch in (0..config.conns).collect::<Vec<_>>().chunks(64) {
            let opening: Vec<_> = batch
                .iter()
                .map(|_| tokio::spawn(open_echo_async(config.addr)))
                .collect();
            for task in opening {
                match task.await? {
                    Ok(stream) => held.push(stream),
                    Err(error) => {
                        open_errors += 1;
                        first_error.get_or_insert(error.to_string());
                    }
                }
            }
        }
        println!("opened ok={} errors={open_errors}", held.len());
        if let Some(error) = first_error {
            eprintln!("loadgen: first failed open: {error}");
        }
        std::io::stdout().flush()?;

        let start = tokio::time::Instant::now();
        let end = start + config.duration;
        let n = held.len().max(1) as u32;
        let mut tasks = Vec::with_capacity(held.len());
        for (i, mut stream) in held.into_iter().enumerate() {
            let counts = counts.clone();
            let trickle = config.trickle;
            let offset = trickle * i as u32 / n;
            tasks.push(tokio::spawn(async move {
                let mut next = start + offset;
                let mut seq = 0u64;
                let mut alive = true;
                while next < end {
                    tokio::time::sleep_until(next).await;
                    let mut message = [0u8; 32];
                    message[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    message[8..16].copy_from_slice(&seq.to_be_bytes());
                    match echo_once(&mut stream, &message).await {
                        Ok(()) => counts.trickles.fetch_add(1, Relaxed),
                        Err(_) => {
                            counts.trickle_errors.fetch_add(1, Relaxed);
                            alive = false;
                            break;
                        }
                    };
                    seq += 1;
                    next += trickle;
                }
                if !alive {
                    return false;
                }
                // A clean close: write side shut, the server's echo of nothing and its EOF.
                if stream.shutdown().await.is_err() {
                    return false;
                }
                let mut rest = Vec::new();
                matches!(
                    tokio::time::timeout(IO_TIMEOUT, stream.read_to_end(&mut rest)).await,
                    Ok(Ok(0))
                )
            }));
        }
        let opener = {
            let counts = counts.clone();
            tokio::spawn(async move {
                if config.rate == 0 {
                    return;
                }
                let mut tick = tokio::time::interval(Duration::from_secs(1) / config.rate);
                let mut opening = tokio::task::JoinSet::new();
                while tokio::time::Instant::now() < end {
                    tick.tick().await;
                    let counts = counts.clone();
                    opening.spawn(async move {
                        let outcome = async {
                            let mut stream = open_echo_async(config.addr).await?;
                            echo_once(&mut stream, &[7u8; REQUEST]).await?;
                            stream.shutdown().await
                        }
                        .await;
                        match outcome {
                            Ok(()) => counts.new_ok.fetch_add(1, Relaxed),
                            Err(_) => counts.new_errors.fetch_add(1, Relaxed),
                        };
                    });
                    while opening.try_join_next().is_some() {}
                }
                while opening.join_next().await.is_some() {}
            })
        };
        let reporter = {
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(
                    start + Duration::from_secs(10),
                    Duration::from_secs(10),
                );
                loop {
                    tick.tick().await;
                    println!(
                        "progress t={} trickles={} trickle_errors={} new_ok={} new_errors={}",
                        start.elapsed().as_secs(),
                        counts.trickles.load(Relaxed),
                        counts.trickle_errors.load(Relaxed),
                        counts.new_ok.load(Relaxed),
                        counts.new_errors.load(Relaxed),
                    );
                    let _ = std::io::stdout().flush();
                }
            })
        };
        let mut closed_ok = 0usize;
        for task in tasks {
            if task.await? {
                closed_ok += 1;
            }
        }
        opener.await?;
        reporter.abort();
        println!(
            "result trickles={} trickle_errors={} new_ok={} new_errors={} open_errors={open_errors} closed_ok={closed_ok} lost={}",
            counts.trickles.load(Relaxed),
            counts.trickle_errors.load(Relaxed),
            counts.new_ok.load(Relaxed),
            counts.new_errors.load(Relaxed),
            config.conns - closed_ok,
        );
        std::io::stdout().flush()?;
        Ok(())
    })
}

/// Nearest-rank percentile of sorted samples; 0 when there are none.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn micros(nanos: u64) -> f64 {
    nanos as f64 / 1000.0
}
