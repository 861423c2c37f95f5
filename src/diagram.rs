//! The state diagrams, generated from the machine's three tables
//! ([`crate::machine::BUILD_TABLE`], [`YAML_TABLE`], [`LIFE_TABLE`]).
//! `state-diagrams/` holds the committed copies; a test regenerates them
//! and fails if they differ.

use crate::machine::{
    EventKind, Life, Row, StateKind, YamlKind, BUILD_TABLE, LIFE_TABLE, YAML_TABLE,
};
use std::collections::BTreeMap;
use std::fmt::Debug;

/// A region's states, for drawing.
trait Region: Copy + Ord + Debug + 'static {
    const TITLE: &'static str;
    fn all() -> &'static [Self];
    fn name(self) -> &'static str;
}

/// Each region's kind of state, its title, and its own `ALL` and `name`.
macro_rules! region {
    ($($kind:ident: $title:literal),* $(,)?) => {$(
        impl Region for $kind {
            const TITLE: &'static str = $title;
            fn all() -> &'static [Self] {
                &$kind::ALL
            }
            fn name(self) -> &'static str {
                $kind::name(self)
            }
        }
    )*};
}

region!(StateKind: "build", YamlKind: "getyaml", Life: "life");

/// A Mermaid or DOT id for a state name.
fn id(name: &str) -> String {
    name.replace('-', "_")
}

/// CamelCase to kebab-case; `Refuse(..)` is `refuse`.
fn does_label(d: &impl Debug) -> String {
    let name = format!("{d:?}");
    let name = name.split('(').next().unwrap_or_default();
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn is_ignore(d: &impl Debug) -> bool {
    format!("{d:?}") == "Ignore"
}

fn event_label<S, D>(row: &Row<S, D>, on: EventKind) -> String {
    match row.guard {
        Some(g) => format!("{} [{}]", on.name(), g.name()),
        None => on.name().to_string(),
    }
}

/// Edges grouped by (from, to). A change of state is labelled
/// `event [guard] / what it does`; a self-loop lists just the events it
/// takes, to keep the picture readable (transitions.md has every cell).
fn edges<S: Region, D: Copy + Debug>(table: &[Row<S, D>]) -> BTreeMap<(S, S), Vec<String>> {
    let mut edges: BTreeMap<(S, S), Vec<String>> = BTreeMap::new();
    for row in table {
        if is_ignore(&row.does) {
            continue;
        }
        for &from in row.from {
            let to = row.target(from);
            for &on in row.on {
                let label = if to == from {
                    event_label(row, on)
                } else {
                    format!("{} / {}", event_label(row, on), does_label(&row.does))
                };
                edges.entry((from, to)).or_default().push(label);
            }
        }
    }
    edges
}

fn mermaid_region<S: Region, D: Copy + Debug>(out: &mut String, table: &[Row<S, D>]) {
    out.push_str(&format!("    state {} {{\n", S::TITLE));
    out.push_str(&format!("        [*] --> {}\n", id(S::all()[0].name())));
    for ((from, to), labels) in edges(table) {
        let sep = if from == to { ", " } else { "<br/>" };
        out.push_str(&format!(
            "        {} --> {}: {}\n",
            id(from.name()),
            id(to.name()),
            labels.join(sep)
        ));
    }
    out.push_str("    }\n");
}

/// The machine as a Mermaid state diagram: its three regions, which run
/// side by side.
pub fn mermaid() -> String {
    let mut out = String::from(
        "%% Generated from src/machine.rs by `cargo test` (see tests/diagrams.rs); do not edit.\n\
         %% Three regions, each in one state at a time, side by side.\n\
         stateDiagram-v2\n",
    );
    mermaid_region(&mut out, BUILD_TABLE);
    mermaid_region(&mut out, YAML_TABLE);
    mermaid_region(&mut out, LIFE_TABLE);
    out
}

fn dot_region<S: Region, D: Copy + Debug>(out: &mut String, table: &[Row<S, D>]) {
    let title = S::TITLE;
    out.push_str(&format!(
        "    subgraph cluster_{title} {{\n        label=\"{title}\";\n        {title}_start [shape=point];\n        {title}_start -> {};\n",
        id(S::all()[0].name())
    ));
    for ((from, to), labels) in edges(table) {
        out.push_str(&format!(
            "        {} -> {} [label=\"{}\"];\n",
            id(from.name()),
            id(to.name()),
            labels.join("\\n")
        ));
    }
    out.push_str("    }\n");
}

/// The machine as a Graphviz DOT digraph, one cluster per region.
pub fn dot() -> String {
    let mut out = String::from(
        "// Generated from src/machine.rs by `cargo test` (see tests/diagrams.rs); do not edit.\n\
         digraph latd {\n    rankdir=LR;\n    node [shape=box, style=rounded];\n",
    );
    dot_region(&mut out, BUILD_TABLE);
    dot_region(&mut out, YAML_TABLE);
    dot_region(&mut out, LIFE_TABLE);
    out.push_str("}\n");
    out
}

fn table_region<S: Region, D: Copy + Debug>(out: &mut String, table: &[Row<S, D>]) {
    out.push_str(&format!(
        "\n## Region {}\n\n| state | event | guard | next | does |\n|---|---|---|---|---|\n",
        S::TITLE
    ));
    for &from in S::all() {
        for on in EventKind::ALL {
            let rows: Vec<&Row<S, D>> = table
                .iter()
                .filter(|r| r.from.contains(&from) && r.on.contains(&on))
                .collect();
            let guarded = rows.iter().any(|r| r.guard.is_some());
            for r in rows {
                let guard = match r.guard {
                    Some(g) => g.name(),
                    None if guarded => "else",
                    None => "",
                };
                let does = format!("{:?}", r.does);
                let does = match does.split_once('(') {
                    Some((_, why)) => {
                        format!("refuse: {}", why.trim_end_matches(')').trim_matches('"'))
                    }
                    None => does_label(&r.does),
                };
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    from.name(),
                    on.name(),
                    guard,
                    r.target(from).name(),
                    does
                ));
            }
        }
    }
}

/// The full tables, every state × event of each region, as Markdown.
pub fn table() -> String {
    let mut out = String::from(
        "<!-- Generated from src/machine.rs by `cargo test` (see tests/diagrams.rs); do not edit. -->\n\
         # latd transition tables\n\n\
         The machine is three regions, each in one state at a time. Every state of a\n\
         region against every event: the next state and what the daemon does. Events\n\
         about a build, job or timer that is no longer current are dropped before the\n\
         tables; while region life is `exited`, only region life answers.\n",
    );
    table_region(&mut out, BUILD_TABLE);
    table_region(&mut out, YAML_TABLE);
    table_region(&mut out, LIFE_TABLE);
    out
}
