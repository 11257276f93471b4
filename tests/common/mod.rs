//! Shared by the integration tests that run the daemon (daemon.rs, schemas.rs).

use std::time::Duration;

/// How much longer than natively things may take: scripts/test-arm.sh sets
/// SHELFWATCH_TEST_SLOWDOWN under qemu, where inference is ~100x slower. It stretches
/// how long a test waits, never what it checks.
pub fn patience(d: Duration) -> Duration {
    let factor: u32 = std::env::var("SHELFWATCH_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    d * factor.max(1)
}
