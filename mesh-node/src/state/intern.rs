//! One copy of each string many resources repeat: namespaces, service accounts, nodes,
//! networks, clusters, localities, canonical names, service keys; and of each locality and
//! port list. At 100,000 workloads a
//! workload's dozen short strings were most of its memory; interned, each is a 16-byte
//! pointer to a string shared with every other workload that has it.
//!
//! The table holds one reference to each string. A string no resource holds any more is
//! dropped by a sweep that runs whenever the table has doubled since the last one, so the
//! table's cost stays amortised O(1) per call and bounded by twice what is in use.
use std::{
    collections::HashSet,
    hash::Hash,
    sync::{Arc, Mutex},
};

use super::{Locality, PortMapping};

/// Below this many entries a sweep is not worth it.
const MIN_SWEEP: usize = 1024;

/// One table of shared values of one type.
struct Interner<T: ?Sized>(Mutex<Option<Table<T>>>);

struct Table<T: ?Sized> {
    values: HashSet<Arc<T>>,
    /// Sweep when `values` reaches this many.
    sweep_at: usize,
}

impl<T: ?Sized + Eq + Hash> Interner<T> {
    const fn new() -> Self {
        Self(Mutex::new(None))
    }

    fn get(&self, value: &T, make: impl FnOnce(&T) -> Arc<T>) -> Arc<T> {
        // The table holds no invariant a panicking holder could break half-way.
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let table = guard.get_or_insert_with(|| Table {
            values: HashSet::new(),
            sweep_at: MIN_SWEEP,
        });
        if let Some(found) = table.values.get(value) {
            return found.clone();
        }
        if table.values.len() >= table.sweep_at {
            // Only the table's own reference left: nothing uses it.
            table.values.retain(|v| Arc::strong_count(v) > 1);
            table.values.shrink_to_fit();
            table.sweep_at = (table.values.len() * 2).max(MIN_SWEEP);
        }
        let shared = make(value);
        table.values.insert(shared.clone());
        shared
    }

    fn len(&self) -> usize {
        let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map_or(0, |t| t.values.len())
    }
}

static STRINGS: Interner<str> = Interner::new();
static PORTS: Interner<[PortMapping]> = Interner::new();
static LOCALITIES: Interner<Locality> = Interner::new();

/// The shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    STRINGS.get(s, |s| Arc::from(s))
}

/// The shared copy of a port list: most workloads of a service serve the same ports.
pub fn ports(ports: &[PortMapping]) -> Arc<[PortMapping]> {
    PORTS.get(ports, |p| Arc::from(p))
}

/// The shared copy of a locality: a cluster has a handful.
pub fn locality(locality: Locality) -> Arc<Locality> {
    LOCALITIES.get(&locality, |l| Arc::new(l.clone()))
}

/// Strings in the table (some perhaps no longer used), for tests and the memory benchmark.
pub fn len() -> usize {
    STRINGS.len()
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
    fn port_lists_and_localities_are_shared() {
        let http = [PortMapping {
            service_port: 80,
            target_port: 8080,
        }];
        assert!(Arc::ptr_eq(&ports(&http), &ports(&http.clone())));
        assert!(!Arc::ptr_eq(&ports(&http), &ports(&[])));
        let zone = |z: &str| Locality {
            region: intern("intern-test-region"),
            zone: intern(z),
            subzone: intern(""),
        };
        assert!(Arc::ptr_eq(&locality(zone("a")), &locality(zone("a"))));
        assert!(!Arc::ptr_eq(&locality(zone("a")), &locality(zone("b"))));
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
