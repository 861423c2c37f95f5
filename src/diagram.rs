//! The state diagram, generated from the transition table in
//! [`crate::machine::rule`]. `state-diagrams/` holds the committed copies; a
//! test regenerates them and fails if they differ.

use crate::machine::{rule, Does, EventKind, StateKind};
use std::collections::BTreeMap;

/// Edges grouped by (from, to). A state change is labelled
/// `event / what it does`; a self-loop lists just the events it takes, to
/// keep the picture readable (transitions.md has every cell).
fn edges() -> BTreeMap<(StateKind, StateKind), Vec<String>> {
    let mut edges: BTreeMap<(StateKind, StateKind), Vec<String>> = BTreeMap::new();
    for from in StateKind::ALL {
        for event in EventKind::ALL {
            let r = rule(from, event);
            if r.does == Does::Ignore {
                continue;
            }
            for &to in r.to {
                let label = if to == from {
                    event.name().to_string()
                } else {
                    format!("{} / {}", event.name(), does_label(r.does))
                };
                edges.entry((from, to)).or_default().push(label);
            }
        }
    }
    edges
}

fn join_labels(from: StateKind, to: StateKind, labels: &[String], sep: &str) -> String {
    if from == to {
        labels.join(", ")
    } else {
        labels.join(sep)
    }
}

fn does_label(d: Does) -> String {
    match d {
        Does::Refuse(_) => "refuse".to_string(),
        other => {
            // CamelCase -> kebab-case
            let name = format!("{other:?}");
            let mut out = String::new();
            for (i, c) in name.chars().enumerate() {
                if c.is_uppercase() && i > 0 {
                    out.push('-');
                }
                out.push(c.to_ascii_lowercase());
            }
            out
        }
    }
}

/// The machine as a Mermaid state diagram.
pub fn mermaid() -> String {
    let mut out = String::from(
        "%% Generated from src/machine.rs by `cargo test` (see tests/diagrams.rs); do not edit.\n\
         stateDiagram-v2\n    [*] --> idle\n",
    );
    for ((from, to), labels) in edges() {
        out.push_str(&format!(
            "    {} --> {}: {}\n",
            from.name(),
            to.name(),
            join_labels(from, to, &labels, "<br/>")
        ));
    }
    out
}

/// The machine as a Graphviz DOT digraph.
pub fn dot() -> String {
    let mut out = String::from(
        "// Generated from src/machine.rs by `cargo test` (see tests/diagrams.rs); do not edit.\n\
         digraph latd {\n    rankdir=LR;\n    node [shape=box, style=rounded];\n    start [shape=point];\n    start -> idle;\n",
    );
    for ((from, to), labels) in edges() {
        out.push_str(&format!(
            "    {} -> {} [label=\"{}\"];\n",
            from.name(),
            to.name(),
            join_labels(from, to, &labels, "\\n")
        ));
    }
    out.push_str("}\n");
    out
}

/// The full table, every state × event, as Markdown.
pub fn table() -> String {
    let mut out = String::from(
        "<!-- Generated from src/machine.rs by `cargo test` (see tests/diagrams.rs); do not edit. -->\n\
         # latd transition table\n\nEvery state against every event: the next state(s) and what the daemon does.\n\n| state | event | next | does |\n|---|---|---|---|\n",
    );
    for from in StateKind::ALL {
        for event in EventKind::ALL {
            let r = rule(from, event);
            let to: Vec<&str> = r.to.iter().map(|s| s.name()).collect();
            let does = match r.does {
                Does::Refuse(why) => format!("refuse: {why}"),
                d => does_label(d),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                from.name(),
                event.name(),
                to.join(" or "),
                does
            ));
        }
    }
    out
}
