//! Strategies: how a round is configured and how results become the next global model.
//!
//! The server's round loop and the client runtime only know this trait. A strategy is one file
//! with a `build` function; [`METHODS`] is the one table of names and constructors.

mod autoflip;
mod dpfedavg;
mod echo;
mod fedavg;
mod fedavgm;
mod fedopt;
mod fedprox;
mod hidenseek;
mod plan;
mod split;
mod structured;

pub use autoflip::{AutoFlip, AutoflipConfig};
pub use dpfedavg::{Clipping, DpConfig, DpFedAvg};
pub use echo::{Echo, LossServer};
pub use fedavg::FedAvg;
pub use fedavgm::{FedAvgM, FedavgmConfig};
pub use fedopt::{Adaptive, FedOpt, FedoptConfig};
pub use fedprox::{FedProx, FedproxConfig};
pub use hidenseek::{Supermask, SupermaskConfig, Vote};
pub use plan::{Exchange, Phase, RoundPlan};
pub use split::{BackServer, PruneKind, Split, SplitConfig};
pub use structured::{Structured, StructuredConfig, UnitScore};
// A strategy file finds everything it works with here.
pub use crate::aggregate::Contribution;
pub use crate::aggregate::stream::{Fold, RunningSum};

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::{rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

use crate::codec;
pub use crate::codec::update::UploadKind;
use crate::model::state::ModelState;
use crate::protocol::{Task, TaskResult, UploadSpec};
use crate::train::step::Step;
use crate::train::{Eval, Optimizer, TrainSpec};

/// What a strategy knows about a connected client.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientView {
    pub id: u64,
    /// Size of the client's training split.
    pub samples: u64,
}

/// Settings every strategy reads (`[strategy]` in the TOML). A method's own settings sit in
/// its own section, `[strategy.<name>]`, and only that strategy parses them (see [`Settings`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct StrategyConfig {
    /// Fraction C of connected clients sampled per round.
    pub fraction: f64,
    /// Never sample fewer than this many clients.
    pub min_fit: usize,
    /// Local epochs over the client's shard per task.
    pub epochs: u32,
    /// Samples per local training step.
    pub batch_size: usize,
    /// The clients' learning rate.
    pub lr: f64,
    /// The clients' optimizer.
    pub optimizer: Optimizer,
    /// Round deadline in milliseconds.
    pub deadline_ms: u64,
    /// Server momentum β, for the strategies that step the global model with momentum
    /// (FedAvgM, and AutoFLIP which builds on it).
    pub server_momentum: f32,
    /// Server learning rate of those strategies.
    pub server_lr: f32,
    /// Seeds the clients' batch order and the strategy's own randomness (sampling, ties).
    pub seed: u64,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig {
            fraction: 1.0,
            min_fit: 1,
            epochs: 1,
            batch_size: 32,
            lr: 0.05,
            optimizer: Optimizer::Sgd { momentum: 0.0 },
            deadline_ms: 120_000,
            server_momentum: 0.9,
            server_lr: 1.0,
            seed: 1,
        }
    }
}

/// A method's own section of the config (`[strategy.autoflip]`...), as parsed data. Each
/// strategy reads it into its own settings type with [`parse_settings`].
pub type Settings = serde_json::Value;

/// Reads a strategy's section into its settings type; no section means the defaults. Unknown
/// keys are errors that name the section.
pub fn parse_settings<T: serde::de::DeserializeOwned + Default>(
    name: &str,
    settings: Option<&Settings>,
) -> Result<T, String> {
    match settings {
        None => Ok(T::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| format!("[strategy.{name}]: {e}")),
    }
}

/// What a strategy reports about one aggregation, besides the new model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundOutcome {
    /// Method-specific figures (sparsity, exploration cost...), logged and charted by name.
    pub metrics: BTreeMap<String, f64>,
}

/// What the server offers a strategy while it aggregates.
pub struct RoundContext<'a> {
    /// Rounds in the whole run.
    pub rounds: u32,
    /// Loss and accuracy of a model on the server's validation split (never the test set); an
    /// error when the split is empty or evaluation failed, so no strategy decides on zeros.
    pub validate: &'a dyn Fn(&ModelState) -> Result<Eval, String>,
}

pub trait Strategy: Send {
    /// Picks clients, gives each a task, and says how the round runs: whether it streams, its
    /// phase, who answers in-round requests ([`RoundPlan`]). `clients` are the ones connected
    /// and idle.
    fn configure_round(
        &mut self,
        round: u32,
        global: &ModelState,
        clients: &[ClientView],
        rng: &mut StdRng,
    ) -> RoundPlan;

    /// Folds validated, decoded results into `global`: what the server calls when a round's
    /// results were kept (its plan does not stream, or the robust rule needs every update). A
    /// strategy that streams answers with [`aggregate_folded`], so both paths share one piece
    /// of code.
    fn aggregate(
        &mut self,
        _round: u32,
        _global: &mut ModelState,
        _results: &[Contribution],
        _ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        Err("this strategy aggregates neither results nor running sums".into())
    }

    /// [`Strategy::aggregate`] from the round's running sums, for a round whose plan's
    /// [`RoundPlan::fold`] said it can. `results` are the round's contributions without their
    /// vectors (empty `values`): who, how many samples, metrics, encoding. Must give what
    /// `aggregate` gives on the same results, up to rounding.
    fn aggregate_sum(
        &mut self,
        _round: u32,
        _global: &mut ModelState,
        _sum: &RunningSum,
        _results: &[Contribution],
        _ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        Err("this strategy does not aggregate running sums".into())
    }

    /// A validated result in the global model's coordinates. Strategies whose clients train
    /// part of the model (split learning's front) fill in the rest here, before the robust
    /// layer compares results with the global model and before [`Strategy::aggregate`].
    fn complete(&self, result: Contribution, _global: &ModelState) -> Result<Contribution, String> {
        Ok(result)
    }

    /// Checks the strategy's settings against the run's model at start-up (a split point that
    /// does not exist, say), so a mistake stops the server with a message before any round.
    fn check_model(&self, _arch: &crate::model::arch::Arch) -> Result<(), String> {
        Ok(())
    }

    /// Checks the strategy against the robust layer it will run under, at start-up (a method
    /// whose guarantee holds only for the plain mean, say).
    fn check_robust(&self, _robust: &crate::aggregate::robust::RobustConfig) -> Result<(), String> {
        Ok(())
    }

    /// Checks that this strategy can run under the buffered driver (`[buffered]`, FedBuff: no
    /// rounds in lock-step; a result trained on an older model joins the newest, its update
    /// scaled by its staleness, and every K results are one step through
    /// [`Strategy::aggregate_sum`] or [`Strategy::aggregate`]). A method whose rounds differ from
    /// one another (phases, in-round exchanges, a model that changes shape, supermask votes), or
    /// whose guarantee counts rounds, says why not; the server then refuses to start.
    fn check_buffered(&self) -> Result<(), String> {
        Err("its rounds depend on one another (phases, exchanges, a changing model or votes), so they must run in lock-step".into())
    }

    /// Whether this strategy decides on the server's validation split ([`RoundContext::validate`]):
    /// the server then refuses to start with an empty one.
    fn needs_validation(&self) -> bool {
        false
    }

    /// The strategy's own state between rounds (server momentum, pruning stage...), saved with
    /// every checkpoint so a restarted server resumes where it stopped.
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }

    fn load_state(&mut self, _bytes: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// [`Strategy::aggregate`] for a strategy that streams: the buffered results folded into the
/// same running sum the streamed path builds (`fold`, as its plans say), then
/// [`Strategy::aggregate_sum`].
pub fn aggregate_folded<S: Strategy + ?Sized>(
    strategy: &mut S,
    fold: Fold,
    round: u32,
    global: &mut ModelState,
    results: &[Contribution],
    ctx: &RoundContext,
) -> Result<RoundOutcome, String> {
    let sum = RunningSum::of(results, fold)?;
    strategy.aggregate_sum(round, global, &sum, results, ctx)
}

/// A strategy's constructor: the shared settings and its own section, if any.
pub type Build = fn(StrategyConfig, Option<&Settings>) -> Result<Box<dyn Strategy>, String>;

/// How a settings type describes itself to the generated configuration reference
/// (`canopy config-reference`): its schema (types, doc comments) and its defaults, serialised.
pub type Describe = fn(&mut schemars::SchemaGenerator) -> (schemars::Schema, Settings);

/// [`Describe`] for a settings type.
pub fn describe<T: schemars::JsonSchema + Serialize + Default>(
    generator: &mut schemars::SchemaGenerator,
) -> (schemars::Schema, Settings) {
    let defaults = serde_json::to_value(T::default()).expect("settings serialise");
    (generator.subschema_for::<T>(), defaults)
}

/// One entry of the registry: a strategy's name, a line about it, its constructor and what its
/// own section (`[strategy.<name>]`) holds.
pub struct Method {
    pub name: &'static str,
    pub about: &'static str,
    pub build: Build,
    pub settings: Describe,
}

/// Every strategy, in the order dashboards list them. Adding a method adds a line here.
pub const METHODS: &[Method] = &[
    Method {
        name: "fedavg",
        about: "FedAvg: sample-weighted mean of the clients' weights",
        build: fedavg::build,
        settings: describe::<fedavg::NoSettings>,
    },
    Method {
        name: "fedavgm",
        about: "FedAvgM: FedAvg with server momentum",
        build: fedavgm::build,
        settings: describe::<FedavgmConfig>,
    },
    Method {
        name: "fedprox",
        about: "FedProx: FedAvg whose clients add the proximal term μ/2·‖w − w_global‖²",
        build: fedprox::build,
        settings: describe::<FedproxConfig>,
    },
    Method {
        name: "fedadagrad",
        about: "FedAdagrad: an Adagrad step on the mean client update (Reddi et al.)",
        build: fedopt::build_adagrad,
        settings: describe::<FedoptConfig>,
    },
    Method {
        name: "fedadam",
        about: "FedAdam: an Adam step on the mean client update (Reddi et al.)",
        build: fedopt::build_adam,
        settings: describe::<FedoptConfig>,
    },
    Method {
        name: "fedyogi",
        about: "FedYogi: a Yogi step on the mean client update (Reddi et al.)",
        build: fedopt::build_yogi,
        settings: describe::<FedoptConfig>,
    },
    Method {
        name: "dpfedavg",
        about: "DP-FedAvg: updates clipped to C, Gaussian noise on the sum, ε reported per round",
        build: dpfedavg::build,
        settings: describe::<DpConfig>,
    },
    Method {
        name: "autoflip",
        about: "AutoFLIP: loss exploration, then global informed pruning",
        build: autoflip::build,
        settings: describe::<AutoflipConfig>,
    },
    Method {
        name: "structured",
        about: "Automatic structured pruning: the model physically shrinks",
        build: structured::build,
        settings: describe::<StructuredConfig>,
    },
    Method {
        name: "hidenseek",
        about: "HideNseek: SynFlow pruning at init, clients learn weight signs (1 bit per weight up)",
        build: hidenseek::build_hidenseek,
        settings: describe::<SupermaskConfig>,
    },
    Method {
        name: "supermask",
        about: "Binary supermask over frozen random weights (FedPM's family), 1 bit per weight up",
        build: hidenseek::build_binary,
        settings: describe::<hidenseek::BinaryConfig>,
    },
    Method {
        name: "split",
        about: "Split learning: clients train a pruned front, the server the back, per batch",
        build: split::build,
        settings: describe::<SplitConfig>,
    },
    Method {
        name: "echo",
        about: "FedAvg with each batch's loss computed on the server (the in-round exchange)",
        build: echo::build,
        settings: describe::<fedavg::NoSettings>,
    },
];

pub fn lookup(name: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.name == name)
}

pub fn names() -> Vec<&'static str> {
    METHODS.iter().map(|m| m.name).collect()
}

/// The strategy called `name`, with the shared settings and its own section (if any).
pub fn build(
    name: &str,
    config: &StrategyConfig,
    settings: Option<&Settings>,
) -> Result<Box<dyn Strategy>, String> {
    let m = lookup(name)
        .ok_or_else(|| format!("unknown strategy '{name}' (known: {})", names().join(", ")))?;
    (m.build)(config.clone(), settings)
}

/// Samples ⌈C·K⌉ clients, at least `min_fit` (if that many are connected).
pub fn sample_clients(
    clients: &[ClientView],
    fraction: f64,
    min_fit: usize,
    rng: &mut StdRng,
) -> Vec<ClientView> {
    let k = clients.len();
    let m = ((fraction * k as f64).ceil() as usize).max(min_fit).min(k);
    let mut picked: Vec<ClientView> = clients.to_vec();
    picked.shuffle(rng);
    picked.truncate(m);
    picked.sort_by_key(|c| c.id);
    picked
}

/// Samples clients as `config` says and gives each the plain training task.
pub fn plain_round(
    round: u32,
    global: &ModelState,
    config: &StrategyConfig,
    clients: &[ClientView],
    rng: &mut StdRng,
    upload: UploadSpec,
) -> Vec<(u64, Task)> {
    let picked = sample_clients(clients, config.fraction, config.min_fit, rng);
    // Encoded once and shared by every sampled client's task.
    let model = Arc::new(codec::encode_model(global));
    picked
        .into_iter()
        .map(|c| (c.id, task_on(round, model.clone(), config, c.id, upload)))
        .collect()
}

/// A plain training task on the whole global model (masked if the model has a mask).
pub fn train_task(
    round: u32,
    global: &ModelState,
    config: &StrategyConfig,
    client: u64,
    upload: UploadSpec,
) -> Task {
    task_on(
        round,
        Arc::new(codec::encode_model(global)),
        config,
        client,
        upload,
    )
}

/// A plain training task on an encoded model that several clients' tasks share.
pub fn task_on(
    round: u32,
    model: Arc<crate::protocol::ModelPayload>,
    config: &StrategyConfig,
    client: u64,
    upload: UploadSpec,
) -> Task {
    Task {
        round,
        model,
        train: TrainSpec {
            epochs: config.epochs,
            batch_size: config.batch_size,
            lr: config.lr,
            optimizer: config.optimizer.clone(),
            // Different per client and round, reproducible per run.
            seed: config.seed ^ ((round as u64) << 32) ^ client,
            patience: 0,
            step: Step::default(),
        },
        upload,
        deadline_ms: config.deadline_ms,
    }
}

/// Checks a result against the task it answers and decodes its update. The server calls this
/// for every result, so strategies only ever see well-formed, finite, full-length vectors.
pub fn accept(
    client: u64,
    task: &Task,
    result: TaskResult,
    shard_samples: u64,
) -> Result<Contribution, String> {
    if result.round != task.round {
        return Err(format!(
            "result for round {} but the task was round {}",
            result.round, task.round
        ));
    }
    let codec::update::Decoded {
        kind,
        values,
        encoding,
    } = codec::decode_update(task, &result.update)?;
    if let Some(i) = first_not_finite(&values) {
        return Err(format!("update value {i} is {} (not finite)", values[i]));
    }
    if result.metrics.pruned_nonzero > 0 {
        return Err(format!(
            "the mask was not enforced: {} pruned parameters moved",
            result.metrics.pruned_nonzero
        ));
    }
    if let Some(crate::protocol::MaskSpec::Full { bits, .. }) = &task.model.mask {
        // A masked task's update must keep pruned entries at exactly zero (weights) or unchanged.
        let m = bits.unpack().map_err(|e| e.to_string())?;
        if let Some(i) = values.iter().zip(&m).position(|(v, k)| !k && *v != 0.0) {
            return Err(format!("update changes pruned parameter {i}"));
        }
    }
    if result.samples == 0 || result.samples > shard_samples {
        return Err(format!(
            "claims {} samples, the client's shard has {shard_samples}",
            result.samples
        ));
    }
    Ok(Contribution {
        client,
        samples: result.samples,
        kind,
        values,
        metrics: result.metrics,
        encoding,
    })
}

/// The index of the first NaN or infinity. Checked a block at a time without an early exit
/// inside the block, so the compiler can use vector lanes (every result is checked).
fn first_not_finite(values: &[f32]) -> Option<usize> {
    const BLOCK: usize = 256;
    values.chunks(BLOCK).enumerate().find_map(|(b, block)| {
        let bad = block.iter().fold(false, |bad, v| bad | !v.is_finite());
        bad.then(|| b * BLOCK + block.iter().position(|v| !v.is_finite()).unwrap_or(0))
    })
}

/// Sample-weighted mean of the contributions' vectors.
pub fn weighted_values(results: &[Contribution]) -> Result<Vec<f32>, String> {
    if results.is_empty() {
        return Err("nothing to aggregate".into());
    }
    let items: Vec<(&[f32], u64)> = results
        .iter()
        .map(|c| (c.values.as_slice(), c.samples))
        .collect();
    Ok(crate::aggregate::weighted_mean(&items))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_first_value_that_is_not_finite_is_found_in_any_block() {
        let mut v = vec![0.5f32; 1000];
        assert_eq!(super::first_not_finite(&v), None);
        for (at, bad) in [
            (0, f32::NAN),
            (255, f32::INFINITY),
            (256, f32::NEG_INFINITY),
            (999, f32::NAN),
        ] {
            v[at] = bad;
            assert_eq!(super::first_not_finite(&v), Some(at));
            v[at] = 0.5;
        }
        v[700] = f32::NAN;
        v[300] = f32::NAN;
        assert_eq!(super::first_not_finite(&v), Some(300));
    }

    #[test]
    fn sampling_respects_fraction_and_minimum() {
        let clients: Vec<ClientView> = (0..20).map(|id| ClientView { id, samples: 10 }).collect();
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(sample_clients(&clients, 0.25, 1, &mut rng).len(), 5);
        assert_eq!(sample_clients(&clients, 0.01, 3, &mut rng).len(), 3);
        assert_eq!(sample_clients(&clients[..2], 0.5, 3, &mut rng).len(), 2);
        let a = sample_clients(&clients, 0.25, 1, &mut StdRng::seed_from_u64(9));
        let b = sample_clients(&clients, 0.25, 1, &mut StdRng::seed_from_u64(9));
        assert_eq!(a, b);
    }

    #[test]
    fn unknown_strategy_is_an_error() {
        assert!(
            build("fedsgd", &StrategyConfig::default(), None)
                .err()
                .unwrap()
                .contains("fedavg, fedavgm")
        );
        for name in names() {
            assert!(
                build(name, &StrategyConfig::default(), None).is_ok(),
                "{name} builds with its defaults"
            );
        }
    }

    #[test]
    fn a_strategy_parses_its_own_section() {
        let ok = serde_json::json!({ "q": 0.5 });
        assert!(build("autoflip", &StrategyConfig::default(), Some(&ok)).is_ok());
        let typo = serde_json::json!({ "qq": 0.5 });
        let e = build("autoflip", &StrategyConfig::default(), Some(&typo))
            .err()
            .unwrap();
        assert!(e.contains("[strategy.autoflip]") && e.contains("qq"), "{e}");
        assert!(
            build("fedavg", &StrategyConfig::default(), Some(&ok))
                .err()
                .unwrap()
                .contains("[strategy.fedavg]")
        );
    }
}
