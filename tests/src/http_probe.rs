//! A minimal HTTP/1.1 client for mesh-node's own endpoints (admin, metrics, readiness), run from
//! inside a node's network namespace, where mesh-node listens.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::hbone_client::run_in;

/// Admin (loopback only), metrics and readiness, at Istio's ports.
pub const ADMIN: &str = "127.0.0.1:15000";
pub const METRICS: &str = "127.0.0.1:15020";
pub const READINESS: &str = "127.0.0.1:15021";

/// An HTTP answer: status code and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// `METHOD path` to `addr` from inside `netns`, with `Connection: close`.
pub fn request(netns: &Path, method: &str, addr: &str, path: &str) -> Result<Answer> {
    let addr: SocketAddr = addr.parse()?;
    let (method, path) = (method.to_owned(), path.to_owned());
    run_in(netns, move || async move { exchange(addr, &method, &path) })?
}

pub fn get(netns: &Path, addr: &str, path: &str) -> Result<Answer> {
    request(netns, "GET", addr, path)
}

fn exchange(addr: SocketAddr, method: &str, path: &str) -> Result<Answer> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header end in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("chunked answers are not expected from mesh-node: {head}");
    }
    Ok(Answer {
        status,
        body: body.to_owned(),
    })
}

/// mesh-node's metrics, scraped from its endpoint in `netns`.
pub fn scrape(netns: &Path) -> Result<String> {
    let answer = get(netns, METRICS, "/stats/prometheus")?;
    if answer.status != 200 {
        bail!("metrics answered {}: {}", answer.status, answer.body);
    }
    Ok(answer.body)
}

/// The sum of every sample of `metric` (all label sets) whose labels include each of `labels`,
/// scraped from mesh-node's metrics endpoint in `netns`.
pub fn total(netns: &Path, metric: &str, labels: &[&str]) -> Result<f64> {
    let exposition = scrape(netns)?;
    matching(&exposition, metric, labels).map(value_of).sum()
}

/// The value of the one sample of `metric` whose labels include every one of `labels`
/// (`name="value"` strings); `None` when there is none. Fails when several match.
pub fn sample(exposition: &str, metric: &str, labels: &[&str]) -> Result<Option<f64>> {
    let matches: Vec<&str> = matching(exposition, metric, labels).collect();
    match matches.as_slice() {
        [] => Ok(None),
        [line] => value_of(line).map(Some),
        many => bail!(
            "{} samples of {metric} match {labels:?}: {many:#?}",
            many.len()
        ),
    }
}

/// The sample lines of `metric` (not of a longer name it prefixes) carrying every label.
fn matching<'a>(
    exposition: &'a str,
    metric: &'a str,
    labels: &'a [&str],
) -> impl Iterator<Item = &'a str> {
    exposition
        .lines()
        .filter(move |line| {
            line.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(move |line| labels.iter().all(|label| line.contains(label)))
}

fn value_of(line: &str) -> Result<f64> {
    line.rsplit(' ')
        .next()
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("no value in {line:?}"))
}
