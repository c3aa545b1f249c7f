//! Box blurs: three passes of a box filter approximate a Gaussian, at a cost per pixel that
//! does not depend on the radius (shadows on 48 MP photos want radii of a hundred pixels).
//! Outside the plane counts as zero; callers pad their planes by the reach, 3 * radius.

/// Passes used everywhere: three boxes are within a few percent of a Gaussian.
pub const PASSES: usize = 3;

/// The box radius whose [`PASSES`]-fold repetition has standard deviation close to `sigma`
/// (a box of width `2r + 1` has variance `((2r + 1)^2 - 1) / 12`).
pub fn radius_for_sigma(sigma: f32) -> usize {
    let width = (12.0 * sigma * sigma / PASSES as f32 + 1.0).sqrt();
    ((width - 1.0) / 2.0).round().max(0.0) as usize
}

/// Blurs a `w` x `h` row-major plane in place.
pub fn blur_f32(plane: &mut [f32], w: usize, h: usize, radius: usize) {
    if radius == 0 || w == 0 || h == 0 {
        return;
    }
    let norm = 1.0 / (2 * radius + 1) as f32;
    let mut line = vec![0f32; w.max(h)];
    for _ in 0..PASSES {
        for row in plane.chunks_exact_mut(w) {
            line[..w].copy_from_slice(row);
            box_line_f32(&line[..w], row, radius, norm);
        }
        let mut column = vec![0f32; h];
        for x in 0..w {
            for (y, c) in column.iter_mut().enumerate() {
                *c = plane[y * w + x];
            }
            line[..h].copy_from_slice(&column);
            box_line_f32(&line[..h], &mut column, radius, norm);
            for (y, c) in column.iter().enumerate() {
                plane[y * w + x] = *c;
            }
        }
    }
}

fn box_line_f32(src: &[f32], dst: &mut [f32], r: usize, norm: f32) {
    let n = src.len();
    // The running sum is recomputed exactly at every row start, so it cannot drift by much
    // over one line; f32 is enough for the few thousand samples a line has here.
    let mut sum: f32 = src[..r.min(n)].iter().sum();
    for i in 0..n {
        if i + r < n {
            sum += src[i + r];
        }
        if i > r {
            sum -= src[i - r - 1];
        }
        dst[i] = (sum * norm).max(0.0);
    }
}

/// Blurs an 8-bit `w` x `h` plane in place, with exact integer sums: a window of zeros stays
/// 0 and a window of 255s stays 255.
pub fn blur_u8(plane: &mut [u8], w: usize, h: usize, radius: usize) {
    let div = (2 * radius + 1) as u32;
    for _ in 0..PASSES {
        box_sums_u8(plane, w, h, radius, |s| ((s + div / 2) / div) as u8);
    }
}

/// One separable pass of (2r + 1) box sums over an 8-bit `w` x `h` plane, in place: rows, then
/// columns of the rows' result, each sum turned back into a byte by `to_byte`. Sliding sums,
/// so the cost does not depend on `r`.
pub(super) fn box_sums_u8(
    plane: &mut [u8],
    w: usize,
    h: usize,
    r: usize,
    to_byte: impl Fn(u32) -> u8,
) {
    if r == 0 || w == 0 || h == 0 {
        return;
    }
    let mut line = vec![0u8; w];
    for row in plane.chunks_exact_mut(w) {
        line.copy_from_slice(row);
        let mut sum: u32 = line[..r.min(w)].iter().map(|&v| v as u32).sum();
        for i in 0..w {
            if i + r < w {
                sum += line[i + r] as u32;
            }
            if i > r {
                sum -= line[i - r - 1] as u32;
            }
            row[i] = to_byte(sum);
        }
    }
    // Columns, a row at a time: a running sum per column over a copy of the plane.
    let copy = plane.to_vec();
    let row = |y: usize| &copy[y * w..(y + 1) * w];
    let mut sums = vec![0u32; w];
    for y in 0..r.min(h) {
        sums.iter_mut()
            .zip(row(y))
            .for_each(|(s, &v)| *s += v as u32);
    }
    for y in 0..h {
        if y + r < h {
            sums.iter_mut()
                .zip(row(y + r))
                .for_each(|(s, &v)| *s += v as u32);
        }
        if y > r {
            sums.iter_mut()
                .zip(row(y - r - 1))
                .for_each(|(s, &v)| *s -= v as u32);
        }
        for (o, &s) in plane[y * w..(y + 1) * w].iter_mut().zip(&sums) {
            *o = to_byte(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_impulse_spreads_like_a_gaussian() {
        let (w, h) = (61, 61);
        let mut p = vec![0f32; w * h];
        p[30 * w + 30] = 1000.0;
        let sigma = 4.0;
        blur_f32(&mut p, w, h, radius_for_sigma(sigma));
        let total: f32 = p.iter().sum();
        assert!((total - 1000.0).abs() < 0.5, "mass kept: {total}");
        // Variance along x, about sigma^2 (three boxes of radius 4: 3 * 80 / 12 = 20).
        let var: f32 = (0..w * h)
            .map(|i| p[i] * ((i % w) as f32 - 30.0).powi(2))
            .sum::<f32>()
            / total;
        assert!((var - sigma * sigma).abs() < 5.0, "variance {var}");
        // Symmetric.
        assert!((p[30 * w + 25] - p[30 * w + 35]).abs() < 1e-3);
        assert!((p[25 * w + 30] - p[35 * w + 30]).abs() < 1e-3);
    }

    #[test]
    fn integer_blur_keeps_flat_regions_and_zero_far_away() {
        let (w, h) = (60, 30);
        let mut p = vec![0u8; w * h];
        for y in 5..25 {
            for x in 20..40 {
                p[y * w + x] = 255;
            }
        }
        blur_u8(&mut p, w, h, 2);
        assert_eq!(p[15 * w + 30], 255, "deep inside stays full");
        assert_eq!(p[0], 0, "far away stays zero");
        assert!(p[15 * w + 20] > 0 && p[15 * w + 20] < 255, "edges soften");
        // The reach is 3 * radius: column 13 is 7 pixels out, column 15 is 5.
        assert_eq!(p[15 * w + 13], 0);
        assert!(p[15 * w + 15] > 0);
    }

    #[test]
    fn radius_zero_is_identity() {
        let mut p = vec![1.0, 2.0, 3.0];
        blur_f32(&mut p, 3, 1, 0);
        assert_eq!(p, [1.0, 2.0, 3.0]);
        assert_eq!(radius_for_sigma(0.0), 0);
        assert!(radius_for_sigma(10.0) >= 9 && radius_for_sigma(10.0) <= 10);
    }
}
