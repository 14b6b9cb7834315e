//! Allocator settings for the kdpipe binary and its benchmarks (both use mimalloc).
//!
//! A training step frees and reallocates gigabytes of activations and gradients. With
//! mimalloc's default purge delay (10 ms) the freed pages go back to the OS and come back
//! zeroed by the kernel on the next step: 28 % of a SmolLM2 training step was the kernel
//! clearing pages (perf), and the step ran at half speed. kdpipe keeps freed memory for
//! the life of the process instead (a batch command, not a server): peak RSS barely moves
//! (8.43 vs 8.63 GB) and training runs twice as fast. A finite delay is not enough: with
//! 60 s, mimalloc 3 still made ~2,000 purge calls (madvise) in two training steps.

/// mimalloc's `mi_option_purge_delay` (index 15 in mimalloc v2 and v3's `mi_option_e`).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never return freed memory to the OS (mimalloc's -1).
const NEVER: std::os::raw::c_long = -1;

/// Apply kdpipe's allocator settings; call first thing in `main`. A `MIMALLOC_PURGE_DELAY`
/// set in the environment wins.
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called before any other thread exists; mi_option_set is not thread safe.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, NEVER) };
    }
}
