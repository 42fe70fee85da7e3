//! Fails when a crate depends on a workspace crate that docs/architecture.md does not
//! allow, when a crate not listed may hold `unsafe` lacks
//! `#![forbid(unsafe_code)]`, or when an `unsafe` block has no SAFETY note.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn metadata() -> Value {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn workspace_crates(meta: &Value) -> Vec<(String, PathBuf, Vec<String>)> {
    let members: Vec<String> =
        meta["packages"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["name"].as_str().unwrap().to_string())
                .filter(|d| members.contains(d))
                .collect();
            let dir = Path::new(p["manifest_path"].as_str().unwrap()).parent().unwrap().to_path_buf();
            (p["name"].as_str().unwrap().to_string(), dir, deps)
        })
        .collect()
}

#[test]
fn crate_dependencies_follow_the_layering() {
    let meta = metadata();
    let mut errors = Vec::new();
    for (name, _, deps) in workspace_crates(&meta) {
        let Some((_, allowed)) = tidy::ALLOWED.iter().find(|(c, _)| *c == name) else {
            errors.push(format!("crate {name} is not in the layering table (tidy/src/lib.rs, docs/architecture.md)"));
            continue;
        };
        for d in deps {
            if !allowed.contains(&d.as_str()) {
                errors.push(format!("{name} depends on {d}, which docs/architecture.md does not allow"));
            }
        }
    }
    assert!(errors.is_empty(), "layering violations:\n{}", errors.join("\n"));
}

/// The checker itself must catch a violation.
#[test]
fn layering_check_rejects_an_upward_edge() {
    let allowed = tidy::ALLOWED.iter().find(|(c, _)| *c == "bdev").unwrap().1;
    assert!(!allowed.contains(&"bdev-raid"));
    assert!(!allowed.contains(&"mgmt"));
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn unsafe_is_forbidden_or_documented() {
    let meta = metadata();
    let mut errors = Vec::new();
    for (name, dir, _) in workspace_crates(&meta) {
        let lib = ["src/lib.rs", "src/main.rs"].iter().map(|f| dir.join(f)).find(|p| p.exists());
        if !tidy::UNSAFE_ALLOWED.contains(&name.as_str()) {
            if let Some(lib) = lib {
                let text = std::fs::read_to_string(&lib).unwrap();
                if !text.contains("#![forbid(unsafe_code)]") {
                    errors.push(format!("{}: crate {name} must say #![forbid(unsafe_code)]", lib.display()));
                }
            }
        }
        if name == "tidy" {
            continue; // its own patterns are string literals
        }
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (i, l) in lines.iter().enumerate() {
                let code = l.split("//").next().unwrap_or("");
                if !(code.contains("unsafe {") || code.contains("unsafe impl")) {
                    continue;
                }
                let window = &lines[i.saturating_sub(8)..=i];
                if !window.iter().any(|w| w.contains("SAFETY:")) {
                    errors.push(format!("{}:{}: unsafe without a // SAFETY: comment", f.display(), i + 1));
                }
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}
