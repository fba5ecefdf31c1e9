//! Per-round records: what the round loop writes after every round, `/api/metrics` serves (in
//! the hub's snapshot) and the run folder keeps as CSV and JSON.

use std::collections::BTreeMap;
use std::path::Path;

use canopy_core::model::arch::Arch;
use canopy_core::strategy::{Contribution, RoundOutcome};
use canopy_core::train::Eval;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub seconds: f64,
    /// Clients given a task.
    pub sampled: usize,
    /// Results aggregated.
    pub results: usize,
    /// Sampled clients that vanished or missed the deadline.
    pub dropped: usize,
    /// Results that failed validation.
    pub rejected: usize,
    /// Attempts of this round that ended below `min_results` and were retried.
    pub retries: u32,
    /// NaN without a test set (a run on the tabs' own data): null in the JSON, read back as NaN.
    #[serde(deserialize_with = "nan_if_null")]
    pub test_accuracy: f32,
    #[serde(deserialize_with = "nan_if_null")]
    pub test_loss: f32,
    /// Sample-weighted mean of the clients' training loss.
    pub train_loss: f32,
    /// Mean of the clients' accuracy on their own local test splits.
    pub local_accuracy: f32,
    pub samples: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub params: usize,
    pub flops_per_sample: u64,
    /// Mean local training step time reported by this round's clients, in milliseconds.
    pub step_ms: f64,
    /// Mean seconds a client computed in its task: training time minus time spent waiting for
    /// the server's replies (split learning's batches).
    #[serde(default)]
    pub tab_seconds: f64,
    /// Backends of the clients whose results were aggregated (e.g. "webgpu", "cpu").
    pub backends: Vec<String>,
    pub participants: Vec<u64>,
    /// Strategy-specific figures.
    pub extra: BTreeMap<String, f64>,
}

/// A figure JSON wrote as null (serde_json writes NaN so) is NaN again.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

/// The round loop's own counts for one round.
pub struct RoundTally {
    pub round: u32,
    pub seconds: f64,
    pub sampled: usize,
    pub dropped: usize,
    pub rejected: usize,
    pub retries: u32,
}

impl RoundRecord {
    /// The record of a finished round: the loop's counts, the aggregated results, the new
    /// model's test figures, the architecture the clients trained, and the strategy's figures.
    /// `bytes` is the round's (up, down) traffic; `backend_of` names a client's backend.
    pub fn new(
        t: RoundTally,
        results: &[Contribution],
        eval: Eval,
        trained: &Arch,
        bytes: (u64, u64),
        backend_of: impl Fn(u64) -> String,
        outcome: RoundOutcome,
    ) -> RoundRecord {
        let total: u64 = results.iter().map(|c| c.samples).sum();
        let n = results.len().max(1) as f64;
        let (bytes_up, bytes_down) = bytes;
        RoundRecord {
            round: t.round,
            seconds: t.seconds,
            sampled: t.sampled,
            results: results.len(),
            dropped: t.dropped,
            rejected: t.rejected,
            retries: t.retries,
            test_accuracy: eval.accuracy,
            test_loss: eval.loss,
            train_loss: (results
                .iter()
                .map(|c| c.metrics.train_loss as f64 * c.samples as f64)
                .sum::<f64>()
                / total.max(1) as f64) as f32,
            local_accuracy: (results
                .iter()
                .map(|c| c.metrics.local_test.accuracy as f64)
                .sum::<f64>()
                / n) as f32,
            samples: total,
            bytes_up,
            bytes_down,
            params: trained.num_params(),
            flops_per_sample: trained.flops_per_sample(),
            step_ms: results
                .iter()
                .map(|c| 1000.0 * c.metrics.train_seconds / c.metrics.steps.max(1) as f64)
                .sum::<f64>()
                / n,
            tab_seconds: results
                .iter()
                .map(|c| (c.metrics.train_seconds - c.metrics.exchange_seconds).max(0.0))
                .sum::<f64>()
                / n,
            backends: results.iter().map(|c| backend_of(c.client)).collect(),
            participants: results.iter().map(|c| c.client).collect(),
            extra: outcome.metrics,
        }
    }
}

const COLUMNS: &str = "round,seconds,sampled,results,dropped,rejected,retries,test_accuracy,test_loss,train_loss,local_accuracy,samples,bytes_up,bytes_down,params,flops_per_sample,step_ms,tab_seconds";

pub fn to_csv(rows: &[RoundRecord]) -> String {
    let extras: Vec<String> = {
        let mut k: Vec<String> = rows.iter().flat_map(|r| r.extra.keys().cloned()).collect();
        k.sort();
        k.dedup();
        k
    };
    let mut out = String::from(COLUMNS);
    for e in &extras {
        out.push(',');
        out.push_str(e);
    }
    out.push('\n');
    for r in rows {
        out.push_str(&format!(
            "{},{:.3},{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{},{},{},{},{},{:.3},{:.4}",
            r.round,
            r.seconds,
            r.sampled,
            r.results,
            r.dropped,
            r.rejected,
            r.retries,
            r.test_accuracy,
            r.test_loss,
            r.train_loss,
            r.local_accuracy,
            r.samples,
            r.bytes_up,
            r.bytes_down,
            r.params,
            r.flops_per_sample,
            r.step_ms,
            r.tab_seconds
        ));
        for e in &extras {
            out.push(',');
            if let Some(v) = r.extra.get(e) {
                out.push_str(&format!("{v}"));
            }
        }
        out.push('\n');
    }
    out
}

pub fn write(dir: &Path, json: &serde_json::Value, rows: &[RoundRecord]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Write-then-rename so a reader never sees half a file.
    let tmp = dir.join("metrics.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(json)?)?;
    std::fs::rename(tmp, dir.join("metrics.json"))?;
    std::fs::write(dir.join("metrics.csv"), to_csv(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_without_a_test_set_reads_back_from_its_json() {
        let r = RoundRecord {
            round: 3,
            test_accuracy: f32::NAN,
            test_loss: f32::NAN,
            local_accuracy: 0.9,
            ..Default::default()
        };
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["test_accuracy"].is_null() && json["test_loss"].is_null());
        let back: RoundRecord = serde_json::from_value(json).unwrap();
        assert!(back.test_accuracy.is_nan() && back.test_loss.is_nan());
        assert_eq!((back.round, back.local_accuracy), (3, 0.9));
        let again: RoundRecord = serde_json::from_value(
            serde_json::to_value(RoundRecord {
                test_accuracy: 0.5,
                ..Default::default()
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(again.test_accuracy, 0.5);
    }

    #[test]
    fn csv_has_a_column_per_extra() {
        let mut a = RoundRecord {
            round: 1,
            test_accuracy: 0.5,
            ..Default::default()
        };
        a.extra.insert("sparsity".into(), 0.25);
        let b = RoundRecord {
            round: 2,
            ..Default::default()
        };
        let csv = to_csv(&[a, b]);
        let lines: Vec<&str> = csv.lines().collect();
        assert!(lines[0].ends_with(",sparsity"));
        assert!(
            lines[1].starts_with("1,")
                && lines[1].ends_with(",0.25")
                && lines[1].contains(",0.5000,")
        );
        assert!(lines[2].ends_with(','));
        assert_eq!(lines[0].split(',').count(), lines[1].split(',').count());
    }
}
