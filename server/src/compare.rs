//! `canopy compare`: several strategies on the same data split, seed and round budget, with
//! native simulated clients, summarised in one table (printed, and saved as Markdown and CSV).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use canopy_core::metric_keys as keys;

use crate::config::{Config, parse_partition};
use crate::metrics::RoundRecord;

#[derive(Clone, Debug, clap::Args)]
pub struct CompareArgs {
    /// Base TOML config (strategy settings, model, rounds...).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Model for every run (overrides the config).
    #[arg(long)]
    pub model: Option<String>,
    /// Strategies to compare, comma separated; the first is the baseline.
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
}

pub struct Row {
    pub dataset: String,
    pub partition: String,
    pub strategy: String,
    pub rounds: Vec<RoundRecord>,
    pub seconds: f64,
}

impl Row {
    fn final_acc(&self) -> f32 {
        self.rounds.last().map_or(0.0, |r| r.test_accuracy)
    }
    fn best_acc(&self) -> f32 {
        self.rounds.iter().map(|r| r.test_accuracy).fold(0.0, f32::max)
    }
    fn to_target(&self, t: f32) -> String {
        self.rounds.iter().find(|r| r.test_accuracy >= t).map_or("–".into(), |r| r.round.to_string())
    }
    /// Mean of the clients' accuracy on their own held-out splits in the last round (for
    /// personalising methods, their own models).
    fn local_acc(&self) -> f32 {
        self.rounds.last().map_or(0.0, |r| r.local_accuracy)
    }
    /// Bits uploaded per model parameter per client result, from real frames, over the run.
    fn bits_per_param(&self) -> f64 {
        let bits: f64 = self.rounds.iter().map(|r| 8.0 * r.bytes_up as f64).sum();
        let params: f64 = self.rounds.iter().map(|r| (r.results * r.params) as f64).sum();
        bits / params.max(1.0)
    }
    fn up(&self) -> u64 {
        self.rounds.iter().map(|r| r.bytes_up).sum()
    }
    fn down(&self) -> u64 {
        self.rounds.iter().map(|r| r.bytes_down).sum()
    }
    fn extra(&self, key: &str) -> Option<f64> {
        self.rounds.last().and_then(|r| r.extra.get(key).copied())
    }
    /// (first round, last round) of a per-round figure.
    fn span<T: Copy + Default>(&self, f: impl Fn(&RoundRecord) -> T) -> (T, T) {
        (self.rounds.first().map(&f).unwrap_or_default(), self.rounds.last().map(&f).unwrap_or_default())
    }
    /// FLOPs per sample of the final model (pruned weights free when a mask says so) over the
    /// first round's dense model.
    fn flops_ratio(&self) -> f64 {
        let (first, _) = self.span(|r| r.flops_per_sample);
        let last = self.rounds.last().map_or(0.0, |r| r.extra.get(keys::EFFECTIVE_FLOPS).copied().unwrap_or(r.flops_per_sample as f64));
        last / first.max(1) as f64
    }
}

pub async fn run(args: CompareArgs) -> Result<Vec<Row>, String> {
    let base = Config::load(&crate::config::Overrides { config: args.config.clone(), ..Default::default() })?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let out = args.out_dir.join(format!("compare-{stamp}"));
    let mut rows = Vec::new();
    for dataset in args.datasets.split(',') {
        for partition in args.partitions.split(',') {
            for strategy in args.strategies.split(',') {
                let mut c = base.clone();
                c.data.dataset = dataset.trim().into();
                c.data.partition = parse_partition(partition.trim())?;
                c.data.shards = args.clients;
                c.strategy.name = strategy.trim().into();
                c.strategy.config.fraction = args.fraction;
                c.run.min_clients = args.clients;
                c.run.linger = false;
                c.run.out_dir = out.clone();
                c.run.name = Some(format!("{}-{}-{}", dataset.trim(), partition.trim().replace(':', ""), strategy.trim()));
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
                eprintln!("== {dataset} / {partition} / {strategy}: {} rounds, {} clients", c.run.rounds, args.clients);
                let t0 = Instant::now();
                let running = crate::start(c).await?;
                let url = format!("ws://{}/ws", running.addr);
                let n = args.clients;
                let sims = tokio::task::spawn_blocking(move || crate::sim::run_many(&url, n, "sim", Duration::from_secs(30)));
                let app = running.app.clone();
                running.rounds.await.map_err(|e| e.to_string())?;
                let reports = sims.await.map_err(|e| e.to_string())?;
                if let Some(e) = reports.iter().flat_map(|r| &r.errors).next() {
                    eprintln!("   a simulated client reported: {e}");
                }
                let rounds = app.hub.lock().unwrap().rounds().to_vec();
                rows.push(Row { dataset: dataset.trim().into(), partition: partition.trim().into(), strategy: strategy.trim().into(), rounds, seconds: t0.elapsed().as_secs_f64() });
                let last = rows.last().unwrap();
                eprintln!("   final accuracy {:.4}, {:.0} s", last.final_acc(), last.seconds);
            }
        }
    }
    let (md, csv) = (markdown(&rows, args.target), csv(&rows, args.target));
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
        "| dataset | partition | strategy | final acc | best acc | local acc | rounds to {:.0}% | bits/param up | MB up | MB down | up vs first | params first → last | FLOPs last/first | sparsity | step ms first → last | time s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        target * 100.0
    );
    for r in rows {
        let baseline = rows.iter().find(|b| b.dataset == r.dataset && b.partition == r.partition).expect("itself");
        s.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {:.4} | {} | {:.3} | {} | {} | {:.3}× | {} → {} | {:.2} | {} | {:.2} → {:.2} | {:.0} |\n",
            r.dataset, r.partition, r.strategy, r.final_acc(), r.best_acc(), r.local_acc(), r.to_target(target), r.bits_per_param(), mb(r.up()), mb(r.down()),
            r.up() as f64 / baseline.up().max(1) as f64,
            r.span(|x| x.params).0, r.span(|x| x.params).1, r.flops_ratio(),
            r.extra(keys::SPARSITY).or(r.extra(keys::DENSITY).map(|d| 1.0 - d)).map_or("0".into(), |v| format!("{v:.2}")),
            r.span(|x| x.step_ms).0, r.span(|x| x.step_ms).1,
            r.seconds
        ));
    }
    s
}

fn csv(rows: &[Row], target: f32) -> String {
    let mut s = String::from("dataset,partition,strategy,final_accuracy,best_accuracy,local_accuracy,bits_per_param_up,rounds_to_target,target,bytes_up,bytes_down,params_first,params_last,flops_ratio,final_sparsity,step_ms_first,step_ms_last,seconds\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{:.4},{:.4},{:.4},{:.4},{},{target},{},{},{},{},{:.4},{},{:.3},{:.3},{:.1}\n",
            r.dataset, r.partition, r.strategy, r.final_acc(), r.best_acc(), r.local_acc(), r.bits_per_param(), r.to_target(target).replace('–', ""), r.up(), r.down(),
            r.span(|x| x.params).0, r.span(|x| x.params).1, r.flops_ratio(),
            r.extra(keys::SPARSITY).unwrap_or(0.0), r.span(|x| x.step_ms).0, r.span(|x| x.step_ms).1, r.seconds
        ));
    }
    s
}
