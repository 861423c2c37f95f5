//! Limits on YAML that comes from clients (requests, image YAMLs,
//! replies), checked on the parser's event stream before any value is
//! built. serde_yaml expands every alias into a full copy of what its
//! anchor names, and its own guard (a replay count of a hundred times the
//! document's events) still lets a 1 MB document of anchors nested a few
//! levels deep expand into billions of nodes. Here the size of what the
//! document would expand into is counted exactly, node by node and byte by
//! byte, without expanding anything: an alias costs what its anchor cost.
//! A document over a limit is refused before serde_yaml sees it.
//!
//! The scan streams: it holds the anchors' names and sizes and the stack
//! of open collections (bounded by the depth limit), nothing else. A
//! document libyaml cannot parse is left to serde_yaml, which parses it
//! with the same libyaml and stops at the same place, with a better
//! message; everything before that place was within the limits.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use unsafe_libyaml as unsafe_yaml;

/// What a document may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of collections.
    pub max_depth: usize,
    /// Nodes (scalars, sequences, mappings, keys included) once every
    /// alias is expanded.
    pub max_nodes: u64,
    /// Bytes of scalar text once every alias is expanded.
    pub max_scalar_bytes: u64,
    /// Whether aliases (`*name`) may appear at all.
    pub allow_aliases: bool,
}

/// A request is a flat mapping of three strings: it never needs an alias.
pub const REQUEST: Limits = Limits {
    max_depth: 64,
    max_nodes: 4096,
    max_scalar_bytes: 256 << 10,
    allow_aliases: false,
};

/// An image YAML: package lists of thousands of entries, a few anchors
/// perhaps; far below these. What serde_yaml builds from a document within
/// them stays in the tens of megabytes.
pub const IMAGE: Limits = Limits {
    max_depth: 64,
    max_nodes: 200_000,
    max_scalar_bytes: 8 << 20,
    allow_aliases: true,
};

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exceeded {
    Alias,
    Depth(usize),
    Nodes(u64),
    ScalarBytes(u64),
    /// An alias inside the collection its anchor names: infinite.
    SelfAlias,
    /// An anchor name defined twice. serde_yaml numbers anchors so that a
    /// redefinition can re-point earlier aliases to later nodes (even to
    /// one that holds the alias); no image YAML needs it.
    Redefined,
    /// The parser could not even be set up (out of memory).
    Parser,
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exceeded::Alias => write!(
                f,
                "it uses a YAML alias (*name), which is not accepted here"
            ),
            Exceeded::Depth(n) => write!(f, "it nests deeper than {n} levels"),
            Exceeded::Nodes(n) => write!(
                f,
                "it would expand into more than {n} YAML nodes (aliases counted at their full size)"
            ),
            Exceeded::ScalarBytes(n) => write!(
                f,
                "its text would expand to more than {n} bytes (aliases counted at their full size)"
            ),
            Exceeded::SelfAlias => write!(f, "an alias refers to the collection it is inside of"),
            Exceeded::Redefined => write!(f, "it defines an anchor (&name) twice"),
            Exceeded::Parser => write!(f, "the YAML parser could not be set up"),
        }
    }
}

/// What a document within the limits costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    /// Nodes once expanded.
    pub nodes: u64,
    /// Scalar bytes once expanded.
    pub scalar_bytes: u64,
    /// Deepest nesting seen.
    pub depth: usize,
    /// Aliases seen.
    pub aliases: u64,
}

/// The libyaml parser, freed on drop; kept on the heap and never moved.
struct Parser(Box<MaybeUninit<unsafe_yaml::yaml_parser_t>>);

impl Parser {
    fn new(input: &[u8]) -> Option<Parser> {
        let mut p = Parser(Box::new(MaybeUninit::uninit()));
        // SAFETY: the pointer is to writable memory for a yaml_parser_t,
        // which yaml_parser_initialize fills; the input outlives the
        // parser (both live only inside `check`).
        unsafe {
            if unsafe_yaml::yaml_parser_initialize(p.0.as_mut_ptr()).fail {
                return None;
            }
            unsafe_yaml::yaml_parser_set_encoding(
                p.0.as_mut_ptr(),
                unsafe_yaml::YAML_UTF8_ENCODING,
            );
            unsafe_yaml::yaml_parser_set_input_string(
                p.0.as_mut_ptr(),
                input.as_ptr(),
                input.len() as _,
            );
        }
        Some(p)
    }
}

impl Drop for Parser {
    fn drop(&mut self) {
        // SAFETY: initialized in `new` (a failed one is never built).
        unsafe { unsafe_yaml::yaml_parser_delete(self.0.as_mut_ptr()) }
    }
}

/// One event, reduced to what the limits need.
enum Ev {
    End,
    Scalar {
        anchor: Option<Vec<u8>>,
        len: u64,
    },
    Start {
        anchor: Option<Vec<u8>>,
    },
    CollectionEnd,
    Alias {
        anchor: Vec<u8>,
    },
    Other,
    /// libyaml refused the text: serde_yaml will say why.
    Error,
}

/// # Safety
/// `ptr` is null or a NUL-terminated string owned by the current event.
unsafe fn anchor_of(ptr: *const u8) -> Option<Vec<u8>> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: by the caller's contract.
    Some(
        unsafe { std::ffi::CStr::from_ptr(ptr.cast()) }
            .to_bytes()
            .to_vec(),
    )
}

fn next_event(p: &mut Parser) -> Ev {
    let mut ev = MaybeUninit::<unsafe_yaml::yaml_event_t>::uninit();
    // SAFETY: the parser is initialized; a successful yaml_parser_parse
    // fills the event, whose union member is the one its type names, and
    // yaml_event_delete frees it once its fields are copied.
    unsafe {
        let parser = p.0.as_mut_ptr();
        let error = (&*parser).error;
        if error != unsafe_yaml::YAML_NO_ERROR {
            return Ev::Error;
        }
        let e = ev.as_mut_ptr();
        if unsafe_yaml::yaml_parser_parse(parser, e).fail {
            return Ev::Error;
        }
        let out = match (*e).type_ {
            unsafe_yaml::YAML_STREAM_END_EVENT => Ev::End,
            unsafe_yaml::YAML_SCALAR_EVENT => Ev::Scalar {
                anchor: anchor_of((*e).data.scalar.anchor),
                len: (*e).data.scalar.length,
            },
            unsafe_yaml::YAML_SEQUENCE_START_EVENT => Ev::Start {
                anchor: anchor_of((*e).data.sequence_start.anchor),
            },
            unsafe_yaml::YAML_MAPPING_START_EVENT => Ev::Start {
                anchor: anchor_of((*e).data.mapping_start.anchor),
            },
            unsafe_yaml::YAML_SEQUENCE_END_EVENT | unsafe_yaml::YAML_MAPPING_END_EVENT => {
                Ev::CollectionEnd
            }
            unsafe_yaml::YAML_ALIAS_EVENT => match anchor_of((*e).data.alias.anchor) {
                Some(anchor) => Ev::Alias { anchor },
                None => Ev::Error,
            },
            _ => Ev::Other,
        };
        unsafe_yaml::yaml_event_delete(e);
        out
    }
}

/// An anchor seen so far: its collection still open (with its definition
/// number), or its expanded size (nodes, scalar bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anchor {
    Open(u64),
    Done(u64, u64),
}

/// A collection not yet closed: its anchor (and definition number), and
/// the running node and byte totals at its start.
type OpenCollection = (Option<(Vec<u8>, u64)>, u64, u64);

/// Checks `bytes` against `limits` without building anything. `Ok` also
/// for a document libyaml cannot parse (the real parse reports it).
pub fn check(bytes: &[u8], limits: &Limits) -> Result<Cost, Exceeded> {
    let mut parser = Parser::new(bytes).ok_or(Exceeded::Parser)?;
    // Each anchor: being defined (its collection still open), or its
    // expanded size.
    let mut anchors: HashMap<Vec<u8>, Anchor> = HashMap::new();
    // Open collections: their anchor (and its definition number) and the
    // running totals at their start.
    let mut open: Vec<OpenCollection> = Vec::new();
    let mut defined = 0u64;
    let mut cost = Cost::default();
    loop {
        match next_event(&mut parser) {
            Ev::End | Ev::Error => return Ok(cost),
            Ev::Other => {}
            Ev::Scalar { anchor, len } => {
                cost.nodes += 1;
                cost.scalar_bytes += len;
                if let Some(a) = anchor {
                    if anchors.insert(a, Anchor::Done(1, len)).is_some() {
                        return Err(Exceeded::Redefined);
                    }
                }
            }
            Ev::Start { anchor } => {
                if open.len() >= limits.max_depth {
                    return Err(Exceeded::Depth(limits.max_depth));
                }
                let anchor = match anchor {
                    Some(a) => {
                        defined += 1;
                        if anchors.insert(a.clone(), Anchor::Open(defined)).is_some() {
                            return Err(Exceeded::Redefined);
                        }
                        Some((a, defined))
                    }
                    None => None,
                };
                open.push((anchor, cost.nodes, cost.scalar_bytes));
                cost.depth = cost.depth.max(open.len());
                cost.nodes += 1;
            }
            Ev::CollectionEnd => {
                if let Some((Some((a, seq)), n0, b0)) = open.pop() {
                    debug_assert_eq!(anchors.get(&a), Some(&Anchor::Open(seq)));
                    anchors.insert(a, Anchor::Done(cost.nodes - n0, cost.scalar_bytes - b0));
                }
            }
            Ev::Alias { anchor } => {
                if !limits.allow_aliases {
                    return Err(Exceeded::Alias);
                }
                cost.aliases += 1;
                // An unknown anchor is serde_yaml's error to report.
                let (n, b) = match anchors.get(&anchor) {
                    Some(&Anchor::Done(n, b)) => (n, b),
                    Some(Anchor::Open(_)) => return Err(Exceeded::SelfAlias),
                    None => return Ok(cost),
                };
                cost.nodes = cost.nodes.saturating_add(n);
                cost.scalar_bytes = cost.scalar_bytes.saturating_add(b);
            }
        }
        if cost.nodes > limits.max_nodes {
            return Err(Exceeded::Nodes(limits.max_nodes));
        }
        if cost.scalar_bytes > limits.max_scalar_bytes {
            return Err(Exceeded::ScalarBytes(limits.max_scalar_bytes));
        }
    }
}

/// Parses `text` into a value once it passed [`check`] with `limits`.
pub fn parse_value(bytes: &[u8], limits: &Limits) -> Result<serde_yaml::Value, String> {
    check(bytes, limits).map_err(|e| e.to_string())?;
    serde_yaml::from_slice(bytes).map_err(|e| format!("not valid YAML ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Nodes of a value as serde_yaml built it: what `check` predicts.
    fn count(v: &serde_yaml::Value) -> u64 {
        use serde_yaml::Value::*;
        match v {
            Sequence(s) => 1 + s.iter().map(count).sum::<u64>(),
            Mapping(m) => 1 + m.iter().map(|(k, v)| count(k) + count(v)).sum::<u64>(),
            Tagged(t) => count(&t.value),
            _ => 1,
        }
    }

    /// Anchors nested `depth` deep, each naming `width` copies of the one
    /// below, after `pad` padding entries (the shape of a "billion laughs").
    pub fn bomb(depth: usize, width: usize, pad: usize) -> String {
        let mut s = String::from("pad: [");
        for i in 0..pad {
            s.push_str(if i == 0 { "p" } else { ",p" });
        }
        s.push_str("]\nl0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for d in 1..=depth {
            s.push_str(&format!("l{d}: &l{d} ["));
            for w in 0..width {
                s.push_str(&format!("{}*l{}", if w == 0 { "" } else { ", " }, d - 1));
            }
            s.push_str("]\n");
        }
        s
    }

    #[test]
    fn plain_documents_pass_and_are_counted() {
        let c = check(b"action: status\nworkdir: /w\n", &REQUEST).unwrap();
        assert_eq!(c.nodes, 5);
        assert_eq!(c.depth, 1);
        assert_eq!(c.scalar_bytes, "actionstatusworkdir/w".len() as u64);
    }

    #[test]
    fn aliases_are_refused_in_requests_and_counted_in_images() {
        let doc = b"a: &x [1, 2, 3]\nb: *x\n";
        assert_eq!(check(doc, &REQUEST), Err(Exceeded::Alias));
        let c = check(doc, &IMAGE).unwrap();
        assert_eq!(c.nodes, 1 + 2 + 4 + 4);
        assert_eq!(c.aliases, 1);
    }

    #[test]
    fn an_alias_bomb_is_refused_before_anything_is_built() {
        // 10^9 nodes once expanded, from a few hundred bytes.
        let doc = bomb(8, 10, 0);
        assert_eq!(
            check(doc.as_bytes(), &IMAGE),
            Err(Exceeded::Nodes(IMAGE.max_nodes))
        );
        assert!(parse_value(doc.as_bytes(), &IMAGE)
            .unwrap_err()
            .contains("more than"));
    }

    #[test]
    fn one_huge_scalar_copied_by_aliases_is_refused() {
        let mut doc = format!("a: &x {}\n", "y".repeat(100_000));
        for i in 0..100 {
            doc.push_str(&format!("b{i}: *x\n"));
        }
        assert_eq!(
            check(doc.as_bytes(), &IMAGE),
            Err(Exceeded::ScalarBytes(IMAGE.max_scalar_bytes))
        );
    }

    #[test]
    fn depth_is_limited_in_block_and_flow_style() {
        let flow = "[".repeat(100) + &"]".repeat(100);
        assert_eq!(check(flow.as_bytes(), &IMAGE), Err(Exceeded::Depth(64)));
        let mut block = String::new();
        for i in 0..100 {
            block.push_str(&format!("{}k{i}:\n", "  ".repeat(i)));
        }
        assert_eq!(check(block.as_bytes(), &IMAGE), Err(Exceeded::Depth(64)));
    }

    #[test]
    fn an_alias_to_the_collection_it_is_in_is_refused() {
        let doc = b"a: &x [1, [*x, *x]]\n";
        assert_eq!(check(doc, &IMAGE), Err(Exceeded::SelfAlias));
        // serde_yaml would take this *x for the scalar defined after it.
        let doc = b"a: &x 1\nb: &x [1]\nc: [*x]\nd: {k: &x 1}\n";
        assert_eq!(check(doc, &IMAGE), Err(Exceeded::Redefined));
        assert_eq!(
            check(b"a: &x {k: &x 1}\n", &IMAGE),
            Err(Exceeded::Redefined)
        );
    }

    #[test]
    fn unparseable_text_is_left_to_serde_yaml() {
        assert!(check(b"a: [", &REQUEST).is_ok());
        assert!(check(b"a: *nowhere", &IMAGE).is_ok());
        assert!(parse_value(b"a: *nowhere", &IMAGE).is_err());
    }

    /// Small YAML documents made of anchors, aliases, flow and block
    /// collections, scalars and tags.
    fn doc() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            "[a-z]{0,3}".prop_map(|s| format!("'{s}'")),
            Just("1".to_string()),
            Just("~".to_string()),
            (0..4u8).prop_map(|i| format!("*a{i}")),
            Just("!t x".to_string()),
        ];
        let node = leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5)
                    .prop_map(|v| format!("[{}]", v.join(", "))),
                prop::collection::vec(inner.clone(), 0..4).prop_map(|v| {
                    let pairs: Vec<String> = v
                        .iter()
                        .enumerate()
                        .map(|(i, x)| format!("k{i}: {x}"))
                        .collect();
                    format!("{{{}}}", pairs.join(", "))
                }),
                ((0..4u8), inner).prop_map(|(i, x)| format!("&a{i} {x}")),
            ]
        });
        prop::collection::vec(node, 1..6).prop_map(|v| {
            v.iter()
                .enumerate()
                .map(|(i, x)| format!("top{i}: {x}\n"))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The count is exact: what serde_yaml builds has exactly the
        /// nodes `check` predicted, and `check` never panics.
        #[test]
        fn predicted_size_is_what_serde_yaml_builds(text in doc()) {
            let cost = check(text.as_bytes(), &IMAGE);
            if cost == Err(Exceeded::Redefined) {
                return Ok(());
            }
            if let Ok(v) = serde_yaml::from_str::<serde_yaml::Value>(&text) {
                let cost = cost.expect("within the limits");
                prop_assert_eq!(cost.nodes, count(&v), "{}", text);
            }
        }

        /// Arbitrary bytes never panic the scan, and a request with an
        /// alias is never accepted.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = check(&bytes, &REQUEST);
            let _ = check(&bytes, &IMAGE);
            if let Ok(c) = check(&bytes, &REQUEST) {
                prop_assert_eq!(c.aliases, 0);
            }
        }
    }
}
