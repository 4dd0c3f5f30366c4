//! Joining two byte streams: a client and its upstream, until both sides are done, an error
//! resets them, or policy revokes the connection.
use std::{future::Future, io, pin::Pin};

use tokio::io::{AsyncRead, AsyncWrite};

/// Copy buffer per direction: fewer syscalls than tokio's 8 KiB default on bulk transfers.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Resolves, with a reason, when the connection must be closed before its ends are done.
pub type Revoked = Pin<Box<dyn Future<Output = String> + Send>>;

/// How a spliced connection ended.
#[derive(Debug)]
pub enum Ended {
    /// Both directions finished: bytes copied from `a` to `b`, and from `b` to `a`.
    Closed {
        a_to_b: u64,
        b_to_a: u64,
    },
    Reset(io::Error),
    /// Closed by us, for this reason; both streams are dropped, which resets them.
    Revoked(String),
}

/// Copies both ways between `a` and `b` until both directions end, one fails, or `revoked`
/// resolves (`None`: never).
pub async fn splice<A, B>(a: &mut A, b: &mut B, revoked: Option<Revoked>) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let copy = tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER);
    let revoked = async {
        match revoked {
            Some(revoked) => revoked.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = copy => match result {
            Ok((a_to_b, b_to_a)) => Ended::Closed { a_to_b, b_to_a },
            Err(error) => Ended::Reset(error),
        },
        reason = revoked => Ended::Revoked(reason),
    }
}
