//! Frame -> model input tensor, as the manifest prescribes: resize policy, channel
//! order, normalisation and layout. Buffers are kept between frames.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use tract_onnx::prelude::Tensor;

use super::manifest::{ColourOrder, InputSpec, Layout, ResizePolicy};
use super::BBox;

/// How model-input coordinates map back to the source frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub src_width: u32,
    pub src_height: u32,
    pub input_width: u32,
    pub input_height: u32,
    /// Model-input pixels per source pixel, per axis.
    pub scale_x: f32,
    pub scale_y: f32,
    /// Letterbox padding on the left and top, in model-input pixels.
    pub pad_x: f32,
    pub pad_y: f32,
}

impl Geometry {
    pub fn new(policy: ResizePolicy, src: (u32, u32), input: (u32, u32)) -> Self {
        let (sw, sh) = (src.0 as f32, src.1 as f32);
        let (iw, ih) = (input.0 as f32, input.1 as f32);
        match policy {
            ResizePolicy::Stretch => Self {
                src_width: src.0,
                src_height: src.1,
                input_width: input.0,
                input_height: input.1,
                scale_x: iw / sw,
                scale_y: ih / sh,
                pad_x: 0.0,
                pad_y: 0.0,
            },
            ResizePolicy::CentreCrop => {
                // Without a shorter-side target the crop is the largest centred region of
                // the input's aspect ratio.
                let s = (iw / sw).max(ih / sh);
                Self::centre_crop(src, input, s)
            }
            ResizePolicy::Letterbox => {
                let (nw, nh) = letterbox_size(src, input);
                Self {
                    src_width: src.0,
                    src_height: src.1,
                    input_width: input.0,
                    input_height: input.1,
                    scale_x: nw as f32 / sw,
                    scale_y: nh as f32 / sh,
                    pad_x: ((input.0 - nw) / 2) as f32,
                    pad_y: ((input.1 - nh) / 2) as f32,
                }
            }
        }
    }

    /// The centre of the source scaled by `scale` (model-input pixels per source pixel)
    /// fills the whole input; what lies outside is cut off.
    fn centre_crop(src: (u32, u32), input: (u32, u32), scale: f32) -> Self {
        let crop_w = input.0 as f32 / scale;
        let crop_h = input.1 as f32 / scale;
        let left = ((src.0 as f32 - crop_w) / 2.0).max(0.0);
        let top = ((src.1 as f32 - crop_h) / 2.0).max(0.0);
        Self {
            src_width: src.0,
            src_height: src.1,
            input_width: input.0,
            input_height: input.1,
            scale_x: scale,
            scale_y: scale,
            // Negative: the input starts `left` source pixels into the frame.
            pad_x: -left * scale,
            pad_y: -top * scale,
        }
    }

    /// `region` (left, top, width, height in source pixels) stretched over the whole
    /// input: the scale rule's crops and tiles (`vision::scale`).
    pub fn region(src: (u32, u32), input: (u32, u32), region: (f64, f64, f64, f64)) -> Self {
        let (left, top, width, height) = region;
        let scale_x = input.0 as f32 / width.max(1e-3) as f32;
        let scale_y = input.1 as f32 / height.max(1e-3) as f32;
        Self {
            src_width: src.0,
            src_height: src.1,
            input_width: input.0,
            input_height: input.1,
            scale_x,
            scale_y,
            pad_x: -(left as f32) * scale_x,
            pad_y: -(top as f32) * scale_y,
        }
    }

    /// The centre-crop geometry for a shorter side scaled to `shorter_side` pixels.
    pub fn with_shorter_side(src: (u32, u32), input: (u32, u32), shorter_side: u32) -> Self {
        let scale = shorter_side as f32 / src.0.min(src.1).max(1) as f32;
        // Never crop more than the frame has: a shorter side below the input size would
        // need padding, so the scale grows to fill the input instead.
        let fill = (input.0 as f32 / src.0 as f32).max(input.1 as f32 / src.1 as f32);
        Self::centre_crop(src, input, scale.max(fill))
    }

    /// The source region (left, top, width, height) that fills the input, for
    /// centre-crop.
    fn crop_region(&self) -> (f64, f64, f64, f64) {
        (
            (-self.pad_x / self.scale_x) as f64,
            (-self.pad_y / self.scale_y) as f64,
            (self.input_width as f32 / self.scale_x) as f64,
            (self.input_height as f32 / self.scale_y) as f64,
        )
    }

    /// Size of the resized picture inside the model input.
    fn content_size(&self) -> (u32, u32) {
        (
            (self.src_width as f32 * self.scale_x).round() as u32,
            (self.src_height as f32 * self.scale_y).round() as u32,
        )
    }

    /// Maps a box in normalised model-input coordinates (0..1 of the input tensor) to
    /// source pixels, clamped to the frame.
    pub fn to_source(&self, b: &BBox) -> BBox {
        let fx = |u: f32| {
            ((u * self.input_width as f32 - self.pad_x) / self.scale_x)
                .clamp(0.0, self.src_width as f32)
        };
        let fy = |v: f32| {
            ((v * self.input_height as f32 - self.pad_y) / self.scale_y)
                .clamp(0.0, self.src_height as f32)
        };
        BBox {
            x1: fx(b.x1),
            y1: fy(b.y1),
            x2: fx(b.x2),
            y2: fy(b.y2),
        }
    }
}

fn letterbox_size(src: (u32, u32), input: (u32, u32)) -> (u32, u32) {
    let s = (input.0 as f32 / src.0 as f32).min(input.1 as f32 / src.1 as f32);
    let nw = ((src.0 as f32 * s).round() as u32).clamp(1, input.0);
    let nh = ((src.1 as f32 * s).round() as u32).clamp(1, input.1);
    (nw, nh)
}

/// Turns RGB frames into the model's input tensor.
pub struct Preprocessor {
    width: u32,
    height: u32,
    layout: Layout,
    colour: ColourOrder,
    policy: ResizePolicy,
    shorter_side: Option<u32>,
    /// Normalised value of every byte per input channel (model order): one lookup per
    /// sample instead of a subtract and a divide.
    lut: [[f32; 256]; 3],
    pad: [f32; 3],
    resizer: Resizer,
    resized: Image<'static>,
}

impl Preprocessor {
    pub fn new(spec: &InputSpec, width: u32, height: u32) -> Self {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                *slot = (v as f32 - spec.mean[c]) / spec.std[c];
            }
        }
        let pad = [0, 1, 2].map(|c| lut[c][spec.pad_value as usize]);
        Self {
            width,
            height,
            layout: spec.layout,
            colour: spec.colour,
            policy: spec.resize,
            shorter_side: spec.resize_shorter_side,
            lut,
            pad,
            resizer: Resizer::new(),
            resized: Image::new(width, height, PixelType::U8x3),
        }
    }

    /// The same preprocessing with buffers of its own, for another thread.
    pub fn fork(&self) -> Self {
        Self {
            width: self.width,
            height: self.height,
            layout: self.layout,
            colour: self.colour,
            policy: self.policy,
            shorter_side: self.shorter_side,
            lut: self.lut,
            pad: self.pad,
            resizer: Resizer::new(),
            resized: Image::new(self.width, self.height, PixelType::U8x3),
        }
    }

    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// A zeroed tensor of the model's input shape.
    pub fn new_tensor(&self) -> Tensor {
        let (w, h) = (self.width as usize, self.height as usize);
        let shape = match self.layout {
            Layout::Nchw => [1, 3, h, w],
            Layout::Nhwc => [1, h, w, 3],
        };
        Tensor::zero::<f32>(&shape).expect("f32 tensor of a fixed shape")
    }

    /// Resizes `frame` as the policy says and writes the normalised result into `out`
    /// (which must come from [`Preprocessor::new_tensor`]).
    pub fn run(&mut self, frame: &RgbImage, out: &mut Tensor) -> Geometry {
        self.run_in(frame, None, out)
    }

    /// Like [`Preprocessor::run`], on `region` (left, top, width, height in frame
    /// pixels, inside the frame) of the frame, stretched over the whole input.
    pub fn run_region(
        &mut self,
        frame: &RgbImage,
        region: (f64, f64, f64, f64),
        out: &mut Tensor,
    ) -> Geometry {
        self.run_in(frame, Some(region), out)
    }

    fn run_in(
        &mut self,
        frame: &RgbImage,
        region: Option<(f64, f64, f64, f64)>,
        out: &mut Tensor,
    ) -> Geometry {
        let input = (self.width, self.height);
        let geometry = match (region, self.policy, self.shorter_side) {
            (Some(r), _, _) => Geometry::region(frame.dimensions(), input, r),
            (None, ResizePolicy::CentreCrop, Some(s)) => {
                Geometry::with_shorter_side(frame.dimensions(), input, s)
            }
            (None, policy, _) => Geometry::new(policy, frame.dimensions(), input),
        };
        // A region is cropped by the resizer, like centre-crop, and fills the input.
        let cropped = region.is_some() || self.policy == ResizePolicy::CentreCrop;
        let (cw, ch) = if cropped {
            input
        } else {
            geometry.content_size()
        };
        if self.resized.width() != cw || self.resized.height() != ch {
            self.resized = Image::new(cw, ch, PixelType::U8x3);
        }
        let src = ImageRef::new(
            frame.width(),
            frame.height(),
            frame.as_raw(),
            PixelType::U8x3,
        )
        .expect("an RgbImage buffer always matches its dimensions");
        // Bilinear convolution is Pillow's BILINEAR: the reference pipeline uses it too, and
        // unlike plain interpolation it averages every source pixel when downscaling.
        let mut options =
            ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        if let Some((left, top, width, height)) = region {
            options = options.crop(left, top, width, height);
        } else if self.policy == ResizePolicy::CentreCrop {
            let (left, top, width, height) = geometry.crop_region();
            options = options.crop(left, top, width, height);
        }
        self.resizer
            .resize(&src, &mut self.resized, &options)
            .expect("source and destination are both U8x3");

        let mut view = out
            .try_as_plain_ram_mut()
            .expect("a tensor made by new_tensor is plain");
        let data = view.as_slice_mut::<f32>().expect("input tensor is f32");
        let (w, h) = (self.width as usize, self.height as usize);
        // Centre-crop has negative padding (the crop offset), which the resizer applied.
        let (px, py) = (
            geometry.pad_x.max(0.0) as usize,
            geometry.pad_y.max(0.0) as usize,
        );
        let letterboxed = cw as usize != w || ch as usize != h;
        // Model channel c takes frame channel order[c].
        let order = match self.colour {
            ColourOrder::Rgb => [0, 1, 2],
            ColourOrder::Bgr => [2, 1, 0],
        };
        let pixels = self.resized.buffer();
        let row_len = cw as usize * 3;
        match self.layout {
            Layout::Nchw => {
                let plane = w * h;
                if letterboxed {
                    for c in 0..3 {
                        data[c * plane..(c + 1) * plane].fill(self.pad[c]);
                    }
                }
                for (y, row) in pixels.chunks_exact(row_len).enumerate() {
                    let base = (y + py) * w + px;
                    for c in 0..3 {
                        let lut = &self.lut[c];
                        let dst = &mut data[c * plane + base..c * plane + base + cw as usize];
                        for (d, px3) in dst.iter_mut().zip(row.chunks_exact(3)) {
                            *d = lut[px3[order[c]] as usize];
                        }
                    }
                }
            }
            Layout::Nhwc => {
                if letterboxed {
                    for px3 in data.chunks_exact_mut(3) {
                        px3.copy_from_slice(&self.pad);
                    }
                }
                for (y, row) in pixels.chunks_exact(row_len).enumerate() {
                    let base = ((y + py) * w + px) * 3;
                    let dst = &mut data[base..base + row_len];
                    for (d, s) in dst.chunks_exact_mut(3).zip(row.chunks_exact(3)) {
                        for c in 0..3 {
                            d[c] = self.lut[c][s[order[c]] as usize];
                        }
                    }
                }
            }
        }
        geometry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(layout: Layout, colour: ColourOrder, resize: ResizePolicy) -> InputSpec {
        InputSpec {
            name: None,
            width: 4,
            height: 4,
            layout,
            colour,
            resize,
            resize_shorter_side: None,
            size_multiple: None,
            pad_value: 0,
            mean: [0.0, 0.0, 0.0],
            std: [1.0, 1.0, 1.0],
        }
    }

    #[test]
    fn letterbox_centres_a_wide_frame_and_maps_boxes_back_to_source_pixels() {
        let g = Geometry::new(ResizePolicy::Letterbox, (200, 100), (4, 4));
        assert_eq!((g.pad_x, g.pad_y), (0.0, 1.0));
        // The whole content area (rows 1..3 of 4) is the whole source frame.
        let b = g.to_source(&BBox {
            x1: 0.0,
            y1: 0.25,
            x2: 1.0,
            y2: 0.75,
        });
        assert_eq!(
            b,
            BBox {
                x1: 0.0,
                y1: 0.0,
                x2: 200.0,
                y2: 100.0
            }
        );
    }

    #[test]
    fn stretch_maps_normalised_boxes_to_source_pixels_per_axis() {
        let g = Geometry::new(ResizePolicy::Stretch, (600, 400), (300, 300));
        let b = g.to_source(&BBox {
            x1: 0.5,
            y1: 0.5,
            x2: 1.2,
            y2: 1.0,
        });
        assert_eq!(
            b,
            BBox {
                x1: 300.0,
                y1: 200.0,
                x2: 600.0,
                y2: 400.0
            }
        );
    }

    #[test]
    fn nchw_bgr_tensor_holds_swapped_planes_and_letterbox_padding() {
        let s = spec(Layout::Nchw, ColourOrder::Bgr, ResizePolicy::Letterbox);
        let mut p = Preprocessor::new(&s, 4, 4);
        let mut t = p.new_tensor();
        // A 4x2 frame of pure red letterboxes into rows 1 and 2.
        let frame = RgbImage::from_pixel(4, 2, image::Rgb([200, 10, 0]));
        p.run(&frame, &mut t);
        let view = t.try_as_plain_ram().unwrap();
        let d = view.as_slice::<f32>().unwrap();
        // Plane 0 is blue (frame channel 2), plane 2 is red.
        assert_eq!(&d[0..4], &[0.0; 4], "padding row");
        assert_eq!(&d[4..8], &[0.0; 4], "blue plane of a red frame");
        assert_eq!(&d[32 + 4..32 + 8], &[200.0; 4], "red plane");
        assert_eq!(&d[32 + 12..32 + 16], &[0.0; 4], "bottom padding row");
    }

    #[test]
    fn centre_crop_takes_the_middle_of_a_wide_frame_and_maps_boxes_back() {
        // 512x256 with the shorter side to 256: scale 1, the centre 224x224 is
        // x 144..368, y 16..240.
        let g = Geometry::with_shorter_side((512, 256), (224, 224), 256);
        assert_eq!((g.scale_x, g.pad_x, g.pad_y), (1.0, -144.0, -16.0));
        let b = g.to_source(&BBox {
            x1: 0.0,
            y1: 0.0,
            x2: 1.0,
            y2: 1.0,
        });
        assert_eq!(
            b,
            BBox {
                x1: 144.0,
                y1: 16.0,
                x2: 368.0,
                y2: 240.0
            }
        );
        // A frame smaller than the input is scaled up to fill it, never padded.
        let small = Geometry::with_shorter_side((100, 50), (224, 224), 256);
        assert!(small.scale_x * 50.0 >= 224.0);
    }

    #[test]
    fn centre_crop_fills_the_tensor_with_the_middle_of_the_frame() {
        let mut s = spec(Layout::Nchw, ColourOrder::Rgb, ResizePolicy::CentreCrop);
        s.resize_shorter_side = Some(4);
        let mut p = Preprocessor::new(&s, 4, 4);
        let mut t = p.new_tensor();
        // 12x4: left third red, middle green, right blue; the crop is the green middle.
        let frame = RgbImage::from_fn(12, 4, |x, _| match x / 4 {
            0 => image::Rgb([255, 0, 0]),
            1 => image::Rgb([0, 255, 0]),
            _ => image::Rgb([0, 0, 255]),
        });
        p.run(&frame, &mut t);
        let view = t.try_as_plain_ram().unwrap();
        let d = view.as_slice::<f32>().unwrap();
        assert!(d[16..32].iter().all(|&v| v > 250.0), "green plane is full");
        assert!(d[..16].iter().all(|&v| v < 5.0), "no red");
    }

    #[test]
    fn nhwc_tensor_interleaves_normalised_channels() {
        let mut s = spec(Layout::Nhwc, ColourOrder::Rgb, ResizePolicy::Stretch);
        s.mean = [127.5; 3];
        s.std = [127.5; 3];
        let mut p = Preprocessor::new(&s, 4, 4);
        let mut t = p.new_tensor();
        let frame = RgbImage::from_pixel(8, 8, image::Rgb([255, 0, 127]));
        p.run(&frame, &mut t);
        let view = t.try_as_plain_ram().unwrap();
        let d = view.as_slice::<f32>().unwrap();
        assert_eq!(d[0], 1.0);
        assert_eq!(d[1], -1.0);
        assert!((d[2] - (-0.5 / 127.5)).abs() < 1e-6);
    }
}
