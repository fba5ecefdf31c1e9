//! `canopy compare`: several strategies on the same data split, seed and round budget, with
//! native simulated clients, summarised in one table (printed, and saved as Markdown and CSV).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use canopy_core::metric_keys as keys;

use crate::config::{Config, parse_partition};

pub mod row;
pub mod split_table;
pub mod time_table;

pub use row::Row;

#[derive(Clone, Debug, clap::Args)]
pub struct CompareArgs {
    /// Base TOML config (strategy settings, model, rounds...).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Model for every run (overrides the config).
    #[arg(long)]
    pub model: Option<String>,
    /// Strategies to compare, comma separated; the first is the baseline. A variant adds
    /// settings in braces, separated by `;`: `autoflip{q=0}`, `fedavgm{lr_decay=0.99}`,
    /// `structured{reinit=true;score="l1"}`. A plain key is a setting of the strategy's own
    /// section (`[strategy.<name>]`); a dotted one is a path from the top of the config
    /// (`strategy.lr=0.01`).
    #[arg(long, default_value = "fedavg,autoflip")]
    pub strategies: String,
    #[arg(long, default_value = "mnist-digits,fashion-mnist")]
    pub datasets: String,
    #[arg(long, default_value = "shards:2,dirichlet:0.1")]
    pub partitions: String,
    /// Clients (each one data shard).
    #[arg(long, default_value_t = 20)]
    pub clients: usize,
    #[arg(long)]
    pub rounds: Option<u32>,
    #[arg(long, default_value_t = 0.25)]
    pub fraction: f64,
    /// Accuracy for the "rounds to target" column.
    #[arg(long, default_value_t = 0.8)]
    pub target: f32,
    #[arg(long, default_value = "runs/compare")]
    pub out_dir: PathBuf,
    /// Use at most this many training samples of each dataset (overrides the config).
    #[arg(long)]
    pub max_train: Option<usize>,
    /// Which table: `pruning` (accuracy, bytes, model size), `split` (bytes each way,
    /// clients' and server's computing, simulated wall time on `--link`) or `time` (accuracy
    /// against server seconds, for `--slow` clients and buffered runs).
    #[arg(long, default_value = "pruning")]
    pub table: String,
    /// Simulated client link for the split table: Mbit/s each way, one-way latency in ms.
    #[arg(long, default_value = "10,20")]
    pub link: crate::lab::compare::split_table::Link,
    /// Slow clients, `FRACTION:FACTOR`: that fraction of the clients (every third for 0.33,
    /// spread over the shards) take FACTOR times as long per task, as slower devices would.
    #[arg(long)]
    pub slow: Option<String>,
}

/// Each client's pace for `--slow FRACTION:FACTOR` (1 for the others): client i is slow when
/// ⌊(i + 1)·f⌋ > ⌊i·f⌋, so slow clients are spread evenly over the shards.
pub fn paces(n: usize, slow: Option<&str>) -> Result<Vec<f64>, String> {
    let Some(slow) = slow else {
        return Ok(vec![1.0; n]);
    };
    let bad = || format!("--slow '{slow}': FRACTION:FACTOR, e.g. 0.33:5");
    let (f, k) = slow.split_once(':').ok_or_else(bad)?;
    let (f, k): (f64, f64) = (
        f.trim().parse().map_err(|_| bad())?,
        k.trim().parse().map_err(|_| bad())?,
    );
    if !(0.0..=1.0).contains(&f) || !(k >= 1.0) || !k.is_finite() {
        return Err(bad());
    }
    Ok((0..n)
        .map(|i| {
            if ((i + 1) as f64 * f).floor() > (i as f64 * f).floor() {
                k
            } else {
                1.0
            }
        })
        .collect())
}

/// The comma-separated strategy list, with commas inside braces left alone.
fn split_strategies(list: &str) -> Result<Vec<String>, String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for ch in list.chars() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur).trim().to_string());
                continue;
            }
            _ => {}
        }
        if depth < 0 {
            return Err(format!("unbalanced braces in '{list}'"));
        }
        cur.push(ch);
    }
    if depth != 0 {
        return Err(format!("unbalanced braces in '{list}'"));
    }
    out.push(cur.trim().to_string());
    Ok(out.into_iter().filter(|s| !s.is_empty()).collect())
}

/// `name{key=value;...}` → the strategy name and its settings.
fn parse_variant(s: &str) -> Result<(String, Vec<(String, String)>), String> {
    let Some((name, rest)) = s.split_once('{') else {
        return Ok((s.trim().to_string(), Vec::new()));
    };
    let body = rest
        .strip_suffix('}')
        .ok_or(format!("'{s}': settings must end with '}}'"))?;
    let mut settings = Vec::new();
    for kv in body.split(';').map(str::trim).filter(|kv| !kv.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or(format!("'{kv}' in '{s}' is not key=value"))?;
        settings.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok((name.trim().to_string(), settings))
}

/// `config` with `settings` written into its TOML form: a plain key into `[strategy.<name>]`, a
/// dotted key from the top. Values are TOML (`0.99`, `true`, `"l1"`); anything else is a string.
fn with_settings(
    config: Config,
    name: &str,
    settings: &[(String, String)],
) -> Result<Config, String> {
    if settings.is_empty() {
        return Ok(config);
    }
    let mut root = toml::Value::try_from(&config).map_err(|e| e.to_string())?;
    for (key, raw) in settings {
        let path: Vec<&str> = if key.contains('.') {
            key.split('.').collect()
        } else {
            vec!["strategy", name, key]
        };
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let mut at = &mut root;
        for part in &path[..path.len() - 1] {
            let table = at
                .as_table_mut()
                .ok_or(format!("setting '{key}': '{part}' is not a section"))?;
            at = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()));
        }
        at.as_table_mut()
            .ok_or(format!("setting '{key}': not a section"))?
            .insert(path[path.len() - 1].to_string(), value);
    }
    root.try_into()
        .map_err(|e: toml::de::Error| format!("settings {settings:?}: {e}"))
}

pub async fn run(args: CompareArgs) -> Result<Vec<Row>, String> {
    let base = Config::load(&crate::config::Overrides {
        config: args.config.clone(),
        ..Default::default()
    })?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let out = args.out_dir.join(format!("compare-{stamp}"));
    let mut rows = Vec::new();
    for dataset in args.datasets.split(',') {
        for partition in args.partitions.split(',') {
            for strategy in split_strategies(&args.strategies)? {
                let strategy = strategy.as_str();
                let (name, settings) = parse_variant(strategy)?;
                let mut c = base.clone();
                c.data.dataset = dataset.trim().into();
                c.data.partition = parse_partition(partition.trim())?;
                c.data.shards = args.clients;
                c.strategy.name = name.clone();
                c.strategy.config.fraction = args.fraction;
                c = with_settings(c, &name, &settings)?;
                c.run.min_clients = args.clients;
                c.run.linger = false;
                c.run.out_dir = out.clone();
                let label: String = strategy
                    .chars()
                    .map(|ch| {
                        if ch.is_ascii_alphanumeric() || ch == '.' || ch == '_' {
                            ch
                        } else {
                            '-'
                        }
                    })
                    .collect();
                c.run.name = Some(format!(
                    "{}-{}-{}",
                    dataset.trim(),
                    partition.trim().replace(':', ""),
                    label.trim_matches('-')
                ));
                c.server.port = 0;
                if let Some(r) = args.rounds {
                    c.run.rounds = r;
                }
                if let Some(m) = &args.model {
                    c.model = m.clone();
                }
                if let Some(n) = args.max_train {
                    c.data.max_train = n;
                }
                c.validate()?;
                let model_name = c.model.clone();
                eprintln!(
                    "== {dataset} / {partition} / {strategy}: {} rounds, {} clients",
                    c.run.rounds, args.clients
                );
                let t0 = Instant::now();
                let running = crate::start(c).await?;
                let url = format!("ws://{}/ws", running.addr);
                let paces = paces(args.clients, args.slow.as_deref())?;
                let sims = tokio::task::spawn_blocking(move || {
                    crate::lab::sim::run_many_paced(&url, &paces, "sim", Duration::from_secs(30))
                });
                let app = running.app.clone();
                running.rounds.await.map_err(|e| e.to_string())?;
                let reports = sims.await.map_err(|e| e.to_string())?;
                if let Some(e) = reports.iter().flat_map(|r| &r.errors).next() {
                    eprintln!("   a simulated client reported: {e}");
                }
                let rounds = app.hub.lock().unwrap().rounds().to_vec();
                rows.push(Row {
                    dataset: dataset.trim().into(),
                    model: model_name.clone(),
                    partition: partition.trim().into(),
                    strategy: strategy.trim().into(),
                    rounds,
                    seconds: t0.elapsed().as_secs_f64(),
                });
                let last = rows.last().unwrap();
                eprintln!(
                    "   final accuracy {:.4}, {:.0} s",
                    last.final_acc(),
                    last.seconds
                );
            }
        }
    }
    let md = match args.table.as_str() {
        "pruning" => markdown(&rows, args.target),
        "split" => crate::lab::compare::split_table::markdown(&rows, args.link),
        "time" => crate::lab::compare::time_table::markdown(&rows, args.target),
        other => return Err(format!("unknown table '{other}': pruning, split or time")),
    };
    let csv = csv(&rows, args.target);
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    std::fs::write(out.join("compare.md"), &md).map_err(|e| e.to_string())?;
    std::fs::write(out.join("compare.csv"), &csv).map_err(|e| e.to_string())?;
    println!("{md}");
    println!("saved in {}", out.display());
    Ok(rows)
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

pub fn markdown(rows: &[Row], target: f32) -> String {
    let mut s = format!(
        "| dataset | partition | strategy | final acc | last-5 acc | trained acc (val) | best acc | local acc | rounds to {:.0}% | bits/param up | MB up | MB down | up vs first | params first → last | params removed | FLOPs last/first | sparsity | step ms first → last | time s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        target * 100.0
    );
    for r in rows {
        let baseline = rows
            .iter()
            .find(|b| b.dataset == r.dataset && b.partition == r.partition)
            .expect("itself");
        s.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {} | {:.4} | {:.4} | {} | {:.3} | {} | {} | {:.3}× | {} → {} | {:.0}% | {:.2} | {} | {:.2} → {:.2} | {:.0} |\n",
            r.dataset, r.partition, r.strategy.replace('|', "\\|"), r.final_acc(), r.tail_acc(),
            r.extra(keys::VAL_ACC_TRAINED).map_or("–".into(), |v| format!("{v:.4}")),
            r.best_acc(), r.local_acc(), r.to_target(target), r.bits_per_param(), mb(r.up()), mb(r.down()),
            r.up() as f64 / baseline.up().max(1) as f64,
            r.span(|x| x.params).0, r.span(|x| x.params).1, 100.0 * r.params_removed(), r.flops_ratio(),
            r.extra(keys::SPARSITY).or(r.extra(keys::DENSITY).map(|d| 1.0 - d)).map_or("0".into(), |v| format!("{v:.2}")),
            r.span(|x| x.step_ms).0, r.span(|x| x.step_ms).1,
            r.seconds
        ));
    }
    s
}

fn csv(rows: &[Row], target: f32) -> String {
    let mut s = String::from(
        "dataset,partition,strategy,final_accuracy,last5_accuracy,trained_val_accuracy,best_accuracy,local_accuracy,bits_per_param_up,rounds_to_target,target,bytes_up,bytes_down,params_first,params_last,flops_ratio,final_sparsity,step_ms_first,step_ms_last,seconds\n",
    );
    for r in rows {
        s.push_str(&format!(
            "{},{},\"{}\",{:.4},{:.4},{},{:.4},{:.4},{:.4},{},{target},{},{},{},{},{:.4},{},{:.3},{:.3},{:.1}\n",
            r.dataset, r.partition, r.strategy.replace('"', "'"), r.final_acc(), r.tail_acc(), r.extra(keys::VAL_ACC_TRAINED).map_or(String::new(), |v| format!("{v:.4}")), r.best_acc(), r.local_acc(), r.bits_per_param(), r.to_target(target).replace('–', ""), r.up(), r.down(),
            r.span(|x| x.params).0, r.span(|x| x.params).1, r.flops_ratio(),
            r.extra(keys::SPARSITY).unwrap_or(0.0), r.span(|x| x.step_ms).0, r.span(|x| x.step_ms).1, r.seconds
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Config {
        let mut c = Config::default();
        c.strategy.name = name.into();
        c
    }

    #[test]
    fn a_third_of_the_clients_are_slow_and_spread_out() {
        let p = paces(9, Some("0.34:5")).unwrap();
        assert_eq!(p, vec![1.0, 1.0, 5.0, 1.0, 1.0, 5.0, 1.0, 1.0, 5.0]);
        assert_eq!(paces(3, None).unwrap(), vec![1.0; 3]);
        assert!(paces(3, Some("0.5")).is_err());
        assert!(paces(3, Some("2:5")).is_err());
        assert!(paces(3, Some("0.5:0.5")).is_err());
    }

    #[test]
    fn variants_carry_their_settings() {
        let list = split_strategies("fedavg, fedavgm{lr_decay=0.99},autoflip{q=0;int8=false}, structured{score=\"movement\";strategy.lr=0.01}").unwrap();
        assert_eq!(
            list,
            vec![
                "fedavg",
                "fedavgm{lr_decay=0.99}",
                "autoflip{q=0;int8=false}",
                "structured{score=\"movement\";strategy.lr=0.01}"
            ]
        );
        assert!(split_strategies("autoflip{q=0").is_err());
        let (name, settings) = parse_variant(&list[2]).unwrap();
        assert_eq!(name, "autoflip");
        let c = with_settings(named(&name), &name, &settings).unwrap();
        let own = &c.strategy.methods["autoflip"];
        assert_eq!(own["q"], 0);
        assert_eq!(own["int8"], false);
        c.strategy.build().unwrap();
        let (name, settings) = parse_variant(&list[1]).unwrap();
        assert_eq!(
            with_settings(named(&name), &name, &settings)
                .unwrap()
                .strategy
                .methods["fedavgm"]["lr_decay"],
            0.99
        );
        let (name, settings) = parse_variant(&list[3]).unwrap();
        let c = with_settings(named(&name), &name, &settings).unwrap();
        assert_eq!(c.strategy.methods["structured"]["score"], "movement");
        assert_eq!(c.strategy.config.lr, 0.01);
        c.strategy.build().unwrap();
        // A misspelt setting is an error when the strategy is built, not silently ignored.
        let (name, settings) = parse_variant("autoflip{qq=0}").unwrap();
        assert!(
            with_settings(named(&name), &name, &settings)
                .unwrap()
                .strategy
                .build()
                .is_err()
        );
    }
}
