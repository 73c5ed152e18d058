//! The "jet" colour map (MATLAB / OpenCV COLORMAP_JET), as used in Grad-CAM figures.

/// Maps `t` in [0, 1] (clamped) to an RGB colour: blue -> cyan -> yellow -> red.
#[inline(always)]
pub fn jet(t: f32) -> [u8; 3] {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let channel = |offset: f32| -> u8 {
        let v = 1.5 - (4.0 * t - offset).abs();
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    };
    [channel(3.0), channel(2.0), channel(1.0)]
}

#[cfg(test)]
mod tests {
    use super::jet;

    #[test]
    fn endpoints_and_middle() {
        assert_eq!(jet(0.0), [0, 0, 128]); // dark blue
        assert_eq!(jet(0.5), [128, 255, 128]); // green-ish centre
        assert_eq!(jet(1.0), [128, 0, 0]); // dark red
        assert_eq!(jet(f32::NAN), jet(0.0));
    }
}
