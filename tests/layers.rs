//! The layers of src/ point one way: a module names (`crate::…`) only modules of a lower
//! layer, and no stage names another stage. docs/ARCHITECTURE.md draws the same layers;
//! a new top-level module must be given one here.

mod common;
use common::*;
use std::collections::BTreeSet;

/// Each top-level module of the library and its layer, lowest first.
const LAYERS: [(&str, u8); 23] = [
    ("alloc", 1),
    ("progress", 1),
    ("test_skip", 1),
    ("stats", 1),
    ("config", 2),
    ("records", 3),
    ("kernels", 3),
    ("io", 4),
    ("chat", 4),
    ("task", 4),
    ("dedup", 4),
    ("prompts", 5),
    ("llama", 6),
    ("teacher", 7),
    ("synthesize", 8),
    ("generate", 8),
    ("curate", 8),
    ("finetune", 8),
    ("eval", 8),
    ("export", 8),
    ("run", 9),
    ("cli", 10),
    ("lib", 11),
];

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .unwrap_or_else(|| panic!("src/{module}: give this module a layer in tests/layers.rs"))
        .1
}

/// The top-level modules a file's text names through `crate::` (single paths and
/// `crate::{a, b::c}` groups).
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != "self" {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn modules_import_only_lower_layers_and_stages_never_each_other() {
    let src = root().join("src");
    let mut wrong = Vec::new();
    for file in all_files(&src) {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if !rel.ends_with(".rs") || rel == "main.rs" {
            continue; // the binary sits above everything
        }
        let module = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        let own = layer(&module);
        let text = std::fs::read_to_string(&file).unwrap();
        for named in named_modules(&text) {
            if named != module && layer(&named) >= own {
                wrong.push(format!(
                    "src/{rel} ({module}, layer {own}) names crate::{named} (layer {})",
                    layer(&named)
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that run sideways or backwards:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_import_reader_sees_groups_and_paths() {
    let text = "use crate::{config::Config, io::atomic};\nlet x = crate::llama::load(m);";
    let got: Vec<String> = named_modules(text).into_iter().collect();
    assert_eq!(got, ["config", "io", "llama"]);
}
