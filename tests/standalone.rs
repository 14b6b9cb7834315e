//! The repository stands alone: a user's fresh clone has no `../shared` folder beside it.
//! No code, test, config or script the suite or the quickstart uses reads it (benchmarks
//! may: they take whole data sets from KDPIPE_DATA and say what to put there), and when
//! scripts/test.sh hid a `../shared` that this checkout has, it is really gone here.

mod common;
use common::*;

/// Files allowed to name the folder: the benchmarks' data default and the script that
/// hides it during the suite.
const ALLOWED: [&str; 2] = ["scripts/bench/", "scripts/test.sh"];

#[test]
fn nothing_the_suite_runs_reads_the_shared_folder() {
    let mut offenders = vec![];
    for dir in [
        "src", "tests", "examples", "scripts", "configs", "prompts", "datasets", ".ci",
    ] {
        for file in all_files(&root().join(dir)) {
            let rel = file
                .strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .to_string();
            if ALLOWED.iter().any(|a| rel.starts_with(a)) || rel == "tests/standalone.rs" {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue; // binary fixtures
            };
            if text.contains("../shared") || text.contains("shared/data") {
                offenders.push(rel);
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "these files read ../shared, which a fresh clone lacks (put small real excerpts in \
         tests/fixtures/ instead): {offenders:?}"
    );
    if std::env::var_os("KDPIPE_SHARED_HIDDEN").is_some() {
        assert!(
            !root().join("../shared/data").exists(),
            "scripts/test.sh said ../shared was hidden, but it is visible"
        );
    }
}

/// The suite checks kdpipe against the mistralrs engine (tests/mistralrs_engine.rs), which
/// only a build with `--features mistralrs` has: scripts/test.sh passes it. Without it,
/// that file is not built, and this records the skip.
#[test]
fn the_suite_is_built_with_the_mistralrs_engine() {
    skip::can_run(
        "standalone::the_suite_is_built_with_the_mistralrs_engine",
        "mistralrs-feature",
        cfg!(feature = "mistralrs"),
        "built without --features mistralrs, so tests/mistralrs_engine.rs did not run",
    );
}
