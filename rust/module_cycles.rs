//! A guard on the module graph of `pool` and `compress`: reads their sources, collects which
//! module names items of which (`use` statements, and `super::…` / `crate::…` paths in code)
//! and fails on a cycle. Both pieces once had one (`allocator` ↔ `snapshot`, `pieces` ↔
//! `scan`); a cycle means neither module can be read, tested or moved without the other.
//!
//! Edges are between files. Inline `#[cfg(test)]` modules are left out: a unit test may use
//! the module's consumers to check it (`decode`'s tests decompress with `dense`, which calls
//! `decode`) without the module depending on them. A module's `pub use` re-exports are not
//! edges either: `mod.rs` re-exporting its children is naming, not depending.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;
type Graph = BTreeMap<Module, BTreeSet<Module>>;

/// Every `.rs` file under `dir` with its module path relative to `dir` (`mod.rs` is its
/// directory's module; `dir/mod.rs` is the root, `[]`).
fn modules(dir: &Path, prefix: &Module, out: &mut BTreeMap<Module, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("readable source directory")
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("UTF-8 file name")
            .to_string();
        let mut module = prefix.clone();
        if path.is_dir() {
            module.push(name);
            modules(&path, &module, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            if name != "mod" {
                module.push(name);
            }
            let text = std::fs::read_to_string(&path).expect("readable source file");
            out.insert(module, text);
        }
    }
}

/// Splits `a, b::{c, d}, e` at the commas outside braces.
fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut parts) = (0, 0, Vec::new());
    for (i, ch) in s.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

/// The paths a use tree names: `a::{b, c::{d}}` → `a::b`, `a::c::d`.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let tree = tree.split(" as ").next().unwrap_or("").trim().to_string();
    match tree.find('{') {
        None => vec![tree],
        Some(open) => {
            let prefix = &tree[..open];
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            split_top(inner)
                .into_iter()
                .flat_map(expand)
                .map(|p| format!("{prefix}{p}"))
                .collect()
        }
    }
}

/// The file module a path written in module `at` (file module plus inline modules) refers
/// to, if it is one of `known`. Bare paths (`segment::X`) count only in `use` statements.
fn resolve(
    path: &str,
    at: &Module,
    piece: &str,
    known: &BTreeSet<Module>,
    bare: bool,
) -> Option<Module> {
    let segs: Vec<&str> = path.split("::").map(str::trim).collect();
    let (mut base, rest): (Module, &[&str]) = match segs.first().copied()? {
        "crate" if segs.get(1) == Some(&piece) => (Vec::new(), &segs[2..]),
        "crate" => return None,
        "self" => (at.clone(), &segs[1..]),
        "super" => {
            let ups = segs.iter().take_while(|s| **s == "super").count();
            let mut base = at.clone();
            for _ in 0..ups {
                base.pop()?;
            }
            (base, &segs[ups..])
        }
        _ if bare => (at.clone(), &segs[..]),
        _ => return None,
    };
    // The longest prefix that names a file module; inline modules fall back to their file.
    let mut found = known.contains(&base).then(|| base.clone());
    for s in rest {
        base.push((*s).to_string());
        if known.contains(&base) {
            found = Some(base.clone());
        }
    }
    if found.is_none() {
        // `at` may be inside an inline module: retry from the nearest file module.
        let mut up = at.clone();
        while !up.is_empty() && !known.contains(&up) {
            up.pop();
        }
        return (bare && &up != at)
            .then(|| resolve(path, &up, piece, known, bare))
            .flatten();
    }
    found
}

/// The module graph of one piece (`rust/<piece>/`).
fn graph(root: &Path, piece: &str) -> Graph {
    let mut files = BTreeMap::new();
    modules(&root.join(piece), &Vec::new(), &mut files);
    let known: BTreeSet<Module> = files.keys().cloned().collect();
    let mut graph = Graph::new();
    for (file, text) in &files {
        let edges = graph.entry(file.clone()).or_default();
        let mut add = |m: Option<Module>| {
            if let Some(m) = m.filter(|m| m != file) {
                edges.insert(m);
            }
        };
        // Where we are: the file's module plus the inline modules opened at column 0
        // (rustfmt'd code closes them with a `}` at column 0).
        let mut at = file.clone();
        let mut statement = String::new();
        let mut reexport = false;
        // `at.len()` inside the outermost inline `#[cfg(test)]` module, while in one.
        let mut in_test: Option<usize> = None;
        let mut cfg_test = false;
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            if let Some(name) = code
                .strip_prefix("mod ")
                .or_else(|| code.strip_prefix("pub mod "))
                .and_then(|s| s.strip_suffix(" {"))
            {
                at.push(name.trim().to_string());
                if cfg_test && in_test.is_none() {
                    in_test = Some(at.len());
                }
                continue;
            }
            cfg_test = code.trim() == "#[cfg(test)]";
            if code == "}" && at.len() > file.len() {
                if in_test == Some(at.len()) {
                    in_test = None;
                }
                at.pop();
                continue;
            }
            if in_test.is_some() {
                continue;
            }
            let trimmed = code.trim_start();
            if reexport || (trimmed.starts_with("pub") && trimmed.contains(" use ")) {
                // A re-export (possibly several lines): naming, not depending.
                reexport = !trimmed.trim_end().ends_with(';');
                continue;
            }
            if !statement.is_empty() || trimmed.starts_with("use ") {
                statement.push_str(trimmed);
                statement.push(' ');
                if trimmed.trim_end().ends_with(';') {
                    let tree = statement
                        .trim()
                        .trim_start_matches("use ")
                        .trim_end_matches(';');
                    for p in expand(tree) {
                        add(resolve(&p, &at, piece, &known, true));
                    }
                    statement.clear();
                }
                continue;
            }
            // Paths in code: `super::x::f(..)`, `crate::pool::x::T`.
            let pattern = format!("crate::{piece}::");
            for start in code
                .match_indices("super::")
                .map(|(i, _)| i)
                .chain(code.match_indices(&pattern).map(|(i, _)| i))
            {
                if start > 0 && code[..start].ends_with("super::") {
                    continue; // the tail of a longer `super::super::` path
                }
                let path: String = code[start..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                add(resolve(
                    path.trim_end_matches(':'),
                    &at,
                    piece,
                    &known,
                    false,
                ));
            }
        }
    }
    graph
}

/// A cycle of `graph`, if it has one, as the modules along it.
fn find_cycle(graph: &Graph) -> Option<Vec<Module>> {
    fn visit(
        m: &Module,
        graph: &Graph,
        done: &mut BTreeSet<Module>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(i) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(m.clone());
            return Some(cycle);
        }
        if !done.insert(m.clone()) {
            return None;
        }
        stack.push(m.clone());
        for n in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(n, graph, done, stack) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut done, &mut Vec::new()))
}

fn show(m: &Module) -> String {
    if m.is_empty() {
        "mod".to_string()
    } else {
        m.join("::")
    }
}

fn src() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rust")
}

#[test]
#[ignore = "prints the graph: cargo test --lib module_cycles -- --ignored --nocapture"]
fn print_module_graph() {
    // MOECORE_RUST_SRC: another checkout's rust/ (to compare before and after a change).
    let root = std::env::var_os("MOECORE_RUST_SRC").map_or_else(src, Into::into);
    for piece in ["pool", "compress"] {
        for (m, uses) in graph(&root, piece) {
            let uses: Vec<String> = uses.iter().map(show).collect();
            println!("{piece}::{} -> {}", show(&m), uses.join(", "));
        }
    }
}

#[test]
fn pool_and_compress_have_no_module_cycle() {
    for piece in ["pool", "compress"] {
        let g = graph(&src(), piece);
        if let Some(cycle) = find_cycle(&g) {
            let path: Vec<String> = cycle.iter().map(show).collect();
            panic!("rust/{piece} has a module cycle: {}", path.join(" -> "));
        }
    }
}

/// The reader itself, on a hand-written tree: it must see `use` trees, inline test modules,
/// `super::` and `crate::` paths in code, and skip re-exports.
#[test]
fn the_reader_finds_edges_and_cycles() {
    let dir = std::env::temp_dir().join(format!("moecore-cycles-{}", std::process::id()));
    let piece = dir.join("p");
    std::fs::create_dir_all(piece.join("d")).expect("temp dir");
    let files = [
        ("mod.rs", "pub use a::A;\npub use d::{\n    D,\n};\n"),
        ("a.rs", "use super::{b::B, c};\n"),
        ("b.rs", "fn f() { crate::p::c::g(); }\n"),
        (
            "c.rs",
            "mod inner {\n    use super::super::d::x::X;\n}\n\n#[cfg(test)]\nmod tests {\n    use super::super::b;\n}\n",
        ),
        ("d/mod.rs", "use x::X;\n"),
        ("d/x.rs", "use super::super::a as other;\n"),
    ];
    for (name, text) in files {
        std::fs::write(piece.join(name), text).expect("temp file");
    }
    let g = graph(&dir, "p");
    std::fs::remove_dir_all(&dir).ok();
    let m = |s: &str| -> Module {
        s.split('/')
            .filter(|x| !x.is_empty())
            .map(String::from)
            .collect()
    };
    let edges = |s: &str| g[&m(s)].iter().map(show).collect::<Vec<_>>();
    assert_eq!(edges(""), Vec::<String>::new(), "re-exports are not edges");
    assert_eq!(edges("a"), ["b", "c"]);
    assert_eq!(edges("b"), ["c"]);
    assert_eq!(edges("c"), ["d::x"]);
    assert_eq!(edges("d"), ["d::x"]);
    assert_eq!(edges("d/x"), ["a"]);
    let cycle: Vec<String> = find_cycle(&g)
        .expect("a -> b -> c -> d::x -> a")
        .iter()
        .map(show)
        .collect();
    assert_eq!(cycle, ["a", "b", "c", "d::x", "a"]);
}
