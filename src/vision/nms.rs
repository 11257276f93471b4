//! Class-aware greedy non-maximum suppression.

use super::Candidate;

/// Keeps the highest-scoring box of every overlapping group within a class and drops
/// the others (IoU strictly above `iou_threshold`). Boxes of different classes never
/// suppress each other. Equal scores keep their input order, so results are
/// deterministic. At most `max` boxes are returned, best first.
pub fn nms(candidates: &mut [Candidate], iou_threshold: f32, max: usize) -> Vec<Candidate> {
    // Stable sort: ties stay in decoder order (anchor order), whatever the platform.
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Candidate> = Vec::new();
    for c in candidates.iter() {
        if kept.len() == max {
            break;
        }
        let suppressed = kept
            .iter()
            .any(|k| k.class_id == c.class_id && k.bbox.iou(&c.bbox) > iou_threshold);
        if !suppressed {
            kept.push(*c);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::BBox;

    fn cand(class_id: usize, score: f32, x: f32) -> Candidate {
        Candidate {
            class_id,
            score,
            bbox: BBox {
                x1: x,
                y1: 0.0,
                x2: x + 1.0,
                y2: 1.0,
            },
        }
    }

    #[test]
    fn nms_keeps_the_highest_scoring_box_of_an_overlapping_group() {
        let mut c = vec![cand(1, 0.5, 0.0), cand(1, 0.9, 0.1), cand(1, 0.7, 0.05)];
        let kept = nms(&mut c, 0.5, 10);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].score, 0.9);
    }

    #[test]
    fn nms_suppresses_only_within_a_class() {
        let mut c = vec![cand(1, 0.9, 0.0), cand(2, 0.8, 0.0), cand(1, 0.7, 0.0)];
        let kept = nms(&mut c, 0.5, 10);
        let classes: Vec<_> = kept.iter().map(|k| k.class_id).collect();
        assert_eq!(classes, vec![1, 2]);
    }

    #[test]
    fn nms_keeps_boxes_that_overlap_less_than_the_threshold() {
        // IoU of boxes shifted by 0.5 is 1/3.
        let mut c = vec![cand(1, 0.9, 0.0), cand(1, 0.8, 0.5)];
        assert_eq!(nms(&mut c, 0.5, 10).len(), 2);
        assert_eq!(nms(&mut c, 0.3, 10).len(), 1);
    }

    #[test]
    fn nms_breaks_score_ties_by_input_order() {
        let mut c = vec![cand(1, 0.8, 0.0), cand(1, 0.8, 0.1)];
        let kept = nms(&mut c, 0.5, 10);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].bbox.x1, 0.0);
    }

    #[test]
    fn nms_of_nothing_is_nothing_and_max_caps_the_result() {
        assert!(nms(&mut [], 0.5, 10).is_empty());
        let mut c: Vec<_> = (0..5).map(|i| cand(1, 0.5, i as f32 * 10.0)).collect();
        assert_eq!(nms(&mut c, 0.5, 3).len(), 3);
    }
}
