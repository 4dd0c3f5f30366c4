//! Policy routing in a pod's network namespace that lets mesh-node connect to the application
//! from the client's address (original source) and still get the replies.
//!
//! mesh-node's socket is bound to the client's address (`IP_TRANSPARENT`) and carries
//! [`DELIVERY_MARK`]. The application's socket accepted from it inherits that mark
//! (`net.ipv4.tcp_fwmark_accept`, per namespace, both families), and a rule sends marked
//! packets to [`DELIVERY_TABLE`], whose one route, `local default dev lo`, makes every address
//! local: the replies loop back to mesh-node's socket instead of leaving the pod. Nothing else
//! in the pod carries the mark, so nothing else changes. This is the routing half of what
//! ztunnel sets up with iptables (CONNMARK plus a table); no iptables here.
//!
//! What is installed stays when the pod is un-enrolled: connections delivered from a client's
//! address may outlive the enrollment and still need it, it affects marked sockets only, and a
//! later enrollment finds it in place.
use std::{fs, io, path::Path};

use mesh_common::{DELIVERY_MARK, DELIVERY_RULE_PRIORITY, DELIVERY_TABLE};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleHeader, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::{netns::NetNs, pod::OriginalSource};

/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SourceRoutingError {
    #[error("enter the pod's network namespace: {0}")]
    NetNs(#[from] crate::netns::NetNsError),
    #[error("{what}: {io_error}")]
    Io {
        what: &'static str,
        io_error: io::Error,
    },
}

/// The sysctl, relative to a procfs mount.
const FWMARK_ACCEPT: &str = "sys/net/ipv4/tcp_fwmark_accept";

/// Installs the mark's rule and table in `netns` for the families in `families` (and turns on
/// `tcp_fwmark_accept`). Idempotent. A family the namespace cannot route (IPv6 disabled) is
/// left out of the answer with a warning; failing IPv4 is an error.
///
/// The sysctl is written through `/proc`, or, where that is read-only (a container's, whose
/// runtime remounts `/proc/sys` read-only), through the host's procfs at `host_proc`: either
/// way `/proc/sys/net` resolves to the namespace of the thread writing it.
pub fn install(
    netns: &NetNs,
    pod: &str,
    families: OriginalSource,
    host_proc: &Path,
) -> Result<OriginalSource, SourceRoutingError> {
    netns.run(|| {
        let io = |what| move |io_error| SourceRoutingError::Io { what, io_error };
        let own = fs::write(Path::new("/proc").join(FWMARK_ACCEPT), "1");
        match own {
            Err(_) if host_proc != Path::new("/proc") => {
                fs::write(host_proc.join(FWMARK_ACCEPT), "1")
            }
            other => other,
        }
        .map_err(io("set net.ipv4.tcp_fwmark_accept"))?;
        let mut socket = Netlink::open().map_err(io("open a route netlink socket"))?;
        let mut done = OriginalSource::default();
        if families.ipv4 {
            socket
                .install(AddressFamily::Inet)
                .map_err(io("install the IPv4 delivery rule and table"))?;
            done.ipv4 = true;
        }
        if families.ipv6 {
            match socket.install(AddressFamily::Inet6) {
                Ok(()) => done.ipv6 = true,
                Err(error) => tracing::warn!(
                    pod,
                    %error,
                    "IPv6 clients' addresses cannot be kept for this pod (delivery rule and table)"
                ),
            }
        }
        Ok(done)
    })?
}

/// A route netlink socket in the namespace of the thread that opened it.
struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// `ip rule add fwmark DELIVERY_MARK lookup DELIVERY_TABLE pref DELIVERY_RULE_PRIORITY` and
    /// `ip route add local default dev lo table DELIVERY_TABLE`, for `family`; either one
    /// already there is fine.
    fn install(&mut self, family: AddressFamily) -> io::Result<()> {
        let mut rule = RuleMessage::default();
        rule.header = RuleHeader {
            family,
            action: RuleAction::ToTable,
            ..Default::default()
        };
        rule.attributes = vec![
            RuleAttribute::FwMark(DELIVERY_MARK),
            RuleAttribute::FwMask(u32::MAX),
            RuleAttribute::Table(DELIVERY_TABLE),
            RuleAttribute::Priority(DELIVERY_RULE_PRIORITY),
        ];
        self.create(RouteNetlinkMessage::NewRule(rule))?;

        let mut route = RouteMessage::default();
        route.header = RouteHeader {
            address_family: family,
            table: RouteHeader::RT_TABLE_UNSPEC,
            protocol: RouteProtocol::Static,
            scope: RouteScope::Host,
            kind: RouteType::Local,
            ..Default::default()
        };
        route.attributes = vec![
            RouteAttribute::Table(DELIVERY_TABLE),
            RouteAttribute::Oif(LOOPBACK_IFINDEX),
        ];
        self.create(RouteNetlinkMessage::NewRoute(route))
    }

    /// Sends a create request and waits for its acknowledgement; `EEXIST` counts as done.
    fn create(&mut self, message: RouteNetlinkMessage) -> io::Result<()> {
        self.sequence += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::from(message));
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let mut answer = vec![0; 8192];
        loop {
            let len = self.socket.recv(&mut &mut answer[..], 0)?;
            let mut offset = 0;
            while offset < len {
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[offset..len])
                        .map_err(|error| {
                            io::Error::new(io::ErrorKind::InvalidData, error.to_string())
                        })?;
                let reply_len = reply.header.length as usize;
                if reply.header.sequence_number == self.sequence
                    && let NetlinkPayload::Error(error) = reply.payload
                {
                    return match error.code {
                        None => Ok(()),
                        Some(code) if -code.get() == libc::EEXIST => Ok(()),
                        Some(_) => Err(error.to_io()),
                    };
                }
                if reply_len == 0 {
                    break;
                }
                offset += reply_len;
            }
        }
    }
}
