//! Giving memory back after a load peak.
//!
//! glibc's allocator returns freed memory to the kernel only from the top of each arena; what
//! thousands of connections freed in the middle (buffers, TLS and h2 state, tasks) stays
//! resident, so a node proxy that once carried a peak keeps its peak footprint: measured, 5,000
//! cross-node connections left both mesh-nodes at their peak 60 s after the last closed. A
//! background task on the control runtime watches how much freed memory the allocator holds,
//! and when a good deal more than at its last look has piled up, asks it to give the free pages
//! back (`malloc_trim`). The check is cheap (`mallinfo2`) and runs every [`CHECK_EVERY`]; a trim
//! happens only after a peak, not on a steady load.
use std::time::Duration;

/// How often the allocator's free memory is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);
/// Free memory held that is worth a trim: the trim itself walks every arena under its lock.
const WORTH_TRIMMING: usize = 8 << 20;

/// Freed memory that must pile up again before another trim.
const STEP: usize = 4 << 20;

/// Runs until the process ends.
pub async fn give_back_after_peaks() {
    // Free memory stays counted as free after a trim (its pages are returned, the chunks are
    // kept): what counts is how much more has been freed since, measured from the lowest
    // figure seen (memory taken again in between is not freed).
    let mut baseline = 0usize;
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        check(&mut baseline);
    }
}

/// One look of [`give_back_after_peaks`]: trims when enough more freed memory than
/// `baseline` has piled up (also what `cargo xtask bench xds` does once after a push, to
/// report what a running mesh-node keeps of it).
pub fn check(baseline: &mut usize) {
    let free = allocator_free_bytes();
    *baseline = (*baseline).min(free);
    if free >= WORTH_TRIMMING && free - *baseline >= STEP {
        let released = trim();
        *baseline = allocator_free_bytes();
        tracing::debug!(
            free_mib = free >> 20,
            released,
            "freed memory given back to the kernel after a load peak"
        );
    }
}

/// Gives back what starting left freed. Loading and verifying the eBPF objects, enrolling the
/// pods and taking the first state allocate far more than an idle node keeps: measured on an
/// idle mesh-node, 3.0 MB of its 3.7 MB heap were free chunks, below [`WORTH_TRIMMING`], so the
/// periodic check never gave them back; one trim took its anonymous memory from 3.7 to 1.8 MiB.
pub fn trim_after_startup() {
    let free = allocator_free_bytes();
    let released = trim();
    tracing::debug!(
        free_kib = free >> 10,
        released,
        "start-up leftovers given back to the kernel"
    );
}

/// Bytes the allocator holds free (in all arenas).
pub fn allocator_free_bytes() -> usize {
    usage().free
}

/// Bytes the allocator has handed out and not had back (all arenas and mmapped blocks).
pub fn allocated_bytes() -> usize {
    usage().allocated
}

struct Usage {
    allocated: usize,
    free: usize,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn usage() -> Usage {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    Usage {
        allocated: info.uordblks + info.hblkhd,
        free: info.fordblks,
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn usage() -> Usage {
    Usage {
        allocated: 0,
        free: 0,
    }
}

/// Returns free pages of every arena to the kernel; whether any were.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> bool {
    // SAFETY: malloc_trim is safe to call at any time from any thread.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many small blocks freed in the middle of the heap are counted as free and can be given
    /// back.
    #[test]
    fn freed_blocks_are_counted_and_trimmed() {
        let blocks: Vec<Vec<u8>> = (0..20_000).map(|i| vec![i as u8; 2048]).collect();
        let keep: Vec<Vec<u8>> = (0..100).map(|_| vec![1u8; 64]).collect();
        drop(blocks);
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(
                allocator_free_bytes() >= 16 << 20,
                "{}",
                allocator_free_bytes()
            );
            trim();
        }
        drop(keep);
    }
}
