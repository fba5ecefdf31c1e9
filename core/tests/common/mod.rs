//! What the core's integration tests share.

use canopy_core::data::Dataset;

/// Ten classes on 8×8 images: class c lights a 2×2 block at a class-specific spot, plus noise.
pub fn blocks(n: usize, seed: u64) -> Dataset {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut rnd = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let c = i % 10;
        let mut img: Vec<u8> = (0..64).map(|_| (rnd() % 60) as u8).collect();
        let (r, col) = ((c / 4) * 3, (c % 4) * 2);
        for (dr, dc) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            img[(r + dr) * 8 + col + dc] = 255;
        }
        images.extend(img);
        labels.push(c as u8);
    }
    Dataset {
        shape: [1, 8, 8],
        classes: 10,
        images,
        labels,
    }
}
