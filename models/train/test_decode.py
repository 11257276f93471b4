"""The Rust HeatmapDecoder's unit tests (src/vision/outputs.rs), replayed against
common.decode, so evaluate.py's decoding stays identical to shelfwatch's.

    models/.build/venv/bin/python models/train/test_decode.py
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def outputs(peaks):
    heat = np.zeros((4, 8), np.float32)
    boxes = np.zeros((4, 4, 8), np.float32)
    for x, y, v, terms in peaks:
        heat[y, x] = v
        boxes[:, y, x] = terms
    return heat, boxes


def close(a, b):
    return abs(a - b) < 1e-5


def main():
    # peaks become boxes from their offsets and log sizes
    heat, boxes = outputs([(2, 1, 0.9, [0.25, -0.5, 0.0, np.log(2)]), (3, 1, 0.6, [0] * 4),
                           (6, 3, 0.2, [0] * 4)])
    out = common.decode(heat, boxes, threshold=0.3, stride=8)
    assert len(out) == 1, out
    s, cx, cy, w, h = out[0]
    assert close(s, 0.9) and close(cx - w / 2, 18) and close(cx + w / 2, 26), out
    assert close(cy - h / 2, 0) and close(cy + h / 2, 16), out
    # a weaker peak inside a stronger peak's box is the same object
    big = [0, 0, np.log(5), np.log(3)]
    heat, boxes = outputs([(2, 1, 0.9, big), (4, 1, 0.7, [0] * 4), (6, 1, 0.8, [0] * 4)])
    out = common.decode(heat, boxes, threshold=0.3, stride=8)
    assert [p[1] for p in out] == [20.0, 52.0], out
    # a max-pooled output decides peaks; logits go through a sigmoid
    heat, boxes = outputs([(1, 1, 2.0, [0] * 4), (5, 2, 1.0, [0] * 4)])
    heat[heat == 0] = -10
    pooled = heat.copy()
    pooled[2, 5] = 3.0
    out = common.decode(heat, boxes, pooled, threshold=0.5, stride=8, heat_is_logit=True)
    assert len(out) == 1 and close(out[0][0], 1 / (1 + np.exp(-2.0))), out
    # log sizes are capped before exp: boxes of at most e^3 x 8 model pixels, whatever
    # the stride
    heat, boxes = outputs([(2, 1, 0.9, [0, 0, 10.0, 10.0])])
    for stride in (8, 4):
        out = common.decode(heat, boxes, threshold=0.3, stride=stride)
        assert abs(out[0][3] - np.exp(3.0) * 8) < 1e-3, out
    print("decode: 4 checks passed (the Rust HeatmapDecoder tests)")


if __name__ == "__main__":
    main()
