//! The integration tests, in one crate: each test binary links tract and the whole
//! daemon, and on the ARM targets every one of them is cross-linked, so one binary
//! instead of one per file saves a link per file on every target. Shared helpers (the
//! daemon under a kill-on-drop guard, configs, mosquitto, fixture paths) are in util.rs.

mod util;

mod browser;

mod cli;
mod counter;
mod daemon;
mod fidelity;
mod identify;
mod kernels;
mod mqtt;
mod platform;
mod schemas;
mod web;
