//! Names of the figures reported per round (`RoundOutcome::metrics` from strategies, the round
//! loop's own `server.*`, `robust.*` and `late_results`; a round record's `extra`). Rust code uses these constants; the dashboard reads the same names from
//! `metric_keys` in `/api/metrics` rather than spelling them itself.

use serde::Serialize;

/// Fraction of all parameters a mask prunes.
pub const SPARSITY: &str = "sparsity";
/// FLOPs per sample with pruned weights skipped.
pub const EFFECTIVE_FLOPS: &str = "effective_flops";
/// Effective over dense FLOPs.
pub const FLOPS_RATIO: &str = "flops_ratio";
/// Units removed by structured pruning this round.
pub const PRUNED_UNITS: &str = "pruned_units";

/// In-round exchange requests the server answered this round.
pub const EXCHANGES: &str = "exchanges";

/// Fraction of the weights a pruning-at-init mask keeps.
pub const DENSITY: &str = "density";
/// Mean upload payload in bits per surviving weight (frame envelopes excluded).
pub const UPLOAD_BITS_PER_WEIGHT: &str = "upload_bits_per_weight";
/// Fraction of uploaded tensors that travelled as flips rather than bit-packed.
pub const FLIP_TENSORS: &str = "flip_tensors";
/// Fraction of the kept entries whose global bit changed in the vote.
pub const BITS_CHANGED: &str = "bits_changed";
/// Fraction of the kept entries a binary supermask has switched on.
pub const MASK_ON: &str = "mask_on";

/// AutoFLIP: the fraction pruned after exploration; the automatic choice of it (when asked), with
/// the validation loss of the unpruned model and of the chosen pruned one.
pub const Q: &str = "q";
pub const Q_AUTO: &str = "q_auto";
pub const Q_AUTO_DENSE_VAL_LOSS: &str = "q_auto_dense_val_loss";
pub const Q_AUTO_VAL_LOSS: &str = "q_auto_val_loss";
/// AutoFLIP: clients that explored, and their mean exploration epochs.
pub const EXPLORE_CLIENTS: &str = "explore_clients";
pub const EXPLORE_EPOCHS_MEAN: &str = "explore_epochs_mean";
/// AutoFLIP: 1 in a round that re-pruned the mask.
pub const REPRUNED: &str = "repruned";

/// Structured pruning: validation accuracy of the round's trained model and of the model after
/// surgery (present only with a validation split).
pub const VAL_ACC_TRAINED: &str = "val_acc_trained";
pub const VAL_ACC_AFTER_SURGERY: &str = "val_acc_after_surgery";
/// Structured pruning: 1 while pruning is active; the next round's model size and cost.
pub const PRUNING_ACTIVE: &str = "pruning_active";
pub const PARAMS_NEXT: &str = "params_next";
pub const FLOPS_NEXT: &str = "flops_next";

/// FedAvgM: the norm of the server's velocity after the round.
pub const SERVER_VELOCITY_NORM: &str = "server_velocity_norm";

/// DP-FedAvg: ε spent so far for δ, with the round's noise multiplier z, clip C and sampling
/// rate q.
pub const DP_EPSILON: &str = "dp_epsilon";
pub const DP_DELTA: &str = "dp_delta";
pub const DP_NOISE: &str = "dp_noise";
pub const DP_CLIP: &str = "dp_clip";
pub const DP_SAMPLING_RATE: &str = "dp_sampling_rate";

/// A buffered run (`[buffered]`, FedBuff), per step (one model version): K, the results each
/// step takes; the mean and largest staleness (versions between a result's task and its step)
/// of the step's results; results dropped since the last step for being staler than
/// `max_staleness`; clients training when the step was taken.
pub const BUFFER_SIZE: &str = "buffer.size";
pub const BUFFER_STALENESS_MEAN: &str = "buffer.staleness_mean";
pub const BUFFER_STALENESS_MAX: &str = "buffer.staleness_max";
pub const BUFFER_STALE_DROPPED: &str = "buffer.stale_dropped";
pub const BUFFER_IN_FLIGHT: &str = "buffer.in_flight";

/// Results from the previous round folded into this one (`run.late_results = "next_round"`).
pub const LATE_RESULTS: &str = "late_results";

/// On a root: edges' partials its defence left out of the round (far from every other
/// partial); their results are not in the round's results. Absent: none.
pub const PARTIALS_LEFT_OUT: &str = "partials_left_out";

/// The robust layer per round (written by the round loop for every strategy): the median update
/// norm, how many updates were clipped, down-weighted and rejected, and the largest norm ratio.
pub const ROBUST_MEDIAN_NORM: &str = "robust.median_norm";
pub const ROBUST_CLIPPED: &str = "robust.clipped";
pub const ROBUST_DOWN_WEIGHTED: &str = "robust.down_weighted";
pub const ROBUST_REJECTED: &str = "robust.rejected";
pub const ROBUST_MAX_NORM_RATIO: &str = "robust.max_norm_ratio";

/// The server's own work per round (written by the round loop, not a strategy): 1 when the
/// round was aggregated from running sums as results arrived, 0 when results were buffered.
pub const SERVER_STREAMED: &str = "server.streamed";
/// Milliseconds to configure the round and queue every task frame.
pub const SERVER_SEND_MS: &str = "server.send_ms";
/// Milliseconds spent validating results and folding (or buffering) them, summed over the round.
pub const SERVER_FOLD_MS: &str = "server.fold_ms";
/// Milliseconds from the end of collection to the new model (robust layer and strategy).
pub const SERVER_AGGREGATE_MS: &str = "server.aggregate_ms";
/// How long a result waited between its session reading it and the round loop having
/// validated and folded it: median and 99th percentile, in milliseconds.
pub const SERVER_RESULT_WAIT_P50_MS: &str = "server.result_wait_p50_ms";
pub const SERVER_RESULT_WAIT_P99_MS: &str = "server.result_wait_p99_ms";

/// Split learning: the cut (weight layers in the front), ρ, κ and b of the round.
pub const SPLIT_CUT: &str = "split_cut";
pub const SPLIT_PRUNE: &str = "split_prune";
pub const SPLIT_KEEP: &str = "split_keep";
pub const SPLIT_BITS: &str = "split_bits";
/// Bytes of activation requests received this round (all clients, frame payloads).
pub const ACT_BYTES_UP: &str = "act_bytes_up";
/// Bytes of gradient replies sent this round.
pub const GRAD_BYTES_DOWN: &str = "grad_bytes_down";
/// Seconds the server spent on clients' batches this round (summed over workers).
pub const SERVER_SECONDS: &str = "server_seconds";
/// Mean client compute per batch in milliseconds (training time minus waiting for replies).
pub const TAB_MS_PER_BATCH: &str = "tab_ms_per_batch";
/// The most batches the server worked on at the same time this round.
pub const EXCHANGES_AT_ONCE: &str = "exchanges_at_once";
/// How often consecutive batches the server answered came from different clients (clients
/// served one after another would give one per round).
pub const EXCHANGE_SWITCHES: &str = "exchange_switches";
/// Parameters of the front the clients trained.
pub const FRONT_PARAMS: &str = "front_params";

/// Fraction of one weight tensor a pruning-at-init mask keeps, e.g. `density.layers.1.weight`.
pub fn tensor_density(param: &str) -> String {
    format!("{DENSITY}.{param}")
}

/// Supermasks: fraction of one tensor's kept entries whose effective weight is positive, e.g.
/// `positive.layers.1.weight`. The inputs are pixels (never negative), so a first layer far
/// below one half has units that no input switches on (a dead network learns nothing).
pub fn tensor_positive(param: &str) -> String {
    format!("positive.{param}")
}

/// Fraction of one tensor a mask prunes, e.g. `sparsity.layers.1.weight`.
pub fn tensor_sparsity(param: &str) -> String {
    format!("{SPARSITY}.{param}")
}

/// Width (units or filters) of hidden layer number `i` among the prunable layers.
pub fn width(i: usize) -> String {
    format!("width.{i}")
}

/// Bytes of the parameters of layer `layer` (e.g. `bytes.layers.3`).
pub fn layer_bytes(layer: usize) -> String {
    format!("bytes.layers.{layer}")
}

/// What `/api/metrics` publishes so the dashboard needs no copy of these names: how to draw each
/// per-round figure (see [`FIGURES`]) and where per-tensor figures start.
#[derive(Serialize)]
pub struct Published {
    /// Prefix of per-tensor sparsity: `<prefix><parameter name>`.
    pub tensor_sparsity_prefix: String,
    /// Prefix of per-tensor density: `<prefix><parameter name>`.
    pub tensor_density_prefix: String,
    pub figures: &'static [Figure],
    pub sentences: Vec<String>,
}

pub fn published() -> Published {
    Published {
        tensor_sparsity_prefix: tensor_sparsity(""),
        tensor_density_prefix: tensor_density(""),
        figures: FIGURES,
        sentences: sentences(),
    }
}

/// How the dashboard draws one per-round figure, when a round's `extra` reports it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Figure {
    pub key: &'static str,
    /// What the figure is called on a chart.
    pub label: &'static str,
    pub kind: Kind,
    pub panel: Panel,
}

/// What a figure's value is, which says how it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Between 0 and 1, written as a percentage.
    Fraction,
    Bytes,
    /// A whole number.
    Count,
    /// Any other number, written as it is.
    Number,
    Seconds,
    Milliseconds,
    /// Bits per weight.
    Bits,
}

/// Where a figure is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Panel {
    /// A line on the chart of bytes per round (left axis).
    Traffic,
    /// A line on the chart of model size (right axis, 0 to 1).
    Size,
    /// Only in a sentence under the chart of bytes (see [`sentences`]).
    Summary,
}

const fn figure(key: &'static str, label: &'static str, kind: Kind, panel: Panel) -> Figure {
    Figure {
        key,
        label,
        kind,
        panel,
    }
}

/// The per-round figures the dashboard draws, each where a round reports it. The order is the
/// order of lines on a chart (and picks each line's colour).
pub const FIGURES: &[Figure] = &[
    figure(SPARSITY, "sparsity", Kind::Fraction, Panel::Size),
    figure(DENSITY, "density", Kind::Fraction, Panel::Size),
    figure(
        UPLOAD_BITS_PER_WEIGHT,
        "bits/weight up",
        Kind::Bits,
        Panel::Size,
    ),
    figure(ACT_BYTES_UP, "activations up", Kind::Bytes, Panel::Traffic),
    figure(
        GRAD_BYTES_DOWN,
        "gradients down",
        Kind::Bytes,
        Panel::Traffic,
    ),
    figure(SPLIT_CUT, "cut layer", Kind::Count, Panel::Summary),
    figure(SPLIT_PRUNE, "front pruned", Kind::Fraction, Panel::Summary),
    figure(
        FRONT_PARAMS,
        "parameters in tabs",
        Kind::Count,
        Panel::Summary,
    ),
    figure(SPLIT_KEEP, "κ", Kind::Number, Panel::Summary),
    figure(SPLIT_BITS, "gradient bits", Kind::Count, Panel::Summary),
    figure(EXCHANGES, "exchanges", Kind::Count, Panel::Summary),
    figure(
        TAB_MS_PER_BATCH,
        "tab per batch",
        Kind::Milliseconds,
        Panel::Summary,
    ),
    figure(
        SERVER_SECONDS,
        "server seconds",
        Kind::Seconds,
        Panel::Summary,
    ),
    figure(BUFFER_SIZE, "buffer K", Kind::Count, Panel::Summary),
    figure(
        BUFFER_STALENESS_MEAN,
        "mean staleness",
        Kind::Number,
        Panel::Summary,
    ),
    figure(
        BUFFER_STALENESS_MAX,
        "largest staleness",
        Kind::Count,
        Panel::Summary,
    ),
    figure(
        BUFFER_STALE_DROPPED,
        "dropped as stale",
        Kind::Count,
        Panel::Summary,
    ),
    figure(BUFFER_IN_FLIGHT, "training", Kind::Count, Panel::Summary),
    figure(DP_EPSILON, "privacy ε", Kind::Number, Panel::Summary),
    figure(DP_DELTA, "δ", Kind::Number, Panel::Summary),
    figure(DP_NOISE, "noise z", Kind::Number, Panel::Summary),
    figure(DP_CLIP, "clip C", Kind::Number, Panel::Summary),
    figure(
        DP_SAMPLING_RATE,
        "sampling q",
        Kind::Fraction,
        Panel::Summary,
    ),
];

/// Where a sentence puts figure `key` of the last round: `{key}`.
fn slot(key: &str) -> String {
    format!("{{{key}}}")
}

/// Where a sentence puts figure `key` divided by figure `per` of the same round: `{key/per}`.
fn slot_per(key: &str, per: &str) -> String {
    format!("{{{key}/{per}}}")
}

/// Sentences under the chart of bytes, each shown when the last round reports one of its
/// figures: `{key}` (or `{key/per}`) stands for a figure written as its [`Kind`] says.
pub fn sentences() -> Vec<String> {
    vec![
        format!(
            "split at layer {} · front pruned {} ({} parameters in tabs) · κ {} · {}-bit gradients \
         · per batch {} up, {} down · tab {}, server {} per batch",
            slot(SPLIT_CUT),
            slot(SPLIT_PRUNE),
            slot(FRONT_PARAMS),
            slot(SPLIT_KEEP),
            slot(SPLIT_BITS),
            slot_per(ACT_BYTES_UP, EXCHANGES),
            slot_per(GRAD_BYTES_DOWN, EXCHANGES),
            slot(TAB_MS_PER_BATCH),
            slot_per(SERVER_SECONDS, EXCHANGES),
        ),
        format!(
            "buffered: each version from {} results · staleness mean {}, largest {} versions · {} dropped as too stale · {} clients training",
            slot(BUFFER_SIZE),
            slot(BUFFER_STALENESS_MEAN),
            slot(BUFFER_STALENESS_MAX),
            slot(BUFFER_STALE_DROPPED),
            slot(BUFFER_IN_FLIGHT),
        ),
        format!(
            "differential privacy: ε {} at δ {} so far · noise z {} · clip C {} · sampling q {}",
            slot(DP_EPSILON),
            slot(DP_DELTA),
            slot(DP_NOISE),
            slot(DP_CLIP),
            slot(DP_SAMPLING_RATE),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_is_described_once_and_sentences_name_described_figures() {
        for (i, f) in FIGURES.iter().enumerate() {
            assert!(
                FIGURES[..i].iter().all(|g| g.key != f.key),
                "{} twice",
                f.key
            );
        }
        for s in sentences() {
            let slots: Vec<&str> = s
                .split('{')
                .skip(1)
                .map(|t| t.split('}').next().unwrap())
                .collect();
            assert!(!slots.is_empty(), "{s}");
            for key in slots.iter().flat_map(|t| t.split('/')) {
                assert!(FIGURES.iter().any(|f| f.key == key), "{key} in {s}");
            }
        }
        let json = serde_json::to_value(published()).unwrap();
        assert_eq!(json["figures"][0]["kind"], "fraction");
        assert_eq!(json["figures"][3]["panel"], "traffic");
    }
}
