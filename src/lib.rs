//! shelfwatch: counts products on warehouse shelves from cameras and publishes stable
//! counts over MQTT.
//!
//! Data flows `capture -> vision -> counting -> publish`; the daemon wires them. This
//! crate is the whole program; `main.rs` only parses arguments and calls [`cli::run`].

pub mod alloc;
pub mod capture;
pub mod cli;
pub mod config;
pub mod counting;
pub mod daemon;
pub mod publish;
pub mod vision;
