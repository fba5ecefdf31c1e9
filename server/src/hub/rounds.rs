//! The run's public state: what the run is, its phase and round, the finished rounds' records,
//! the bytes moved since the round began, and what the dashboard's controls asked for.

use std::time::Instant;

use canopy_core::protocol::RunInfo;
use canopy_core::strategy::Phase as StrategyPhase;
use serde::{Serialize, Serializer};

use crate::round::record::RoundRecord;

/// What the run is doing, as the dashboard shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    WaitingForClients,
    /// Clients are working on the round's tasks; the strategy names what kind of round it is.
    Round(StrategyPhase),
    Aggregating,
    /// Held at a round boundary by the dashboard's Pause (or before the first round with `hold`).
    Paused,
    Done,
    /// Ended early by the dashboard's Stop.
    Stopped,
}

impl Phase {
    pub fn name(&self) -> &str {
        match self {
            Phase::WaitingForClients => "waiting_for_clients",
            Phase::Round(p) => p.name(),
            Phase::Aggregating => "aggregating",
            Phase::Paused => "paused",
            Phase::Done => "done",
            Phase::Stopped => "stopped",
        }
    }

    pub fn is_over(&self) -> bool {
        matches!(self, Phase::Done | Phase::Stopped)
    }

    /// A round is under way (its count can no longer be taken back).
    pub fn is_busy(&self) -> bool {
        matches!(self, Phase::Round(_) | Phase::Aggregating)
    }
}

impl Serialize for Phase {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// What the dashboard's admin controls asked for. The round loop reads it at round boundaries.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Control {
    /// Do not start the next round.
    pub paused: bool,
    /// Waiting for the first Start (`run.hold`): a teacher lets the class join first.
    pub held: bool,
    /// End the run after the round in progress.
    pub stop: bool,
    /// Offer at most this many idle clients to the strategy each round.
    pub clients_per_round: Option<usize>,
    /// Strategy chosen for the next run (see `next-run.toml` in the run folder).
    pub next_strategy: Option<String>,
}

/// A buffered run's buffer between two steps, as the dashboard shows it (`[buffered]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BufferFill {
    /// The model version the buffer will make (the "round" of a buffered run).
    pub version: u32,
    /// Results in the buffer, of `size` (K) per step.
    pub filled: usize,
    pub size: usize,
    /// Clients training now, each on the version it was sent.
    pub in_flight: usize,
    /// Results dropped since the run began for being staler than `max_staleness` versions.
    pub stale_dropped: u64,
    pub max_staleness: u32,
}

/// The rounds of a run as the public sees them. Its rules: bytes count per round, rounds done
/// or under way cannot be taken back, an ended run cannot be started again.
pub struct Rounds {
    info: RunInfo,
    phase: Phase,
    round: u32,
    records: Vec<RoundRecord>,
    started: Instant,
    /// Bytes in and out since the current round began (frames as sent, headers excluded).
    bytes_up: u64,
    bytes_down: u64,
    control: Control,
    /// A buffered run's buffer (`None` in a run of rounds).
    buffer: Option<BufferFill>,
}

impl Rounds {
    /// A run waiting for clients; `done` are the rounds a resumed run already finished, and
    /// `hold` keeps it from starting before the dashboard's Start.
    pub fn new(info: RunInfo, done: Vec<RoundRecord>, hold: bool) -> Rounds {
        Rounds {
            info,
            phase: Phase::WaitingForClients,
            round: 0,
            records: done,
            started: Instant::now(),
            bytes_up: 0,
            bytes_down: 0,
            control: Control {
                held: hold,
                ..Control::default()
            },
            buffer: None,
        }
    }

    pub fn info(&self) -> &RunInfo {
        &self.info
    }

    pub fn phase(&self) -> Phase {
        self.phase.clone()
    }

    /// The round under way (or the last one, between rounds).
    pub fn round(&self) -> u32 {
        self.round
    }

    pub fn set_phase(&mut self, phase: Phase, round: u32) {
        self.phase = phase;
        self.round = round;
    }

    /// A new round starts: its byte counters begin at zero.
    pub fn begin_round(&mut self, round: u32, phase: StrategyPhase) {
        self.set_phase(Phase::Round(phase), round);
        self.bytes_up = 0;
        self.bytes_down = 0;
    }

    /// Counts bytes moved in this round.
    pub fn add_bytes(&mut self, up: u64, down: u64) {
        self.bytes_up += up;
        self.bytes_down += down;
    }

    /// Bytes (up, down) since the round began.
    pub fn bytes(&self) -> (u64, u64) {
        (self.bytes_up, self.bytes_down)
    }

    pub fn record(&mut self, record: RoundRecord) {
        self.records.push(record);
    }

    pub fn set_buffer(&mut self, fill: BufferFill) {
        self.buffer = Some(fill);
    }

    pub fn buffer(&self) -> Option<&BufferFill> {
        self.buffer.as_ref()
    }

    /// Finished rounds, in order.
    pub fn records(&self) -> &[RoundRecord] {
        &self.records
    }

    pub fn elapsed_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    // ---- the dashboard's controls ----

    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Rounds the run should have (the dashboard can change it).
    pub fn planned_rounds(&self) -> u32 {
        self.info.rounds
    }

    /// Changes the round count; rounds done or under way cannot be taken back.
    pub fn set_planned_rounds(&mut self, rounds: u32) -> Result<(), String> {
        if self.phase.is_over() {
            return Err("this run is over; its round count can no longer change".into());
        }
        let floor = (self.records.len() as u32)
            .max(if self.phase.is_busy() { self.round } else { 0 })
            .max(1);
        if rounds < floor {
            return Err(format!(
                "rounds must be at least {floor} (rounds done or under way)"
            ));
        }
        self.info.rounds = rounds;
        Ok(())
    }

    /// Starts a held run or resumes a paused one.
    pub fn start(&mut self) -> Result<(), String> {
        if self.phase.is_over() {
            return Err("this run is over; start the next one with the command in next-run.toml or restart the server".into());
        }
        self.control.paused = false;
        self.control.held = false;
        Ok(())
    }

    pub fn pause(&mut self) {
        self.control.paused = true;
    }

    pub fn stop(&mut self) {
        self.control.stop = true;
    }

    pub fn set_clients_per_round(&mut self, n: Option<usize>) {
        self.control.clients_per_round = n;
    }

    pub fn set_next_strategy(&mut self, name: String) {
        self.control.next_strategy = Some(name);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn info(rounds: u32) -> RunInfo {
        RunInfo {
            run_id: "test".into(),
            strategy: "fedavg".into(),
            model: "mlp".into(),
            dataset: "synthetic".into(),
            partition: "iid".into(),
            rounds,
            classes: Vec::new(),
        }
    }

    fn done(n: u32) -> Vec<RoundRecord> {
        (1..=n)
            .map(|round| RoundRecord {
                round,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn phases_name_themselves_and_say_whether_a_round_is_under_way() {
        let training = Phase::Round(StrategyPhase::Training);
        assert_eq!(training.name(), "training");
        assert_eq!(Phase::WaitingForClients.name(), "waiting_for_clients");
        assert_eq!(serde_json::to_value(Phase::Paused).unwrap(), "paused");
        assert!(training.is_busy() && Phase::Aggregating.is_busy());
        assert!(!Phase::Paused.is_busy() && !Phase::Done.is_busy());
        assert!(Phase::Done.is_over() && Phase::Stopped.is_over());
        assert!(!Phase::Paused.is_over());
    }

    #[test]
    fn hold_pause_start_and_stop_set_the_controls() {
        let mut r = Rounds::new(info(3), Vec::new(), true);
        assert!(r.control().held && !r.control().paused);
        r.pause();
        assert!(r.control().paused);
        r.start().unwrap();
        assert!(!r.control().held && !r.control().paused);
        r.set_clients_per_round(Some(4));
        r.set_next_strategy("fedprox".into());
        r.stop();
        let c = r.control();
        assert!(c.stop);
        assert_eq!(c.clients_per_round, Some(4));
        assert_eq!(c.next_strategy.as_deref(), Some("fedprox"));

        // An ended run cannot be started again, nor its round count changed.
        r.pause();
        r.set_phase(Phase::Stopped, 2);
        assert!(r.start().unwrap_err().contains("this run is over"));
        assert!(r.control().paused, "a refused start changes nothing");
        assert!(r.set_planned_rounds(5).is_err());
    }

    #[test]
    fn rounds_done_or_under_way_cannot_be_taken_back() {
        // A resumed run that finished two rounds.
        let mut r = Rounds::new(info(5), done(2), false);
        assert_eq!(r.records().len(), 2);
        assert_eq!(
            r.set_planned_rounds(1).unwrap_err(),
            "rounds must be at least 2 (rounds done or under way)"
        );
        r.begin_round(3, StrategyPhase::Training);
        assert!(r.set_planned_rounds(2).is_err());
        r.set_planned_rounds(3).unwrap();
        assert_eq!(r.planned_rounds(), 3);
        assert_eq!(r.info().rounds, 3);
        // Between rounds only the finished ones count.
        r.record(RoundRecord {
            round: 3,
            ..Default::default()
        });
        r.set_phase(Phase::Paused, 3);
        r.set_planned_rounds(3).unwrap();
        assert!(r.set_planned_rounds(2).is_err());
        // Never fewer than one round.
        let mut fresh = Rounds::new(info(5), Vec::new(), false);
        assert!(fresh.set_planned_rounds(0).is_err());
        fresh.set_planned_rounds(1).unwrap();
    }

    #[test]
    fn bytes_count_per_round() {
        let mut r = Rounds::new(info(3), Vec::new(), false);
        assert_eq!((r.phase(), r.round()), (Phase::WaitingForClients, 0));
        r.add_bytes(10, 20);
        r.begin_round(1, StrategyPhase::Training);
        assert_eq!(r.bytes(), (0, 0), "a round starts from zero");
        r.add_bytes(5, 0);
        r.add_bytes(1, 100);
        assert_eq!(r.bytes(), (6, 100));
        r.set_phase(Phase::Aggregating, 1);
        assert_eq!(
            r.bytes(),
            (6, 100),
            "a phase change within the round keeps them"
        );
        r.begin_round(2, StrategyPhase::Own("exploring".into()));
        assert_eq!(
            (r.phase().name(), r.round(), r.bytes()),
            ("exploring", 2, (0, 0))
        );
    }
}
