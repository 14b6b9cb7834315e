//! `alloc::returning_freed_memory`: freed memory goes back to the OS while a model loads
//! (mimalloc's purge delay 0), and the delay found before the first load comes back after
//! the last, nested or not. `alloc::giving_back_after`: what a pass freed goes back when
//! it ends, or when the pass asks (`alloc::give_back_freed_so_far`). Its own test binary, on mimalloc like kdpipe's: no other test loads a model
//! or allocates much meanwhile, and its tests take turns (they set the same option).

use kdpipe::alloc::{
    give_back_freed_so_far, giving_back_after, purge_delay, returning_freed_memory, tune,
};
use std::sync::Mutex;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn a_load_purges_at_once_and_the_delay_found_before_it_comes_back() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = purge_delay();
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        // The user's setting wins: loading leaves it alone.
        returning_freed_memory(|| assert_eq!(purge_delay(), before));
        assert_eq!(purge_delay(), before);
        return;
    }
    assert_ne!(before, 0, "mimalloc's default delay is 10 ms");
    let inner = returning_freed_memory(|| {
        assert_eq!(purge_delay(), 0, "purging at once while loading");
        returning_freed_memory(purge_delay)
    });
    assert_eq!(inner, 0, "a nested load keeps purging at once");
    assert_eq!(
        purge_delay(),
        before,
        "the delay found before the load comes back"
    );
    tune();
    let caught = returning_freed_memory(|| {
        std::panic::catch_unwind(|| returning_freed_memory(|| panic!("a load that panics")))
    });
    assert!(caught.is_err());
    assert_eq!(
        purge_delay(),
        -1,
        "after tune(), and a panicked load: memory is kept again"
    );
}

/// Resident memory of this process, in MiB.
fn rss_mib() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024
}

/// Allocate `mib` MiB in 1 MiB blocks, write every page, and free it all.
fn churn(mib: usize) {
    let blocks: Vec<Vec<u8>> = (0..mib).map(|i| vec![i as u8 | 1; 1 << 20]).collect();
    assert!(blocks.iter().all(|b| b[4096] != 0));
}

#[test]
fn a_pass_gives_back_what_it_freed_when_it_ends_and_not_before() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        // The user's setting wins: the pass leaves it alone.
        let before = purge_delay();
        giving_back_after(|| assert_eq!(purge_delay(), before));
        assert_eq!(purge_delay(), before);
        return;
    }
    tune();
    let start = rss_mib();
    churn(512);
    let kept = rss_mib();
    assert!(
        kept >= start + 400,
        "tune() keeps freed memory: {start} MiB before, {kept} MiB after freeing 512"
    );
    let during = giving_back_after(|| {
        churn(512);
        rss_mib()
    });
    let after = rss_mib();
    assert!(
        during >= start + 400,
        "nothing goes back while the pass runs: {during} MiB (started at {start})"
    );
    assert!(
        after + 400 <= during,
        "the pass's end gives its freed memory back: {during} MiB in it, {after} after"
    );
    assert_eq!(purge_delay(), -1, "memory is kept again after the pass");

    // A model load inside a pass purges at once, then the pass marks again; a pass inside
    // a load leaves the load purging at once; either way memory is kept after both.
    giving_back_after(|| {
        returning_freed_memory(|| assert_eq!(purge_delay(), 0));
        assert!(
            purge_delay() > 0,
            "the pass marks frees again after the load"
        );
    });
    assert_eq!(purge_delay(), -1);
    returning_freed_memory(|| {
        giving_back_after(|| assert_eq!(purge_delay(), 0, "the load still purges at once"));
        assert_eq!(purge_delay(), 0);
    });
    assert_eq!(purge_delay(), -1, "memory is kept again after both");
}

#[test]
fn a_pass_gives_back_what_it_freed_so_far_when_it_asks() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return; // the user's setting wins (the test above checks that)
    }
    tune();
    let start = rss_mib();
    let (churned, asked) = giving_back_after(|| {
        churn(512);
        let churned = rss_mib();
        give_back_freed_so_far();
        (churned, rss_mib())
    });
    assert!(
        churned >= start + 400,
        "the pass keeps what it freed until it asks: {churned} MiB (started at {start})"
    );
    assert!(
        asked + 400 <= churned,
        "asking gives the freed memory back within the pass: {churned} MiB before, {asked} after"
    );
    assert_eq!(purge_delay(), -1, "memory is kept again after the pass");
}
