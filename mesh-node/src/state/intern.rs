//! One copy of each string many resources repeat: namespaces, service accounts, nodes,
//! networks, clusters, localities, canonical names, service keys. At 100,000 workloads a
//! workload's dozen short strings were most of its memory; interned, each is a 16-byte
//! pointer to a string shared with every other workload that has it.
//!
//! The table holds one reference to each string. A string no resource holds any more is
//! dropped by a sweep that runs whenever the table has doubled since the last one, so the
//! table's cost stays amortised O(1) per call and bounded by twice what is in use.
use std::{
    collections::HashSet,
    sync::{Arc, Mutex, MutexGuard},
};

/// Below this many entries a sweep is not worth it.
const MIN_SWEEP: usize = 1024;

struct Table {
    strings: HashSet<Arc<str>>,
    /// Sweep when `strings` reaches this many.
    sweep_at: usize,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

fn table() -> MutexGuard<'static, Option<Table>> {
    // The table holds no invariant a panicking holder could break half-way.
    TABLE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    let mut guard = table();
    let table = guard.get_or_insert_with(|| Table {
        strings: HashSet::new(),
        sweep_at: MIN_SWEEP,
    });
    if let Some(found) = table.strings.get(s) {
        return found.clone();
    }
    if table.strings.len() >= table.sweep_at {
        // Only the table's own reference left: nothing uses it.
        table.strings.retain(|s| Arc::strong_count(s) > 1);
        table.strings.shrink_to_fit();
        table.sweep_at = (table.strings.len() * 2).max(MIN_SWEEP);
    }
    let shared: Arc<str> = Arc::from(s);
    table.strings.insert(shared.clone());
    shared
}

/// Strings in the table (some perhaps no longer used), for tests and the memory benchmark.
pub fn len() -> usize {
    table().as_ref().map_or(0, |t| t.strings.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_allocation() {
        let a = intern("intern-test/shared");
        let b = intern(&String::from("intern-test/shared"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "intern-test/shared");
        assert!(!Arc::ptr_eq(&a, &intern("intern-test/other")));
    }

    #[test]
    fn strings_nobody_holds_are_swept() {
        let kept = intern("intern-test/kept");
        for i in 0..(MIN_SWEEP * 4) {
            drop(intern(&format!("intern-test/dropped-{i}")));
        }
        // Each sweep leaves what is held (and what other tests hold right now), so the table
        // never grows past twice that plus one sweep's worth.
        assert!(len() <= MIN_SWEEP * 2 + 64, "table holds {}", len());
        assert!(Arc::ptr_eq(&kept, &intern("intern-test/kept")));
    }
}
