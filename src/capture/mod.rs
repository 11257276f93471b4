//! Capture: frames from cameras and files, converted to RGB for the vision stage.

pub mod decode;

pub use decode::{decode_image, load_image, DecodeError};
