//! The scale rule: run a fully convolutional counter where products are the size it was
//! trained on, whatever the camera sees.
//!
//! A counter finds products by their centres on a grid of `stride` input pixels and is
//! only reliable while a product is a few cells wide (the manifest's `[scale]` band):
//! smaller and neighbours merge into one peak, larger and the picture printed on one box
//! reads as several products. No single input size serves every camera, so the rule
//! chooses, per region of the frame (a shelf zone's bounding rectangle, or the whole
//! frame), how many model pixels a frame pixel becomes:
//!
//! 1. **Probe.** Run the region fitted into one tile, then at twice and four times that
//!    scale, coarse to fine, until the median predicted product width is inside the
//!    trained band (or too large, which a smaller scale fixes). A probe that finds
//!    nothing ends it: an empty shelf costs one pass.
//! 2. **Aim.** The scale that puts that median at `target-width-cells`; run there and,
//!    if the median still misses the target by more than a third, aim once more.
//! 3. **Tile.** A region scaled beyond the largest tile is cut into tiles of one size
//!    that overlap by at least the largest product the band allows; each tile keeps the
//!    detections whose centre lies in its own core (the overlaps split at their middle),
//!    and a last size-aware suppression removes a product seen by two tiles or regions.
//!
//! A shelf camera is fixed, so its product scale per zone is stable: the daemon probes at
//! start, on reload and every `rescale-interval`, and runs only the tiles in between.
//! `detect`, `eval` and `bench` use the same rule per image.

use std::time::{Duration, Instant};

use image::RgbImage;
use serde::Serialize;

use super::manifest::{DecoderSpec, ScaleSpec};
use super::{BBox, Detection, Detector, StageTimings, VisionError};

/// A rectangle of the frame: left, top, width, height in frame pixels.
pub type Rect = (f64, f64, f64, f64);

/// The largest tile the rule runs, in model-input pixels. Larger tiles waste less on
/// overlaps but each needs its own buffers; 640 x 480 holds 80 x 60 cells at stride 8
/// (160 x 120 at stride 4).
pub const DEFAULT_MAX_TILE: (u32, u32) = (640, 480);

/// See [`ScaleRule::tiles`]: how much larger than the largest tile a region may be and
/// still run as one tile.
const ONE_TILE_SLACK: f32 = 1.25;

/// The finest scale the rule uses (model pixels per frame pixel): beyond 4x upsampling
/// a product has no detail left to find, and the tiles multiply.
pub const MAX_SCALE: f32 = 4.0;

/// The finest probe is this many times the coarsest (probes double): 8x finds products
/// of 2 px in a frame fitted to the trained size, at a few dozen tiles.
pub const MAX_PROBE_ZOOM: f32 = 8.0;

/// Probes need this many products to measure a median; fewer is an empty or nearly
/// empty zone, whose scale is kept (or the coarse one used) until products show up.
pub const MIN_PROBE_DETECTIONS: usize = 3;

/// The rule for one model: its trained band and tiling limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleRule {
    pub band: ScaleSpec,
    /// Input pixels per heat-map cell.
    pub stride: f32,
    /// Input sizes must be multiples of this.
    pub multiple: u32,
    pub max_tile: (u32, u32),
    /// The input size the model was trained at: the coarsest probe fits a region into
    /// one tile of it.
    pub trained: (u32, u32),
    /// The decoder's suppression fraction, reused to merge tiles.
    pub suppression: f32,
    /// Only detections at or above this score measure the product width (`eval` ranks
    /// detections far below the operating threshold; they must not move the scale).
    pub measure_min_score: f32,
}

/// One pass of the model: a rectangle of the frame stretched over an input size, and
/// the part of it whose detections it keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tile {
    pub region: Rect,
    pub size: (u32, u32),
    /// Detections are kept when their centre lies in here (frame pixels).
    pub core: BBox,
}

/// A part of the frame to count in: detections are kept when their centre lies in
/// `core`; `context` (the core with a margin) is what the model sees, so a product
/// whose centre is in the core is seen whole.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Region {
    pub core: BBox,
    pub context: Rect,
}

impl Region {
    /// The whole frame.
    pub fn frame(width: u32, height: u32) -> Self {
        let (w, h) = (width as f32, height as f32);
        Self {
            core: BBox {
                x1: 0.0,
                y1: 0.0,
                x2: w,
                y2: h,
            },
            context: (0.0, 0.0, f64::from(w), f64::from(h)),
        }
    }

    /// The region of a zone with bounding box `zone`: the model sees `margin` frame
    /// pixels around it and keeps detections up to half of that outside it, so that a
    /// product a membership rule admits by its bottom edge or by overlap (its centre
    /// outside the zone) is kept, and one cut by the edge of what the model sees is not.
    pub fn around(zone: BBox, margin: f32, frame: (u32, u32)) -> Self {
        let (fw, fh) = (frame.0 as f32, frame.1 as f32);
        let grow = |m: f32| BBox {
            x1: (zone.x1 - m).clamp(0.0, fw),
            y1: (zone.y1 - m).clamp(0.0, fh),
            x2: (zone.x2 + m).clamp(0.0, fw),
            y2: (zone.y2 + m).clamp(0.0, fh),
        };
        let core = grow(margin / 2.0);
        let outer = grow(margin);
        // A degenerate zone still gets a region the model can run on.
        let (w, h) = (outer.width().max(1.0), outer.height().max(1.0));
        Self {
            core,
            context: (
                f64::from(outer.x1),
                f64::from(outer.y1),
                f64::from(w),
                f64::from(h),
            ),
        }
    }
}

impl Region {
    /// The smallest region holding both: cores and contexts joined.
    pub fn union(&self, other: &Region) -> Region {
        let (a, b) = (self.context, other.context);
        let (x1, y1) = (a.0.min(b.0), a.1.min(b.1));
        let (x2, y2) = ((a.0 + a.2).max(b.0 + b.2), (a.1 + a.3).max(b.1 + b.3));
        Region {
            core: BBox {
                x1: self.core.x1.min(other.core.x1),
                y1: self.core.y1.min(other.core.y1),
                x2: self.core.x2.max(other.core.x2),
                y2: self.core.y2.max(other.core.y2),
            },
            context: (x1, y1, x2 - x1, y2 - y1),
        }
    }
}

/// What the rule chose for one region, for logs, `detect` output and health.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct ScaleChoice {
    /// Model-input pixels per frame pixel at the coarsest level.
    pub scale: f32,
    /// Levels of the pyramid: `scale`, twice it, ... (1 unless the region's products
    /// span more than an octave, as along a shelf seen in perspective).
    pub levels: usize,
    /// Tiles one frame runs, over every level.
    pub tiles: usize,
    /// Median predicted product width at this scale, in cells (None: too few products
    /// were found to measure it).
    pub median_width_cells: Option<f32>,
    /// Median product width in frame pixels, for the region's margin.
    #[serde(skip, default)]
    pub median_size_px: Option<f32>,
}

/// One level of the pyramid: every tile at one scale.
#[derive(Debug, Clone)]
struct Level {
    scale: f32,
    tiles: usize,
    found: Vec<Detection>,
}

/// The detections of a region with what they cost.
#[derive(Debug, Clone)]
pub struct RegionResult {
    pub detections: Vec<Detection>,
    pub timings: StageTimings,
    /// Model passes run (tiles of every probe and aim).
    pub passes: usize,
    pub choice: ScaleChoice,
}

impl ScaleRule {
    /// The rule for a detector, when its model declares a `[scale]` band and no fixed
    /// input size was asked for.
    pub fn for_detector(detector: &Detector, fixed_size: Option<(u32, u32)>) -> Option<Self> {
        if fixed_size.is_some() {
            return None;
        }
        let m = &detector.manifest().manifest;
        let band = m.scale?;
        let DecoderSpec::Heatmap(h) = &m.decoder else {
            return None;
        };
        Some(Self {
            band,
            stride: h.stride as f32,
            multiple: m.input.size_multiple.unwrap_or(h.stride).max(1),
            max_tile: DEFAULT_MAX_TILE,
            trained: (m.input.width, m.input.height),
            suppression: h.suppression_box_fraction,
            measure_min_score: 0.0,
        })
    }

    /// Overlap between neighbouring tiles, in model pixels: the widest product the band
    /// allows, so a product cut by one tile's edge is whole in its neighbour.
    fn overlap(&self) -> f32 {
        (self.band.max_width_cells * self.stride)
            .min(self.max_tile.0.min(self.max_tile.1) as f32 / 2.0)
    }

    /// The scale at which `region` fits one tile of the trained size's area: the
    /// coarsest probe.
    pub fn fit_scale(&self, region: Rect) -> f32 {
        let (_, _, w, h) = region;
        let trained = self.trained;
        (trained.0 as f32 / w as f32).min(trained.1 as f32 / h as f32)
    }

    /// An input side for `extent` model pixels: a multiple of the model's, at least two.
    fn side(&self, extent: f32, max: u32) -> u32 {
        let m = self.multiple as f32;
        let n = (extent / m).round().max(2.0) as u32;
        (n * self.multiple).min(max.max(2 * self.multiple))
    }

    /// Splits one axis of `start..start + len` (frame pixels) at `scale` into tiles:
    /// (tile start, tile length, input side, core start, core end).
    fn split(&self, start: f64, len: f64, scale: f32, max: u32) -> Vec<(f64, f64, u32, f32, f32)> {
        let extent = len as f32 * scale;
        // Up to a quarter too large for one tile: one tile, a little coarser, is cheaper
        // than four that overlap by most of their area.
        if extent <= max as f32 * ONE_TILE_SLACK {
            let side = self.side(extent, max);
            return vec![(start, len, side, f32::NEG_INFINITY, f32::INFINITY)];
        }
        let overlap = self.overlap();
        let n = ((extent - overlap) / (max as f32 - overlap))
            .ceil()
            .max(2.0) as usize;
        let tile = f64::from(max as f32 / scale);
        let step = (len - tile) / (n - 1) as f64;
        (0..n)
            .map(|i| {
                let at = start + step * i as f64;
                let lo = if i == 0 {
                    f32::NEG_INFINITY
                } else {
                    (at + (tile - step) / 2.0) as f32
                };
                let hi = if i + 1 == n {
                    f32::INFINITY
                } else {
                    (at + (tile + step) / 2.0) as f32
                };
                (at, tile, max, lo, hi)
            })
            .collect()
    }

    /// The tiles that cover `region` at `scale` model pixels per frame pixel.
    pub fn tiles(&self, region: &Region, scale: f32) -> Vec<Tile> {
        let (x, y, w, h) = region.context;
        let xs = self.split(x, w, scale, self.max_tile.0);
        let ys = self.split(y, h, scale, self.max_tile.1);
        let c = region.core;
        let mut tiles = Vec::with_capacity(xs.len() * ys.len());
        for &(ty, th, sh, ylo, yhi) in &ys {
            for &(tx, tw, sw, xlo, xhi) in &xs {
                tiles.push(Tile {
                    region: (tx, ty, tw, th),
                    size: (sw, sh),
                    core: BBox {
                        x1: xlo.max(c.x1),
                        y1: ylo.max(c.y1),
                        x2: xhi.min(c.x2),
                        y2: yhi.min(c.y2),
                    },
                });
            }
        }
        tiles
    }

    /// Runs every tile of `region` at `scale`: the detections whose centre lies in their
    /// tile's core, not yet merged.
    fn run_level(
        &self,
        detector: &mut Detector,
        frame: &RgbImage,
        region: &Region,
        scale: f32,
        timings: &mut StageTimings,
    ) -> Result<Level, VisionError> {
        let tiles = self.tiles(region, scale);
        let mut found = Vec::new();
        for tile in &tiles {
            let (dets, t) = detector.detect_region(frame, tile.region, tile.size)?;
            add_timings(timings, &t);
            found.extend(dets.into_iter().filter(|d| contains(&tile.core, d)));
        }
        Ok(Level {
            scale,
            tiles: tiles.len(),
            found,
        })
    }

    /// The lower edge of the target's octave, in cells: narrower products are what a
    /// level at twice the scale takes over.
    fn octave_low(&self) -> f32 {
        self.band.target_width_cells / std::f32::consts::SQRT_2
    }

    /// The width of `d` in cells at `scale`.
    fn cells(&self, d: &Detection, scale: f32) -> f32 {
        d.bbox.width() * scale / self.stride
    }

    /// The detections of a pyramid of levels (coarse first, each twice the scale of the
    /// one before): each level keeps the products that are in the octave of the band
    /// around the target at its scale (the coarsest also the larger, the finest also
    /// the smaller), coarser levels win where two see the same product.
    fn combine(&self, levels: &[Level], iou_threshold: f32) -> Vec<Detection> {
        let lo = self.octave_low();
        let n = levels.len();
        let mut kept: Vec<Detection> = Vec::new();
        for (j, level) in levels.iter().enumerate() {
            // A little overlap between octaves: a product measured at the edge in both
            // is merged below, not lost.
            let min = if j + 1 == n { 0.0 } else { lo * 0.9 };
            let max = if j == 0 {
                f32::INFINITY
            } else {
                2.0 * lo * 1.1
            };
            let inside: Vec<Detection> = level
                .found
                .iter()
                .filter(|d| (min..max).contains(&self.cells(d, level.scale)))
                .cloned()
                .collect();
            for d in self.merge(inside, iou_threshold) {
                if !kept.iter().any(|k| self.inside(k, &d)) {
                    kept.push(d);
                }
            }
        }
        kept
    }

    /// The merged detections of a set of levels.
    fn detections(&self, levels: &[Level], iou_threshold: f32) -> Vec<Detection> {
        if levels.len() == 1 {
            self.merge(levels[0].found.clone(), iou_threshold)
        } else {
            self.combine(levels, iou_threshold)
        }
    }

    /// The result of a set of levels, measured at the coarsest (the anchor).
    fn result(
        &self,
        levels: &[Level],
        iou_threshold: f32,
        timings: StageTimings,
        passes: usize,
    ) -> RegionResult {
        let t = Instant::now();
        let detections = self.detections(levels, iou_threshold);
        let mut timings = timings;
        timings.postprocess_ms += t.elapsed().as_secs_f64() * 1e3;
        let anchor = levels[0].scale;
        let median_width_cells = self.median_cells(&detections, anchor);
        RegionResult {
            choice: ScaleChoice {
                scale: anchor,
                levels: levels.len(),
                tiles: levels.iter().map(|l| l.tiles).sum(),
                median_width_cells,
                median_size_px: median(
                    measured(&detections, self.measure_min_score)
                        .map(|d| d.bbox.width().max(d.bbox.height())),
                )
                .filter(|_| median_width_cells.is_some()),
            },
            detections,
            timings,
            passes,
        }
    }

    /// Runs `region` at the levels `scale`, 2 x `scale`, ... (`levels` of them) and
    /// merges them: the per-frame work once a region's scale is chosen.
    pub fn run_at(
        &self,
        detector: &mut Detector,
        frame: &RgbImage,
        region: &Region,
        scale: f32,
        levels: usize,
    ) -> Result<RegionResult, VisionError> {
        let mut timings = StageTimings::default();
        let mut runs = Vec::with_capacity(levels.max(1));
        for j in 0..levels.max(1) {
            let s = scale * (1u32 << j) as f32;
            runs.push(self.run_level(detector, frame, region, s, &mut timings)?);
        }
        let passes = runs.iter().map(|l| l.tiles).sum();
        Ok(self.result(&runs, detector.nms_params().0, timings, passes))
    }

    /// Probes `region` coarse to fine, aims at the target width, adds finer levels
    /// while they find products the coarser ones could not (a shelf seen in
    /// perspective), and returns the detections at the chosen scale.
    pub fn choose(
        &self,
        detector: &mut Detector,
        frame: &RgbImage,
        region: &Region,
    ) -> Result<RegionResult, VisionError> {
        let band = self.band;
        let iou = detector.nms_params().0;
        let coarse = self.fit_scale(region.context).min(MAX_SCALE);
        let finest = (coarse * MAX_PROBE_ZOOM).min(MAX_SCALE);
        let mut timings = StageTimings::default();
        let mut passes = 0;
        let mut run = |scale: f32, timings: &mut StageTimings, passes: &mut usize| {
            let level = self.run_level(detector, frame, region, scale, timings)?;
            *passes += level.tiles;
            Ok::<Level, VisionError>(level)
        };
        let median_cells = |level: &Level| self.median_cells(&level.found, level.scale);
        // 1. Coarse to fine until the products are at least the band's smallest width.
        let mut probe = coarse;
        let mut level = run(probe, &mut timings, &mut passes)?;
        let mut aim = None;
        loop {
            if let Some(m) = median_cells(&level) {
                aim = Some(probe * band.target_width_cells / m);
                if m >= band.min_width_cells {
                    break;
                }
            }
            // Nothing at all (an empty shelf, or no products in view): finer probes
            // would cost four times the pixels each to find nothing again. Products
            // too small to count at this scale still show as a few peaks.
            if probe >= finest || level.found.is_empty() {
                break;
            }
            probe = (probe * 2.0).min(finest);
            level = run(probe, &mut timings, &mut passes)?;
        }
        let Some(mut scale) = aim else {
            // Nothing measured at any probe (an empty zone): the coarse scale, the
            // cheapest, measured again later.
            if level.scale != coarse {
                level = run(coarse, &mut timings, &mut passes)?;
            }
            return Ok(self.result(&[level], iou, timings, passes));
        };
        // 2. Aim the median at the target, twice at most.
        for _ in 0..2 {
            scale = scale.clamp(1e-3, MAX_SCALE);
            if (scale / level.scale - 1.0).abs() < 0.05 {
                break;
            }
            level = run(scale, &mut timings, &mut passes)?;
            match median_cells(&level) {
                Some(m) if (m / band.target_width_cells - 1.0).abs() > 1.0 / 3.0 => {
                    scale = level.scale * band.target_width_cells / m;
                }
                _ => break,
            }
        }
        // 3. Finer levels while each adds products: smaller ones, farther along a shelf
        //    seen in perspective, than the coarser levels can separate.
        let mut levels = vec![level];
        let mut count = self.detections(&levels, iou).len();
        loop {
            let last = &levels[levels.len() - 1];
            let next = last.scale * 2.0;
            if next > MAX_SCALE * 1.001 || next > finest * 2.001 {
                break;
            }
            // Only where the finest level so far sees products in the octave below
            // the target, the ones a finer level would take over: a finer level is
            // four times the pixels, and on a shelf of one product size it would only
            // find the pictures printed on large boxes. (Below the band itself would
            // be too late a sign: along an aisle the farthest products are not seen
            // as narrow, they are not seen at all.)
            let lo = self.octave_low();
            let small = measured(&last.found, self.measure_min_score)
                .filter(|d| self.cells(d, last.scale) < lo)
                .count();
            if small < MIN_PROBE_DETECTIONS.max(last.found.len() / 10) {
                break;
            }
            levels.push(run(next, &mut timings, &mut passes)?);
            let with = self.detections(&levels, iou).len();
            let gain = with.saturating_sub(count);
            let kept = gain >= MIN_PROBE_DETECTIONS.max(count / 20);
            tracing::debug!(scale = next, small, count, with, kept, "finer level tried");
            if !kept {
                levels.pop();
                break;
            }
            count = with;
        }
        Ok(self.result(&levels, iou, timings, passes))
    }

    /// Size-aware suppression over tiles and regions: a weaker detection whose centre
    /// lies inside the suppression fraction of a stronger one's box is the same product
    /// seen twice; then the usual IoU suppression.
    pub fn merge(&self, mut found: Vec<Detection>, iou_threshold: f32) -> Vec<Detection> {
        found.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut kept: Vec<Detection> = Vec::with_capacity(found.len());
        for d in found {
            let duplicate = kept.iter().any(|k| {
                self.inside(k, &d)
                    || k.class_id == d.class_id && k.bbox.iou(&d.bbox) > iou_threshold
            });
            if !duplicate {
                kept.push(d);
            }
        }
        kept
    }

    /// `d`'s centre lies inside the suppression fraction of `k`'s box (same class): the
    /// decoder's size-aware suppression, across tiles, levels and regions.
    fn inside(&self, k: &Detection, d: &Detection) -> bool {
        let f = self.suppression / 2.0;
        let ((cx, cy), (kx, ky)) = (centre(&d.bbox), centre(&k.bbox));
        k.class_id == d.class_id
            && (cx - kx).abs() <= f * k.bbox.width()
            && (cy - ky).abs() <= f * k.bbox.height()
    }

    /// The median width in cells at `scale` of the detections at or above the
    /// measuring score, when there are enough of them to tell.
    fn median_cells(&self, detections: &[Detection], scale: f32) -> Option<f32> {
        let widths: Vec<f32> = measured(detections, self.measure_min_score)
            .map(|d| self.cells(d, scale))
            .collect();
        if widths.len() < MIN_PROBE_DETECTIONS {
            return None;
        }
        median(widths.into_iter())
    }
}

/// Per-region scales that a fixed camera keeps between frames (the daemon).
#[derive(Debug, Clone)]
pub struct RegionScales {
    /// By region index: the chosen scale and when it was chosen.
    chosen: Vec<Option<(ScaleChoice, Instant)>>,
    /// How often a region is probed again.
    pub interval: Duration,
}

/// A scale this close to the one in use is not worth a change (and a count wobble).
const RESCALE_HYSTERESIS: f32 = 0.15;

/// An empty region is probed again this often, so products placed on an empty shelf are
/// soon counted at their own scale.
const EMPTY_REPROBE: Duration = Duration::from_secs(30);

impl RegionScales {
    pub fn new(interval: Duration) -> Self {
        Self {
            chosen: Vec::new(),
            interval,
        }
    }

    /// Forget every scale (a reload, or the zones or frame size changed).
    pub fn reset(&mut self) {
        self.chosen.clear();
    }

    /// The scales in use, by region index.
    pub fn choices(&self) -> Vec<Option<ScaleChoice>> {
        self.chosen.iter().map(|c| c.map(|(c, _)| c)).collect()
    }

    /// The margin around a zone (see [`Region::around`]): the median product's longer
    /// side, or a tenth of the zone's longer side before any product was measured.
    pub fn margin(&self, index: usize, core: &BBox) -> f32 {
        match self.chosen.get(index).copied().flatten() {
            Some((
                ScaleChoice {
                    median_size_px: Some(s),
                    ..
                },
                _,
            )) => s,
            _ => 0.1 * core.width().max(core.height()) + 8.0,
        }
    }

    /// Detections of every region, probing those whose scale is unknown or due, merged
    /// into one list (a product two regions see is kept once).
    pub fn detect(
        &mut self,
        rule: &ScaleRule,
        detector: &mut Detector,
        frame: &RgbImage,
        regions: &[Region],
        now: Instant,
        changed: &mut Vec<usize>,
    ) -> Result<(Vec<Detection>, StageTimings, usize), VisionError> {
        self.chosen.resize(regions.len(), None);
        let mut all = Vec::new();
        let mut timings = StageTimings::default();
        let mut passes = 0;
        // Regions measured before run together where they can: neighbouring zones of
        // one shelf at about one scale are one pass, not one each (their margins
        // overlap, and every pass has a fixed cost).
        let mut steady: Vec<(Region, ScaleChoice)> = Vec::new();
        for (i, region) in regions.iter().enumerate() {
            let due = match self.chosen[i] {
                None => true,
                Some((c, at)) => {
                    let every = if c.median_width_cells.is_some() {
                        self.interval
                    } else {
                        EMPTY_REPROBE.min(self.interval)
                    };
                    now.duration_since(at) >= every
                }
            };
            if !due {
                let (c, _) = self.chosen[i].expect("not due means chosen");
                match steady.iter_mut().find(|(r, g)| mergeable(r, g, region, &c)) {
                    Some((r, _)) => *r = r.union(region),
                    None => steady.push((*region, c)),
                }
                continue;
            }
            let r = rule.choose(detector, frame, region)?;
            let keep = self.chosen[i].and_then(|(old, _)| {
                let close = (r.choice.scale / old.scale - 1.0).abs() < RESCALE_HYSTERESIS
                    && r.choice.levels == old.levels;
                (close && r.choice.median_width_cells.is_some()).then_some(old)
            });
            let choice = match keep {
                Some(old) => ScaleChoice {
                    median_width_cells: r.choice.median_width_cells,
                    median_size_px: r.choice.median_size_px,
                    ..old
                },
                None => {
                    changed.push(i);
                    r.choice
                }
            };
            self.chosen[i] = Some((choice, now));
            passes += r.passes;
            add_timings(&mut timings, &r.timings);
            all.extend(r.detections);
        }
        for (region, c) in &steady {
            let r = rule.run_at(detector, frame, region, c.scale, c.levels)?;
            passes += r.passes;
            add_timings(&mut timings, &r.timings);
            all.extend(r.detections);
        }
        let detections = if regions.len() > 1 {
            rule.merge(all, detector.nms_params().0)
        } else {
            all
        };
        Ok((detections, timings, passes))
    }
}

/// A detector with the scale rule: what the daemon, `detect`, `eval` and `bench` run.
/// Without a rule (a fixed input size, or a model without `[scale]`) it runs the whole
/// frame at the detector's input size, as before the rule existed.
pub struct ScaledDetector {
    pub detector: Detector,
    rule: Option<ScaleRule>,
    scales: RegionScales,
    regions: Vec<Region>,
}

/// What one frame cost: model passes, and the regions whose scale changed.
#[derive(Debug, Clone, Default)]
pub struct FrameReport {
    pub timings: StageTimings,
    pub passes: usize,
    /// Indices (zones in order) whose scale was chosen anew on this frame.
    pub rescaled: Vec<usize>,
}

impl ScaledDetector {
    /// `fixed_size`: the input size asked for (config or `--input-size`), which turns the
    /// rule off. `interval`: how often a region's scale is measured again.
    pub fn new(detector: Detector, fixed_size: Option<(u32, u32)>, interval: Duration) -> Self {
        let rule = ScaleRule::for_detector(&detector, fixed_size);
        Self {
            detector,
            rule,
            scales: RegionScales::new(interval),
            regions: Vec::new(),
        }
    }

    pub fn rule(&self) -> Option<&ScaleRule> {
        self.rule.as_ref()
    }

    /// How often a region's scale is measured again.
    pub fn set_interval(&mut self, interval: Duration) {
        self.scales.interval = interval;
    }

    /// See [`ScaleRule::measure_min_score`].
    pub fn set_measure_min_score(&mut self, score: f32) {
        if let Some(r) = self.rule.as_mut() {
            r.measure_min_score = score;
        }
    }

    /// Forget the scales measured so far: the next frame probes again (a reload, new
    /// zones, another frame size, or the next unrelated image).
    pub fn reset(&mut self) {
        self.scales.reset();
    }

    /// The scale in use per region (zones in order, or the whole frame).
    pub fn choices(&self) -> Vec<Option<ScaleChoice>> {
        self.scales.choices()
    }

    /// Detections in `frame` for zones with the bounding boxes `zones` (frame pixels);
    /// no zones: the whole frame.
    pub fn detect(
        &mut self,
        frame: &RgbImage,
        zones: &[BBox],
        now: Instant,
    ) -> Result<(Vec<Detection>, FrameReport), VisionError> {
        let Some(rule) = self.rule else {
            let (d, timings) = self.detector.detect(frame)?;
            return Ok((
                d,
                FrameReport {
                    timings,
                    passes: 1,
                    rescaled: Vec::new(),
                },
            ));
        };
        let size = frame.dimensions();
        self.regions.clear();
        if zones.is_empty() {
            self.regions.push(Region::frame(size.0, size.1));
        } else {
            for (i, z) in zones.iter().enumerate() {
                let margin = self.scales.margin(i, z);
                self.regions.push(Region::around(*z, margin, size));
            }
        }
        let mut rescaled = Vec::new();
        let (detections, timings, passes) = self.scales.detect(
            &rule,
            &mut self.detector,
            frame,
            &self.regions,
            now,
            &mut rescaled,
        )?;
        Ok((
            detections,
            FrameReport {
                timings,
                passes,
                rescaled,
            },
        ))
    }
}

/// Whether `region` at `choice` can run in one pass with `group` at `at`: one level,
/// scales within the hysteresis of each other, and their union hardly larger than the
/// two (they overlap or touch, as neighbouring zones of one shelf do).
fn mergeable(group: &Region, at: &ScaleChoice, region: &Region, choice: &ScaleChoice) -> bool {
    if at.levels != 1 || choice.levels != 1 {
        return false;
    }
    if (choice.scale / at.scale - 1.0).abs() >= RESCALE_HYSTERESIS {
        return false;
    }
    let area = |r: &Rect| r.2 * r.3;
    let union = group.union(region);
    area(&union.context) <= 1.1 * (area(&group.context) + area(&region.context))
}

/// The detections that may measure a product width (see `ScaleRule::measure_min_score`).
fn measured(detections: &[Detection], min_score: f32) -> impl Iterator<Item = &Detection> {
    detections.iter().filter(move |d| d.score >= min_score)
}

fn centre(b: &BBox) -> (f32, f32) {
    ((b.x1 + b.x2) / 2.0, (b.y1 + b.y2) / 2.0)
}

fn contains(core: &BBox, d: &Detection) -> bool {
    let (x, y) = centre(&d.bbox);
    x >= core.x1 && x < core.x2 && y >= core.y1 && y < core.y2
}

fn median(values: impl Iterator<Item = f32>) -> Option<f32> {
    let mut v: Vec<f32> = values.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f32::total_cmp);
    Some(v[v.len() / 2])
}

fn add_timings(sum: &mut StageTimings, t: &StageTimings) {
    sum.preprocess_ms += t.preprocess_ms;
    sum.inference_ms += t.inference_ms;
    sum.postprocess_ms += t.postprocess_ms;
    for (s, a) in sum.allocations.iter_mut().zip(t.allocations) {
        *s += a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> ScaleRule {
        ScaleRule {
            band: ScaleSpec {
                min_width_cells: 3.0,
                max_width_cells: 12.0,
                target_width_cells: 6.0,
            },
            stride: 8.0,
            multiple: 32,
            max_tile: (640, 480),
            trained: (384, 288),
            suppression: 1.0,
            measure_min_score: 0.0,
        }
    }

    fn det(score: f32, x1: f32, y1: f32, w: f32, h: f32) -> Detection {
        Detection {
            label: "product".into(),
            class_id: 0,
            score,
            bbox: BBox {
                x1,
                y1,
                x2: x1 + w,
                y2: y1 + h,
            },
        }
    }

    #[test]
    fn a_region_that_fits_one_tile_runs_once_at_a_size_the_model_accepts() {
        let r = Region::frame(1280, 960);
        let tiles = rule().tiles(&r, 0.3);
        assert_eq!(tiles.len(), 1);
        assert_eq!(tiles[0].size, (384, 288));
        assert_eq!(tiles[0].region, (0.0, 0.0, 1280.0, 960.0));
        assert_eq!(tiles[0].core, r.core);
    }

    #[test]
    fn a_large_region_is_tiled_with_overlaps_wider_than_the_widest_product() {
        let rule = rule();
        let r = Region::frame(1280, 960);
        let scale = 2.0;
        let tiles = rule.tiles(&r, scale);
        // 2560 x 1920 model pixels in tiles of 640 x 480, overlapping by >= 96 px.
        let cols = tiles.iter().filter(|t| t.region.1 == 0.0).count();
        let rows = tiles.len() / cols;
        assert_eq!((cols, rows), (5, 5));
        for t in &tiles {
            assert_eq!(t.size, (640, 480));
            assert!(t.region.0 >= 0.0 && t.region.0 + t.region.2 <= 1280.0 + 1e-6);
        }
        let (a, b) = (tiles[0].region, tiles[1].region);
        let overlap_model_px = (a.0 + a.2 - b.0) as f32 * scale;
        assert!(overlap_model_px >= 96.0, "overlap {overlap_model_px}");
    }

    #[test]
    fn tile_cores_cover_the_region_core_exactly_once() {
        let rule = rule();
        let r = Region::around(
            BBox {
                x1: 120.0,
                y1: 70.0,
                x2: 1080.0,
                y2: 680.0,
            },
            40.0,
            (1280, 720),
        );
        assert_eq!((r.core.x1, r.core.y2), (100.0, 700.0));
        assert_eq!(r.context, (80.0, 30.0, 1040.0, 690.0));
        let tiles = rule.tiles(&r, 1.5);
        assert!(tiles.len() > 4);
        // Every point of the core lies in exactly one tile's core, and that tile sees
        // it with room around it.
        for yi in 0..40 {
            for xi in 0..60 {
                let x = 100.0 + 1000.0 * (xi as f32 + 0.5) / 60.0;
                let y = 50.0 + 650.0 * (yi as f32 + 0.5) / 40.0;
                let d = det(1.0, x - 1.0, y - 1.0, 2.0, 2.0);
                let owners: Vec<&Tile> = tiles.iter().filter(|t| contains(&t.core, &d)).collect();
                assert_eq!(owners.len(), 1, "({x}, {y})");
                let (tx, ty, tw, th) = owners[0].region;
                assert!(f64::from(x) >= tx && f64::from(x) <= tx + tw);
                assert!(f64::from(y) >= ty && f64::from(y) <= ty + th);
            }
        }
        // Nothing outside the region core is kept.
        let outside = det(1.0, 1150.0, 300.0, 2.0, 2.0);
        assert!(tiles.iter().all(|t| !contains(&t.core, &outside)));
    }

    #[test]
    fn a_product_seen_by_two_tiles_is_kept_once_and_touching_neighbours_are_both_kept() {
        let rule = rule();
        let merged = rule.merge(
            vec![
                det(0.8, 100.0, 100.0, 40.0, 60.0),
                // The same product from the next tile, a few pixels off.
                det(0.6, 104.0, 102.0, 38.0, 58.0),
                // Its neighbour, touching it.
                det(0.7, 140.0, 100.0, 40.0, 60.0),
            ],
            0.5,
        );
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].score, 0.8);
        assert_eq!(merged[1].score, 0.7);
    }

    #[test]
    fn neighbouring_zones_at_one_scale_run_as_one_region_and_distant_or_other_scales_do_not() {
        let frame = (640, 480);
        let zone = |y1: f32, y2: f32| {
            Region::around(
                BBox {
                    x1: 0.0,
                    y1,
                    x2: 640.0,
                    y2,
                },
                40.0,
                frame,
            )
        };
        let at = |scale: f32| ScaleChoice {
            scale,
            levels: 1,
            tiles: 1,
            median_width_cells: Some(5.0),
            median_size_px: Some(40.0),
        };
        let (top, bottom) = (zone(0.0, 240.0), zone(240.0, 480.0));
        assert!(mergeable(&top, &at(0.6), &bottom, &at(0.65)));
        let both = top.union(&bottom);
        assert_eq!(both.context, (0.0, 0.0, 640.0, 480.0));
        assert_eq!((both.core.y1, both.core.y2), (0.0, 480.0));
        // Another product size: its own pass.
        assert!(!mergeable(&top, &at(0.6), &bottom, &at(0.9)));
        // Two small zones far apart: one pass over the frame between them costs more.
        let (a, b) = (zone(0.0, 40.0), zone(440.0, 480.0));
        assert!(!mergeable(&a, &at(0.6), &b, &at(0.6)));
        // A perspective pyramid stays on its own.
        let levels = ScaleChoice {
            levels: 2,
            ..at(0.6)
        };
        assert!(!mergeable(&top, &levels, &bottom, &at(0.6)));
    }

    #[test]
    fn the_margin_follows_the_measured_product_size() {
        let mut s = RegionScales::new(Duration::from_secs(600));
        let core = BBox {
            x1: 0.0,
            y1: 0.0,
            x2: 400.0,
            y2: 100.0,
        };
        assert_eq!(s.margin(0, &core), 48.0);
        s.chosen = vec![Some((
            ScaleChoice {
                scale: 1.0,
                levels: 1,
                tiles: 1,
                median_width_cells: Some(6.0),
                median_size_px: Some(60.0),
            },
            Instant::now(),
        ))];
        assert_eq!(s.margin(0, &core), 60.0);
    }
}
