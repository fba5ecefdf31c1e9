//! Poisoning attacks a native simulated client can mount, for the attack table and the tests.
//!
//! The client runtime stays honest: an attacking client runs it unchanged and then alters what
//! leaves it (its result) or what it trains on (its own shard). Attackers respect the task's
//! pruning mask, since the server rejects any update that touches pruned entries outright.

use canopy_core::codec::sparse::{decode_sparse, encode_sparse};
use canopy_core::data::partition::Shard;
use canopy_core::model::arch::Arch;
use canopy_core::protocol::{Blob, TaskResult, Update, UploadSpec};
use rand::{RngExt, SeedableRng, rngs::StdRng};

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Attack {
    #[default]
    None,
    /// Multiply the uploaded vector (weights, or the delta for delta uploads) by this factor.
    Scale(f32),
    /// Upload this value in every entry.
    Constant(f32),
    /// Upload the delta negated and multiplied by this factor (for weights: start − f·delta).
    SignFlip(f32),
    /// Upload Gaussian noise with the norm of the honest delta instead of the delta.
    Noise,
    /// Train on the own shard with every label y replaced by `classes − 1 − y`.
    LabelFlip,
}

/// The attacks of the attack table, in its order.
pub const TABLE: &[&str] = &[
    "none",
    "scale:1000",
    "constant:1e6",
    "sign-flip",
    "sign-flip:10",
    "noise",
    "label-flip",
];

impl Attack {
    /// `none`, `scale:F`, `constant:V`, `sign-flip` (×−1), `sign-flip:F` (×−F), `noise` or
    /// `label-flip`.
    pub fn parse(s: &str) -> Result<Attack, String> {
        let s = s.trim();
        let num = |v: &str| {
            v.parse::<f32>()
                .map_err(|e| format!("attack '{s}': {e}"))
                .and_then(|x| {
                    if x.is_finite() {
                        Ok(x)
                    } else {
                        Err(format!("attack '{s}': not finite"))
                    }
                })
        };
        Ok(match s.split_once(':') {
            Some(("scale", v)) => Attack::Scale(num(v)?),
            Some(("constant", v)) => Attack::Constant(num(v)?),
            Some(("sign-flip", v)) => Attack::SignFlip(num(v)?),
            _ => match s {
                "none" => Attack::None,
                "scale" => Attack::Scale(1e3),
                "constant" => Attack::Constant(1e6),
                "sign-flip" => Attack::SignFlip(1.0),
                "noise" => Attack::Noise,
                "label-flip" => Attack::LabelFlip,
                _ => {
                    return Err(format!(
                        "unknown attack '{s}' (known: none, scale:F, constant:V, sign-flip, sign-flip:F, noise, label-flip)"
                    ));
                }
            },
        })
    }

    pub fn name(&self) -> String {
        match self {
            Attack::None => "none".into(),
            Attack::Scale(f) => format!("scaled ×{f}"),
            Attack::Constant(v) => format!("constant {v:e}"),
            Attack::SignFlip(f) if *f == 1.0 => "sign flip".into(),
            Attack::SignFlip(f) => format!("sign flip ×−{f}"),
            Attack::Noise => "noise".into(),
            Attack::LabelFlip => "label flip".into(),
        }
    }

    /// Called whenever the server deals this client its shard (on every welcome).
    pub fn poison_shard(&self, shard: &mut Shard) {
        if *self == Attack::LabelFlip {
            let top = shard.train.classes.saturating_sub(1) as u8;
            for y in &mut shard.train.labels {
                *y = top - (*y).min(top);
            }
        }
    }

    /// Rewrites an honest result. `start` is the model the task started from (full length,
    /// zeros where pruned), `mask` the task's mask, `upload` what the task asked for.
    pub fn poison_result(
        &self,
        result: &mut TaskResult,
        arch: &Arch,
        start: &[f32],
        mask: Option<&[bool]>,
        upload: UploadSpec,
    ) -> Result<(), String> {
        if matches!(self, Attack::None | Attack::LabelFlip) {
            return Ok(());
        }
        let keep = |i: usize| mask.is_none_or(|m| m[i]);
        if matches!(result.update, Update::Supermask(_)) {
            // Votes carry no magnitude to inflate; the attacks here are on weights and deltas.
            return Err("these attacks do not apply to supermask votes".into());
        }
        // The honest delta, full length.
        let delta: Vec<f32> = match &result.update {
            Update::Weights(b) => b
                .to_f32()
                .map_err(|e| e.to_string())?
                .iter()
                .zip(start)
                .map(|(w, s)| w - s)
                .collect(),
            Update::Delta(b) => b.to_f32().map_err(|e| e.to_string())?,
            Update::Sparse(u) => decode_sparse(arch, u, mask)?,
            Update::Supermask(_) => unreachable!("returned above"),
        };
        let weights_upload = matches!(upload, UploadSpec::Weights);
        // What the attacker wants the server to see, as a delta.
        let bad: Vec<f32> = match *self {
            Attack::Scale(f) => {
                if weights_upload {
                    // f·w − start, with w = start + delta.
                    delta
                        .iter()
                        .zip(start)
                        .map(|(d, s)| f * (s + d) - s)
                        .collect()
                } else {
                    delta.iter().map(|d| f * d).collect()
                }
            }
            Attack::Constant(v) => {
                if weights_upload {
                    start.iter().map(|s| v - s).collect()
                } else {
                    vec![v; delta.len()]
                }
            }
            Attack::SignFlip(f) => delta.iter().map(|d| -f * d).collect(),
            Attack::Noise => {
                let mut rng = StdRng::seed_from_u64(
                    0x5eed_a77a ^ ((result.round as u64) << 20) ^ delta.len() as u64,
                );
                let noise: Vec<f32> = (0..delta.len())
                    .map(|i| if keep(i) { gaussian(&mut rng) } else { 0.0 })
                    .collect();
                let (dn, nn) = (l2(&delta), l2(&noise));
                let s = if nn > 0.0 { (dn / nn) as f32 } else { 0.0 };
                noise.iter().map(|x| x * s).collect()
            }
            Attack::None | Attack::LabelFlip => unreachable!("returned above"),
        };
        let bad: Vec<f32> = bad
            .into_iter()
            .enumerate()
            .map(|(i, v)| if keep(i) { v } else { 0.0 })
            .collect();
        result.update = match upload {
            UploadSpec::Weights => Update::Weights(Blob::from_f32(
                &bad.iter()
                    .zip(start)
                    .map(|(d, s)| s + d)
                    .collect::<Vec<_>>(),
            )),
            // A hostile client ignores a clip it was asked for; the server refuses the result.
            UploadSpec::Delta | UploadSpec::ClippedDelta { .. } => {
                Update::Delta(Blob::from_f32(&bad))
            }
            UploadSpec::Sparse { int8, top_k, .. } => {
                Update::Sparse(encode_sparse(arch, &bad, mask, int8, top_k, None))
            }
            UploadSpec::Supermask { .. } | UploadSpec::ScoreSteps { .. } => {
                unreachable!("a supermask task is answered with votes")
            }
        };
        Ok(())
    }
}

fn l2(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// A standard normal draw (Box–Muller).
fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Which of `n` simulated clients attack: `attackers` of them, spread evenly (client 0 first),
/// so "1 of 10" and "3 of 10" always pick the same ones on the same split.
pub fn attackers(n: usize, attackers: usize) -> Vec<bool> {
    let mut out = vec![false; n];
    if attackers == 0 || n == 0 {
        return out;
    }
    for k in 0..attackers.min(n) {
        out[k * n / attackers.min(n)] = true;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_core::data::Dataset;
    use canopy_core::model::arch::Layer;
    use canopy_core::protocol::ClientMetrics;

    fn arch() -> Arch {
        Arch {
            input: [1, 1, 2],
            classes: 2,
            layers: vec![
                Layer::Flatten,
                Layer::Dense {
                    inputs: 2,
                    units: 2,
                },
            ],
        }
    }

    fn result(update: Update) -> TaskResult {
        TaskResult {
            round: 2,
            samples: 5,
            update,
            metrics: ClientMetrics::default(),
            mask_version: None,
        }
    }

    fn values(r: &TaskResult) -> Vec<f32> {
        match &r.update {
            Update::Weights(b) | Update::Delta(b) => b.to_f32().unwrap(),
            Update::Sparse(u) => decode_sparse(&arch(), u, None).unwrap(),
            Update::Supermask(_) => unreachable!(),
        }
    }

    #[test]
    fn parse_and_names() {
        let all: Vec<Attack> = TABLE.iter().map(|s| Attack::parse(s).unwrap()).collect();
        assert_eq!(
            all,
            vec![
                Attack::None,
                Attack::Scale(1000.0),
                Attack::Constant(1e6),
                Attack::SignFlip(1.0),
                Attack::SignFlip(10.0),
                Attack::Noise,
                Attack::LabelFlip
            ]
        );
        assert_eq!(Attack::Scale(1000.0).name(), "scaled ×1000");
        assert_eq!(Attack::Constant(1e6).name(), "constant 1e6");
        assert_eq!(
            Attack::parse("sign-flip:10").unwrap(),
            Attack::SignFlip(10.0)
        );
        assert_eq!(Attack::SignFlip(10.0).name(), "sign flip ×−10");
        assert!(Attack::parse("scale:nan").is_err() && Attack::parse("flood").is_err());
    }

    #[test]
    fn weights_uploads_by_hand() {
        let a = arch(); // 6 parameters
        let start = vec![1.0, 2.0, 0.0, -1.0, 0.5, 0.0];
        let trained = vec![1.5, 2.0, 0.0, -1.0, 0.5, 1.0]; // delta (0.5, 0, 0, 0, 0, 1)
        let honest = result(Update::Weights(Blob::from_f32(&trained)));
        let run = |atk: Attack, mask: Option<&[bool]>| {
            let mut r = honest.clone();
            atk.poison_result(&mut r, &a, &start, mask, UploadSpec::Weights)
                .unwrap();
            values(&r)
        };
        let scaled = run(Attack::Scale(1000.0), None);
        assert!(
            scaled
                .iter()
                .zip(&trained)
                .all(|(s, t)| (s - 1000.0 * t).abs() < 1e-3),
            "{scaled:?}"
        );
        assert_eq!(run(Attack::Constant(1e6), None), vec![1e6; 6]);
        assert_eq!(
            run(Attack::SignFlip(1.0), None),
            vec![0.5, 2.0, 0.0, -1.0, 0.5, -1.0]
        );
        let noise = run(Attack::Noise, None);
        let moved: Vec<f32> = noise.iter().zip(&start).map(|(n, s)| n - s).collect();
        assert!(
            (l2(&moved) - 1.25f64.sqrt()).abs() < 1e-5,
            "noise has the honest norm"
        );
        // With a mask the attacker keeps pruned entries at zero, or the server would reject it.
        let mask = [true, true, false, true, true, false];
        assert_eq!(
            run(Attack::Constant(1e6), Some(&mask)),
            vec![1e6, 1e6, 0.0, 1e6, 1e6, 0.0]
        );
        assert_eq!(run(Attack::LabelFlip, None), trained);
    }

    #[test]
    fn delta_and_sparse_uploads() {
        let a = arch();
        let start = vec![0.0; 6];
        let delta = vec![0.5, 0.0, 0.0, 0.0, -0.25, 1.0];
        let mut r = result(Update::Delta(Blob::from_f32(&delta)));
        Attack::Scale(10.0)
            .poison_result(&mut r, &a, &start, None, UploadSpec::Delta)
            .unwrap();
        assert_eq!(values(&r), vec![5.0, 0.0, 0.0, 0.0, -2.5, 10.0]);
        let spec = UploadSpec::Sparse {
            int8: false,
            top_k: 1.0,
            error_feedback: false,
        };
        let mut r = result(Update::Sparse(encode_sparse(
            &a, &delta, None, false, 1.0, None,
        )));
        Attack::SignFlip(1.0)
            .poison_result(&mut r, &a, &start, None, spec)
            .unwrap();
        assert_eq!(values(&r), vec![-0.5, 0.0, 0.0, 0.0, 0.25, -1.0]);
    }

    #[test]
    fn label_flip_and_attacker_choice() {
        let data = Dataset {
            shape: [1, 1, 1],
            classes: 10,
            images: vec![0; 4],
            labels: vec![0, 3, 9, 5],
        };
        let mut shard = Shard {
            index: 0,
            train: data.clone(),
            test: data,
        };
        Attack::LabelFlip.poison_shard(&mut shard);
        assert_eq!(shard.train.labels, vec![9, 6, 0, 4]);
        assert_eq!(
            shard.test.labels,
            vec![0, 3, 9, 5],
            "only what it trains on"
        );
        assert_eq!(
            attackers(10, 1),
            [
                true, false, false, false, false, false, false, false, false, false
            ]
        );
        assert_eq!(
            attackers(10, 3)
                .iter()
                .enumerate()
                .filter(|(_, a)| **a)
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            vec![0, 3, 6]
        );
        assert_eq!(attackers(4, 0), vec![false; 4]);
    }
}
