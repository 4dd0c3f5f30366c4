//! A packet capture on one interface of a test namespace (AF_PACKET), to check what crosses the
//! wire between nodes.
use std::{
    fs::File,
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};

use anyhow::{Context, Result, bail};

/// One captured TCP segment, over IPv4 or IPv6.
#[derive(Debug, Clone)]
pub struct Segment {
    pub ipv6: bool,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

/// Captures until [`Sniffer::stop`].
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Segment>>,
}

const ETH_P_ALL: u16 = 0x0003;

impl Sniffer {
    /// Starts capturing every frame on `interface` inside network namespace `netns` (a name
    /// under /run/netns).
    pub fn start(netns: &str, interface: &str) -> Result<Self> {
        let ns = File::open(Path::new("/run/netns").join(netns))
            .with_context(|| format!("open netns {netns}"))?;
        let interface = std::ffi::CString::new(interface)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let thread_stop = stop.clone();
        let thread = std::thread::spawn(move || {
            let fd = match open_socket(&ns, &interface) {
                Ok(fd) => {
                    let _ = ready_tx.send(Ok(()));
                    fd
                }
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    return Vec::new();
                }
            };
            let mut segments = Vec::new();
            let mut frame = vec![0u8; 256 * 1024];
            while !thread_stop.load(Ordering::Acquire) {
                // SAFETY: `frame` is a live buffer of the length passed.
                let n = unsafe { libc::recv(fd, frame.as_mut_ptr().cast(), frame.len(), 0) };
                if n > 0
                    && let Some(segment) = parse(&frame[..n as usize])
                {
                    segments.push(segment);
                }
            }
            // SAFETY: the descriptor is ours and closed once.
            unsafe { libc::close(fd) };
            segments
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { stop, thread }),
            Ok(Err(error)) => bail!("packet capture: {error}"),
            Err(_) => bail!("packet capture thread died"),
        }
    }

    /// Stops capturing and returns the TCP segments seen.
    pub fn stop(self) -> Vec<Segment> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}

/// On the calling (dedicated) thread: enter `ns`, open a raw packet socket bound to `interface`
/// with a 100 ms receive timeout and a large buffer.
fn open_socket(ns: &File, interface: &std::ffi::CStr) -> Result<i32, String> {
    let os_error = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain syscalls on descriptors owned here; pointers reference live locals.
    unsafe {
        if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            return Err(os_error("setns"));
        }
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ALL.to_be()),
        );
        if fd < 0 {
            return Err(os_error("socket(AF_PACKET)"));
        }
        let index = libc::if_nametoindex(interface.as_ptr());
        if index == 0 {
            return Err(os_error("if_nametoindex"));
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = index as i32;
        if libc::bind(
            fd,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            return Err(os_error("bind"));
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let buffer: libc::c_int = 64 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const buffer).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
        Ok(fd)
    }
}

/// Ethernet → IPv4 or IPv6 (no extension headers) → TCP; anything else is skipped.
fn parse(frame: &[u8]) -> Option<Segment> {
    let ip = frame.get(14..)?;
    let (ipv6, tcp) = match frame.get(12..14)? {
        [0x08, 0x00] => {
            if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
                return None;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
            (false, ip.get(ihl..total)?)
        }
        [0x86, 0xdd] => {
            if ip.len() < 40 || ip[0] >> 4 != 6 || ip[6] != 6 {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            (true, ip.get(40..(40 + payload).min(ip.len()))?)
        }
        _ => return None,
    };
    if tcp.len() < 20 {
        return None;
    }
    let offset = usize::from(tcp[12] >> 4) * 4;
    Some(Segment {
        ipv6,
        src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        payload: tcp.get(offset..)?.to_vec(),
    })
}
