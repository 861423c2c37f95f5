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
//! of open collections (bounded by the depth limit), nothing else. The
//! events come from libyaml-safer, libyaml ported function by function to
//! safe Rust and held to libyaml's own test suite, so the check reads the
//! text as the libyaml under serde_yaml does: the same documents, nodes,
//! anchors and tags, and the same place where a text stops parsing. A
//! document the parser stops on (bad syntax, an unknown anchor) is left to
//! serde_yaml, which stops at the same place with a better message;
//! everything before that place was within the limits. Because serde_yaml
//! builds what it read before reporting such an error, that prefix is also
//! counted the way serde_yaml builds it (see [`Tally`]), so that even a
//! difference between the two parsers cannot let a larger value through.

use serde::de::{self, DeserializeSeed, Visitor};
use std::cell::Cell;
use std::collections::HashMap;
use std::io::{BufRead, Read};

/// What a document may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of collections.
    pub max_depth: usize,
    /// Nodes (scalars, sequences, mappings, keys included) once every
    /// alias is expanded.
    pub max_nodes: u64,
    /// Bytes of scalar text, tags included, once every alias is expanded.
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
    /// The parser could not even be set up. No longer returned: the
    /// parser now has nothing to set up that can fail; kept so that the
    /// reasons stay the same.
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
    /// Scalar bytes, tags included, once expanded.
    pub scalar_bytes: u64,
    /// Deepest nesting seen.
    pub depth: usize,
    /// Aliases seen.
    pub aliases: u64,
}

/// The text as libyaml's reader takes it in: 16 KiB at a time, the size of
/// its raw buffer, each piece decoded (and bad UTF-8 or a control character
/// in it refused) as a whole, an incomplete last character carried over to
/// the next. Given all the text at once, libyaml-safer would decode and
/// refuse a bad byte anywhere in it before its first event, where the
/// libyaml under serde_yaml first builds what comes before that piece.
struct Pieces<'a> {
    text: &'a [u8],
    /// Consumed up to here.
    at: usize,
    /// The piece being decoded ends here.
    end: usize,
}

/// libyaml's `YAML_RAW_BUFFER_SIZE`.
const PIECE: usize = 16384;

impl<'a> Pieces<'a> {
    fn new(text: &'a [u8]) -> Pieces<'a> {
        Pieces {
            text,
            at: 0,
            end: 0,
        }
    }
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.fill_buf()?.len().min(buf.len());
        buf[..n].copy_from_slice(&self.text[self.at..self.at + n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Pieces<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        // What is left of a piece once it is decoded is at most the first
        // bytes of one character: the next piece starts with them.
        if self.end - self.at < 4 {
            self.end = self.text.len().min(self.at + PIECE);
        }
        Ok(&self.text[self.at..self.end])
    }

    fn consume(&mut self, n: usize) {
        self.at = (self.at + n).min(self.end);
    }
}

/// One event, reduced to what the limits need.
enum Ev {
    End,
    Scalar {
        anchor: Option<String>,
        len: u64,
    },
    Start {
        anchor: Option<String>,
        tag_len: u64,
    },
    CollectionEnd,
    Alias {
        anchor: String,
    },
    Other,
    /// The parser refused the text: serde_yaml will say why.
    Error,
}

fn next_event(p: &mut libyaml_safer::Parser<Pieces<'_>>) -> Ev {
    use libyaml_safer::EventData as E;
    let Ok(event) = p.parse() else {
        return Ev::Error;
    };
    match event.data {
        E::StreamEnd => Ev::End,
        E::Scalar {
            anchor, tag, value, ..
        } => Ev::Scalar {
            anchor,
            len: (value.len() + tag.map_or(0, |t| t.len())) as u64,
        },
        E::SequenceStart { anchor, tag, .. } | E::MappingStart { anchor, tag, .. } => Ev::Start {
            anchor,
            tag_len: tag.map_or(0, |t| t.len()) as u64,
        },
        E::SequenceEnd | E::MappingEnd => Ev::CollectionEnd,
        E::Alias { anchor } => Ev::Alias { anchor },
        E::StreamStart { .. } | E::DocumentStart { .. } | E::DocumentEnd { .. } => Ev::Other,
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
type OpenCollection = (Option<(String, u64)>, u64, u64);

/// Where the scan of a text ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// At the end of the stream.
    End,
    /// Where the parser refused the text or met an unknown anchor: before
    /// the end, at the place serde_yaml stops too.
    Early,
    /// Where the parser panicked.
    Panicked,
}

/// Checks `bytes` against `limits` without building anything. `Ok` also
/// for a document the parser cannot read (the real parse reports it).
pub fn check(bytes: &[u8], limits: &Limits) -> Result<Cost, Exceeded> {
    let (cost, stop) = scan(bytes, limits)?;
    if stop != Stop::End {
        Tally::count(bytes, limits)?;
    }
    Ok(cost)
}

/// The event scan of [`check`], and where it ended.
///
/// A panic in the parser is taken as the parser refusing the text, what
/// serde_yaml builds from it then counted all the same. libyaml-safer
/// 0.3.0 panics where a text ends inside some tokens (`"\`, `|\n - `): it
/// reads past the end, where libyaml reads the NUL bytes that pad its
/// buffer. (Adding a final line break to such a text would avoid it, but
/// changes which events come before a parse error.) This needs
/// `panic = "unwind"`, Rust's default, which the release profile keeps.
fn scan(bytes: &[u8], limits: &Limits) -> Result<(Cost, Stop), Exceeded> {
    // What was counted before a panic was within the limits (a limit
    // passed returns at once).
    let mut cost = Cost::default();
    let scanned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        scan_events(bytes, limits, &mut cost)
    }));
    Ok((cost, scanned.unwrap_or(Ok(Stop::Panicked))?))
}

fn scan_events(bytes: &[u8], limits: &Limits, cost: &mut Cost) -> Result<Stop, Exceeded> {
    let mut parser = libyaml_safer::Parser::new();
    parser.set_input(Pieces::new(bytes));
    // serde_yaml reads every text as UTF-8, whatever byte order mark it
    // starts with.
    parser.set_encoding(libyaml_safer::Encoding::Utf8);
    // Each anchor: being defined (its collection still open), or its
    // expanded size.
    let mut anchors: HashMap<String, Anchor> = HashMap::new();
    // Open collections: their anchor (and its definition number) and the
    // running totals at their start.
    let mut open: Vec<OpenCollection> = Vec::new();
    let mut defined = 0u64;
    loop {
        match next_event(&mut parser) {
            Ev::End => return Ok(Stop::End),
            Ev::Error => return Ok(Stop::Early),
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
            Ev::Start { anchor, tag_len } => {
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
                cost.scalar_bytes += tag_len;
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
                    None => return Ok(Stop::Early),
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

/// What serde_yaml builds from a text, counted as it builds it: a serde
/// visitor that owns nothing, fed by serde_yaml's own parser, which
/// replays every alias as it would into a value. Used where the event scan
/// stopped early: serde_yaml then builds what it read before its error,
/// and this makes sure that is within the limits whatever the scan saw.
/// It gives up as soon as a limit is passed, so its work is bounded by
/// the limits too.
struct Tally<'l> {
    limits: &'l Limits,
    nodes: Cell<u64>,
    scalar_bytes: Cell<u64>,
    exceeded: Cell<Option<Exceeded>>,
}

impl Tally<'_> {
    /// The nodes serde_yaml builds from `bytes` (also before an error it
    /// reports), or which limit they pass.
    fn count(bytes: &[u8], limits: &Limits) -> Result<u64, Exceeded> {
        let tally = Tally {
            limits,
            nodes: Cell::new(0),
            scalar_bytes: Cell::new(0),
            exceeded: Cell::new(None),
        };
        let _ = TallyNode {
            tally: &tally,
            depth: 0,
        }
        .deserialize(serde_yaml::Deserializer::from_slice(bytes));
        match tally.exceeded.take() {
            Some(e) => Err(e),
            None => Ok(tally.nodes.get()),
        }
    }

    /// One node of `len` scalar bytes.
    fn add<E: de::Error>(&self, len: usize) -> Result<(), E> {
        self.nodes.set(self.nodes.get() + 1);
        if self.nodes.get() > self.limits.max_nodes {
            return self.exceeded(Exceeded::Nodes(self.limits.max_nodes));
        }
        self.bytes(len)
    }

    /// `len` bytes of scalar or tag text.
    fn bytes<E: de::Error>(&self, len: usize) -> Result<(), E> {
        self.scalar_bytes
            .set(self.scalar_bytes.get().saturating_add(len as u64));
        if self.scalar_bytes.get() > self.limits.max_scalar_bytes {
            return self.exceeded(Exceeded::ScalarBytes(self.limits.max_scalar_bytes));
        }
        Ok(())
    }

    fn exceeded<E: de::Error>(&self, e: Exceeded) -> Result<(), E> {
        let message = e.to_string();
        self.exceeded.set(Some(e));
        Err(E::custom(message))
    }
}

/// A node for [`Tally`] at `depth` collections deep.
#[derive(Clone, Copy)]
struct TallyNode<'t, 'l> {
    tally: &'t Tally<'l>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for TallyNode<'_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl TallyNode<'_, '_> {
    /// Opens a collection: one node, one level deeper.
    fn open<E: de::Error>(self) -> Result<Self, E> {
        self.tally.add(0)?;
        if self.depth >= self.tally.limits.max_depth {
            self.tally
                .exceeded(Exceeded::Depth(self.tally.limits.max_depth))?;
        }
        Ok(TallyNode {
            depth: self.depth + 1,
            ..self
        })
    }
}

impl<'de> Visitor<'de> for TallyNode<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.tally.add(0)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.tally.add(0)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.tally.add(0)
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.tally.add(0)
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.tally.add(0)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.tally.add(0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.tally.add(v.len())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.tally.add(0)
    }

    /// An empty document.
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.tally.add(0)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.open()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.open()?;
        while map.next_key_seed(inner)?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }

    /// A tagged node: serde_yaml hands it over as the tag and the value,
    /// and makes a copy of the tag for each.
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let (tag_len, value) = data.variant_seed(TagLen)?;
        self.tally.bytes(tag_len)?;
        de::VariantAccess::newtype_variant_seed(value, self)
    }
}

/// The length of a tag, read without a copy of it.
struct TagLen;

impl<'de> DeserializeSeed<'de> for TagLen {
    type Value = usize;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for TagLen {
    type Value = usize;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a YAML tag")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
        Ok(v.len())
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
    use serde::Deserialize;

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
    fn a_long_tag_copied_by_aliases_is_refused() {
        // serde_yaml builds a copy of the tag for every alias: 2 000 of a
        // 100 KB tag are 200 MB, from a 110 KB document of short scalars.
        let mut doc = format!("a: &x !{} v\nb: [", "t".repeat(100_000));
        for _ in 0..2000 {
            doc.push_str("*x, ");
        }
        doc.push_str("]\n");
        assert_eq!(
            check(doc.as_bytes(), &IMAGE),
            Err(Exceeded::ScalarBytes(IMAGE.max_scalar_bytes))
        );
        let doc = doc.replace("v\nb: [", "v\nb: [x");
        assert_eq!(
            Tally::count(doc.as_bytes(), &IMAGE),
            Err(Exceeded::ScalarBytes(IMAGE.max_scalar_bytes))
        );
        // The same on a collection.
        let mut doc = format!("a: &x !{} [v]\nb: [", "t".repeat(100_000));
        for _ in 0..2000 {
            doc.push_str("*x, ");
        }
        doc.push_str("]\n");
        assert_eq!(
            check(doc.as_bytes(), &IMAGE),
            Err(Exceeded::ScalarBytes(IMAGE.max_scalar_bytes))
        );
        // A tag counts its text.
        let c = check(b"a: !t [x, !u y]\n", &IMAGE).unwrap();
        assert_eq!(c.scalar_bytes, "a!tx!uy".len() as u64);
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

    /// Limits nothing passes: for comparing what the check reads with what
    /// serde_yaml builds.
    const OPEN: Limits = Limits {
        max_depth: 1 << 20,
        max_nodes: u64::MAX / 2,
        max_scalar_bytes: u64::MAX / 2,
        allow_aliases: true,
    };

    /// The nodes serde_yaml builds from `bytes`, also before an error.
    fn built(bytes: &[u8]) -> u64 {
        Tally::count(bytes, &OPEN).unwrap()
    }

    /// The check's nodes and serde_yaml's value, for a text that parses.
    fn both(text: &str) -> (Cost, serde_yaml::Value) {
        let (cost, stop) = scan(text.as_bytes(), &IMAGE).unwrap();
        assert_eq!(stop, Stop::End, "{text:?}");
        let v = serde_yaml::from_str::<serde_yaml::Value>(text).unwrap();
        (cost, v)
    }

    #[test]
    fn every_document_of_a_stream_is_checked() {
        // serde_yaml refuses a stream of two documents, but only once it
        // has built the first: a bomb there is refused here.
        let two = format!("{}---\nb: 2\n", bomb(8, 10, 0));
        assert_eq!(
            check(two.as_bytes(), &IMAGE),
            Err(Exceeded::Nodes(IMAGE.max_nodes))
        );
        // And one in a later document too, though serde_yaml would only
        // parse that one.
        let later = format!("a: 1\n---\n{}", bomb(8, 10, 0));
        assert_eq!(
            check(later.as_bytes(), &IMAGE),
            Err(Exceeded::Nodes(IMAGE.max_nodes))
        );
        // Two plain documents pass, counted together; serde_yaml says why
        // it refuses them.
        let c = check(b"a: 1\n---\nb: 2\n...\n", &REQUEST).unwrap();
        assert_eq!(c.nodes, 6);
        assert!(parse_value(b"a: 1\n---\nb: 2\n", &REQUEST)
            .unwrap_err()
            .contains("more than one document"));
        // Anchors count across documents: naming one twice is refused, and
        // an alias to an earlier document's anchor costs its full size
        // (serde_yaml knows no such anchor and refuses the stream).
        assert_eq!(
            check(b"a: &x 1\n---\nb: &x 2\n", &IMAGE),
            Err(Exceeded::Redefined)
        );
        let c = check(b"--- &x [1, 2]\n--- [*x]\n", &IMAGE).unwrap();
        assert_eq!(c.nodes, 3 + 1 + 3);
        assert!(parse_value(b"--- &x [1, 2]\n--- [*x]\n", &IMAGE).is_err());
    }

    #[test]
    fn an_empty_document_is_what_serde_yaml_reads_as_null() {
        // No document at all: nothing to count; serde_yaml makes a null
        // of it without an event.
        for text in ["", "\n", "# only a comment\n", "%YAML 1.1\n---\n"] {
            let (cost, v) = both(text);
            let expected = if text.contains("---") { 1 } else { 0 };
            assert_eq!(cost.nodes, expected, "{text:?}");
            assert_eq!(v, serde_yaml::Value::Null, "{text:?}");
        }
        // An explicit empty document is one empty scalar, read as null.
        for text in ["---\n", "--- \n...\n", "---\n# nothing\n"] {
            let (cost, v) = both(text);
            assert_eq!((cost.nodes, cost.scalar_bytes), (1, 0), "{text:?}");
            assert_eq!(v, serde_yaml::Value::Null, "{text:?}");
        }
        // A document end marker alone is not a document for either.
        assert_eq!(scan(b"...\n", &IMAGE).unwrap().1, Stop::Early);
        assert!(parse_value(b"...\n", &REQUEST).is_err());
    }

    #[test]
    fn tagged_nodes_are_counted_as_serde_yaml_builds_them() {
        for text in [
            "a: !t x\n",
            "a: !t [1, 2]\n",
            "a: !t {k: v}\n",
            "!t {k: !u [x, !v y]}\n",
            "a: !!str 1\nb: !!int '2'\n",
            "a: !<tag:example.com,2000:x> v\n",
            "%TAG !e! tag:example.com,2000:\n--- !e!thing {a: !e!x 1}\n",
            "a: &x !t [1, 2]\nb: [*x, *x]\n",
        ] {
            let (cost, v) = both(text);
            assert_eq!(cost.nodes, count(&v), "{text:?}");
            assert_eq!(built(text.as_bytes()), count(&v), "{text:?}");
        }
        // An undeclared tag handle stops both parsers.
        assert_eq!(scan(b"a: !e!x 1\n", &IMAGE).unwrap().1, Stop::Early);
        assert!(parse_value(b"a: !e!x 1\n", &IMAGE).is_err());
    }

    #[test]
    fn a_byte_order_mark_and_crlf_lines_read_the_same() {
        let plain = check(b"action: status\nworkdir: /w\n", &REQUEST).unwrap();
        for text in [
            "action: status\r\nworkdir: /w\r\n",
            "action: status\rworkdir: /w\r",
        ] {
            let (cost, v) = both(text);
            assert_eq!(cost, plain, "{text:?}");
            assert_eq!(v["action"], "status", "{text:?}");
            assert_eq!(v["workdir"], "/w", "{text:?}");
        }
        // A byte order mark is skipped, but takes a column: a line after it
        // at column 0 is less indented than the first, a second document
        // without its `---`. Both parsers stop there.
        let (cost, _) = both("\u{feff}action: status\n");
        assert_eq!(cost, check(b"action: status\n", &REQUEST).unwrap());
        let text = "\u{feff}action: status\r\nworkdir: /w\r\n";
        let (cost, stop) = scan(text.as_bytes(), &REQUEST).unwrap();
        assert_eq!((cost.nodes, stop), (3, Stop::Early));
        assert_eq!(built(text.as_bytes()), 3);
        assert!(parse_value(text.as_bytes(), &REQUEST).is_err());
        // serde_yaml reads every text as UTF-8: a UTF-16 one is refused by
        // both.
        let utf16: Vec<u8> = [0xff, 0xfe]
            .into_iter()
            .chain("a: 1\n".encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        assert_eq!(scan(&utf16, &IMAGE).unwrap().1, Stop::Early);
        assert!(parse_value(&utf16, &IMAGE).is_err());
    }

    #[test]
    fn a_bad_byte_stops_the_check_where_it_stops_serde_yaml() {
        // libyaml decodes its input 16 KiB at a time and refuses a piece
        // with a bad byte before any event from it: serde_yaml builds
        // nothing from a bomb with a bad byte behind it in the same piece,
        // and the check reads no further either.
        for bad in [&b"\xff"[..], b"\x01", b"\xc3"] {
            let near = [bomb(8, 10, 0).as_bytes(), b"# end", bad, b"\n"].concat();
            assert_eq!(built(&near), 0);
            assert_eq!(scan(&near, &IMAGE).unwrap(), (Cost::default(), Stop::Early));
            assert!(check(&near, &IMAGE).is_ok());
            assert!(parse_value(&near, &IMAGE)
                .unwrap_err()
                .starts_with("not valid YAML"));
            // One piece later, serde_yaml builds the bomb before it meets
            // the bad byte: refused.
            let far = [
                bomb(8, 10, 0).as_bytes(),
                "#".repeat(PIECE).as_bytes(),
                bad,
                b"\n",
            ]
            .concat();
            assert_eq!(check(&far, &IMAGE), Err(Exceeded::Nodes(IMAGE.max_nodes)));
        }
        // A character cut off by the end stops both where it starts.
        let cut = b"? ---\n- \xc3";
        assert_eq!(scan(cut, &IMAGE).unwrap().0.nodes, built(cut));
        // And where the end cuts off a simple key.
        let key = b"? --- # c---\n\\";
        assert_eq!(scan(key, &IMAGE).unwrap().1, Stop::Early);
        assert_eq!(scan(key, &IMAGE).unwrap().0.nodes, built(key));
        // Events before the bad piece count: a document within the limits
        // is then left to serde_yaml.
        let doc = [
            b"a: [1, 2]\n".as_slice(),
            "#".repeat(PIECE).as_bytes(),
            b"\nb: \xff\n",
        ]
        .concat();
        let (cost, stop) = scan(&doc, &IMAGE).unwrap();
        assert_eq!((cost.nodes, stop), (5, Stop::Early));
        assert_eq!(built(&doc), 5);
    }

    #[test]
    fn a_panic_of_the_parser_is_taken_as_a_refusal_of_the_text() {
        // Texts that end inside a token the parser reads past its end.
        for text in [&b"\"\\"[..], b"a: \"x\\", b"|\n - ", b"a: |\n - "] {
            assert_eq!(scan(text, &REQUEST).unwrap().1, Stop::Panicked);
            assert!(check(text, &REQUEST).is_ok());
        }
        assert!(parse_value(b"a: \"x\\", &REQUEST).is_err());
        assert_eq!(parse_value(b"a: |\n - ", &REQUEST).unwrap()["a"], "- ");
        // What the scan read before the panic was held to the limits, and
        // what serde_yaml builds from the text is counted.
        let doc = format!("{}x: |\n - ", bomb(8, 10, 0));
        assert_eq!(
            scan(doc.as_bytes(), &IMAGE),
            Err(Exceeded::Nodes(IMAGE.max_nodes))
        );
        let doc = "a: &x [1]\nb: *x\nc: |\n - ";
        assert_eq!(scan(doc.as_bytes(), &REQUEST), Err(Exceeded::Alias));
        let (cost, stop) = scan(b"a: [1, 2]\nb: |\n - ", &REQUEST).unwrap();
        assert_eq!((cost.nodes, stop), (6, Stop::Panicked));
        assert_eq!(Tally::count(b"a: [1, 2]\nb: |\n - ", &REQUEST), Ok(7));
    }

    #[test]
    fn what_serde_yaml_builds_before_an_error_is_held_to_the_limits() {
        // Were the scan to stop earlier than serde_yaml (it does not), what
        // serde_yaml builds from the text is still counted.
        // (Padded: serde_yaml's own guard would stop a short one early.)
        let doc = format!("{}x: [", bomb(8, 10, 5000));
        assert_eq!(
            Tally::count(doc.as_bytes(), &IMAGE),
            Err(Exceeded::Nodes(IMAGE.max_nodes))
        );
        let deep = "[".repeat(100);
        assert_eq!(
            Tally::count(deep.as_bytes(), &IMAGE),
            Err(Exceeded::Depth(IMAGE.max_depth))
        );
        let mut wide = format!("a: &x {}\n", "y".repeat(100_000));
        for i in 0..100 {
            wide.push_str(&format!("b{i}: *x\n"));
        }
        wide.push_str("c: [");
        assert_eq!(
            Tally::count(wide.as_bytes(), &IMAGE),
            Err(Exceeded::ScalarBytes(IMAGE.max_scalar_bytes))
        );
        assert_eq!(Tally::count(b"a: [1, 2]\nb: [", &IMAGE), Ok(7));
    }

    /// Texts of YAML's punctuation, names, tags, directives, markers, line
    /// ends and bad bytes: mostly invalid, often in odd places.
    fn yamlish() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop::sample::select(vec![
            &b"a"[..],
            b"1",
            b" ",
            b"  ",
            b"\n",
            b"\r\n",
            b"\r",
            b"\t",
            b"- ",
            b"-",
            b": ",
            b":",
            b"? ",
            b"[",
            b"]",
            b"{",
            b"}",
            b", ",
            b"&a ",
            b"*a",
            b"&b ",
            b"*b ",
            b"!t ",
            b"!!str ",
            b"!e!x ",
            b"'",
            b"\"",
            b"\\",
            b"# c",
            b"|",
            b">",
            b"---\n",
            b"--- ",
            b"...\n",
            b"%YAML 1.1\n",
            b"%TAG !e! tag:x,2000:\n",
            b"\xef\xbb\xbf",
            b"\x01",
            b"\xff",
            b"\xc3",
            "\u{e9}".as_bytes(),
        ]);
        prop::collection::vec(piece, 0..30).prop_map(|v| v.concat())
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

        /// The check reads a text as serde_yaml does: it stops (a refusal
        /// or an unknown anchor) exactly when serde_yaml finds the stream
        /// in error, it never counts fewer nodes than serde_yaml builds
        /// (also before an error), and exactly as many from a document
        /// serde_yaml reads.
        #[test]
        fn the_check_reads_what_serde_yaml_reads(bytes in yamlish()) {
            let Ok((cost, stop)) = scan(&bytes, &OPEN) else {
                // Redefined or SelfAlias: refused, nothing to compare.
                return Ok(());
            };
            let mut stream_error = None;
            for document in serde_yaml::Deserializer::from_slice(&bytes) {
                if let Err(e) = serde::de::IgnoredAny::deserialize(document) {
                    stream_error = Some(e.to_string());
                    break;
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            if stop == Stop::Panicked {
                // Left to the count of what serde_yaml builds.
                prop_assert!(check(&bytes, &OPEN).is_ok(), "{:?}", text);
                return Ok(());
            }
            match (stop, &stream_error) {
                (Stop::End, None) | (Stop::Early, Some(_)) => {}
                // The check keeps anchors across documents, serde_yaml
                // knows each document's own.
                (Stop::End, Some(e)) => prop_assert!(e.starts_with("unknown anchor"), "{:?}", text),
                (_, None) => prop_assert!(false, "stopped early: {:?}", text),
                (Stop::Panicked, Some(_)) => unreachable!(),
            }
            // (serde_yaml makes a null of a stream without a document.)
            prop_assert!(built(&bytes) <= cost.nodes.max(1), "{:?}", text);
            if let Ok(v) = serde_yaml::from_slice::<serde_yaml::Value>(&bytes) {
                if cost.nodes > 0 {
                    prop_assert_eq!(cost.nodes, count(&v), "{:?}", text);
                }
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
