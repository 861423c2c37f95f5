//! The committed diagrams in state-diagrams/ must be what the code
//! generates from the transition table. To regenerate after changing the
//! machine: `UPDATE_DIAGRAMS=1 cargo test --test diagrams`, then commit.

use std::path::Path;

fn check(name: &str, generated: String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("state-diagrams")
        .join(name);
    if std::env::var_os("UPDATE_DIAGRAMS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "state-diagrams/{name} differs from what src/machine.rs generates.\n\
         Regenerate it with: UPDATE_DIAGRAMS=1 cargo test --test diagrams\n\
         --- generated ---\n{generated}"
    );
}

#[test]
fn mermaid_diagram_is_current() {
    check("machine.mmd", latd::diagram::mermaid());
}

#[test]
fn dot_diagram_is_current() {
    check("machine.dot", latd::diagram::dot());
}

#[test]
fn transition_table_is_current() {
    check("transitions.md", latd::diagram::table());
}

#[test]
fn diagram_has_every_state_and_no_ignored_edge() {
    let m = latd::diagram::mermaid();
    for s in latd::machine::StateKind::ALL {
        assert!(m.contains(s.name()), "{} missing", s.name());
    }
    assert!(!m.contains("ignore"), "ignored events are not drawn");
}

#[test]
fn readme_shows_the_current_diagram() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let body: String = latd::diagram::mermaid()
        .lines()
        .filter(|l| !l.starts_with("%%"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        readme.contains(&format!("```mermaid\n{body}```")),
        "README.md's mermaid block differs from the generated diagram; paste state-diagrams/machine.mmd (without its comment line) into it:\n{body}"
    );
}
