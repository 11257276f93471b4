//! Camera pixel formats -> packed RGB.
//!
//! YUYV, UYVY, NV12, NV21 and YU12 go through `yuvutils-rs`, which has hand-written
//! AVX2/SSE4.1 and NEON kernels (a 1280x720 YUYV frame converts in well under a
//! millisecond); MJPEG goes through the `image` crate's JPEG decoder (zune-jpeg, SIMD IDCT
//! and colour conversion) after a completeness check. YUV uses BT.601 limited range, the
//! V4L2 default for SDTV/webcam YUV, unless the driver reports full range.

use image::RgbImage;
use serde::{Deserialize, Serialize};
use yuvutils_rs::{
    YuvBiPlanarImage, YuvConversionMode, YuvPackedImage, YuvPlanarImage, YuvRange,
    YuvStandardMatrix,
};

use super::compressed::{decode_image_within, DecodeError, DecodeLimits};

/// Pixel formats shelfwatch converts, by their V4L2 fourcc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PixelFormat {
    /// Motion JPEG: every frame a JPEG.
    #[serde(alias = "MJPEG")]
    Mjpg,
    /// Packed 4:2:2, Y0 U Y1 V.
    Yuyv,
    /// Packed 4:2:2, U Y0 V Y1.
    Uyvy,
    /// Y plane, then interleaved U/V at half resolution.
    Nv12,
    /// Y plane, then interleaved V/U at half resolution.
    Nv21,
    /// Planar 4:2:0 (I420): Y, U, V planes.
    Yu12,
    /// Packed R G B.
    Rgb3,
    /// Packed B G R.
    Bgr3,
    /// 8-bit luminance.
    Grey,
}

impl PixelFormat {
    pub const ALL: [PixelFormat; 9] = [
        PixelFormat::Mjpg,
        PixelFormat::Yuyv,
        PixelFormat::Uyvy,
        PixelFormat::Nv12,
        PixelFormat::Nv21,
        PixelFormat::Yu12,
        PixelFormat::Rgb3,
        PixelFormat::Bgr3,
        PixelFormat::Grey,
    ];

    /// The V4L2 fourcc code.
    pub fn fourcc(self) -> [u8; 4] {
        *match self {
            PixelFormat::Mjpg => b"MJPG",
            PixelFormat::Yuyv => b"YUYV",
            PixelFormat::Uyvy => b"UYVY",
            PixelFormat::Nv12 => b"NV12",
            PixelFormat::Nv21 => b"NV21",
            PixelFormat::Yu12 => b"YU12",
            PixelFormat::Rgb3 => b"RGB3",
            PixelFormat::Bgr3 => b"BGR3",
            PixelFormat::Grey => b"GREY",
        }
    }

    pub fn from_fourcc(code: [u8; 4]) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.fourcc() == code)
    }

    /// Parses a fourcc or a common name (`MJPEG`, `RGB24`, `BGR24`, `I420`), any case.
    pub fn parse(s: &str) -> Option<Self> {
        let up = s.trim().to_ascii_uppercase();
        match up.as_str() {
            "MJPEG" | "JPEG" => Some(PixelFormat::Mjpg),
            "RGB24" => Some(PixelFormat::Rgb3),
            "BGR24" => Some(PixelFormat::Bgr3),
            "I420" => Some(PixelFormat::Yu12),
            "GRAY" | "Y8" => Some(PixelFormat::Grey),
            _ => {
                let b = up.as_bytes();
                (b.len() == 4)
                    .then(|| Self::from_fourcc([b[0], b[1], b[2], b[3]]))
                    .flatten()
            }
        }
    }

    /// Smallest valid frame size in bytes for `width` x `height` with `stride` bytes per
    /// line of the first plane; `None` for compressed formats. Saturates at `usize::MAX`
    /// (no buffer is that long) instead of wrapping: a size that wrapped to a small number
    /// let a short buffer through (issue #19).
    pub fn min_size(self, width: u32, height: u32, stride: u32) -> Option<usize> {
        let (w, h, s) = (width as usize, height as usize, stride as usize);
        let ch = h.div_ceil(2);
        match self {
            PixelFormat::Mjpg => None,
            // Whole lines, as drivers deliver them (sizeimage = bytesperline * height).
            PixelFormat::Yuyv
            | PixelFormat::Uyvy
            | PixelFormat::Rgb3
            | PixelFormat::Bgr3
            | PixelFormat::Grey => Some(
                s.max(w.saturating_mul(self.bytes_per_pixel()))
                    .saturating_mul(h),
            ),
            PixelFormat::Nv12 | PixelFormat::Nv21 => {
                Some(s.saturating_mul(h).saturating_add(s.saturating_mul(ch)))
            }
            PixelFormat::Yu12 => Some(
                s.saturating_mul(h)
                    .saturating_add(s.div_ceil(2).saturating_mul(ch).saturating_mul(2)),
            ),
        }
    }

    fn bytes_per_pixel(self) -> usize {
        match self {
            PixelFormat::Yuyv | PixelFormat::Uyvy => 2,
            PixelFormat::Rgb3 | PixelFormat::Bgr3 => 3,
            _ => 1,
        }
    }
}

impl std::fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.fourcc()).unwrap_or("????"))
    }
}

/// How YUV samples map to RGB; the default is BT.601 limited range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct YuvEncoding {
    /// Full range (0..255) instead of limited (16..235 luma).
    pub full_range: bool,
    /// BT.709 coefficients instead of BT.601.
    pub bt709: bool,
}

/// The geometry of one raw frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawLayout {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    /// Bytes per line of the first plane (V4L2 bytesperline).
    pub stride: u32,
    pub encoding: YuvEncoding,
    /// Bounds on a compressed (MJPEG) frame's picture, on top of its negotiated size.
    pub limits: DecodeLimits,
}

/// Why a frame could not be converted; the frame is skipped and counted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{format} frame of {got} bytes is shorter than {need} bytes for {width}x{height}")]
    Short {
        format: PixelFormat,
        got: usize,
        need: usize,
        width: u32,
        height: u32,
    },
    #[error("{format} stride of {stride} bytes is shorter than a line of {width} pixels")]
    Stride {
        format: PixelFormat,
        stride: u32,
        width: u32,
    },
    #[error("corrupt MJPEG frame: {0}")]
    Jpeg(#[from] DecodeError),
    #[error("{format} conversion failed: {message}")]
    Yuv {
        format: PixelFormat,
        message: String,
    },
}

/// Converts one raw frame into `out` (resized to the frame when its size differs, so a
/// long-lived buffer is reused frame after frame).
// One match over the pixel formats, each arm a few lines: split up, the checks that
// guard every arm (stride, buffer size) would be repeated or hidden.
#[allow(clippy::too_many_lines)]
pub fn to_rgb(layout: &RawLayout, data: &[u8], out: &mut RgbImage) -> Result<(), ConvertError> {
    let RawLayout {
        format,
        width,
        height,
        stride,
        encoding,
        limits,
    } = *layout;
    if format == PixelFormat::Mjpg {
        let img = decode_image_within(data, &limits.for_frame(width, height))?;
        *out = img;
        return Ok(());
    }
    // A stride shorter than a line would let a tiny buffer pass the size check for a
    // frame of any width, and the output image for that width be allocated (found by
    // fuzzing, issue #19). With whole lines, the output is at most 3 bytes a pixel of a
    // buffer that exists.
    if u64::from(stride) < u64::from(width) * format.bytes_per_pixel() as u64 {
        return Err(ConvertError::Stride {
            format,
            stride,
            width,
        });
    }
    let need = format.min_size(width, height, stride).unwrap_or(0);
    if data.len() < need || width == 0 || height == 0 {
        return Err(ConvertError::Short {
            format,
            got: data.len(),
            need,
            width,
            height,
        });
    }
    if out.dimensions() != (width, height) {
        *out = RgbImage::new(width, height);
    }
    let range = if encoding.full_range {
        YuvRange::Full
    } else {
        YuvRange::Limited
    };
    let matrix = if encoding.bt709 {
        YuvStandardMatrix::Bt709
    } else {
        YuvStandardMatrix::Bt601
    };
    let rgb_stride = width * 3;
    let yuv_err = |e: yuvutils_rs::YuvError| ConvertError::Yuv {
        format,
        message: e.to_string(),
    };
    let rgb: &mut [u8] = out;
    match format {
        PixelFormat::Yuyv | PixelFormat::Uyvy => {
            // yuvutils-rs 0.8 insists on unpadded lines (it checks len == 2 * w * h
            // whatever the stride), so padded lines are packed first; most drivers do not
            // pad, and pay nothing.
            let line = width as usize * 2;
            let packed_lines: std::borrow::Cow<[u8]> = if stride as usize == line {
                std::borrow::Cow::Borrowed(&data[..line * height as usize])
            } else {
                std::borrow::Cow::Owned(
                    (0..height as usize)
                        .flat_map(|y| &data[y * stride as usize..y * stride as usize + line])
                        .copied()
                        .collect(),
                )
            };
            let packed = YuvPackedImage {
                yuy: &packed_lines,
                yuy_stride: line as u32,
                width,
                height,
            };
            if format == PixelFormat::Yuyv {
                yuvutils_rs::yuyv422_to_rgb(&packed, rgb, rgb_stride, range, matrix)
            } else {
                yuvutils_rs::uyvy422_to_rgb(&packed, rgb, rgb_stride, range, matrix)
            }
            .map_err(yuv_err)?;
        }
        PixelFormat::Nv12 | PixelFormat::Nv21 => {
            // In usize: the u32 product wraps for a 4 GiB plane.
            let y_len = stride as usize * height as usize;
            let image = YuvBiPlanarImage {
                y_plane: &data[..y_len],
                y_stride: stride,
                uv_plane: &data[y_len..need],
                uv_stride: stride,
                width,
                height,
            };
            let mode = YuvConversionMode::Balanced;
            if format == PixelFormat::Nv12 {
                yuvutils_rs::yuv_nv12_to_rgb(&image, rgb, rgb_stride, range, matrix, mode)
            } else {
                yuvutils_rs::yuv_nv21_to_rgb(&image, rgb, rgb_stride, range, matrix, mode)
            }
            .map_err(yuv_err)?;
        }
        PixelFormat::Yu12 => {
            let y_len = stride as usize * height as usize;
            let c_stride = stride.div_ceil(2);
            let c_len = c_stride as usize * height.div_ceil(2) as usize;
            let image = YuvPlanarImage {
                y_plane: &data[..y_len],
                y_stride: stride,
                u_plane: &data[y_len..y_len + c_len],
                u_stride: c_stride,
                v_plane: &data[y_len + c_len..y_len + 2 * c_len],
                v_stride: c_stride,
                width,
                height,
            };
            yuvutils_rs::yuv420_to_rgb(&image, rgb, rgb_stride, range, matrix).map_err(yuv_err)?;
        }
        PixelFormat::Rgb3 | PixelFormat::Bgr3 => {
            let w3 = width as usize * 3;
            for (y, dst) in rgb.chunks_exact_mut(w3).enumerate() {
                let src = &data[y * stride as usize..y * stride as usize + w3];
                if format == PixelFormat::Rgb3 {
                    dst.copy_from_slice(src);
                } else {
                    for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(3)) {
                        d.copy_from_slice(&[s[2], s[1], s[0]]);
                    }
                }
            }
        }
        PixelFormat::Grey => {
            let w = width as usize;
            for (y, dst) in rgb.chunks_exact_mut(w * 3).enumerate() {
                let src = &data[y * stride as usize..y * stride as usize + w];
                for (d, &g) in dst.chunks_exact_mut(3).zip(src) {
                    d.copy_from_slice(&[g, g, g]);
                }
            }
        }
        PixelFormat::Mjpg => unreachable!("handled above"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BT.601 limited-range YCbCr of the 75% colour bars (ITU-R BT.801): white, yellow,
    /// cyan, green, magenta, red, blue, black; RGB = 191 or 0 per channel.
    const BARS_YUV: [(u8, u8, u8); 8] = [
        (180, 128, 128),
        (162, 44, 142),
        (131, 156, 44),
        (112, 72, 58),
        (84, 184, 198),
        (65, 100, 212),
        (35, 212, 114),
        (16, 128, 128),
    ];
    const BARS_RGB: [[u8; 3]; 8] = [
        [191, 191, 191],
        [191, 191, 0],
        [0, 191, 191],
        [0, 191, 0],
        [191, 0, 191],
        [191, 0, 0],
        [0, 0, 191],
        [0, 0, 0],
    ];

    fn layout(format: PixelFormat, width: u32, height: u32, stride: u32) -> RawLayout {
        RawLayout {
            format,
            width,
            height,
            stride,
            encoding: YuvEncoding::default(),
            limits: DecodeLimits::default(),
        }
    }

    fn assert_bars(img: &RgbImage, bar_width: u32) {
        for (i, want) in BARS_RGB.iter().enumerate() {
            for y in [0, img.height() - 1] {
                let p = img.get_pixel(i as u32 * bar_width + bar_width / 2, y).0;
                for c in 0..3 {
                    assert!(
                        (p[c] as i32 - want[c] as i32).abs() <= 3,
                        "bar {i} row {y}: got {p:?}, want {want:?}"
                    );
                }
            }
        }
    }

    /// 8 bars of 4 pixels, 2 rows; each line padded to `stride` bytes.
    fn bars_packed(uyvy: bool, stride: usize) -> Vec<u8> {
        let mut data = vec![0xAA; stride * 2];
        for row in 0..2 {
            let line = &mut data[row * stride..];
            for (i, &(y, u, v)) in BARS_YUV.iter().enumerate() {
                for pair in 0..2 {
                    let o = (i * 2 + pair) * 4;
                    let q = if uyvy { [u, y, v, y] } else { [y, u, y, v] };
                    line[o..o + 4].copy_from_slice(&q);
                }
            }
        }
        data
    }

    #[test]
    fn yuyv_colour_bars_convert_to_the_bt601_limited_range_values() {
        let mut out = RgbImage::new(1, 1);
        // Stride larger than the line: drivers pad lines.
        to_rgb(
            &layout(PixelFormat::Yuyv, 32, 2, 72),
            &bars_packed(false, 72),
            &mut out,
        )
        .unwrap();
        assert_eq!(out.dimensions(), (32, 2));
        assert_bars(&out, 4);
    }

    #[test]
    fn uyvy_colour_bars_convert_to_the_bt601_limited_range_values() {
        let mut out = RgbImage::new(32, 2);
        to_rgb(
            &layout(PixelFormat::Uyvy, 32, 2, 64),
            &bars_packed(true, 64),
            &mut out,
        )
        .unwrap();
        assert_bars(&out, 4);
    }

    fn planar_bars(width: usize, height: usize) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let bar = width / 8;
        let mut y = vec![0; width * height];
        let mut u = vec![0; width / 2 * height / 2];
        let mut v = vec![0; width / 2 * height / 2];
        for row in 0..height {
            for x in 0..width {
                y[row * width + x] = BARS_YUV[x / bar].0;
            }
        }
        for row in 0..height / 2 {
            for x in 0..width / 2 {
                u[row * width / 2 + x] = BARS_YUV[2 * x / bar].1;
                v[row * width / 2 + x] = BARS_YUV[2 * x / bar].2;
            }
        }
        (y, u, v)
    }

    #[test]
    fn nv12_and_nv21_colour_bars_convert_to_the_bt601_limited_range_values() {
        let (y, u, v) = planar_bars(32, 4);
        for (format, first) in [(PixelFormat::Nv12, &u), (PixelFormat::Nv21, &v)] {
            let second = if format == PixelFormat::Nv12 { &v } else { &u };
            let mut data = y.clone();
            for (a, b) in first.iter().zip(second.iter()) {
                data.extend([*a, *b]);
            }
            let mut out = RgbImage::new(1, 1);
            to_rgb(&layout(format, 32, 4, 32), &data, &mut out).unwrap();
            assert_bars(&out, 4);
        }
    }

    #[test]
    fn yu12_colour_bars_convert_to_the_bt601_limited_range_values() {
        let (y, u, v) = planar_bars(32, 4);
        let data = [y, u, v].concat();
        let mut out = RgbImage::new(1, 1);
        to_rgb(&layout(PixelFormat::Yu12, 32, 4, 32), &data, &mut out).unwrap();
        assert_bars(&out, 4);
    }

    #[test]
    fn limited_range_black_and_white_map_to_0_and_255_and_full_range_passes_through() {
        let data = [16u8, 128, 235, 128];
        let mut out = RgbImage::new(1, 1);
        to_rgb(&layout(PixelFormat::Yuyv, 2, 1, 4), &data, &mut out).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(1, 0).0, [255, 255, 255]);
        let mut full = layout(PixelFormat::Yuyv, 2, 1, 4);
        full.encoding.full_range = true;
        to_rgb(&full, &data, &mut out).unwrap();
        let p = out.get_pixel(0, 0).0;
        assert!(p.iter().all(|&c| (15..=17).contains(&c)), "{p:?}");
    }

    #[test]
    fn rgb24_bgr24_and_grey_convert_byte_exactly_with_padded_lines() {
        let mut out = RgbImage::new(1, 1);
        let rgb = [10, 20, 30, 40, 50, 60, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0];
        to_rgb(&layout(PixelFormat::Rgb3, 2, 2, 8), &rgb, &mut out).unwrap();
        assert_eq!(
            out.as_raw(),
            &vec![10, 20, 30, 40, 50, 60, 1, 2, 3, 4, 5, 6]
        );
        to_rgb(&layout(PixelFormat::Bgr3, 2, 2, 8), &rgb, &mut out).unwrap();
        assert_eq!(
            out.as_raw(),
            &vec![30, 20, 10, 60, 50, 40, 3, 2, 1, 6, 5, 4]
        );
        let grey = [7, 9, 0xff, 11, 13, 0xff];
        to_rgb(&layout(PixelFormat::Grey, 2, 2, 3), &grey, &mut out).unwrap();
        assert_eq!(
            out.as_raw(),
            &vec![7, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13]
        );
    }

    #[test]
    fn a_short_frame_is_an_error_not_a_panic() {
        let mut out = RgbImage::new(1, 1);
        for f in PixelFormat::ALL {
            let err = to_rgb(&layout(f, 64, 48, 128), &[0u8; 100], &mut out);
            assert!(err.is_err(), "{f}");
        }
    }

    #[test]
    fn an_mjpeg_frame_declaring_more_than_the_negotiated_size_is_refused() {
        let img = RgbImage::from_pixel(32, 16, image::Rgb([0, 0, 200]));
        let mut jpeg = std::io::Cursor::new(Vec::new());
        img.write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
        let mut out = RgbImage::new(1, 1);
        let err = to_rgb(
            &layout(PixelFormat::Mjpg, 16, 8, 0),
            &jpeg.into_inner(),
            &mut out,
        )
        .unwrap_err();
        assert!(
            matches!(err, ConvertError::Jpeg(DecodeError::TooLarge { .. })),
            "{err}"
        );
    }

    #[test]
    fn a_truncated_mjpeg_frame_is_refused_and_a_whole_one_decodes() {
        let img = RgbImage::from_pixel(32, 16, image::Rgb([0, 0, 200]));
        let mut jpeg = std::io::Cursor::new(Vec::new());
        img.write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
        let jpeg = jpeg.into_inner();
        let mut out = RgbImage::new(1, 1);
        let l = layout(PixelFormat::Mjpg, 32, 16, 0);
        to_rgb(&l, &jpeg, &mut out).unwrap();
        assert_eq!(out.dimensions(), (32, 16));
        assert!(out.get_pixel(16, 8).0[2] > 180);
        assert!(matches!(
            to_rgb(&l, &jpeg[..jpeg.len() - 40], &mut out),
            Err(ConvertError::Jpeg(_))
        ));
    }

    /// Issue #19 (found by fuzzing): a stride of 0 made the size check ask for 0 bytes,
    /// and an empty buffer for a 2^31-pixel-wide frame went on to allocate 412 GB for
    /// its RGB copy, which aborts the process.
    #[test]
    fn a_stride_shorter_than_a_line_is_an_error_not_an_allocation_for_any_width() {
        let mut out = RgbImage::new(1, 1);
        for f in PixelFormat::ALL
            .into_iter()
            .filter(|f| *f != PixelFormat::Mjpg)
        {
            let err = to_rgb(&layout(f, 0x8000_0000, 64, 0), &[], &mut out).unwrap_err();
            assert!(matches!(err, ConvertError::Stride { .. }), "{f}: {err}");
            let err = to_rgb(&layout(f, 32, 2, 31), &[0; 4096], &mut out).unwrap_err();
            assert!(matches!(err, ConvertError::Stride { .. }), "{f}: {err}");
        }
        assert_eq!(out.dimensions(), (1, 1), "nothing allocated");
    }

    /// Issue #19: 2 bytes x 2147516416 x 4294901761 is 2^64 + 65536, which wrapped to a
    /// 64 KiB minimum; on 32-bit ARM far smaller frames wrapped.
    #[test]
    fn a_frame_size_too_big_to_count_in_a_usize_needs_more_bytes_than_any_buffer() {
        let (w, h) = (2_147_516_416, 4_294_901_761);
        assert_eq!(PixelFormat::Yuyv.min_size(w, h, 0), Some(usize::MAX));
        assert_eq!(
            PixelFormat::Nv12.min_size(u32::MAX, u32::MAX, u32::MAX),
            Some(usize::MAX)
        );
    }

    #[test]
    fn formats_parse_by_fourcc_and_common_name() {
        assert_eq!(PixelFormat::parse("mjpeg"), Some(PixelFormat::Mjpg));
        assert_eq!(PixelFormat::parse("RGB24"), Some(PixelFormat::Rgb3));
        assert_eq!(PixelFormat::parse("yuyv"), Some(PixelFormat::Yuyv));
        assert_eq!(PixelFormat::parse("H264"), None);
    }
}
