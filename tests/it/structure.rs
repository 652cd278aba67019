//! The shape of `src/`, checked without services: its modules form layers (each uses only those
//! that `src/lib.rs` declares above it, so there is no import cycle), every file opens with a
//! `//!` line saying what it is for, and every function fits on a screen; and the docs name what
//! the code declares: the README's exit codes are `src/exit.rs`'s, its refused `KAFKA_PROP_*`
//! properties are the code's, every metric the docs name is one `src/metrics.rs` declares, and the
//! README names every one of them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a function in `src/` may be, in lines from its signature to its closing brace.
const MAX_FUNCTION_LINES: usize = 60;

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The library's top-level module a file belongs to; `None` for the binaries.
fn module_of(path: &Path) -> Option<String> {
    let relative = path.strip_prefix(src()).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?.to_string();
    match first.as_str() {
        "main.rs" | "lib.rs" | "bin" => None,
        name => Some(name.trim_end_matches(".rs").to_string()),
    }
}

/// The code of a file without its comments.
fn code(text: &str) -> String {
    text.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules that `code` names through `crate::`, also inside `use crate::{…}`.
fn referenced(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Only the first segment of each item at the outer level of the group.
            let (mut depth, mut start) = (0, true);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        found.insert(ident(&group[j..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

/// Which top-level module uses which.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(&src()) {
        let Some(module) = module_of(&file) else { continue };
        let uses = referenced(&code(&std::fs::read_to_string(&file).unwrap()));
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(uses.into_iter().filter(|m| *m != module));
    }
    graph
}

/// A cycle through `graph`, as the modules along it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_modules_of_src_have_no_import_cycle() {
    let graph = module_graph();
    assert!(graph.len() > 10, "found the modules: {graph:?}");
    assert!(
        graph["writer"].contains("handlers"),
        "the graph sees `use crate::…`: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

/// The modules in the order `src/lib.rs` declares them.
fn declared_order() -> Vec<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';').map(str::to_string))
        .collect()
}

#[test]
fn each_module_uses_only_those_declared_above_it_in_lib_rs() {
    let graph = module_graph();
    let order = declared_order();
    assert_eq!(
        order.iter().cloned().collect::<BTreeSet<_>>(),
        graph.keys().cloned().collect::<BTreeSet<_>>(),
        "src/lib.rs declares every module"
    );
    let mut upward = Vec::new();
    for (at, module) in order.iter().enumerate() {
        for used in &graph[module] {
            if !order[..at].contains(used) {
                upward.push(format!("{module} uses {used}, declared below it"));
            }
        }
    }
    assert!(upward.is_empty(), "the layers of src/lib.rs:\n{}", upward.join("\n"));
}

#[test]
fn the_cycle_check_finds_a_cycle_when_there_is_one() {
    let edges = [
        ("kafka", "writer"),
        ("writer", "handlers"),
        ("handlers", "kafka"),
        ("handlers", "models"),
    ];
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in edges {
        graph.entry(from.into()).or_default().insert(to.into());
    }
    assert_eq!(find_cycle(&graph).unwrap(), ["handlers", "kafka", "writer", "handlers"]);
    graph.get_mut("handlers").unwrap().remove("kafka");
    assert_eq!(find_cycle(&graph), None);
    let uses = referenced("use crate::{a::B, b, c::{d, e}};\nlet x = crate::f::g();");
    assert_eq!(uses.into_iter().collect::<Vec<_>>(), ["a", "b", "c", "f"]);
}

#[test]
fn every_source_file_opens_with_a_line_saying_what_it_is_for() {
    for file in rust_files(&src()) {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("//! "), "{} does not open with `//! `", file.display());
    }
}

/// `(name, lines)` of every function in `text`: from a line declaring `fn` to the closing brace
/// at the same indentation.
fn functions(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        // Past any visibility (`pub`, `pub(crate)`, `pub(super)`, `pub(in …)`) and qualifiers.
        let mut declaration = trimmed;
        if let Some(rest) = declaration.strip_prefix("pub") {
            declaration = match rest.strip_prefix('(') {
                Some(inner) => inner.split_once(')').map_or(rest, |(_, after)| after),
                None => rest,
            }
            .trim_start();
        }
        for qualifier in ["const ", "unsafe ", "extern \"C\" "] {
            declaration = declaration.trim_start_matches(qualifier);
        }
        let Some(rest) = declaration.strip_prefix("fn ") else {
            continue;
        };
        if line.trim_end().ends_with(';') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{indent}}}");
        if let Some(end) = lines[i..].iter().position(|l| l.trim_end() == close) {
            found.push((name, end + 1));
        }
    }
    found
}

#[test]
fn every_function_in_src_fits_on_a_screen() {
    let mut long = Vec::new();
    for file in rust_files(&src()) {
        for (name, lines) in functions(&std::fs::read_to_string(&file).unwrap()) {
            if lines > MAX_FUNCTION_LINES {
                long.push(format!("{}: {name} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_function_lengths_are_measured() {
    let text = "fn a() {\n    x();\n}\n\n    pub fn b(\n        y: u8,\n    ) {\n        if y {\n        }\n    }\n\
                pub(super) fn c() {\n}\npub(in crate::x) unsafe fn d() {\n}\n";
    let names = |f: Vec<(String, usize)>| f.into_iter().map(|(n, l)| format!("{n}:{l}")).collect::<Vec<_>>();
    assert_eq!(names(functions(text)), ["a:3", "b:6", "c:2", "d:2"]);
}

/// The rows of the README's table whose header line is `header`: each row's cells.
fn readme_table(header: &str) -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut lines = readme.lines().skip_while(|l| l.trim() != header);
    assert!(lines.next().is_some(), "the README has no table headed {header}");
    lines
        .skip(1) // the | --- | line
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.trim_matches('|').split(" | ").map(|c| c.trim().to_string()).collect())
        .collect()
}

#[test]
fn the_readme_lists_every_exit_code_the_code_declares_and_no_other() {
    use booking_worker::exit::ExitStatus;
    let documented: Vec<u8> = readme_table("| code | meaning |")
        .iter()
        .map(|row| row[0].parse().unwrap_or_else(|_| panic!("not a code: {row:?}")))
        .collect();
    let declared: Vec<u8> = ExitStatus::ALL.iter().map(|s| s.code()).collect();
    assert_eq!(documented, declared, "the README's exit codes, in order");
}

/// The metric names `src/metrics.rs` declares: the name each of its constants gives, whether a
/// `(name, help)` pair or a name alone.
fn declared_metrics() -> BTreeSet<String> {
    let text = std::fs::read_to_string(src().join("metrics.rs")).unwrap();
    text.split("\nconst ")
        .skip(1)
        .filter_map(|declaration| {
            let value = declaration.split(';').next()?;
            let name = value.split('"').nth(1)?;
            name.starts_with("booking_worker_").then(|| name.to_string())
        })
        .collect()
}

/// The names with the `booking_worker_` prefix that `text` mentions, each as a whole word.
fn metric_names(text: &str) -> BTreeSet<String> {
    const PREFIX: &str = "booking_worker_";
    let word = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    text.match_indices(PREFIX)
        .filter(|(at, _)| !text[..*at].ends_with(word))
        .map(|(at, _)| text[at..].split(|c| !word(c)).next().unwrap().to_string())
        .collect()
}

/// The documents that name metrics: the READMEs and the crate docs.
fn documents_naming_metrics() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    ["README.md", "tests/README.md", "scripts/README.md", "src/lib.rs"]
        .iter()
        .map(|path| (path.to_string(), std::fs::read_to_string(root.join(path)).unwrap()))
        .collect()
}

#[test]
fn every_metric_the_docs_name_exists_in_the_code() {
    let declared = declared_metrics();
    assert!(declared.len() > 10, "the metric table was not found: {declared:?}");
    for (path, text) in documents_naming_metrics() {
        for name in metric_names(&text) {
            // A histogram's series carry a suffix of their own.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|b| declared.contains(*b)))
                .unwrap_or(&name);
            assert!(
                declared.contains(base),
                "{path} names {name}, which src/metrics.rs does not declare"
            );
        }
    }
}

#[test]
fn the_readme_names_every_metric_the_code_declares() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let missing: Vec<String> = declared_metrics().difference(&metric_names(&readme)).cloned().collect();
    assert!(missing.is_empty(), "the README's metrics list lacks {missing:?}");
}

#[test]
fn metric_names_are_found_as_whole_words() {
    let text = "`booking_worker_ready`, booking_worker_halts_total{x}; not_booking_worker_a, BOOKING_WORKER_B";
    let names: Vec<String> = metric_names(text).into_iter().collect();
    assert_eq!(names, ["booking_worker_halts_total", "booking_worker_ready"]);
}

/// The header that opens the README's table of the properties `KAFKA_PROP_*` may not set.
const REFUSED_TABLE_HEADER: &str = "| refused property | why |";

/// The properties the README's table of refused properties names: every `` `name` `` of each
/// row's first cell.
fn readme_refused_properties() -> BTreeSet<String> {
    readme_table(REFUSED_TABLE_HEADER)
        .iter()
        .flat_map(|row| {
            row[0]
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_readme_names_every_refused_kafka_property_and_no_other() {
    let code: BTreeSet<String> = booking_worker::config::REFUSED_PROPERTIES
        .iter()
        .map(|(name, _)| name.to_string())
        .collect();
    assert_eq!(
        readme_refused_properties(),
        code,
        "the README's table headed `{REFUSED_TABLE_HEADER}` and config::REFUSED_PROPERTIES"
    );
}
