//! Splitting a dataset across clients: IID, Dirichlet label skew, pathological shards.
//! Every split is a pure function of the labels, the settings and the seed.

use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

use crate::data::Dataset;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Partition {
    Iid,
    /// Per class, client shares drawn from Dirichlet(α): small α, strong label skew.
    Dirichlet {
        alpha: f64,
    },
    /// Sort by label, cut into `clients × shards_per_client` shards, deal them out
    /// (FedAvg's pathological non-IID split: 2 shards gives about 2 classes per client).
    Shards {
        shards_per_client: usize,
    },
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Partition::Iid => write!(f, "iid"),
            Partition::Dirichlet { alpha } => write!(f, "dirichlet({alpha})"),
            Partition::Shards { shards_per_client } => write!(f, "shards({shards_per_client})"),
        }
    }
}

/// One client's data: what it trains on and its local held-out split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub train: Dataset,
    pub test: Dataset,
}

impl Partition {
    /// Indices of the samples each of `clients` clients gets. Every client gets at least one
    /// sample when there are enough samples.
    pub fn assign(
        &self,
        labels: &[u8],
        classes: usize,
        clients: usize,
        seed: u64,
    ) -> Vec<Vec<usize>> {
        assert!(clients > 0, "need at least one client");
        let mut rng = StdRng::seed_from_u64(seed);
        let mut parts = vec![Vec::new(); clients];
        match *self {
            Partition::Iid => {
                let mut idx: Vec<usize> = (0..labels.len()).collect();
                idx.shuffle(&mut rng);
                for (i, s) in idx.into_iter().enumerate() {
                    parts[i % clients].push(s);
                }
            }
            Partition::Dirichlet { alpha } => {
                let gamma = Gamma::new(alpha.max(1e-6), 1.0).expect("positive alpha");
                for class in 0..classes {
                    let mut idx: Vec<usize> = (0..labels.len())
                        .filter(|&i| labels[i] as usize == class)
                        .collect();
                    idx.shuffle(&mut rng);
                    let draws: Vec<f64> = (0..clients)
                        .map(|_| gamma.sample(&mut rng) + 1e-12)
                        .collect();
                    let total: f64 = draws.iter().sum();
                    // Cumulative cut points from the proportions.
                    let mut start = 0;
                    let mut acc = 0.0;
                    for (k, d) in draws.iter().enumerate() {
                        acc += d / total;
                        let end = if k + 1 == clients {
                            idx.len()
                        } else {
                            (acc * idx.len() as f64).round() as usize
                        };
                        let end = end.clamp(start, idx.len());
                        parts[k].extend_from_slice(&idx[start..end]);
                        start = end;
                    }
                }
                // A client left empty by a very skewed draw takes one sample from the largest.
                for k in 0..clients {
                    if parts[k].is_empty() {
                        let big = (0..clients).max_by_key(|&j| parts[j].len()).unwrap();
                        if parts[big].len() > 1 {
                            let s = parts[big].pop().unwrap();
                            parts[k].push(s);
                        }
                    }
                }
                for p in &mut parts {
                    p.shuffle(&mut rng);
                }
            }
            Partition::Shards { shards_per_client } => {
                let mut idx: Vec<usize> = (0..labels.len()).collect();
                // Stable sort by label after a shuffle: ties land in random order.
                idx.shuffle(&mut rng);
                idx.sort_by_key(|&i| labels[i]);
                let n_shards = clients * shards_per_client.max(1);
                let mut order: Vec<usize> = (0..n_shards).collect();
                order.shuffle(&mut rng);
                let shard_len = labels.len() / n_shards;
                for (pos, &shard) in order.iter().enumerate() {
                    let start = shard * shard_len;
                    let end = if shard + 1 == n_shards {
                        labels.len()
                    } else {
                        start + shard_len
                    };
                    parts[pos % clients].extend_from_slice(&idx[start..end]);
                }
                for p in &mut parts {
                    p.shuffle(&mut rng);
                }
            }
        }
        parts
    }

    /// Splits `data` into one [`Shard`] per client, each holding back `local_test` of its samples.
    pub fn split(&self, data: &Dataset, clients: usize, local_test: f64, seed: u64) -> Vec<Shard> {
        self.assign(&data.labels, data.classes, clients, seed)
            .into_iter()
            .enumerate()
            .map(|(index, idx)| {
                let mine = data.select(&idx);
                let (train, test) = mine.split(local_test, seed ^ (index as u64 + 1));
                Shard { index, train, test }
            })
            .collect()
    }
}

/// Mean over clients of the total-variation distance between the client's label distribution and
/// the global one: 0 for identical distributions, near 1 for disjoint ones.
pub fn label_skew(labels: &[u8], classes: usize, parts: &[Vec<usize>]) -> f64 {
    let mut global = vec![0f64; classes];
    for &l in labels {
        global[l as usize] += 1.0 / labels.len() as f64;
    }
    let mut sum = 0.0;
    let mut n = 0;
    for p in parts.iter().filter(|p| !p.is_empty()) {
        let mut local = vec![0f64; classes];
        for &i in p {
            local[labels[i] as usize] += 1.0 / p.len() as f64;
        }
        sum += 0.5
            * local
                .iter()
                .zip(&global)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>();
        n += 1;
    }
    sum / n.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<u8> {
        (0..5000).map(|i| (i % 10) as u8).collect()
    }

    fn check_cover(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "every sample exactly once");
    }

    #[test]
    fn iid_sizes_are_even() {
        let l = labels();
        let parts = Partition::Iid.assign(&l, 10, 7, 1);
        check_cover(&parts, l.len());
        for p in &parts {
            assert!(p.len() == 714 || p.len() == 715);
        }
        assert!(label_skew(&l, 10, &parts) < 0.08);
    }

    #[test]
    fn dirichlet_skew_grows_as_alpha_falls() {
        let l = labels();
        let skew = |alpha| {
            let parts = Partition::Dirichlet { alpha }.assign(&l, 10, 20, 3);
            check_cover(&parts, l.len());
            assert!(parts.iter().all(|p| !p.is_empty()));
            label_skew(&l, 10, &parts)
        };
        let (s01, s05, s10, s100) = (skew(0.1), skew(0.5), skew(1.0), skew(100.0));
        assert!(
            s01 > s05 && s05 > s10 && s10 > s100,
            "{s01} {s05} {s10} {s100}"
        );
        assert!(s01 > 0.6, "alpha 0.1 should be strongly skewed: {s01}");
        assert!(s100 < 0.15, "alpha 100 should be near IID: {s100}");
    }

    #[test]
    fn shards_give_two_classes_each() {
        let l = labels();
        let parts = Partition::Shards {
            shards_per_client: 2,
        }
        .assign(&l, 10, 20, 5);
        check_cover(&parts, l.len());
        for p in &parts {
            let mut classes: Vec<u8> = p.iter().map(|&i| l[i]).collect();
            classes.sort();
            classes.dedup();
            assert!(classes.len() <= 2, "{classes:?}");
            assert_eq!(p.len(), 250);
        }
    }

    #[test]
    fn partitions_are_deterministic() {
        let l = labels();
        for part in [
            Partition::Iid,
            Partition::Dirichlet { alpha: 0.3 },
            Partition::Shards {
                shards_per_client: 2,
            },
        ] {
            assert_eq!(part.assign(&l, 10, 9, 42), part.assign(&l, 10, 9, 42));
            assert_ne!(part.assign(&l, 10, 9, 42), part.assign(&l, 10, 9, 43));
        }
    }
}
