//! `alloc::returning_freed_memory`: freed memory goes back to the OS while a model loads
//! (mimalloc's purge delay 0), and the delay found before the first load comes back after
//! the last, nested or not. Its own test binary: no other test loads a model meanwhile.

use kdpipe::alloc::{purge_delay, returning_freed_memory, tune};

#[test]
fn a_load_purges_at_once_and_the_delay_found_before_it_comes_back() {
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
