//! Allocator settings for the kdpipe binary and its benchmarks (both use mimalloc).
//!
//! A training step frees and reallocates gigabytes of activations and gradients. With
//! mimalloc's default purge delay (10 ms) the freed pages go back to the OS and come back
//! zeroed by the kernel on the next step: 28 % of a SmolLM2 training step was the kernel
//! clearing pages (perf), and the step ran at half speed. kdpipe keeps freed memory for
//! the life of the process instead (a batch command, not a server): peak RSS barely moves
//! (8.43 vs 8.63 GB) and training runs twice as fast. A finite delay is not enough: with
//! 60 s, mimalloc 3 still made ~2,000 purge calls (madvise) in two training steps.
//! Model loading is the exception: what it frees goes back at once
//! (`returning_freed_memory`); so is what one of curate's passes freed, when the pass ends
//! (`giving_back_after`).

/// mimalloc's `mi_option_purge_delay` (index 15 in mimalloc v2 and v3's `mi_option_e`).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never return freed memory to the OS (mimalloc's -1).
const NEVER: std::os::raw::c_long = -1;

/// Return freed memory to the OS as soon as it is freed (mimalloc's 0).
const AT_ONCE: std::os::raw::c_long = 0;

/// Model loads in progress, and the purge delay to restore when the last one ends.
static LOADS: std::sync::Mutex<(usize, std::os::raw::c_long)> = std::sync::Mutex::new((0, NEVER));

/// Apply kdpipe's allocator settings; call first thing in `main`. A `MIMALLOC_PURGE_DELAY`
/// set in the environment wins.
pub fn tune() {
    if !set_by_user() {
        set_purge_delay(NEVER);
    }
}

/// Run `load` (reading a model file) with freed memory given back to the OS as it is freed,
/// then keep freed memory again.
///
/// Loading builds and drops tens of MB once: the GGUF's metadata, the tokenizer's
/// temporary strings (13 MB of resident memory after loading SmolLM2-135M, 49 MB after
/// Qwen2.5-Coder-0.5B). Kept, the steps after it reuse only part of that memory, and the
/// engine's peak RSS carries the rest (SmolLM2 at 32 × 160 tokens: 262–267 MB against
/// 257–261 MB with this; Qwen 0.5B 638–639 against 619–625; docs/PERFORMANCE.md). Loading
/// frees each thing once, so giving it back costs nothing measurable there, unlike in the
/// steps (see `tune`). Concurrent loads nest: the last one to finish restores the delay
/// the first one found. A `MIMALLOC_PURGE_DELAY` set in the environment wins here too.
pub fn returning_freed_memory<T>(load: impl FnOnce() -> T) -> T {
    if set_by_user() {
        return load();
    }
    let _loading = Loading::start();
    load()
}

/// Whether `MIMALLOC_PURGE_DELAY` in the environment sets the purge delay.
fn set_by_user() -> bool {
    std::env::var_os("MIMALLOC_PURGE_DELAY").is_some()
}

/// One load in progress; dropping it (also on a panic) ends it.
struct Loading;

impl Loading {
    fn start() -> Self {
        let mut loads = LOADS.lock().unwrap_or_else(|e| e.into_inner());
        if loads.0 == 0 {
            loads.1 = purge_delay();
            set_purge_delay(AT_ONCE);
        }
        loads.0 += 1;
        Loading
    }
}

impl Drop for Loading {
    fn drop(&mut self) {
        let mut loads = LOADS.lock().unwrap_or_else(|e| e.into_inner());
        loads.0 -= 1;
        if loads.0 == 0 {
            set_purge_delay(loads.1);
        }
    }
}

/// mimalloc's purge delay now, in ms (-1: never).
pub fn purge_delay() -> std::os::raw::c_long {
    // SAFETY: reads an aligned `long` of mimalloc's option table (see `set_purge_delay`).
    unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
}

fn set_purge_delay(delay: std::os::raw::c_long) {
    // SAFETY: mi_option_set stores the value in an aligned `long` of mimalloc's option
    // table (plus, for two other options, a range check): a thread allocating meanwhile
    // reads either the old or the new delay, and both are valid settings. LOADS
    // serialises the writers.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, delay) };
}

/// A purge delay that does not run out during a pass (a day): what is freed is only marked
/// for purging, until `giving_back_after` purges it all at once.
const MARKED_ONLY: std::os::raw::c_long = 86_400_000;

/// Run `pass`, then give back to the OS what it freed, in one purge when it ends.
///
/// curate's passes each build and drop more than the next one reuses: the spread's buffer
/// (up to ~2 GB of rows at 100M), a part's frames during the head rules. Kept (`tune`), that
/// heap carries into the next pass's peak RSS and slowed it; given back as freed (delay 0)
/// costs ~14 % of curate's time, the kernel clearing pages reused a moment later
/// (bench-results/curate-scale.md). Here frees during the pass are only marked (mimalloc
/// v3 marks only what is freed while its purge delay is positive, so a delay set after
/// the pass could not reach them), and the end purges every mark at once. A
/// `MIMALLOC_PURGE_DELAY` set in the environment wins.
pub fn giving_back_after<T>(pass: impl FnOnce() -> T) -> T {
    if set_by_user() {
        return pass();
    }
    let window = MarkingFrees::start();
    let out = pass();
    drop(window);
    out
}

/// A pass whose frees are marked for purging; dropping it (also on a panic) purges them and
/// restores the delay it found.
struct MarkingFrees {
    previous: std::os::raw::c_long,
}

impl MarkingFrees {
    fn start() -> Self {
        MarkingFrees {
            previous: replace_delay_outside_loads(MARKED_ONLY),
        }
    }
}

impl Drop for MarkingFrees {
    fn drop(&mut self) {
        give_back_freed_so_far();
        replace_delay_outside_loads(self.previous);
    }
}

/// Inside `giving_back_after`, give back now what the pass has freed so far.
///
/// A pass that streams large batches calls this every so often, so the heap it keeps stays
/// near the memory it uses: what it freed is reused only in part, and the rest would pile
/// up until the pass ends (curate's split files pass on 2M rows with token top-20 peaked at
/// 4,332–4,420 MiB, more than at 1M, with 3,273 in use; giving back every GiB streamed,
/// 3,601–3,672; bench-results/curate-scale.md, 2026-12-07g). Outside such a pass nothing
/// is marked, and nothing goes back.
pub fn give_back_freed_so_far() {
    // Each thread's empty pages go back to mimalloc's arenas, and a forced collect purges
    // every marked range of the arenas (program-wide).
    rayon::broadcast(|_| collect_forced());
    collect_forced();
}

/// Set the purge delay that holds outside model loads, and return the one it replaces:
/// while a load runs (purging at once), the delay that load restores when it ends. Under
/// LOADS, like every other writer of the delay.
fn replace_delay_outside_loads(delay: std::os::raw::c_long) -> std::os::raw::c_long {
    let mut loads = LOADS.lock().unwrap_or_else(|e| e.into_inner());
    if loads.0 > 0 {
        return std::mem::replace(&mut loads.1, delay);
    }
    let previous = purge_delay();
    set_purge_delay(delay);
    previous
}

fn collect_forced() {
    // SAFETY: mi_collect only walks the calling thread's heap and the arenas' bitmaps,
    // under mimalloc's own synchronisation.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
