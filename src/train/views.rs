//! The 8 views of the rot90 x flip group (the seed's augmentation: 90-degree
//! rotations and horizontal/vertical flips), applied to a preprocessed CHW tensor.
//!
//! View `v` is `rot90(x, k = v % 4)` (counter-clockwise, as `numpy.rot90`),
//! followed by a left-right flip when `v >= 4`. Vertical flips are in the group
//! too: flipud = fliplr after rot180 (view 6).

/// Number of views.
pub const VIEWS: usize = 8;

/// Short names of the views, in order.
pub const VIEW_NAMES: [&str; VIEWS] = [
    "rot0",
    "rot90",
    "rot180",
    "rot270",
    "rot0-flip",
    "rot90-flip",
    "rot180-flip",
    "rot270-flip",
];

/// Whether view `v` swaps height and width.
pub fn swaps_axes(v: usize) -> bool {
    v % 2 == 1
}

/// Applies view `v` to a `[c, h, w]` tensor; the result is `[c, h, w]` or, for
/// odd rotations, `[c, w, h]`.
pub fn apply(v: usize, x: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    assert!(v < VIEWS);
    assert_eq!(x.len(), c * h * w);
    let k = v % 4;
    let flip = v >= 4;
    let (oh, ow) = if swaps_axes(v) { (w, h) } else { (h, w) };
    let mut out = Vec::with_capacity(x.len());
    for ch in 0..c {
        let plane = &x[ch * h * w..(ch + 1) * h * w];
        for i in 0..oh {
            for j in 0..ow {
                let j = if flip { ow - 1 - j } else { j };
                // Source pixel of output (i, j) for numpy.rot90(x, k).
                let (si, sj) = match k {
                    0 => (i, j),
                    1 => (j, w - 1 - i),
                    2 => (h - 1 - i, w - 1 - j),
                    _ => (h - 1 - j, i),
                };
                out.push(plane[si * w + sj]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rot90_matches_numpy_on_a_small_case() {
        // numpy.rot90([[1, 2, 3], [4, 5, 6]]) == [[3, 6], [2, 5], [1, 4]]
        let x = [1., 2., 3., 4., 5., 6.];
        assert_eq!(apply(1, &x, 1, 2, 3), vec![3., 6., 2., 5., 1., 4.]);
        // numpy.fliplr(x)
        assert_eq!(apply(4, &x, 1, 2, 3), vec![3., 2., 1., 6., 5., 4.]);
        // numpy.flipud(x) is view 6
        assert_eq!(apply(6, &x, 1, 2, 3), vec![4., 5., 6., 1., 2., 3.]);
    }

    #[test]
    fn the_eight_views_are_distinct_and_form_the_group() {
        let (c, h, w) = (2, 3, 5);
        let x: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
        let views: Vec<Vec<f32>> = (0..VIEWS).map(|v| apply(v, &x, c, h, w)).collect();
        for a in 0..VIEWS {
            for b in a + 1..VIEWS {
                assert_ne!(views[a], views[b], "views {a} and {b}");
            }
        }
        // rot90 four times is the identity; a flip twice is the identity.
        let mut y = x.clone();
        let (mut hh, mut ww) = (h, w);
        for _ in 0..4 {
            y = apply(1, &y, c, hh, ww);
            std::mem::swap(&mut hh, &mut ww);
        }
        assert_eq!(y, x);
        assert_eq!(apply(4, &apply(4, &x, c, h, w), c, h, w), x);
    }
}
