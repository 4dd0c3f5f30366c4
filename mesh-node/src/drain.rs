//! The process-wide drain signal: once started (SIGTERM, `POST /drain`), listeners close,
//! HBONE connections are told GOAWAY, and open connections may finish until the deadline.
use std::sync::Arc;

use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct Drain {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Starts draining; true the first time.
    pub fn start(&self) -> bool {
        !self.tx.send_replace(true)
    }

    pub fn is_draining(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once draining has started.
    pub async fn started(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_once_and_wakes_waiters() {
        let drain = Drain::new();
        assert!(!drain.is_draining());
        let waiter = {
            let drain = drain.clone();
            tokio::spawn(async move { drain.started().await })
        };
        assert!(drain.start());
        assert!(!drain.start(), "only the first start counts");
        waiter.await.unwrap();
        assert!(drain.is_draining());
    }
}
