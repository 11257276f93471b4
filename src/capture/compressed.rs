//! Compressed images (files, MJPEG frames) -> RGB, refusing damaged input instead of
//! passing on a half-grey picture.

use std::path::{Path, PathBuf};

use image::{ImageDecoder, RgbImage};

/// Bounds on one image, checked against its header before a pixel is decoded, so a
/// small file that declares a huge picture (a decompression bomb) costs an error line,
/// not the board's memory. The memory budget counts the decoder's own buffer and the
/// RGB copy made from it: a 16-bit or RGBA image needs both.
///
/// `[decode]` in the config file; the CLI uses the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct DecodeLimits {
    /// Largest width and height accepted.
    pub max_side: u32,
    /// Largest width x height accepted.
    pub max_pixels: u64,
    /// Largest memory for the decoded picture plus its RGB conversion.
    pub max_memory_bytes: u64,
    /// Largest compressed input (file, frame or upload) read at all.
    pub max_input_bytes: u64,
}

impl Default for DecodeLimits {
    /// Room for a 4K camera and a 32-megapixel still, in under a quarter of a Pi 4's 1 GB.
    fn default() -> Self {
        Self {
            max_side: 8192,
            max_pixels: 32_000_000,
            max_memory_bytes: 256 << 20,
            max_input_bytes: 64 << 20,
        }
    }
}

impl DecodeLimits {
    /// The config check: every bound must leave room for a real picture.
    pub(crate) fn validate(&self, key: &str, problems: &mut crate::config::Problems) {
        problems.at_least(
            format!("{key}.max-side"),
            self.max_side,
            64,
            "the smallest camera mode",
        );
        problems.at_least(
            format!("{key}.max-pixels"),
            self.max_pixels,
            64 * 64,
            "64 x 64",
        );
        problems.at_least(
            format!("{key}.max-memory-bytes"),
            self.max_memory_bytes,
            64 * 64 * 11,
            "64 x 64 at 16-bit RGBA plus its RGB copy",
        );
        problems.at_least(
            format!("{key}.max-input-bytes"),
            self.max_input_bytes,
            1024,
            "1 KiB",
        );
    }

    /// The limits for frames from a camera that agreed to `width` x `height`: a frame
    /// declaring a bigger picture is damaged or hostile, whatever the global limits say.
    pub fn for_frame(&self, width: u32, height: u32) -> Self {
        Self {
            max_side: self.max_side.min(width.max(height)),
            max_pixels: self.max_pixels.min(u64::from(width) * u64::from(height)),
            ..*self
        }
    }

    /// Checks a header's promise; `bytes_per_pixel` is the decoder's own layout.
    fn check(&self, width: u32, height: u32, bytes_per_pixel: u64) -> Result<(), DecodeError> {
        let pixels = u64::from(width) * u64::from(height);
        // Decoding to anything but 8-bit RGB needs a second buffer for the conversion.
        let convert = if bytes_per_pixel == 3 { 0 } else { 3 };
        let memory = pixels.saturating_mul(bytes_per_pixel + convert);
        let refuse = |limit: String| {
            Err(DecodeError::TooLarge {
                width,
                height,
                limit,
            })
        };
        if width.max(height) > self.max_side {
            return refuse(format!("largest side {} px", self.max_side));
        }
        if pixels > self.max_pixels {
            return refuse(format!("{} pixels", self.max_pixels));
        }
        if memory > self.max_memory_bytes {
            return refuse(format!(
                "{} bytes of memory ({memory} needed at {bytes_per_pixel} bytes a pixel, plus the RGB copy)",
                self.max_memory_bytes
            ));
        }
        Ok(())
    }
}

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
    #[error("image declares {width}x{height}, over the decode limit of {limit}")]
    TooLarge {
        width: u32,
        height: u32,
        limit: String,
    },
    #[error("{len} bytes of compressed image, over the decode limit of {limit} bytes")]
    InputTooLarge { len: u64, limit: u64 },
    #[error("{path}: {error}")]
    File {
        path: PathBuf,
        error: Box<DecodeError>,
    },
}

/// Decodes PNG, JPEG or BMP bytes to RGB within the default [`DecodeLimits`].
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    decode_image_within(bytes, &DecodeLimits::default())
}

/// Decodes PNG, JPEG or BMP bytes to RGB. The header is checked against `limits` before
/// any pixel is decoded, and the decoder's allocations are capped by the same budget.
/// JPEG data must be complete: the image crate's decoder fills a cut-off stream with
/// grey and reports success, which would feed the counter a picture of half a shelf.
pub fn decode_image_within(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    if bytes.len() as u64 > limits.max_input_bytes {
        return Err(DecodeError::InputTooLarge {
            len: bytes.len() as u64,
            limit: limits.max_input_bytes,
        });
    }
    if is_jpeg(bytes) && !jpeg_is_complete(bytes) {
        return Err(DecodeError::TruncatedJpeg { len: bytes.len() });
    }
    // Our own reading of the header comes first: creating the image crate's PNG decoder
    // already reads into the pixel data (a 274-byte PNG declaring 60000 x 60000 failed
    // there, past any check made on the decoder afterwards).
    if let Some(h) = header(bytes) {
        limits.check(h.width, h.height, h.bytes_per_pixel)?;
    }
    let mut caps = image::Limits::default();
    caps.max_image_width = Some(limits.max_side);
    caps.max_image_height = Some(limits.max_side);
    caps.max_alloc = Some(limits.max_memory_bytes);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Image(image::ImageError::IoError(e)))?;
    reader.limits(caps.clone());
    let mut decoder = reader.into_decoder()?;
    // The decoder's own word, for formats (or header variants) read above only roughly.
    let (width, height) = decoder.dimensions();
    let bytes_per_pixel = u64::from(decoder.color_type().bytes_per_pixel());
    limits.check(width, height, bytes_per_pixel)?;
    decoder.set_limits(caps)?;
    Ok(image::DynamicImage::from_decoder(decoder)?.into_rgb8())
}

/// What an image's header declares, read without a decoder.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    width: u32,
    height: u32,
    /// Of the decoder's output (a palette PNG is charged as RGBA: it may have tRNS).
    bytes_per_pixel: u64,
}

/// The declared size of a PNG (IHDR), JPEG (the first SOF marker) or BMP (the DIB
/// header); `None` for anything else or a header too short to say.
fn header(bytes: &[u8]) -> Option<Header> {
    let be16 = |at: usize| Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?));
    let be32 = |at: usize| Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.get(12..16) == Some(b"IHDR") {
        let (depth, colour) = (*bytes.get(24)?, *bytes.get(25)?);
        let channels = match colour {
            0 => 1,
            2 => 3,
            4 => 2,
            _ => 4, // 6: RGBA; 3: palette, expanded to RGB or RGBA
        };
        return Some(Header {
            width: be32(16)?,
            height: be32(20)?,
            bytes_per_pixel: channels * if depth == 16 { 2 } else { 1 },
        });
    }
    if is_jpeg(bytes) {
        let mut at = 2;
        while at + 4 <= bytes.len() {
            if bytes[at] != 0xff {
                return None;
            }
            // Any number of 0xff fill bytes may precede a marker.
            if bytes[at + 1] == 0xff {
                at += 1;
                continue;
            }
            let marker = bytes[at + 1];
            let len = usize::from(be16(at + 2)?);
            // SOF0-SOF15, except DHT (C4), JPG (C8) and DAC (CC).
            if (0xc0..=0xcf).contains(&marker) && ![0xc4, 0xc8, 0xcc].contains(&marker) {
                return Some(Header {
                    height: be16(at + 5)?.into(),
                    width: be16(at + 7)?.into(),
                    // Grey stays one byte; colour (and CMYK, converted) decode to RGB.
                    bytes_per_pixel: if *bytes.get(at + 9)? == 1 { 1 } else { 3 },
                });
            }
            at += 2 + len;
        }
        return None;
    }
    if bytes.starts_with(b"BM") {
        let le32 = |at: usize| Some(i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
        let bits = u16::from_le_bytes(bytes.get(28..30)?.try_into().ok()?);
        return Some(Header {
            width: le32(18)?.unsigned_abs(),
            height: le32(22)?.unsigned_abs(), // negative: stored top-down
            bytes_per_pixel: if bits == 32 { 4 } else { 3 },
        });
    }
    None
}

/// Reads and decodes an image file within `limits`; errors name the file. The file's
/// size is checked before it is read, so a huge file is not pulled into memory.
pub fn load_image_within(path: &Path, limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    let named = |e: DecodeError| DecodeError::File {
        path: path.to_owned(),
        error: Box::new(e),
    };
    let io = |error| DecodeError::Io {
        path: path.to_owned(),
        error,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len > limits.max_input_bytes {
        return Err(named(DecodeError::InputTooLarge {
            len,
            limit: limits.max_input_bytes,
        }));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // A file that grows while it is read is cut at the limit, then refused by length.
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&mut file, limits.max_input_bytes + 1),
        &mut bytes,
    )
    .map_err(io)?;
    decode_image_within(&bytes, limits).map_err(named)
}

/// [`load_image_within`] the default [`DecodeLimits`].
pub fn load_image(path: &Path) -> Result<RgbImage, DecodeError> {
    load_image_within(path, &DecodeLimits::default())
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

    fn png_header(width: u32, height: u32, bit_depth: u8, colour: u8) -> Vec<u8> {
        // A PNG whose IHDR promises a picture and whose data is one empty IDAT: the
        // decoder must be stopped at the header.
        fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
            out.extend((data.len() as u32).to_be_bytes());
            let start = out.len();
            out.extend(kind);
            out.extend(data);
            let crc = crc32(&out[start..]);
            out.extend(crc.to_be_bytes());
        }
        fn crc32(bytes: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in bytes {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xedb8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend(width.to_be_bytes());
        ihdr.extend(height.to_be_bytes());
        ihdr.extend([bit_depth, colour, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(
            &mut out,
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        );
        chunk(&mut out, b"IEND", &[]);
        out
    }

    #[test]
    fn a_tiny_png_declaring_sixty_thousand_pixels_a_side_is_refused_from_its_header() {
        let bomb = png_header(60_000, 60_000, 8, 2);
        assert!(bomb.len() < 100, "{} bytes", bomb.len());
        let err = decode_image(&bomb).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::TooLarge {
                    width: 60_000,
                    height: 60_000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("60000x60000"), "{err}");
    }

    #[test]
    fn a_sixteen_bit_image_is_charged_for_its_decoder_buffer_and_the_rgb_copy() {
        let limits = DecodeLimits {
            max_memory_bytes: 64 << 20,
            ..DecodeLimits::default()
        };
        // 4096 x 4096 RGBA16: 8 bytes a pixel to decode plus 3 to convert, 176 MiB.
        let err = decode_image_within(&png_header(4096, 4096, 16, 6), &limits).unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
        // The same picture in 8-bit RGB fits the pixel count; it fails later, on the
        // empty pixel data, not on the budget.
        let small = DecodeLimits {
            max_memory_bytes: 64 << 20,
            ..DecodeLimits::default()
        };
        let err = decode_image_within(&png_header(4000, 4000, 8, 2), &small).unwrap_err();
        assert!(!matches!(err, DecodeError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn headers_are_read_without_a_decoder_for_png_jpeg_and_bmp() {
        assert_eq!(
            header(&png_header(60_000, 50_000, 16, 6)),
            Some(Header {
                width: 60_000,
                height: 50_000,
                bytes_per_pixel: 8
            })
        );
        assert_eq!(
            header(&jpeg()),
            Some(Header {
                width: 16,
                height: 16,
                bytes_per_pixel: 3
            })
        );
        let mut bmp = std::io::Cursor::new(Vec::new());
        RgbImage::new(5, 3)
            .write_to(&mut bmp, image::ImageFormat::Bmp)
            .unwrap();
        let bmp = bmp.into_inner();
        assert_eq!(header(&bmp).map(|h| (h.width, h.height)), Some((5, 3)));
        assert_eq!(header(b"GIF89a"), None);
        // Fill bytes before a marker are skipped, not read as one.
        let mut filled = jpeg()[..2].to_vec();
        filled.extend([0xff, 0xff]);
        filled.extend(&jpeg()[2..]);
        assert_eq!(header(&filled).map(|h| (h.width, h.height)), Some((16, 16)));
        assert_eq!(header(&jpeg()[..3]), None);
    }

    #[test]
    fn a_bomb_with_pixel_data_is_refused_from_its_header_too() {
        let bomb = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/bad/bomb-60000x60000.png"
        ))
        .unwrap();
        let err = decode_image(&bomb).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooLarge { width: 60_000, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_frame_bigger_than_the_negotiated_size_is_refused() {
        let limits = DecodeLimits::default().for_frame(8, 8);
        let err = decode_image_within(&jpeg(), &limits).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");
        assert!(decode_image_within(&jpeg(), &DecodeLimits::default().for_frame(16, 16)).is_ok());
    }

    #[test]
    fn a_file_over_the_input_limit_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.jpg");
        std::fs::write(&path, jpeg()).unwrap();
        let limits = DecodeLimits {
            max_input_bytes: 100,
            ..DecodeLimits::default()
        };
        let err = load_image_within(&path, &limits).unwrap_err().to_string();
        assert!(
            err.contains("big.jpg") && err.contains("over the decode limit"),
            "{err}"
        );
    }
}
