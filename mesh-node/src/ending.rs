//! How the sockets mesh-node holds for applications end. A broken connection must look broken:
//! an application that only reads (a download, a replica, a log shipper) must never take a
//! cut-off transfer for a complete one.
//!
//! So every such socket (the application's connection to a capture listener, and each
//! connection mesh-node makes into a pod or to a passthrough destination) is *armed* from the
//! start: `SO_LINGER` 0, under which closing it sends a reset. Whatever ends the connection
//! other than a clean end — an error on the other side, a reset tunnel, a policy revocation, a
//! refusal, a panic, mesh-node exiting or being killed (the kernel then closes its sockets the
//! same way) — the application reads `ECONNRESET`. Only once both directions have ended with
//! an end of stream passed on is the socket *disarmed* and closed normally. Linger does not
//! affect `shutdown(SHUT_WR)`, so half-close works as before.
use std::time::Duration;

use tokio::net::TcpStream;

use crate::splice::Ended;

/// Makes closing `socket` send a reset (until [`disarm`]).
pub fn arm(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// Makes closing `socket` an orderly close again.
pub fn disarm(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(None);
}

/// After a relay: a clean end closes `sockets` normally; any other leaves them armed, so
/// dropping them resets both applications.
pub fn settle(ended: &Ended, sockets: &[&TcpStream]) {
    if ended.is_clean() {
        sockets.iter().for_each(|s| disarm(s));
    } else {
        sockets.iter().for_each(|s| arm(s));
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        (app, ours)
    }

    /// An armed socket dropped mid-transfer resets the application, after the bytes already
    /// delivered; a disarmed one ends with an orderly end of stream; half-close still works
    /// while armed.
    #[tokio::test]
    async fn an_armed_socket_resets_and_a_disarmed_one_closes() {
        let (mut app, mut ours) = pair().await;
        arm(&ours);
        ours.write_all(b"partial").await.unwrap();
        drop(ours);
        let mut got = [0u8; 7];
        app.read_exact(&mut got).await.unwrap();
        let error = app.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ConnectionReset);

        let (mut app, mut ours) = pair().await;
        arm(&ours);
        ours.write_all(b"all of it").await.unwrap();
        ours.shutdown().await.unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"all of it", "half-close while armed");
        app.shutdown().await.unwrap();
        let mut eof = [0u8; 1];
        assert_eq!(ours.read(&mut eof).await.unwrap(), 0);
        disarm(&ours);
        drop(ours);
        assert_eq!(app.read(&mut eof).await.unwrap(), 0, "orderly close");
    }
}
