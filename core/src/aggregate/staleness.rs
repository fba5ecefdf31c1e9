//! Asynchronous buffered aggregation (FedBuff, Nguyen et al., AISTATS 2022): what a result is
//! worth when it comes back, and how it joins a buffer built on a newer model.
//!
//! There are no rounds in lock-step: a client trains on the model version it was sent, and its
//! update joins the server's buffer when it arrives, however many versions later. Every
//! [`BufferedConfig::buffer`] results the server takes a step and bumps the version. A result
//! trained from version v and arriving at version v + τ is *stale* by τ: its update is scaled by
//! the staleness weight s(τ) = (1 + τ)^(−a) (a = ½, FedBuff's 1/√(1+τ), by default) and dropped
//! past [`BufferedConfig::max_staleness`]. The server's side (the driver that hands out tasks
//! and takes the steps) is `server/src/round/buffered.rs`; this is the arithmetic it uses.

use serde::{Deserialize, Serialize};

use super::Contribution;
use crate::codec::update::UploadKind;

/// `[buffered]` in a run's config: present, the server runs the buffered driver instead of rounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BufferedConfig {
    /// K: results per server step (each step is one model version).
    pub buffer: usize,
    /// A result stale by more than this many versions is dropped (its client is told).
    pub max_staleness: u32,
    /// a in s(τ) = (1 + τ)^(−a): ½ is FedBuff's 1/√(1+τ); 0 weighs every result alike.
    pub staleness_exponent: f64,
    /// Clients training at once; 0: every connected client.
    pub concurrency: usize,
}

impl Default for BufferedConfig {
    fn default() -> Self {
        BufferedConfig {
            buffer: 10,
            max_staleness: 20,
            staleness_exponent: 0.5,
            concurrency: 0,
        }
    }
}

impl BufferedConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.buffer == 0 {
            return Err("[buffered] buffer must be at least 1 result per step".into());
        }
        if !(self.staleness_exponent >= 0.0) || !self.staleness_exponent.is_finite() {
            return Err(format!(
                "[buffered] staleness_exponent must be a finite number ≥ 0, not {}",
                self.staleness_exponent
            ));
        }
        Ok(())
    }

    /// s(τ) for a result stale by `tau` versions, or `None` when it is past `max_staleness`.
    pub fn weight(&self, tau: u32) -> Option<f64> {
        (tau <= self.max_staleness).then(|| (1.0 + tau as f64).powf(-self.staleness_exponent))
    }
}

/// Puts a result trained from `from` (the model of its version) onto `to` (the model the buffer
/// builds on) with its update scaled by `weight`: trained weights w become
/// `to + weight·(w − from)`, a delta d becomes `weight·d`. The buffer's mean is then the newest
/// model plus the staleness-weighted mean update, which is FedBuff's step, and the robust layer
/// measures each update's norm from `to` as it does in a round. Supermask votes have no update to
/// scale: an error.
pub fn rebase(c: &mut Contribution, from: &[f32], to: &[f32], weight: f64) -> Result<(), String> {
    if from.len() != c.values.len() || to.len() != c.values.len() {
        return Err(format!(
            "a result of {} values cannot join a buffer of {} (trained from {})",
            c.values.len(),
            to.len(),
            from.len()
        ));
    }
    let w = weight as f32;
    match c.kind {
        UploadKind::Weights => {
            for ((v, f), t) in c.values.iter_mut().zip(from).zip(to) {
                *v = t + w * (*v - f);
            }
        }
        UploadKind::Delta => {
            for v in &mut c.values {
                *v *= w;
            }
        }
        UploadKind::Votes => {
            return Err("supermask votes cannot join a buffer: they carry no update".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::supermask::Encoding;
    use crate::protocol::ClientMetrics;

    fn result(kind: UploadKind, values: Vec<f32>) -> Contribution {
        Contribution {
            client: 1,
            samples: 10,
            kind,
            values,
            metrics: ClientMetrics::default(),
            encoding: Encoding::default(),
        }
    }

    #[test]
    fn staleness_weight_is_one_over_root_one_plus_tau_and_bounded() {
        let c = BufferedConfig {
            max_staleness: 8,
            ..BufferedConfig::default()
        };
        assert_eq!(c.weight(0), Some(1.0));
        assert!((c.weight(3).unwrap() - 0.5).abs() < 1e-12);
        assert!((c.weight(8).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        // Past τ_max: dropped, not down-weighted.
        assert_eq!(c.weight(9), None);
        assert_eq!(c.weight(u32::MAX), None);
        let flat = BufferedConfig {
            staleness_exponent: 0.0,
            ..c.clone()
        };
        assert_eq!(flat.weight(8), Some(1.0));
        let steep = BufferedConfig {
            staleness_exponent: 1.0,
            ..c
        };
        assert!((steep.weight(3).unwrap() - 0.25).abs() < 1e-12);
    }

    #[test]
    fn a_stale_result_joins_the_newest_model_with_its_update_scaled() {
        let from = [1.0, 2.0, 3.0];
        let to = [1.5, 2.0, 2.0];
        // Trained weights: +1, −2, +0.5 from where the client started.
        let mut c = result(UploadKind::Weights, vec![2.0, 0.0, 3.5]);
        rebase(&mut c, &from, &to, 0.5).unwrap();
        assert_eq!(c.values, vec![2.0, 1.0, 2.25]);
        // A fresh result (weight 1, from == to) is left as it was.
        let mut fresh = result(UploadKind::Weights, vec![2.0, 0.0, 3.5]);
        rebase(&mut fresh, &from, &from, 1.0).unwrap();
        assert_eq!(fresh.values, vec![2.0, 0.0, 3.5]);
        let mut d = result(UploadKind::Delta, vec![1.0, -2.0, 0.5]);
        rebase(&mut d, &from, &to, 0.5).unwrap();
        assert_eq!(d.values, vec![0.5, -1.0, 0.25]);
        let mut votes = result(UploadKind::Votes, vec![1.0, -1.0, 1.0]);
        assert!(rebase(&mut votes, &from, &to, 1.0).is_err());
        let mut short = result(UploadKind::Weights, vec![1.0]);
        assert!(rebase(&mut short, &from, &to, 1.0).is_err());
    }

    #[test]
    fn settings_are_checked() {
        assert!(BufferedConfig::default().validate().is_ok());
        let zero = BufferedConfig {
            buffer: 0,
            ..BufferedConfig::default()
        };
        assert!(zero.validate().is_err());
        let nan = BufferedConfig {
            staleness_exponent: f64::NAN,
            ..BufferedConfig::default()
        };
        assert!(nan.validate().is_err());
    }
}
