//! Drawing boxes and labels onto frames, for `detect --annotate` and snapshots.

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

use super::{BBox, Detection};

/// Distinct, saturated colours; a class keeps its colour across frames.
const PALETTE: [[u8; 3]; 10] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 190],
];

/// Colour used for a class id.
pub fn class_colour(class_id: usize) -> Rgb<u8> {
    Rgb(PALETTE[class_id % PALETTE.len()])
}

/// Draws each detection's box and "label score" tag.
pub fn draw_detections(img: &mut RgbImage, detections: &[Detection]) {
    // Lines and glyphs scale with the picture so labels stay readable on 4K frames.
    let scale = (img.width().max(img.height()) / 640).clamp(1, 4) + 1;
    for d in detections {
        let colour = class_colour(d.class_id);
        draw_box(img, &d.bbox, colour, scale);
        let text = format!("{} {:.2}", d.label, d.score);
        draw_tag(
            img,
            d.bbox.x1 as i64,
            d.bbox.y1 as i64,
            &text,
            colour,
            scale,
        );
    }
}

/// Draws a rectangle outline `thickness` pixels wide, clipped to the image.
pub fn draw_box(img: &mut RgbImage, b: &BBox, colour: Rgb<u8>, thickness: u32) {
    let (x1, y1, x2, y2) = (b.x1 as i64, b.y1 as i64, b.x2 as i64, b.y2 as i64);
    for t in 0..thickness as i64 {
        hline(img, x1, x2, y1 + t, colour);
        hline(img, x1, x2, y2 - t, colour);
        vline(img, x1 + t, y1, y2, colour);
        vline(img, x2 - t, y1, y2, colour);
    }
}

/// Draws `text` on a filled tag whose bottom-left corner is at (x, y), moved inside the
/// image when it would leave it.
pub fn draw_tag(img: &mut RgbImage, x: i64, y: i64, text: &str, bg: Rgb<u8>, scale: u32) {
    let s = scale as i64;
    let w = (text.chars().count() as i64 * 8 + 4) * s;
    let h = 12 * s;
    let x = x.clamp(0, (img.width() as i64 - w).max(0));
    let y = if y - h >= 0 { y - h } else { y.max(0) };
    fill(img, x, y, w, h, bg);
    // Dark text on light colours, white on dark ones.
    let luma = 0.299 * bg[0] as f32 + 0.587 * bg[1] as f32 + 0.114 * bg[2] as f32;
    let fg = if luma > 140.0 {
        Rgb([0, 0, 0])
    } else {
        Rgb([255, 255, 255])
    };
    let mut cx = x + 2 * s;
    for ch in text.chars() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    fill(img, cx + col * s, y + (2 + row as i64) * s, s, s, fg);
                }
            }
        }
        cx += 8 * s;
    }
}

/// Draws a closed polygon outline (zones on snapshots).
pub fn draw_polygon(img: &mut RgbImage, points: &[(f32, f32)], colour: Rgb<u8>, thickness: u32) {
    for i in 0..points.len() {
        let (a, b) = (points[i], points[(i + 1) % points.len()]);
        draw_line(img, a, b, colour, thickness);
    }
}

/// A line `thickness` pixels wide (square brush), clipped to the image.
pub fn draw_line(
    img: &mut RgbImage,
    a: (f32, f32),
    b: (f32, f32),
    colour: Rgb<u8>,
    thickness: u32,
) {
    let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil().max(1.0) as i64;
    let half = thickness as i64 / 2;
    for i in 0..=steps {
        let t = i as f32 / steps as f32;
        let x = (a.0 + t * (b.0 - a.0)).round() as i64;
        let y = (a.1 + t * (b.1 - a.1)).round() as i64;
        fill(
            img,
            x - half,
            y - half,
            thickness as i64,
            thickness as i64,
            colour,
        );
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn hline(img: &mut RgbImage, x1: i64, x2: i64, y: i64, c: Rgb<u8>) {
    for x in x1..=x2 {
        put(img, x, y, c);
    }
}

fn vline(img: &mut RgbImage, x: i64, y1: i64, y2: i64, c: Rgb<u8>) {
    for y in y1..=y2 {
        put(img, x, y, c);
    }
}

fn fill(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, c: Rgb<u8>) {
    for yy in y..y + h {
        for xx in x..x + w {
            put(img, xx, yy, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_box_outline_is_drawn_and_its_inside_left_alone() {
        let mut img = RgbImage::new(20, 20);
        let b = BBox {
            x1: 2.0,
            y1: 2.0,
            x2: 10.0,
            y2: 10.0,
        };
        draw_box(&mut img, &b, Rgb([255, 0, 0]), 1);
        assert_eq!(img.get_pixel(2, 5), &Rgb([255, 0, 0]));
        assert_eq!(img.get_pixel(10, 10), &Rgb([255, 0, 0]));
        assert_eq!(img.get_pixel(5, 5), &Rgb([0, 0, 0]));
    }

    #[test]
    fn a_tag_near_the_top_edge_is_moved_inside_and_has_glyph_pixels() {
        let mut img = RgbImage::new(200, 50);
        draw_tag(&mut img, 0, 0, "Mug 0.9", Rgb([0, 0, 255]), 1);
        let white = img.pixels().filter(|p| **p == Rgb([255, 255, 255])).count();
        assert!(white > 20, "glyphs drawn: {white}");
        assert_eq!(img.get_pixel(0, 0), &Rgb([0, 0, 255]));
    }
}
