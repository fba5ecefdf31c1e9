//! `canopy compare --table split`: what split learning costs and gains per round, against the
//! first strategy of the run (FedAvg): bytes each way, the clients' and the server's computing,
//! and the wall time of a round on a simulated link.

use canopy_core::metric_keys as keys;

use crate::lab::compare::row::Row;
use crate::round::record::RoundRecord;

/// A simulated client link: bandwidth each way and one-way latency. Nothing is slowed down; the
/// time is computed from each round's measured bytes, messages and computing.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub mbit: f64,
    pub ms: f64,
}

impl std::str::FromStr for Link {
    type Err = String;
    fn from_str(s: &str) -> Result<Link, String> {
        let (mbit, ms) = s.split_once(',').ok_or("link as MBIT,MS, e.g. 10,20")?;
        let link = Link {
            mbit: mbit
                .trim()
                .parse()
                .map_err(|e| format!("link bandwidth: {e}"))?,
            ms: ms
                .trim()
                .parse()
                .map_err(|e| format!("link latency: {e}"))?,
        };
        if link.mbit <= 0.0 || link.ms < 0.0 {
            return Err("link bandwidth must be > 0 and latency ≥ 0".into());
        }
        Ok(link)
    }
}

fn extra(r: &RoundRecord, key: &str) -> f64 {
    r.extra.get(key).copied().unwrap_or(0.0)
}

/// Seconds a mean client of round `r` spends on it over `link`: its own computing, the server's
/// work on its batches (it waits for each), its bytes each way, and a latency per message (task
/// and result, plus a request and a reply per batch).
pub fn simulated_seconds(r: &RoundRecord, link: Link) -> f64 {
    let n = r.results.max(1) as f64;
    let bytes = (r.bytes_up + r.bytes_down) as f64 / n;
    let messages = 2.0 + 2.0 * extra(r, keys::EXCHANGES) / n;
    r.tab_seconds
        + extra(r, keys::SERVER_SECONDS) / n
        + bytes * 8.0 / (link.mbit * 1e6)
        + messages * link.ms / 1000.0
}

struct Figures {
    tail_acc: f64,
    up: f64,
    down: f64,
    act_per_batch: Option<(f64, f64)>,
    tab: f64,
    server: f64,
    wall: f64,
}

fn figures(row: &Row, link: Link) -> Figures {
    let rs = &row.rounds;
    let n = rs.len().max(1) as f64;
    let mean = |f: &dyn Fn(&RoundRecord) -> f64| rs.iter().map(f).sum::<f64>() / n;
    let tail = &rs[rs.len().saturating_sub(5)..];
    let batches: f64 = rs.iter().map(|r| extra(r, keys::EXCHANGES)).sum();
    let act_per_batch =
        (batches > 0.0 && rs.iter().any(|r| r.extra.contains_key(keys::ACT_BYTES_UP))).then(|| {
            let up: f64 = rs.iter().map(|r| extra(r, keys::ACT_BYTES_UP)).sum();
            let down: f64 = rs.iter().map(|r| extra(r, keys::GRAD_BYTES_DOWN)).sum();
            (up / batches, down / batches)
        });
    Figures {
        tail_acc: tail.iter().map(|r| r.test_accuracy as f64).sum::<f64>()
            / tail.len().max(1) as f64,
        up: mean(&|r| r.bytes_up as f64),
        down: mean(&|r| r.bytes_down as f64),
        act_per_batch,
        tab: mean(&|r| r.tab_seconds * r.results as f64),
        server: mean(&|r| extra(r, keys::SERVER_SECONDS)),
        wall: mean(&|r| simulated_seconds(r, link)),
    }
}

pub fn markdown(rows: &[Row], link: Link) -> String {
    let mut s = format!(
        "| dataset | model | partition | strategy | final acc | last-5 acc | MB up / round | MB down / round | per batch up / down (KB) | clients' compute s / round | server compute s / round | simulated s / round ({} Mbit/s, {} ms) | vs baseline |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        link.mbit, link.ms
    );
    for row in rows {
        let base = rows
            .iter()
            .find(|b| {
                b.dataset == row.dataset && b.partition == row.partition && b.model == row.model
            })
            .expect("itself");
        let (f, b) = (figures(row, link), figures(base, link));
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.4} | {:.4} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.2}× |\n",
            row.dataset,
            row.model,
            row.partition,
            row.strategy.replace('|', "\\|"),
            row.rounds.last().map_or(0.0, |r| r.test_accuracy),
            f.tail_acc,
            f.up / 1e6,
            f.down / 1e6,
            f.act_per_batch.map_or("–".into(), |(u, d)| format!("{:.1} / {:.1}", u / 1e3, d / 1e3)),
            f.tab,
            f.server,
            f.wall,
            f.wall / b.wall.max(1e-9),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_model_adds_bytes_latency_and_computing() {
        let mut r: RoundRecord = serde_json::from_value(serde_json::json!({
            "round": 1, "seconds": 1.0, "sampled": 2, "results": 2, "dropped": 0, "rejected": 0, "retries": 0,
            "test_accuracy": 0.5, "test_loss": 1.0, "train_loss": 1.0, "local_accuracy": 0.0, "samples": 10,
            "bytes_up": 2_500_000, "bytes_down": 2_500_000, "params": 10, "flops_per_sample": 1, "step_ms": 1.0,
            "tab_seconds": 3.0, "backends": [], "participants": [], "extra": {}
        }))
        .unwrap();
        let link: Link = "10,20".parse().unwrap();
        // Per client 2.5 MB = 20 Mbit → 2 s, two messages → 40 ms, plus 3 s of computing.
        assert!((simulated_seconds(&r, link) - 5.04).abs() < 1e-9);
        r.extra.insert(keys::EXCHANGES.into(), 200.0);
        r.extra.insert(keys::SERVER_SECONDS.into(), 1.0);
        // 100 batches per client: 200 more messages (4 s) and half a second of the server.
        assert!((simulated_seconds(&r, link) - 9.54).abs() < 1e-9);
        assert!("10".parse::<Link>().is_err() && "0,5".parse::<Link>().is_err());
    }
}
