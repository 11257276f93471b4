//! shelfwatch: counts products on warehouse shelves from cameras and publishes stable
//! counts over MQTT.
//!
//! Data flows `capture -> vision -> (identify) -> counting -> publish`; the daemon wires
//! them. `identify` names detections by SKU when a gallery is configured. This
//! crate is the whole program; `main.rs` only parses arguments and calls [`cli::run`].

pub mod alloc;
pub mod capture;
pub mod cli;
pub mod config;
pub mod counting;
pub mod daemon;
pub mod fsutil;
pub mod identify;
pub mod publish;
pub mod vision;
pub mod web;

#[cfg(test)]
mod fuzz_tests;
