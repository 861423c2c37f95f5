//! latd and latc: a daemon and client that drive the LAT SDK image builder
//! through files in a shared channel directory.
//!
//! Code map:
//! - [`protocol`]: file names, request/reply/status documents (pure);
//! - [`machine`]: the daemon's logic as a pure state machine (no I/O, no clock);
//! - [`diagram`]: the state diagram, generated from [`machine::rule`];
//! - [`effects`]: performs what the machine asks: files, processes, signals;
//! - [`sdklog`]: the SDK's log: its real file, success line and errors;
//! - [`mounts`]: unmounts what a build left mounted under its workdir;
//! - [`tree`]: removes a tree without following symlinks or crossing mounts;
//! - [`channel`]: reads requests from the channel dir and writes replies;
//! - [`daemon`]: the poll loop that ties them together (`latd`);
//! - [`client`]: the client side (`latc`);
//! - [`yaml_limits`]: what YAML from clients may cost, checked before parsing;
//! - [`heartbeat`]: `latd.alive`, and how a client judges it without comparing clocks;
//! - [`lock`]: `latd.lock`, who serves a channel, and a test of it for clients.

pub mod cgroup;
pub mod channel;
pub mod cli;
pub mod client;
pub mod clock;
pub mod daemon;
pub mod diagram;
pub mod driver;
pub mod effects;
pub mod fsutil;
pub mod heartbeat;
pub mod lock;
pub mod machine;
pub mod mounts;
pub mod protocol;
pub mod sdklog;
pub mod tree;
pub mod validate;
pub mod yaml_limits;
