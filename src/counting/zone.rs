//! Shelf zones: polygons in frame pixels and the rules that put a detection in a zone.

use serde::{Deserialize, Serialize};

use crate::vision::BBox;

/// Which point or area of a detection decides its zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Membership {
    /// The box centre lies in the zone.
    Centre,
    /// The middle of the box's bottom edge lies in the zone: where an item stands on
    /// the shelf board, robust to tall items reaching into the shelf above.
    BottomCentre,
    /// At least `overlap-fraction` of the box's area lies in the zone.
    Overlap,
}

/// A simple polygon (convex or concave, not self-intersecting) in frame pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Polygon {
    points: Vec<(f32, f32)>,
    bounds: BBox,
}

impl Polygon {
    /// At least three points; the caller validates that.
    pub fn new(points: Vec<(f32, f32)>) -> Self {
        let (mut x1, mut y1, mut x2, mut y2) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
        for &(x, y) in &points {
            x1 = x1.min(x);
            y1 = y1.min(y);
            x2 = x2.max(x);
            y2 = y2.max(y);
        }
        Self {
            points,
            bounds: BBox { x1, y1, x2, y2 },
        }
    }

    pub fn points(&self) -> &[(f32, f32)] {
        &self.points
    }

    pub fn bounds(&self) -> BBox {
        self.bounds
    }

    /// Even-odd rule; points on the left or top edge count as inside, on the right or
    /// bottom edge as outside, so a point on the border of two adjacent zones belongs to
    /// exactly one of them.
    pub fn contains(&self, x: f32, y: f32) -> bool {
        let n = self.points.len();
        let mut inside = false;
        let mut j = n - 1;
        for i in 0..n {
            let (xi, yi) = self.points[i];
            let (xj, yj) = self.points[j];
            if (yi > y) != (yj > y) {
                let x_cross = xi + (y - yi) * (xj - xi) / (yj - yi);
                if x < x_cross {
                    inside = !inside;
                }
            }
            j = i;
        }
        inside
    }

    /// Shoelace area.
    pub fn area(&self) -> f32 {
        shoelace(&self.points)
    }

    /// Area of the polygon inside `b` (Sutherland-Hodgman clipping against the box,
    /// which is convex, so concave zones clip correctly).
    pub fn intersection_area(&self, b: &BBox) -> f32 {
        if b.x2 <= self.bounds.x1
            || b.x1 >= self.bounds.x2
            || b.y2 <= self.bounds.y1
            || b.y1 >= self.bounds.y2
        {
            return 0.0;
        }
        let mut poly = self.points.clone();
        type Inside = fn(&(f32, f32), f32) -> bool;
        let edges: [(Inside, f32, bool); 4] = [
            (|p, v| p.0 >= v, b.x1, true),
            (|p, v| p.0 <= v, b.x2, true),
            (|p, v| p.1 >= v, b.y1, false),
            (|p, v| p.1 <= v, b.y2, false),
        ];
        for (inside, v, vertical) in edges {
            if poly.is_empty() {
                break;
            }
            let input = std::mem::take(&mut poly);
            for i in 0..input.len() {
                let cur = input[i];
                let prev = input[(i + input.len() - 1) % input.len()];
                let (ci, pi) = (inside(&cur, v), inside(&prev, v));
                if ci {
                    if !pi {
                        poly.push(cross(prev, cur, v, vertical));
                    }
                    poly.push(cur);
                } else if pi {
                    poly.push(cross(prev, cur, v, vertical));
                }
            }
        }
        shoelace(&poly)
    }

    /// Whether a detection box belongs to this zone under `rule`.
    pub fn admits(&self, b: &BBox, rule: Membership, overlap_fraction: f32) -> bool {
        match rule {
            Membership::Centre => self.contains((b.x1 + b.x2) / 2.0, (b.y1 + b.y2) / 2.0),
            // A hair above the bottom edge: a box whose bottom lies exactly on the zone's
            // lower border stands on this shelf, not the one below.
            Membership::BottomCentre => self.contains((b.x1 + b.x2) / 2.0, b.y2 - 1e-3),
            Membership::Overlap => {
                let area = b.area();
                area > 0.0 && self.intersection_area(b) / area >= overlap_fraction
            }
        }
    }
}

fn cross(a: (f32, f32), b: (f32, f32), v: f32, vertical: bool) -> (f32, f32) {
    if vertical {
        let t = (v - a.0) / (b.0 - a.0);
        (v, a.1 + t * (b.1 - a.1))
    } else {
        let t = (v - a.1) / (b.1 - a.1);
        (a.0 + t * (b.0 - a.0), v)
    }
}

fn shoelace(p: &[(f32, f32)]) -> f32 {
    if p.len() < 3 {
        return 0.0;
    }
    let mut s = 0.0;
    for i in 0..p.len() {
        let (x1, y1) = p[i];
        let (x2, y2) = p[(i + 1) % p.len()];
        s += x1 * y2 - x2 * y1;
    }
    (s / 2.0).abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An L-shaped (concave) zone: the 10x10 square minus its top-right 5x5 quarter.
    fn ell() -> Polygon {
        Polygon::new(vec![
            (0.0, 0.0),
            (5.0, 0.0),
            (5.0, 5.0),
            (10.0, 5.0),
            (10.0, 10.0),
            (0.0, 10.0),
        ])
    }

    fn bbox(x1: f32, y1: f32, x2: f32, y2: f32) -> BBox {
        BBox { x1, y1, x2, y2 }
    }

    #[test]
    fn a_concave_zone_excludes_its_notch() {
        let z = ell();
        assert!(z.contains(2.0, 2.0));
        assert!(z.contains(8.0, 8.0));
        assert!(!z.contains(8.0, 2.0), "the notch is outside");
        assert!(!z.contains(11.0, 5.0));
        assert_eq!(z.area(), 75.0);
    }

    #[test]
    fn a_point_on_the_border_of_two_adjacent_zones_belongs_to_exactly_one() {
        let top = Polygon::new(vec![(0.0, 0.0), (10.0, 0.0), (10.0, 5.0), (0.0, 5.0)]);
        let bottom = Polygon::new(vec![(0.0, 5.0), (10.0, 5.0), (10.0, 10.0), (0.0, 10.0)]);
        for (x, y) in [(3.0, 5.0), (0.0, 5.0), (5.0, 5.0)] {
            assert!(top.contains(x, y) ^ bottom.contains(x, y), "({x}, {y})");
        }
    }

    #[test]
    fn centre_and_bottom_centre_rules_differ_for_a_tall_item() {
        let bottom_shelf = Polygon::new(vec![
            (0.0, 50.0),
            (100.0, 50.0),
            (100.0, 100.0),
            (0.0, 100.0),
        ]);
        // A bottle standing on the bottom shelf, reaching up into the shelf above.
        let bottle = bbox(10.0, 0.0, 20.0, 80.0);
        assert!(!bottom_shelf.admits(&bottle, Membership::Centre, 0.5));
        assert!(bottom_shelf.admits(&bottle, Membership::BottomCentre, 0.5));
        // Standing exactly on the lower border: it belongs here, not below.
        let on_edge = bbox(10.0, 60.0, 20.0, 100.0);
        assert!(bottom_shelf.admits(&on_edge, Membership::BottomCentre, 0.5));
    }

    #[test]
    fn overlap_rule_uses_the_fraction_of_the_box_inside_a_concave_zone() {
        let z = ell();
        // Half of this box lies in the notch.
        let b = bbox(3.0, 1.0, 7.0, 3.0);
        assert!((z.intersection_area(&b) - 4.0).abs() < 1e-4);
        assert!(z.admits(&b, Membership::Overlap, 0.5));
        assert!(!z.admits(&b, Membership::Overlap, 0.6));
        assert_eq!(z.intersection_area(&bbox(20.0, 20.0, 30.0, 30.0)), 0.0);
        assert_eq!(z.intersection_area(&bbox(-5.0, -5.0, 15.0, 15.0)), 75.0);
    }
}
