//! HBONE between nodes on a real kernel: mutual TLS with SPIFFE identities, CONNECT tunnels,
//! inbound delivery, plaintext inbound capture and the same-node shortcut. Assertions are on
//! what a user sees: bytes that arrived, identities mesh-node reports, what crossed the wire.
use std::{net::SocketAddr, time::Duration};

use mesh_node::hbone::{H2Stream, client::ConnectHeaders};
use mesh_tests::{MeshNode, PodSpec, Topology, hbone_client, podapp, privileged, sniff, wait_for};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const PORT: u16 = 8080;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

/// node1: `client`, `neighbor` (enrolled), `outsider` (not); node2: `server` (enrolled),
/// `legacy` (not enrolled, not in the mesh).
fn topology() -> Topology {
    Topology::two_nodes(
        vec![
            PodSpec::enrolled("client"),
            PodSpec::enrolled("neighbor"),
            PodSpec::plain("outsider"),
        ],
        vec![PodSpec::enrolled("server"), PodSpec::plain("legacy")],
    )
}

fn all_ok(run: &podapp::PodRun, conns: usize) {
    assert!(run.errors.is_empty(), "connection errors: {:?}", run.errors);
    assert_eq!(run.ok.len(), conns);
}

#[test]
fn cross_node_traffic_is_mutual_tls_with_identities_and_no_cleartext_on_the_wire() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("mesh-node node1");
    let mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("mesh-node node2");
    let server = topo.serve("server", PORT);
    let legacy = topo.serve("legacy", PORT);

    let sniffer = sniff::Sniffer::start(&topo.node("node1").netns, "n0").expect("capture n0");
    let run = topo.connect_from("client", server.addr, 1 << 20, 4);
    all_ok(&run, 4);
    for conn in &run.ok {
        assert_eq!(
            conn.peer, server.addr,
            "the application sees its original destination"
        );
        assert_eq!(conn.bytes, 1 << 20);
    }
    // Control: the same bytes to a workload outside the mesh cross the link in cleartext, so
    // the capture below would have seen them.
    all_ok(&topo.connect_from("client", legacy.addr, 64 * 1024, 1), 1);
    let segments = sniffer.stop();

    let hbone_bytes: usize = segments
        .iter()
        .filter(|s| s.dst_port == 15008 || s.src_port == 15008)
        .map(|s| s.payload.len())
        .sum();
    assert!(
        hbone_bytes > 4 << 20,
        "only {hbone_bytes} bytes crossed the link on 15008"
    );
    let marker = podapp::pattern_bytes(1000, 64);
    let cleartext = |port: u16| {
        segments
            .iter()
            .filter(|s| s.dst_port == port || s.src_port == port)
            .any(|s| s.payload.windows(marker.len()).any(|w| w == marker))
    };
    assert!(
        cleartext(PORT),
        "control: passthrough bytes must be visible on the link"
    );
    assert!(
        !cleartext(15008),
        "application bytes appeared in cleartext inside HBONE"
    );

    // Each side names the other's identity.
    assert!(
        wait_for(|| !mesh2
            .log_lines_with(&[
                "HBONE connection accepted",
                &format!("peer_identity={CLIENT_ID}")
            ])
            .is_empty()),
        "{}",
        mesh2.log_text()
    );
    assert!(
        wait_for(|| mesh1
            .log_lines_with(&[
                "outbound connection closed",
                "route=hbone",
                &format!("dst_identity={SERVER_ID}")
            ])
            .len()
            == 4),
        "{}",
        mesh1.log_text()
    );
    assert!(
        wait_for(|| mesh2
            .log_lines_with(&["HBONE tunnel closed", &format!("dst={}", server.addr)])
            .len()
            == 4),
        "{}",
        mesh2.log_text()
    );
}

/// TLS + h2 to `peer`'s 15008 with `config`, then one CONNECT to `authority`.
async fn tunnel(
    config: std::sync::Arc<rustls::ClientConfig>,
    peer: SocketAddr,
    authority: &str,
) -> Result<H2Stream, String> {
    hbone_client::tunnel(config, peer, authority, &ConnectHeaders::default()).await
}

/// Reads the echo server's greeting, sends `payload`, reads it back.
async fn echo_once(
    stream: &mut H2Stream,
    greeting_read: bool,
    payload: &[u8],
) -> std::io::Result<Vec<u8>> {
    if !greeting_read {
        let mut byte = [0u8; 1];
        loop {
            stream.read_exact(&mut byte).await?;
            if byte[0] == b'\n' {
                break;
            }
        }
    }
    stream.write_all(payload).await?;
    let mut echoed = vec![0u8; payload.len()];
    stream.read_exact(&mut echoed).await?;
    Ok(echoed)
}

#[test]
fn identities_are_verified_both_ways_and_bad_connects_get_400() {
    if !privileged() {
        return;
    }
    identities_verified(false);
}

#[test]
fn over_ipv6_identities_are_verified_both_ways_and_bad_connects_get_400() {
    if !privileged() {
        return;
    }
    identities_verified(true);
}

/// [`topology`], dual-stack when `ipv6` (the server then listens on, and is called at, its
/// IPv6 address).
fn topology_in(ipv6: bool) -> (Topology, mesh_tests::Server) {
    if !ipv6 {
        let topo = topology();
        let server = topo.serve("server", PORT);
        return (topo, server);
    }
    let topo = Topology::two_nodes_dual_stack(
        vec![
            PodSpec::enrolled("client"),
            PodSpec::enrolled("neighbor"),
            PodSpec::plain("outsider"),
        ],
        vec![PodSpec::enrolled("server"), PodSpec::plain("legacy")],
    );
    let addr = SocketAddr::new(std::net::IpAddr::V6(topo.pod("server").ipv6()), PORT);
    let server = topo.serve_at("server", addr);
    (topo, server)
}

fn identities_verified(ipv6: bool) {
    let (topo, server) = topology_in(ipv6);
    // node1 believes the server runs as "impostor": its real certificate must be refused.
    let wrong_state = topo.workdir.join("wrong-state.yaml");
    topo.write_state_file(&wrong_state, |pod| (pod == "server").then_some("impostor"))
        .expect("state file");
    let wrong = wrong_state.display().to_string();
    let ca = topo.ca_dir().display().to_string();
    let mesh1 = MeshNode::start(&topo, "node1", &["--ca-dir", &ca, "--local-xds", &wrong])
        .expect("mesh-node node1");
    let mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("mesh-node node2");

    let refused = topo.connect_from("client", server.addr, 100, 1);
    assert!(
        refused.ok.is_empty(),
        "a tunnel to the wrong identity carried data: {:?}",
        refused.ok
    );
    assert!(
        wait_for(|| {
            !mesh1
            .log_lines_with(&[
                "outbound connection failed",
                &format!("peer identity {SERVER_ID} is not one of the expected identities [spiffe://cluster.local/ns/default/sa/impostor]"),
            ])
            .is_empty()
        }),
        "{}",
        mesh1.log_text()
    );

    // Foreign peers, played by the test from the non-mesh pod on node1.
    let outsider = topo.pod("outsider").netns_path();
    let peer = SocketAddr::new(server.addr.ip(), 15008);
    let authority = server.addr.to_string();
    let ca_dir = topo.ca_dir();
    let results = hbone_client::run_in(&outsider, || async {
        let no_cert = hbone_client::anonymous_config(&ca_dir, SERVER_ID).unwrap();
        let foreign = hbone_client::client_config(
            &ca_dir,
            "spiffe://evil.example/ns/default/sa/client",
            SERVER_ID,
        )
        .unwrap();
        let good = hbone_client::client_config(&ca_dir, CLIENT_ID, SERVER_ID).unwrap();
        let client = topo.pod("client");
        let client_ip: std::net::IpAddr = if ipv6 {
            client.ipv6().into()
        } else {
            client.ip.into()
        };
        let not_local = SocketAddr::new(client_ip, 8080).to_string();
        let hbone_port = SocketAddr::new(server.addr.ip(), 15008).to_string();
        let mut ok = tunnel(good.clone(), peer, &authority)
            .await
            .expect("good tunnel");
        (
            tunnel(no_cert, peer, &authority).await.err(),
            tunnel(foreign, peer, &authority).await.err(),
            tunnel(good.clone(), peer, &not_local).await.err(),
            tunnel(good.clone(), peer, &hbone_port).await.err(),
            get_request(good, peer, &authority).await,
            echo_once(&mut ok, false, b"through the tunnel").await.ok(),
        )
    })
    .expect("client thread");
    let (no_cert, foreign, not_local, hbone_port, get_status, echoed) = results;
    assert!(
        no_cert.is_some(),
        "a client without a certificate got a tunnel"
    );
    assert!(
        foreign.is_some(),
        "a client from another trust domain got a tunnel"
    );
    assert!(
        not_local
            .expect("non-local authority refused")
            .contains("with 400")
    );
    assert!(
        hbone_port
            .expect("15008 authority refused")
            .contains("with 400")
    );
    assert_eq!(get_status, Ok(400), "a GET must be answered 400");
    assert_eq!(echoed.as_deref(), Some(&b"through the tunnel"[..]));
    let log = mesh2.log_text();
    assert!(
        log.contains("HBONE connection refused")
            && log.contains("TLS handshake: peer sent no certificates"),
        "{log}"
    );
    assert!(log.contains("client identity spiffe://evil.example/ns/default/sa/client is outside trust domain cluster.local"), "{log}");
    assert!(
        log.contains("is not an address of local pod default/server"),
        "{log}"
    );
    assert!(log.contains("method GET is not CONNECT"), "{log}");
}

/// Sends a GET over an authenticated HBONE connection; returns the response status.
async fn get_request(
    config: std::sync::Arc<rustls::ClientConfig>,
    peer: SocketAddr,
    authority: &str,
) -> Result<u16, String> {
    let mut send = raw_h2(config, peer).await?;
    let request = http::Request::get(format!("http://{authority}/"))
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, _) = send
        .send_request(request, true)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

/// mTLS and a bare h2 client connection, driven in the background.
async fn raw_h2(
    config: std::sync::Arc<rustls::ClientConfig>,
    peer: SocketAddr,
) -> Result<h2::client::SendRequest<bytes::Bytes>, String> {
    let tcp = TcpStream::connect(peer).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls::pki_types::ServerName::IpAddress(peer.ip().into()),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    let (send, connection) = h2::client::handshake(tls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

#[test]
fn many_tunnels_share_few_connections_and_big_transfers_half_close_intact() {
    if !privileged() {
        return;
    }
    tunnels_pooled_and_intact(false);
}

/// The same over IPv6: tunnels to the server's IPv6 address share IPv6 HBONE connections.
#[test]
fn over_ipv6_many_tunnels_share_few_connections_and_big_transfers_half_close_intact() {
    if !privileged() {
        return;
    }
    tunnels_pooled_and_intact(true);
}

fn tunnels_pooled_and_intact(ipv6: bool) {
    let (topo, server) = topology_in(ipv6);
    let mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("mesh-node node1");
    let _mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("mesh-node node2");

    all_ok(
        &topo.connect_from("client", server.addr, 16 * 1024, 256),
        256,
    );
    let peer = format!("peer={}", SocketAddr::new(server.addr.ip(), 15008));
    let connections = mesh1
        .log_lines_with(&["HBONE connection established", &peer])
        .len();
    assert!(
        (1..=6).contains(&connections),
        "256 tunnels used {connections} HBONE connections:\n{}",
        mesh1.log_text()
    );

    // 256 MiB up and the same back; podapp half-closes after sending and the server echoes
    // until it reads EOF, so the transfer only completes if the half-close crossed the tunnel.
    let big = topo.connect_from("client", server.addr, 256 << 20, 1);
    all_ok(&big, 1);
    assert_eq!(big.ok[0].bytes, 256 << 20);
    let bytes = format!("bytes_sent={}", 256 << 20);
    assert!(wait_for(|| !mesh1
        .log_lines_with(&["outbound connection closed", "route=hbone", &bytes])
        .is_empty()));
}

#[test]
fn same_node_traffic_skips_tls_and_plaintext_from_outside_the_mesh_is_captured_inbound() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("mesh-node node1");
    let mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("mesh-node node2");
    let neighbor = topo.serve("neighbor", PORT);
    let server = topo.serve("server", PORT);

    all_ok(&topo.connect_from("client", neighbor.addr, 1 << 20, 8), 8);
    assert!(
        wait_for(|| mesh1
            .log_lines_with(&[
                "outbound connection closed",
                "route=local",
                "dst_identity=spiffe://cluster.local/ns/default/sa/neighbor"
            ])
            .len()
            == 8),
        "{}",
        mesh1.log_text()
    );
    let log = mesh1.log_text();
    assert!(
        !log.contains("HBONE connection established"),
        "same-node traffic used HBONE:\n{log}"
    );
    assert!(
        !log.contains("HBONE connection accepted"),
        "same-node traffic used HBONE:\n{log}"
    );

    // A pod outside the mesh talks plaintext to an enrolled pod on another node: node2 steers
    // it through its 15006 listener in the server's namespace.
    let plain = topo.connect_from("outsider", server.addr, 256 * 1024, 4);
    all_ok(&plain, 4);
    assert!(
        wait_for(|| mesh2
            .log_lines_with(&[
                "inbound plaintext connection closed",
                &format!("dst={}", server.addr),
                "bytes_received=262144"
            ])
            .len()
            == 4),
        "{}",
        mesh2.log_text()
    );
}

#[test]
fn garbage_stalls_and_floods_on_15008_are_refused_alone() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let mut mesh2 = MeshNode::start_hbone(&topo, "node2", &["--handshake-timeout", "1"])
        .expect("mesh-node node2");
    let server = topo.serve("server", PORT);
    let peer = SocketAddr::new(server.addr.ip(), 15008);
    let authority = server.addr.to_string();
    let ca_dir = topo.ca_dir();
    let not_local = format!("{}:8080", topo.pod("client").ip);

    let outcome = hbone_client::run_in(&topo.pod("outsider").netns_path(), || async {
        let good = hbone_client::client_config(&ca_dir, CLIENT_ID, SERVER_ID).unwrap();
        // A tunnel that must survive everything below.
        let mut survivor = tunnel(good.clone(), peer, &authority)
            .await
            .expect("first tunnel");
        assert_eq!(
            echo_once(&mut survivor, false, b"before").await.unwrap(),
            b"before"
        );

        // Garbage instead of a ClientHello: closed.
        let mut garbage = TcpStream::connect(peer).await.unwrap();
        let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        let _ = garbage.write_all(&junk).await;
        let closed_garbage = read_until_closed(&mut garbage, Duration::from_secs(10)).await;

        // A peer that connects and says nothing: dropped at the handshake timeout (1 s).
        let mut silent = TcpStream::connect(peer).await.unwrap();
        let closed_silent = read_until_closed(&mut silent, Duration::from_secs(10)).await;

        // Rapid reset: thousands of streams opened and cancelled at once.
        let mut flood = raw_h2(good.clone(), peer).await.unwrap();
        for _ in 0..5000 {
            let Ok(ready) = flood.clone().ready().await else {
                break;
            };
            flood = ready;
            let request = http::Request::builder()
                .method("CONNECT")
                .uri(not_local.as_str())
                .body(())
                .unwrap();
            match flood.send_request(request, false) {
                Ok((response, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    drop(response);
                }
                Err(_) => break,
            }
        }

        // A header block far beyond the 16 KiB limit.
        let mut big_headers = raw_h2(good.clone(), peer).await.unwrap();
        let mut request = http::Request::builder()
            .method("CONNECT")
            .uri(authority.as_str());
        for i in 0..64 {
            request = request.header(format!("x-flood-{i}"), "v".repeat(1024));
        }
        let headers_result = match big_headers.send_request(request.body(()).unwrap(), false) {
            Ok((response, _)) => {
                match tokio::time::timeout(Duration::from_secs(10), response).await {
                    Ok(Ok(response)) => Some(response.status().as_u16()),
                    _ => None,
                }
            }
            Err(_) => None,
        };

        // The survivor still works, and new tunnels are still served.
        let after = echo_once(&mut survivor, true, b"after").await.ok();
        let mut fresh = tunnel(good, peer, &authority)
            .await
            .expect("tunnel after the abuse");
        let fresh_echo = echo_once(&mut fresh, false, b"fresh").await.ok();
        (
            closed_garbage,
            closed_silent,
            headers_result,
            after,
            fresh_echo,
        )
    })
    .expect("client thread");
    let (closed_garbage, closed_silent, headers_result, after, fresh_echo) = outcome;
    assert!(closed_garbage, "a connection sending garbage was kept open");
    assert!(
        closed_silent,
        "a silent connection outlived the handshake timeout"
    );
    assert_ne!(
        headers_result,
        Some(200),
        "an oversized header block was accepted"
    );
    assert_eq!(
        after.as_deref(),
        Some(&b"after"[..]),
        "the existing tunnel was disturbed"
    );
    assert_eq!(fresh_echo.as_deref(), Some(&b"fresh"[..]));
    let log = mesh2.log_text();
    assert!(log.contains("handshake timed out"), "{log}");
    assert!(
        log.contains("TLS handshake: received corrupt message"),
        "{log}"
    );
    assert!(
        log.contains("excessive load generating behavior"),
        "rapid reset not cut off:\n{log}"
    );
    // The oversized block must have reached the server and been refused there, not merely
    // failed in the test's own client: either a 431 answer or the connection cut off while
    // decoding it (h2 cannot skip a header block half-decoded).
    assert!(
        headers_result == Some(431)
            || log.contains("unable to maintain the header compression context"),
        "oversized headers not refused by the server (client saw {headers_result:?}):\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(mesh2.is_running(), "mesh-node died:\n{log}");
}

/// Reads until EOF or error; false if the peer kept the connection open past `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// 2,000 junk connections to a pod's 15008 from outside the mesh: every one is refused and
/// counted, and the log gets a handful of lines (one per source and reason per 10 s, saying how
/// many were left out), so real lines are not pushed out.
#[test]
fn a_flood_of_junk_handshakes_is_counted_exactly_and_logged_sparingly() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("mesh-node node2");
    let peer = SocketAddr::new(topo.pod("server").ip.into(), 15008);
    const JUNK: usize = 2000;
    hbone_client::run_in(&topo.pod("outsider").netns_path(), || async move {
        let junk: Vec<u8> = (0..512u32).map(|i| (i * 7919 % 251) as u8).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..20 {
            let junk = junk.clone();
            tasks.spawn(async move {
                for _ in (worker..JUNK).step_by(20) {
                    let mut stream = TcpStream::connect(peer).await.unwrap();
                    let _ = stream.write_all(&junk).await;
                    assert!(read_until_closed(&mut stream, Duration::from_secs(10)).await);
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    })
    .expect("junk client");
    let netns = topo.node("node2").netns_path();
    let refused = || {
        mesh_tests::http_probe::total(&netns, "mesh_hbone_handshakes_refused_total", &[])
            .unwrap_or(0.0)
    };
    assert!(
        wait_for(|| refused() >= JUNK as f64),
        "refusals counted: {}",
        refused()
    );
    assert_eq!(
        refused(),
        JUNK as f64,
        "exactly one count per junk connection"
    );
    let lines = mesh2.log_lines_with(&["HBONE connection refused"]);
    assert!(
        (1..=5).contains(&lines.len()),
        "{} lines for {JUNK} junk connections:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(
        lines[0].contains("TLS handshake: received corrupt message"),
        "{}",
        lines[0]
    );
}
