//! Property test: random frames and mutations of real client frames go through the server's
//! path (decode → accept → robust aggregation; exchange payloads → request and reply decoding)
//! without a panic, and reach deep enough into it for that to mean something. Seeded, so a failure repeats;
//! `cargo fuzz` (see `fuzz/`) explores the same function without end.

use std::time::Instant;

use canopy_core::fuzzing::{Tally, feed, seed_frames, targets};
use canopy_core::protocol::PROTOCOL_VERSION;
use rand::{RngExt, SeedableRng, rngs::StdRng};

const MUTATED: usize = 100_000;
const RANDOM: usize = 20_000;

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut f = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..4) {
        let len = f.len().max(1);
        match rng.random_range(0..9) {
            // Flip a bit.
            0 => {
                if !f.is_empty() {
                    let i = rng.random_range(0..f.len());
                    f[i] ^= 1 << rng.random_range(0..8);
                }
            }
            // An interesting byte (postcard varints and lengths live on these edges).
            1 => {
                if !f.is_empty() {
                    let i = rng.random_range(0..f.len());
                    f[i] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0xfe, 0x3f, 0x40][rng.random_range(0..8)];
                }
            }
            // An interesting little-endian u32 (counts, positions, f32 bit patterns).
            2 => {
                if f.len() >= 4 {
                    let i = rng.random_range(0..f.len() - 3);
                    let v: u32 = [
                        0,
                        1,
                        u32::MAX,
                        i32::MAX as u32,
                        0x7f80_0000,
                        0x7fc0_0000,
                        0x7f7f_ffff,
                        f.len() as u32,
                    ][rng.random_range(0..8)];
                    f[i..i + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            // Insert random bytes.
            3 => {
                let i = rng.random_range(0..=f.len());
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                f.splice(i..i, bytes);
            }
            // Delete a range.
            4 => {
                if !f.is_empty() {
                    let i = rng.random_range(0..f.len());
                    let j = (i + rng.random_range(1..16)).min(f.len());
                    f.drain(i..j);
                }
            }
            // Truncate.
            5 => f.truncate(rng.random_range(0..len)),
            // Duplicate a slice in place.
            6 => {
                if !f.is_empty() {
                    let i = rng.random_range(0..f.len());
                    let j = (i + rng.random_range(1..32)).min(f.len());
                    let copy = f[i..j].to_vec();
                    f.splice(j..j, copy);
                }
            }
            // Splice with another frame.
            7 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let cut = rng.random_range(0..=f.len());
                let from = rng.random_range(0..=other.len());
                f.truncate(cut);
                f.extend_from_slice(&other[from..]);
            }
            // A run of continuation bytes: an endless varint.
            _ => {
                let i = rng.random_range(0..=f.len());
                let n = rng.random_range(1..12);
                f.splice(i..i, std::iter::repeat_n(0xff, n));
            }
        }
    }
    f
}

/// Random bytes; about half of them behind a valid header, so they reach postcard. Returns the
/// frame and whether it got the header.
fn random_frame(rng: &mut StdRng) -> (Vec<u8>, bool) {
    let n = rng.random_range(0..200);
    let mut f: Vec<u8> = (0..n).map(|_| rng.random()).collect();
    let headed = rng.random_bool(0.5) && f.len() >= 3;
    if headed {
        f[..3].copy_from_slice(&[b'C', b'N', PROTOCOL_VERSION]);
    }
    (f, headed)
}

#[test]
fn random_and_mutated_frames_never_panic() {
    let t0 = Instant::now();
    let targets = targets();
    let seeds = seed_frames(&targets);
    if let Ok(dir) = std::env::var("CANOPY_FUZZ_SEEDS") {
        // `just fuzz` starts the fuzzer's corpus from these.
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(format!("{dir}/seed-{i}"), s).unwrap();
        }
    }
    // The real frames themselves pass, and each result is accepted by the task it answers.
    let honest: Vec<Tally> = seeds.iter().map(|s| feed(s, &targets)).collect();
    assert!(honest.iter().all(|t| t.decoded == 1), "{honest:?}");
    assert!(
        honest
            .iter()
            .filter(|t| t.results == 1)
            .all(|t| t.accepted >= 1 && t.aggregated >= 1),
        "{honest:?}"
    );
    assert!(honest.iter().any(|t| t.votes >= 1), "{honest:?}");
    assert!(
        honest.iter().filter(|t| t.requests == 1).count() >= 2,
        "{honest:?}"
    );
    assert!(
        honest.iter().filter(|t| t.replies == 1).count() >= 4,
        "{honest:?}"
    );
    let mut rng = StdRng::seed_from_u64(0xf422);
    let mut mutated = Tally::default();
    for _ in 0..MUTATED {
        mutated.add(&feed(&mutate(&mut rng, &seeds), &targets));
    }
    let (mut random, mut headed) = (Tally::default(), 0);
    for _ in 0..RANDOM {
        let (frame, h) = random_frame(&mut rng);
        headed += h as usize;
        random.add(&feed(&frame, &targets));
    }
    eprintln!(
        "{} frames in {:.2} s: mutated {mutated:?}, random {random:?} ({headed} with a header)",
        MUTATED + RANDOM,
        t0.elapsed().as_secs_f64()
    );
    // Every random frame with a valid header gets past it to postcard.
    assert!(
        headed > RANDOM / 3 && random.framed >= headed,
        "{random:?}, {headed}"
    );
    // The mutations reach deep: many still decode, some mutated results are accepted (supermask
    // votes among them) and some mutated exchange payloads still decode on either side.
    assert!(
        mutated.decoded > 5_000 && mutated.results > 3_000 && mutated.accepted > 1_000,
        "{mutated:?}"
    );
    assert!(
        mutated.votes > 100 && mutated.requests > 100 && mutated.replies > 100,
        "{mutated:?}"
    );
}
