//! Double HBONE on the wire with Istio's ztunnel, through a mesh-node east-west gateway, both
//! ways, in the two-cluster topology (`mesh_tests::multicluster`) with ztunnel's test root as
//! the mesh root:
//!
//! - mesh-node's client in cluster 1 → mesh-node gateway gw2 → ztunnel (dedicated mode, in pod
//!   `zpod` of cluster 2) delivering to its pod;
//! - ztunnel in `zpod` (cluster 2, through its SOCKS5 listener) → mesh-node gateway gw1 →
//!   mesh-node on c1n2 delivering to `server1`.
//!
//! Not part of CI: it needs a ztunnel build, which the project never depends on. Build one as
//! DEVELOPERS.md (README, "Interoperability") says, then run
//! `ZTUNNEL_SRC=/path/to/ztunnel cargo test -p mesh-tests --test ztunnel_interop -- --ignored`.
use std::{fs, net::SocketAddr, path::PathBuf};

use mesh_tests::{
    control_plane::eventually,
    hbone_client,
    multicluster::{self, ECHO_HOST, MultiCluster, TARGET_PORT},
    podapp,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

fn ztunnel_src() -> PathBuf {
    PathBuf::from(
        std::env::var_os("ZTUNNEL_SRC")
            .expect("ZTUNNEL_SRC: a ztunnel checkout with out/rust/release/ztunnel"),
    )
}

/// ztunnel in dedicated mode for `zpod`, in its network namespace, on network net2.
struct Ztunnel(mesh_tests::ztunnel::Ztunnel);

impl Ztunnel {
    fn start(mc: &MultiCluster, config: &str, name: &str) -> Self {
        let dir = &mc.topo.workdir;
        let config_path = dir.join(format!("ztunnel-{name}.yaml"));
        fs::write(&config_path, config).expect("write ztunnel config");
        let log = dir.join(format!("ztunnel-{name}.log"));
        let bin = ztunnel_src().join("out/rust/release/ztunnel");
        let pod = mc.topo.pod("zpod");
        let z = mesh_tests::ztunnel::Ztunnel::spawn(
            &bin,
            &pod.netns_path(),
            &config_path,
            &[
                ("PROXY_WORKLOAD_INFO", "default/zpod/zpod"),
                ("NETWORK", "net2"),
                ("CLUSTER_ID", "cluster2"),
                ("UNSTABLE_ENABLE_SOCKS5", "true"),
                // No IP_TRANSPARENT: the replies to another cluster's client address could not
                // route back here (ztunnel relies on the CNI's routing for that).
                ("ENABLE_ORIG_SRC", "false"),
            ],
            log,
            &ztunnel_src(),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        // Ready, and its listeners (SOCKS5, 15008) accept.
        let netns = pod.netns_path();
        let ready = || {
            z.says_ready()
                && hbone_client::run_in(&netns, || async {
                    TcpStream::connect("127.0.0.1:15080").await.is_ok()
                        && TcpStream::connect(SocketAddr::from((pod.ip, 15008)))
                            .await
                            .is_ok()
                })
                .unwrap_or(false)
        };
        eventually("ztunnel to be ready", ready)
            .unwrap_or_else(|e| panic!("{e}\n{}", z.log_text()));
        Self(z)
    }

    fn log_text(&self) -> String {
        self.0.log_text()
    }
}

/// ztunnel's local state: zpod itself (an endpoint of echo when `zpod_is_endpoint`), with
/// `remote_net1` cluster 1's endpoints of echo behind gw1 and gw1 itself, and the service.
fn config(mc: &MultiCluster, zpod_is_endpoint: bool, remote_net1: bool) -> String {
    let zpod = mc.topo.pod("zpod").ip;
    let gw1 = mc.topo.link_ip("gw1");
    let services = if zpod_is_endpoint {
        format!("  services:\n    \"default/{ECHO_HOST}\":\n      80: {TARGET_PORT}\n")
    } else {
        "  services: {}\n".to_owned()
    };
    let mut yaml = format!(
        "workloads:\n- uid: cluster2//v1/Pod/default/zpod\n  name: zpod\n  workloadName: zpod\n  workloadType: deployment\n  namespace: default\n  trustDomain: cluster.local\n  serviceAccount: zpod\n  workloadIps: [\"{zpod}\"]\n  protocol: HBONE\n  network: net2\n  clusterId: cluster2\n  node: c2n1\n{services}"
    );
    if remote_net1 {
        yaml.push_str(&format!(
            "- uid: cluster1/net1/{ECHO_HOST}\n  name: echo\n  namespace: default\n  trustDomain: cluster.local\n  workloadIps: []\n  protocol: HBONE\n  network: net1\n  clusterId: cluster1\n  networkGateway:\n    destination: net1/{gw1}\n    hboneMtlsPort: 15008\n  capacity: 1\n  services:\n    \"default/{ECHO_HOST}\":\n      80: {TARGET_PORT}\n- uid: NetworkGateway/net1/{gw1}/15008\n  name: istio-eastwestgateway\n  namespace: istio-system\n  trustDomain: cluster.local\n  serviceAccount: istio-eastwestgateway\n  workloadIps: [\"{gw1}\"]\n  protocol: HBONE\n  network: net1\n  clusterId: cluster1\n  services: {{}}\n"
        ));
    }
    yaml.push_str(&format!(
        "services:\n- name: echo\n  namespace: default\n  hostname: {ECHO_HOST}\n  vips: [\"net2/10.96.0.10\"]\n  ports:\n    80: {TARGET_PORT}\n  subjectAltNames:\n  - spiffe://cluster.local/ns/default/sa/server1\n  - spiffe://cluster.local/ns/default/sa/zpod\n"
    ));
    yaml
}

#[test]
#[ignore = "needs ZTUNNEL_SRC: a local ztunnel build (see the file's header)"]
fn mesh_node_reaches_ztunnel_through_a_mesh_node_gateway() {
    let mc = MultiCluster::start_with(false, Some(&ztunnel_src().join("src/tls")));
    let _zpod_server = mc.topo.serve("zpod", TARGET_PORT);
    // Cluster 1 accepts zpod's identity for echo.
    let mut echo = multicluster::echo_service("net1");
    echo.subject_alt_names
        .push("spiffe://cluster.local/ns/default/sa/zpod".into());
    multicluster::push(&mc.c1n1, || mc.cp1.put_service(echo)).unwrap();
    let zt = Ztunnel::start(&mc, &config(&mc, true, false), "inbound");
    // Cluster 2's only endpoint of echo is zpod, behind ztunnel.
    let state = mc.state();
    let mut zpod = state.pod("zpod", "c2n1", 2, Some(ECHO_HOST));
    zpod.tunnel_protocol = mesh_node::xds::proto::workload::TunnelProtocol::Hbone as i32;
    multicluster::push(&mc.gw2, || {
        mc.cp2
            .change_workloads(vec![zpod, state.pod("server2", "c2n2", 2, None)], &[])
    })
    .unwrap();
    let run = mc.topo.connect_from("client", mc.echo(), 64 * 1024, 2);
    let served = mc.served_by(&run).unwrap_or_else(|e| {
        panic!(
            "{e:#}\n=== ztunnel\n{}\n=== gw2\n{}\n=== c1n1\n{}",
            zt.log_text(),
            mc.gw2.log_text(),
            mc.c1n1.log_text()
        )
    });
    assert_eq!(served, ["zpod"; 2], "{}", zt.log_text());
    let lines: Vec<String> = zt
        .log_text()
        .lines()
        .filter(|l| l.contains("connection complete") && l.contains("direction=\"inbound\""))
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 2, "{}", zt.log_text());
    // ztunnel took the caller from the inner TLS and, the peer being a gateway, its cluster
    // from our `baggage`.
    for field in [
        "src.identity=\"spiffe://cluster.local/ns/default/sa/client\"",
        "src.cluster=\"cluster1\"",
        "dst.hbone_addr=echo.default.svc.cluster.local:80",
    ] {
        assert!(lines[0].contains(field), "{field}: {}", lines[0]);
    }
    // ztunnel answers with its workload in `baggage`; our source names it from that.
    let src = mc
        .c1n1
        .log_lines_with(&["outbound connection closed", "route=gateway"]);
    assert_eq!(src.len(), 2, "{}", mc.c1n1.log_text());
    assert!(src[0].contains("dst_workload=zpod"), "{}", src[0]);
    let gw = mc
        .gw2
        .log_lines_with(&["gateway tunnel closed", "dst_workload=zpod"]);
    assert_eq!(gw.len(), 2, "{}", mc.gw2.log_text());
}

#[test]
#[ignore = "needs ZTUNNEL_SRC: a local ztunnel build (see the file's header)"]
fn ztunnel_reaches_mesh_node_through_a_mesh_node_gateway() {
    let mc = MultiCluster::start_with(true, Some(&ztunnel_src().join("src/tls")));
    let zt = Ztunnel::start(&mc, &config(&mc, false, true), "outbound");
    let pod = mc.topo.pod("zpod");
    let payload = podapp::pattern_bytes(0, 64 * 1024);
    let expected = payload.clone();
    // ztunnel's SOCKS5 listener stands in for the capture ztunnel would get from iptables.
    let result = hbone_client::run_in(&pod.netns_path(), || async move {
        let mut socks = TcpStream::connect("127.0.0.1:15080").await?;
        socks.write_all(&[5, 1, 0]).await?;
        let mut method = [0u8; 2];
        socks.read_exact(&mut method).await?;
        anyhow::ensure!(method == [5, 0], "SOCKS5 method {method:?}");
        socks.write_all(&[5, 1, 0, 1, 10, 96, 0, 10, 0, 80]).await?;
        let mut reply = [0u8; 10];
        socks.read_exact(&mut reply).await?;
        anyhow::ensure!(reply[1] == 0, "SOCKS5 reply {reply:?}");
        let mut reader = BufReader::new(socks);
        let mut greeting = String::new();
        reader.read_line(&mut greeting).await?;
        // The server's own address: which pod answered.
        let server_saw: SocketAddr = greeting
            .split_whitespace()
            .find_map(|word| word.strip_prefix("local="))
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("greeting {greeting:?}"))?;
        let mut socks = reader.into_inner();
        socks.write_all(&payload).await?;
        let mut echoed = vec![0u8; payload.len()];
        socks.read_exact(&mut echoed).await?;
        anyhow::ensure!(echoed == expected, "echo differs");
        anyhow::Ok(server_saw)
    })
    .expect("run the SOCKS5 client");
    let server_saw = result.unwrap_or_else(|e| {
        panic!(
            "{e:#}\n=== ztunnel\n{}\n=== gw1\n{}\n=== c1n2\n{}",
            zt.log_text(),
            mc.gw1.log_text(),
            mc.c1n2.log_text()
        )
    });
    assert_eq!(
        server_saw.ip(),
        std::net::IpAddr::V4(mc.topo.pod("server1").ip)
    );
    // ztunnel ends the outer stream with RST_STREAM (CANCEL) once its inner connection is
    // done (it drops the stream rather than finishing it), so the gateway may log the hop as
    // reset after every byte went through: the count is what matters here.
    let gw = mc
        .gw1
        .log_lines_with(&["gateway tunnel", "reporter=destination"]);
    assert_eq!(gw.len(), 1, "{}\n{}", mc.gw1.log_text(), zt.log_text());
    assert!(
        gw[0].contains("src_identity=spiffe://cluster.local/ns/default/sa/zpod"),
        "{}",
        gw[0]
    );
    let dst = mc.c1n2.log_lines_with(&["HBONE tunnel closed"]);
    assert_eq!(dst.len(), 1, "{}", mc.c1n2.log_text());
    for field in [
        "src_identity=spiffe://cluster.local/ns/default/sa/zpod",
        "src_workload=zpod",
        "dst_workload=server1",
        "result=closed",
    ] {
        assert!(dst[0].contains(field), "{field}: {}", dst[0]);
    }
}
