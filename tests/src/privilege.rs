//! Integration tests need root (BPF, namespaces, cgroups). Unprivileged runs skip them with a
//! clear message; with `MESH_REQUIRE_PRIVILEGED=1` (set by `cargo xtask test`, hence CI) a
//! missing privilege is a failure, so CI can never pass by skipping.

/// The variable that turns a skip into a failure.
pub const REQUIRE_ENV: &str = "MESH_REQUIRE_PRIVILEGED";

/// True when the test may run; false (after saying so) when it must skip.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but the test is not running as root: privileged tests cannot run");
    }
    eprintln!(
        "SKIPPED: needs root for network namespaces, cgroups and BPF (run `cargo xtask test` as root)"
    );
    false
}
