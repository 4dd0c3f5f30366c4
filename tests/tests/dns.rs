//! DNS for mesh names on a real kernel: enrolled pods' queries to their resolver (the
//! harness's DNS server on node1, as kube-dns would be) are captured by the cgroup hooks into
//! mesh-node's per-pod DNS proxy, which answers mesh service names from the mesh state and
//! forwards the rest. Assertions are on what the pod's resolver library sees (the answer, where
//! it seems to come from) and on what the real resolver received.
use std::{
    net::{IpAddr, SocketAddr},
    process::Stdio,
    thread,
    time::Duration,
};

use mesh_tests::{
    MeshNode, PodSpec, Topology,
    dns_server::{BIG_NAME, DnsServer, SILENT_NAME},
    podapp, privileged, wait_for,
};

const ECHO: &str = "echo.default.svc.cluster.local";
const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:10:96::10";
const PORT: u16 = 8080;

/// node1: `client`, `neighbor` (enrolled), `optout` (enrolled, DNS not captured), `outsider`
/// (not enrolled); node2: `server`, the endpoint of the service echo (80 → 8080).
fn topology() -> Topology {
    Topology::two_nodes(
        vec![
            PodSpec::enrolled("client"),
            PodSpec::enrolled("neighbor"),
            PodSpec::enrolled("optout").without_dns_capture(),
            PodSpec::plain("outsider"),
        ],
        vec![PodSpec::enrolled("server")],
    )
}

/// The topology's state file plus the dual-stack service echo with `server` as its endpoint.
fn write_state(topo: &Topology) {
    let path = topo.state_file();
    topo.write_state_file(&path, |_| None).expect("state file");
    let mut yaml = std::fs::read_to_string(&path).expect("read state");
    yaml = yaml.replace(
        "  - name: server\n",
        "  - name: server\n    services: {default/echo.default.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]}\n",
    );
    yaml.push_str(&format!(
        "services:\n  - name: echo\n    namespace: default\n    hostname: {ECHO}\n    addresses: [{VIP4}, \"{VIP6}\"]\n    ports: [{{servicePort: 80, targetPort: 8080}}]\n"
    ));
    std::fs::write(&path, yaml).expect("write state");
}

fn resolve(
    topo: &Topology,
    pod: &str,
    server: SocketAddr,
    name: &str,
    qtype: &str,
    mode: &str,
) -> podapp::Resolved {
    let p = topo.pod(pod);
    podapp::resolve(&p.netns_path(), &p.cgroup, server, name, qtype, mode)
        .unwrap_or_else(|error| panic!("{pod}: {error:#}"))
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().expect("ip")).collect()
}

#[test]
fn mesh_names_are_answered_from_the_state_and_other_names_forwarded() {
    if !privileged() {
        return;
    }
    let topo = topology();
    write_state(&topo);
    let resolver = DnsServer::start(
        &topo.node("node1").netns_path(),
        IpAddr::V4(topo.link_ip("node1")),
    )
    .expect("DNS server");
    resolver.add("www.example.org", &ips(&["192.0.2.80"]));
    let upstream = resolver.addr;
    let mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("node1");
    let _mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("node2");
    let _server = topo.serve("server", PORT);

    // The service by its hostname, A and AAAA, over connected and unconnected UDP and over
    // TCP; the answer seems to come from the resolver asked, which never saw the query.
    for mode in ["connected", "unconnected", "tcp"] {
        let a = resolve(&topo, "client", upstream, ECHO, "A", mode);
        assert_eq!(
            (a.rcode.as_str(), a.ips.clone()),
            ("NOERROR", ips(&[VIP4])),
            "{mode}: {a:?}"
        );
        assert_eq!(
            a.from, upstream,
            "{mode}: the reply's source is the resolver"
        );
        assert_eq!(a.peer, upstream, "{mode}: getpeername is the resolver");
    }
    // The same resolver addressed from a dual-stack socket (IPv4-mapped, as Go and Java do):
    // connect6 / sendmsg6 / recvmsg6 and DNS over TCP through connect6.
    let mapped = match upstream {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    };
    for mode in ["connected", "unconnected", "tcp"] {
        let a = resolve(&topo, "client", mapped, ECHO, "A", mode);
        assert_eq!(a.ips, ips(&[VIP4]), "mapped {mode}: {a:?}");
        assert_eq!((a.from, a.peer), (mapped, mapped), "mapped {mode}");
    }
    let aaaa = resolve(&topo, "client", upstream, ECHO, "AAAA", "connected");
    assert_eq!(aaaa.ips, ips(&[VIP6]));
    // Short and search-domain forms, as a pod's resolver sends them.
    for name in [
        "echo",
        "echo.default",
        "echo.default.svc",
        "echo.default.default.svc.cluster.local",
    ] {
        let a = resolve(&topo, "client", upstream, name, "A", "connected");
        assert_eq!(a.ips, ips(&[VIP4]), "{name}: {a:?}");
    }
    assert!(resolver.seen_for(ECHO).is_empty(), "{:?}", resolver.seen());
    assert!(resolver.seen_for("echo").is_empty());

    // Another name is forwarded to the resolver the pod asked, from the pod's own address,
    // and the answer relayed.
    let www = resolve(
        &topo,
        "client",
        upstream,
        "www.example.org",
        "A",
        "connected",
    );
    assert_eq!(www.ips, ips(&["192.0.2.80"]));
    let seen = resolver.seen_for("www.example.org");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].from.ip(), IpAddr::V4(topo.pod("client").ip));
    let missing = resolve(
        &topo,
        "client",
        upstream,
        "nothing.example.org",
        "A",
        "connected",
    );
    assert_eq!(missing.rcode, "NXDOMAIN");

    // A resolver that never answers: SERVFAIL once the proxy's 5 s are up (before the
    // client's own patience would end).
    let silent = resolve(&topo, "client", upstream, SILENT_NAME, "A", "connected");
    assert_eq!(silent.rcode, "SERVFAIL", "{silent:?}");
    // Over TCP the resolver closes the connection without an answer: SERVFAIL at once.
    let closed = resolve(&topo, "client", upstream, SILENT_NAME, "A", "tcp");
    assert_eq!(closed.rcode, "SERVFAIL", "{closed:?}");

    // A large answer: truncated over UDP, then asked and relayed over TCP.
    let big = resolve(&topo, "client", upstream, BIG_NAME, "A", "auto");
    assert_eq!(big.transport, "tcp");
    assert_eq!(big.ips.len(), 40, "{big:?}");
    assert!(
        resolver
            .seen_for(BIG_NAME)
            .iter()
            .any(|s| s.tcp && s.from.ip() == IpAddr::V4(topo.pod("client").ip))
    );

    // Resolved by name, reached by the VIP it resolved to: through HBONE to the endpoint.
    let vip = SocketAddr::new(
        resolve(&topo, "client", upstream, "echo", "A", "connected").ips[0],
        80,
    );
    let run = topo.connect_from("client", vip, 4096, 1);
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    assert!(wait_for(|| !mesh1
        .log_lines_with(&[
            "outbound connection closed",
            "route=hbone",
            &format!("dst_service={ECHO}")
        ])
        .is_empty()));

    // Opted out, and not enrolled: the real resolver answers (it does not know echo).
    for pod in ["optout", "outsider"] {
        let a = resolve(&topo, pod, upstream, ECHO, "A", "connected");
        assert_eq!(a.rcode, "NXDOMAIN", "{pod}: {a:?}");
        assert!(
            resolver
                .seen_for(ECHO)
                .iter()
                .any(|s| s.from.ip() == IpAddr::V4(topo.pod(pod).ip))
        );
    }

    // A flood of malformed queries from one pod: FORMERR where a header can be read, nothing
    // otherwise; its neighbour resolves meanwhile, and so does the flooder afterwards.
    let client = topo.pod("client");
    let (mut flood, _files) = podapp::command_in(
        &client.netns_path(),
        &client.cgroup,
        &[
            "dnsflood".to_owned(),
            upstream.to_string(),
            "20000".to_owned(),
        ],
    )
    .expect("podapp dnsflood");
    let flood = flood.stdout(Stdio::piped()).spawn().expect("spawn flood");
    for _ in 0..5 {
        let a = resolve(&topo, "neighbor", upstream, ECHO, "A", "connected");
        assert_eq!(a.ips, ips(&[VIP4]));
    }
    let out = podapp::wait_with_timeout(flood, Duration::from_secs(60)).expect("flood");
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let replies: usize = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("replies="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("flood: {line}"));
    assert!(replies > 0, "FORMERR answers: {line}");
    assert!(
        replies <= 10000,
        "no answer to datagrams without a header: {line}"
    );
    assert_eq!(
        resolve(&topo, "client", upstream, ECHO, "A", "connected").ips,
        ips(&[VIP4])
    );
    assert!(
        resolver.seen().len() < 100,
        "the flood did not reach the resolver"
    );

    // The proxy's account: answers, forwards, FORMERRs and drops counted; `mesh-node bpf pods`
    // shows which pods have DNS captured.
    let netns = topo.node("node1").netns_path();
    let count = |result: &str| {
        mesh_tests::http_probe::total(
            &netns,
            "mesh_dns_requests_total",
            &[&format!("result=\"{result}\"")],
        )
        .unwrap_or(0.0)
    };
    // 3 transports twice (IPv4, mapped), AAAA, 4 short forms, the name connected to, 5 from
    // the neighbour, 1 after the flood.
    assert_eq!(count("answered"), 18.0);
    assert!(
        count("forwarded") >= 3.0,
        "forwarded {}",
        count("forwarded")
    );
    assert!(count("formerr") >= 1.0 && count("dropped") >= 1.0);
    assert_eq!(
        count("servfail"),
        2.0,
        "the silent resolver, over UDP and TCP"
    );
    let pods = std::process::Command::new(mesh_tests::meshnode::binary())
        .args(["bpf", "--bpffs"])
        .arg(&topo.node("node1").bpffs)
        .args(["pods", "--output", "json"])
        .output()
        .expect("mesh-node bpf pods");
    let pods: serde_json::Value = serde_json::from_slice(&pods.stdout).expect("JSON");
    let dns_of = |pod: &str| {
        pods.as_array()
            .expect("list")
            .iter()
            .find(|p| p["pod"] == format!("default/{pod}"))
            .map(|p| p["listeners"].to_string().contains("15053"))
    };
    assert_eq!(dns_of("client"), Some(true), "{pods:#}");
    assert_eq!(dns_of("optout"), Some(false), "{pods:#}");

    // mesh-node gone: queries reach the resolver (fail-open for DNS).
    drop(mesh1);
    thread::sleep(Duration::from_millis(200));
    let www = resolve(
        &topo,
        "client",
        upstream,
        "www.example.org",
        "A",
        "connected",
    );
    assert_eq!(www.ips, ips(&["192.0.2.80"]));
    let direct = resolve(&topo, "client", upstream, ECHO, "A", "connected");
    assert_eq!(direct.rcode, "NXDOMAIN", "the real resolver answered");
}

/// A resolver with a native IPv6 address (a dual-stack cluster's kube-dns): queries to it are
/// captured into the pod's DNS proxy on `[::1]:15053` over UDP (connected and not) and TCP,
/// mesh names answered, the rest forwarded from the pod's own IPv6 address.
#[test]
fn a_resolver_with_an_ipv6_address_is_captured_too() {
    if !privileged() {
        return;
    }
    let topo = Topology::two_nodes_dual_stack(
        vec![PodSpec::enrolled("client")],
        vec![PodSpec::enrolled("server")],
    );
    write_state(&topo);
    let resolver = DnsServer::start(
        &topo.node("node1").netns_path(),
        "fd00:19::1".parse().expect("node1's IPv6 link address"),
    )
    .expect("DNS server");
    resolver.add("www.example.org", &ips(&["2001:db8::80"]));
    let upstream = resolver.addr;
    let _mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("node1");
    for mode in ["connected", "unconnected", "tcp"] {
        let aaaa = resolve(&topo, "client", upstream, ECHO, "AAAA", mode);
        assert_eq!(
            (aaaa.rcode.as_str(), aaaa.ips.clone()),
            ("NOERROR", ips(&[VIP6])),
            "{mode}: {aaaa:?}"
        );
        assert_eq!((aaaa.from, aaaa.peer), (upstream, upstream), "{mode}");
        let a = resolve(&topo, "client", upstream, ECHO, "A", mode);
        assert_eq!(a.ips, ips(&[VIP4]), "{mode}: {a:?}");
    }
    assert!(resolver.seen_for(ECHO).is_empty(), "{:?}", resolver.seen());
    let www = resolve(
        &topo,
        "client",
        upstream,
        "www.example.org",
        "AAAA",
        "connected",
    );
    assert_eq!(www.ips, ips(&["2001:db8::80"]), "{www:?}");
    let seen = resolver.seen_for("www.example.org");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].from.ip(), IpAddr::V6(topo.pod("client").ipv6()));
}
