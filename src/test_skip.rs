//! Tests that cannot run on this machine: a skip is recorded, never passed off as a pass.
//!
//! A test whose capability is missing (a CPU feature, a privilege) calls [`can_run`]. The
//! skip is written to the suite folder (`KDPIPE_SUITE_DIR`, which `scripts/test.sh` sets
//! and prints after the run) and the test *fails* unless `KDPIPE_ALLOW_SKIP` names the
//! capability or the test (comma-separated). `KDPIPE_FORCE_SKIP` names capabilities to
//! treat as missing, to see the mechanism work on a machine that has them.
//!
//! Compiled into the library's unit tests (`#[cfg(test)]`) and included by the
//! integration tests' `common` module, so both record skips the same way.
#![allow(dead_code)]

use std::path::PathBuf;

/// The folder the suite's counts and skips go to.
pub fn suite_dir() -> PathBuf {
    match std::env::var_os("KDPIPE_SUITE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join("kdpipe-suite"),
    }
}

fn listed(var: &str, names: &[&str]) -> bool {
    std::env::var(var).is_ok_and(|v| {
        v.split(',')
            .map(str::trim)
            .any(|entry| names.contains(&entry))
    })
}

/// Whether `test` may run: `available` says whether this machine has `capability`.
/// When it has not (or `KDPIPE_FORCE_SKIP` names it), the skip is recorded and the test
/// panics unless `KDPIPE_ALLOW_SKIP` names the capability or the test; with that
/// permission this returns false and the caller returns early.
pub fn can_run(test: &str, capability: &str, available: bool, reason: &str) -> bool {
    let forced = listed("KDPIPE_FORCE_SKIP", &[capability]);
    if available && !forced {
        return true;
    }
    let reason = if forced {
        format!("{reason} (forced by KDPIPE_FORCE_SKIP)")
    } else {
        reason.to_string()
    };
    let allowed = listed("KDPIPE_ALLOW_SKIP", &[capability, test]);
    let dir = suite_dir().join("skips");
    let line = format!(
        "{test}: skipped, {capability}: {reason}{}\n",
        if allowed {
            " (allowed by KDPIPE_ALLOW_SKIP)"
        } else {
            ""
        }
    );
    // Best effort: the panic below already fails the test when the record cannot be kept.
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{test}.txt")), &line);
    eprint!("{line}");
    assert!(
        allowed,
        "{test} cannot run here ({capability}: {reason}); a skipped test fails the suite. \
         hint: run it on a machine that has {capability}, or set KDPIPE_ALLOW_SKIP={capability}"
    );
    false
}
