//! Positions of the entries a top-k update sends, as compact bytes.
//!
//! A top-k upload names which of the `n` candidate entries (the mask's kept ones) it carries:
//! strictly ascending positions in `0..n`. Four bytes per position would make any `top_k` above
//! about 0.2 cost more than sending every int8 value. Two codings, and the encoder takes the
//! smaller:
//!
//! - tag 0, **bitmap**: ⌈n/8⌉ bytes, bit `p % 8` of byte `p / 8` set for each position `p`
//!   (n/8 bytes whatever k is: best for dense selections);
//! - tag 1, **delta varints**: the gaps `p₀`, `p₁ − p₀ − 1`, `p₂ − p₁ − 1`, … as LEB128 varints
//!   (one byte per position while gaps stay below 128: best for sparse selections).
//!
//! Decoding checks everything and returns an error on malformed input, never panics.

/// Tag of the bitmap coding.
pub const BITMAP: u8 = 0;
/// Tag of the delta-varint coding.
pub const VARINTS: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PositionsError {
    #[error("positions: empty")]
    Empty,
    #[error("positions: unknown coding {0}")]
    Tag(u8),
    #[error("positions: bitmap of {got} bytes for {n} entries (expected {want})")]
    BitmapLength { got: usize, want: usize, n: usize },
    #[error("positions: bit set beyond the {0} entries")]
    BitmapTail(usize),
    #[error("positions: truncated varint")]
    Truncated,
    #[error("positions: varint too long")]
    Overlong,
    #[error("positions: position {0} beyond the {1} entries")]
    OutOfRange(u64, usize),
}

/// Codes `positions` (strictly ascending, each below `n`) in whichever coding is smaller (the
/// bitmap on a tie).
pub fn encode(positions: &[u32], n: usize) -> Vec<u8> {
    debug_assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions must be strictly ascending"
    );
    debug_assert!(
        positions.last().is_none_or(|&p| (p as usize) < n),
        "position beyond n"
    );
    let varints = encode_varints(positions);
    if varints.len() < 1 + n.div_ceil(8) {
        varints
    } else {
        encode_bitmap(positions, n)
    }
}

/// The bitmap coding, tag included.
pub fn encode_bitmap(positions: &[u32], n: usize) -> Vec<u8> {
    let mut out = vec![0u8; 1 + n.div_ceil(8)];
    out[0] = BITMAP;
    for &p in positions {
        out[1 + p as usize / 8] |= 1 << (p % 8);
    }
    out
}

/// The delta-varint coding, tag included.
pub fn encode_varints(positions: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + positions.len());
    out.push(VARINTS);
    out.extend(varints(positions));
    out
}

/// The gaps between strictly ascending positions as LEB128 varints, no tag (also the flips of a
/// supermask upload).
pub fn varints(positions: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(positions.len());
    let mut next = 0u32; // smallest value the next position can take
    for &p in positions {
        let mut gap = p - next;
        loop {
            let byte = (gap & 0x7f) as u8;
            gap >>= 7;
            if gap == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        next = p + 1;
    }
    out
}

/// Decodes [`varints`]: strictly ascending positions, each below `n`.
pub fn decode_varints(body: &[u8], n: usize) -> Result<Vec<u32>, PositionsError> {
    let mut out = Vec::new();
    let mut next = 0u64;
    let mut at = 0;
    while at < body.len() {
        let mut gap = 0u64;
        let mut shift = 0;
        loop {
            let &b = body.get(at).ok_or(PositionsError::Truncated)?;
            at += 1;
            if shift >= 35 {
                return Err(PositionsError::Overlong);
            }
            gap |= ((b & 0x7f) as u64) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let p = next + gap;
        if p >= n as u64 || p > u32::MAX as u64 {
            return Err(PositionsError::OutOfRange(p, n));
        }
        out.push(p as u32);
        next = p + 1;
    }
    Ok(out)
}

/// The positions `bytes` codes, checked against `n` candidate entries: strictly ascending and
/// each below `n` by construction.
pub fn decode(bytes: &[u8], n: usize) -> Result<Vec<u32>, PositionsError> {
    let (&tag, body) = bytes.split_first().ok_or(PositionsError::Empty)?;
    match tag {
        BITMAP => {
            let want = n.div_ceil(8);
            if body.len() != want {
                return Err(PositionsError::BitmapLength {
                    got: body.len(),
                    want,
                    n,
                });
            }
            if !n.is_multiple_of(8) && body[want - 1] >> (n % 8) != 0 {
                return Err(PositionsError::BitmapTail(n));
            }
            let mut out = Vec::new();
            for (i, &b) in body.iter().enumerate() {
                for bit in 0..8 {
                    if b & (1 << bit) != 0 {
                        out.push((i * 8 + bit) as u32);
                    }
                }
            }
            Ok(out)
        }
        VARINTS => decode_varints(body, n),
        other => Err(PositionsError::Tag(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_codings_round_trip() {
        for (positions, n) in [
            (vec![], 0),
            (vec![], 10),
            (vec![0], 1),
            (vec![0, 1, 2, 3, 4, 5, 6, 7, 8], 9),
            (vec![3, 200, 201, 70_000, 1 << 31], (1usize << 31) + 1),
            ((0..1000).filter(|i| i % 3 == 0).collect(), 1000),
        ] {
            assert_eq!(decode(&encode_varints(&positions), n).unwrap(), positions);
            if n < 1 << 20 {
                assert_eq!(decode(&encode_bitmap(&positions, n), n).unwrap(), positions);
            }
            assert_eq!(decode(&encode(&positions, n), n).unwrap(), positions);
        }
    }

    #[test]
    fn the_smaller_coding_is_chosen() {
        let n = 10_000;
        // Dense: 30% of the entries → the bitmap (1,251 bytes) beats ~3,000 varint bytes.
        let dense: Vec<u32> = (0..n as u32).filter(|i| i % 10 < 3).collect();
        let e = encode(&dense, n);
        assert_eq!(e[0], BITMAP);
        assert_eq!(e.len(), 1 + n / 8);
        assert!(e.len() < encode_varints(&dense).len());
        // Sparse: 1% of the entries with gaps below 128 → one byte each.
        let sparse: Vec<u32> = (0..n as u32).filter(|i| i % 100 == 42).collect();
        let e = encode(&sparse, n);
        assert_eq!(e[0], VARINTS);
        assert_eq!(e.len(), 1 + sparse.len());
        assert!(e.len() < encode_bitmap(&sparse, n).len());
        // Either way far below 4 bytes a position.
        assert!(encode(&dense, n).len() * 8 < 4 * dense.len());
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert_eq!(decode(&[], 8), Err(PositionsError::Empty));
        assert_eq!(decode(&[7, 0], 8), Err(PositionsError::Tag(7)));
        // Bitmaps: wrong length, or bits past n.
        assert!(matches!(
            decode(&[BITMAP, 0], 9),
            Err(PositionsError::BitmapLength { .. })
        ));
        assert!(matches!(
            decode(&[BITMAP, 0, 0, 0], 9),
            Err(PositionsError::BitmapLength { .. })
        ));
        assert_eq!(
            decode(&[BITMAP, 0, 0b10], 9),
            Err(PositionsError::BitmapTail(9))
        );
        assert_eq!(decode(&[BITMAP, 0, 0b1], 9).unwrap(), vec![8]);
        // Varints: cut short, too long, beyond n (directly or by accumulated gaps).
        assert_eq!(
            decode(&[VARINTS, 0x80], 1000),
            Err(PositionsError::Truncated)
        );
        assert_eq!(
            decode(&[VARINTS, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(PositionsError::Overlong)
        );
        assert_eq!(
            decode(&[VARINTS, 10], 10),
            Err(PositionsError::OutOfRange(10, 10))
        );
        assert_eq!(
            decode(&[VARINTS, 5, 4], 10),
            Err(PositionsError::OutOfRange(10, 10))
        );
        // Two maximal gaps overflow u32 even when n is larger.
        let two = [
            VARINTS, 0xff, 0xff, 0xff, 0xff, 0x0f, 0xff, 0xff, 0xff, 0xff, 0x0f,
        ];
        assert!(matches!(
            decode(&two, usize::MAX),
            Err(PositionsError::OutOfRange(..))
        ));
    }
}
