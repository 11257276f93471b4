//! Compressed images (files, MJPEG frames) -> RGB, refusing damaged input instead of
//! passing on a half-grey picture.

use std::path::{Path, PathBuf};

use image::RgbImage;

/// Why an image could not be turned into RGB.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("truncated JPEG: no end-of-image marker after {len} bytes")]
    TruncatedJpeg { len: usize },
    #[error("cannot decode image: {0}")]
    Image(#[from] image::ImageError),
    #[error("{path}: {error}")]
    File {
        path: PathBuf,
        error: Box<DecodeError>,
    },
}

/// Decodes PNG, JPEG or BMP bytes to RGB. JPEG data must be complete: the image crate's
/// decoder fills a cut-off stream with grey and reports success, which would feed the
/// counter a picture of half a shelf.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    decode_image_within(bytes, image::Limits::no_limits())
}

/// [`decode_image`] for bytes from outside (scanner uploads): the image's size and the
/// decoder's memory are bounded by `limits`.
pub fn decode_image_within(bytes: &[u8], limits: image::Limits) -> Result<RgbImage, DecodeError> {
    if is_jpeg(bytes) && !jpeg_is_complete(bytes) {
        return Err(DecodeError::TruncatedJpeg { len: bytes.len() });
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Image(image::ImageError::IoError(e)))?;
    reader.limits(limits);
    Ok(reader.decode()?.into_rgb8())
}

/// Reads and decodes an image file; errors name the file.
pub fn load_image(path: &Path) -> Result<RgbImage, DecodeError> {
    let bytes = std::fs::read(path).map_err(|error| DecodeError::Io {
        path: path.to_owned(),
        error,
    })?;
    decode_image(&bytes).map_err(|e| DecodeError::File {
        path: path.to_owned(),
        error: Box::new(e),
    })
}

fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xff, 0xd8])
}

/// A JPEG ends with the EOI marker; cameras may pad a frame with zeros after it.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    end >= 4 && bytes[end - 2..end] == [0xff, 0xd9]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg() -> Vec<u8> {
        let img = RgbImage::from_pixel(16, 16, image::Rgb([200, 30, 30]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_complete_jpeg_decodes_to_its_colour() {
        let img = decode_image(&jpeg()).unwrap();
        let p = img.get_pixel(8, 8);
        assert!(p[0] > 180 && p[1] < 60 && p[2] < 60, "{p:?}");
    }

    #[test]
    fn a_jpeg_padded_with_zeros_after_its_end_marker_still_decodes() {
        let mut j = jpeg();
        j.extend([0u8; 64]);
        assert!(decode_image(&j).is_ok());
    }

    #[test]
    fn a_truncated_jpeg_is_refused() {
        let j = jpeg();
        let err = decode_image(&j[..j.len() / 2]).unwrap_err();
        assert!(matches!(err, DecodeError::TruncatedJpeg { .. }), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_image(b"").is_err());
        assert!(decode_image(&[0xff, 0xd8, 0xff, 0xd9]).is_err());
        assert!(decode_image(b"\x89PNG\r\n\x1a\n garbage").is_err());
    }
}
