//! The lab: tools that run around a server, never inside one. Native simulated clients
//! ([`sim`]), poisoned clients for the attack table ([`poison`], [`attack`], across edges [`attack_edges`]), many synthetic
//! clients ([`load`]), a long run under churn and faults ([`soak`]), comparisons of strategies on the same splits ([`compare`]) and speed
//! figures ([`bench`], [`bench_split`]). Each is a `canopy` subcommand.

pub mod attack;
pub mod attack_edges;
pub mod bench;
pub mod bench_split;
pub mod compare;
pub mod load;
pub mod poison;
pub mod sim;
pub mod soak;
