//! Initial-noise generators.
//!
//! The default, `torch-cpu`, follows `torch.randn(shape, generator=torch.Generator("cpu")
//! .manual_seed(seed))`: mt19937, 24-bit uniform floats, and PyTorch's 16-wide Box-Muller
//! fill, so a seed from diffusers' docs (which recommend the CPU generator) starts from the
//! same noise.

/// The Mersenne Twister MT19937 (32-bit), as PyTorch's CPU generator uses it.
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for j in 1..624 {
            let prev = state[j - 1];
            state[j] = 1812433253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// Uniform float in [0, 1) with 24 random bits (ATen's uniform_real for float).
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

fn box_muller_16(data: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * (u1 as f64).ln() as f32).sqrt();
        let theta = 2.0f32 * std::f32::consts::PI * u2;
        data[j] = radius * (theta as f64).cos() as f32;
        data[j + 8] = radius * (theta as f64).sin() as f32;
    }
}

/// `torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed))` for float32.
pub fn torch_cpu_randn(seed: u64, n: usize) -> Vec<f32> {
    let mut g = Mt19937::new(seed);
    if n < 16 {
        // Latents always have at least 16 values; below that PyTorch takes a scalar path
        // that is not reproduced here.
        let mut v = torch_cpu_randn(seed, 16);
        v.truncate(n);
        return v;
    }
    let mut data: Vec<f32> = (0..n).map(|_| g.uniform_f32()).collect();
    for chunk in data.chunks_exact_mut(16) {
        box_muller_16(chunk);
    }
    if n % 16 != 0 {
        // PyTorch redraws the last 16 values and fills them again.
        let tail = &mut data[n - 16..];
        for v in tail.iter_mut() {
            *v = g.uniform_f32();
        }
        box_muller_16(tail);
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_output() {
        // The C++ standard requires the 10000th output of mt19937 seeded 5489 to be 4123659995.
        let mut g = Mt19937::new(5489);
        let mut v = 0;
        for _ in 0..10000 {
            v = g.next_u32();
        }
        assert_eq!(v, 4123659995);
    }

    #[test]
    fn randn_is_standard_normal_and_seeded() {
        let a = torch_cpu_randn(42, 4096);
        let b = torch_cpu_randn(42, 4096);
        let c = torch_cpu_randn(43, 4096);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.08,
            "{mean} {var}"
        );
        assert_eq!(torch_cpu_randn(1, 21).len(), 21);
    }
}
