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
        _ => Err(
            "usage: loadgen serve ADDR | throughput ADDR STREAMS WARMUP_MS DURATION_MS | \
                  latency ADDR CONNS RATE WARMUP_MS DURATION_MS | \
                  connrate ADDR THREADS WARMUP_MS DURATION_MS | hold ADDR N"
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
