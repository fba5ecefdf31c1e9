//! `canopy compare --table time`: accuracy against the server's seconds, for runs whose clients
//! differ in speed (`--slow`), where rounds in lock-step wait for the slowest client and a
//! buffered run (`[buffered]`, FedBuff) does not. A round of one and a step of the other are not
//! the same unit, so the columns compare seconds and results, not rounds.

use super::Row;

/// The table: per run its final and last-5 accuracy, rounds (or steps), results aggregated,
/// server seconds, and the seconds to reach the first row's final accuracy on the same data
/// (the baseline's) and `target`.
pub fn markdown(rows: &[Row], target: f32) -> String {
    let mut s = format!(
        "| dataset | partition | strategy | final acc | last-5 acc | rounds or steps | results | server s | s to baseline's final acc | s to {:.0}% |\n|---|---|---|---|---|---|---|---|---|---|\n",
        target * 100.0
    );
    let secs = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.1}"));
    for r in rows {
        let baseline = rows
            .iter()
            .find(|b| b.dataset == r.dataset && b.partition == r.partition)
            .expect("itself");
        let results: usize = r.rounds.iter().map(|x| x.results).sum();
        s.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {} | {} | {:.1} | {} | {} |\n",
            r.dataset,
            r.partition,
            r.strategy.replace('|', "\\|"),
            r.final_acc(),
            r.tail_acc(),
            r.rounds.len(),
            results,
            r.server_seconds(),
            secs(r.seconds_to(baseline.final_acc())),
            secs(r.seconds_to(target)),
        ));
    }
    s
}
