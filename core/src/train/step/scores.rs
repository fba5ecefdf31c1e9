//! Learning scores over frozen weights (supermasks): the weights never change; the sign or the
//! keep-bit of each score decides how its weight enters the model. A client's own scores are
//! kept between tasks by [`OwnScores`].

use std::borrow::Cow;

use burn::tensor::{Device, Tensor, TensorData};

use super::{Frozen, Given, Learn, Learner, Personal, Reparam, Start, SupermaskKind};
use crate::model::Net;
use crate::model::arch::Arch;

pub struct Scores {
    kind: SupermaskKind,
    /// Per tensor: |θ₀| ⊙ M (sign) or θ₀ ⊙ M (keep), constants.
    base: Vec<Tensor<1>>,
}

impl Scores {
    pub fn new(arch: &Arch, frozen: Frozen, mask: Option<&[bool]>, device: &Device) -> Scores {
        let base = arch
            .params()
            .iter()
            .map(|p| {
                let v: Vec<f32> = (p.offset..p.offset + p.len)
                    .map(|i| {
                        let kept = mask.is_none_or(|m| m[i]) as u8 as f32;
                        kept * match frozen.kind {
                            SupermaskKind::Sign => frozen.theta0[i].abs(),
                            SupermaskKind::Keep => frozen.theta0[i],
                        }
                    })
                    .collect();
                Tensor::from_data(TensorData::new(v, [p.len]), device)
            })
            .collect();
        Scores {
            kind: frozen.kind,
            base,
        }
    }
}

impl Reparam for Scores {
    fn weights(&self, learned: &Net) -> Vec<Tensor<1>> {
        learned
            .params
            .iter()
            .zip(&self.base)
            .map(|(s, base)| {
                let s = s.val();
                // One comparison either way (burn's `sign()` costs several passes on the CPU
                // backends); a score of exactly zero counts as negative.
                let positive = s.clone().greater_elem(0.0).float();
                let hard = match self.kind {
                    SupermaskKind::Sign => positive * 2.0 - 1.0,
                    SupermaskKind::Keep => positive,
                };
                // Straight-through: the forward pass sees `hard`, the gradient reaches `s` as if
                // the sign (or threshold) were the identity.
                let ste = (hard - s.clone()).detach() + s;
                base.clone() * ste
            })
            .collect()
    }
}

/// This client's own supermask scores (personalisation), kept from task to task; how a task's
/// scores start from them and the task's bits is the task's [`Personal`].
#[derive(Default)]
pub struct OwnScores {
    scores: Option<Vec<f32>>,
}

impl OwnScores {
    /// Where a task's scores start. The first time (or with `Personal::None`): |θ₀| signed by
    /// the task's bits, so the model starts as the global one. After that, see [`Personal`].
    fn start_scores(
        &self,
        theta0: &[f32],
        mask: Option<&[bool]>,
        bits: &[bool],
        personal: Personal,
    ) -> Vec<f32> {
        let own = self
            .scores
            .as_ref()
            .filter(|s| personal != Personal::None && s.len() == theta0.len());
        let mut b = bits.iter();
        (0..theta0.len())
            .map(|i| {
                if mask.is_some_and(|m| !m[i]) {
                    return 0.0;
                }
                let sign = if *b.next().expect("one bit per kept entry") {
                    1.0
                } else {
                    -1.0
                };
                // A zero score would have no sign: keep a floor.
                let init = theta0[i].abs().max(1e-6);
                match (own.map(|s| s[i]), personal) {
                    (None, _) | (_, Personal::None) => sign * init,
                    (Some(s), Personal::Magnitudes) => sign * s.abs().max(1e-6),
                    (Some(s), Personal::Own) => s,
                    (Some(s), Personal::OwnPlusGlobal) => s + sign * init,
                }
            })
            .collect()
    }
}

impl Learner for OwnScores {
    fn start<'a>(&mut self, learn: Learn, given: Given<'a>) -> Result<Start<'a>, String> {
        let Learn::Scores { personal } = learn else {
            return Err("the scores' learner got a task that learns no scores".into());
        };
        let (frozen, bits) = given
            .supermask
            .ok_or("the task learns scores but its model is no supermask")?;
        let start = self.start_scores(frozen.theta0, given.mask, bits, personal);
        Ok(Start {
            learned: Cow::Owned(start),
            frozen: Some(frozen),
        })
    }

    /// Keeps the learned scores; the model computes with the effective weights of their bits.
    fn finish(&mut self, given: Given, learned: Vec<f32>) -> Vec<f32> {
        let Some((frozen, _)) = given.supermask else {
            return learned;
        };
        let weights = effective(frozen, given.mask, &learned);
        self.scores = Some(learned);
        weights
    }
}

/// The weights scores stand for (what the forward pass computes with): on the kept entries
/// |θ₀| signed by the score (sign) or θ₀ where the score is positive (keep); zero elsewhere.
/// The same as `codec::supermask::effective` of the scores' bits.
fn effective(frozen: Frozen, mask: Option<&[bool]>, scores: &[f32]) -> Vec<f32> {
    (0..frozen.theta0.len())
        .map(|i| {
            if mask.is_some_and(|m| !m[i]) {
                return 0.0;
            }
            let (w, on) = (frozen.theta0[i], scores[i] > 0.0);
            match (frozen.kind, on) {
                (SupermaskKind::Sign, true) => w.abs(),
                (SupermaskKind::Sign, false) => -w.abs(),
                (SupermaskKind::Keep, true) => w,
                (SupermaskKind::Keep, false) => 0.0,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::Learners;
    use super::*;

    const THETA0: [f32; 4] = [0.5, -0.25, 0.0, 2.0];
    /// The third entry pruned: the bits cover the other three.
    const MASK: [bool; 4] = [true, true, false, true];

    fn given<'a>(kind: SupermaskKind, bits: &'a [bool]) -> Given<'a> {
        Given {
            params: &[0.0; 4],
            mask: Some(&MASK),
            supermask: Some((
                Frozen {
                    kind,
                    theta0: &THETA0,
                },
                bits,
            )),
        }
    }

    fn start(learners: &mut Learners, personal: Personal, bits: &[bool]) -> Vec<f32> {
        let learn = Learn::Scores { personal };
        let s = learners
            .get(learn)
            .start(learn, given(SupermaskKind::Sign, bits))
            .unwrap();
        assert!(s.frozen.is_some(), "scores act on the frozen weights");
        s.learned.into_owned()
    }

    #[test]
    fn personal_scores_keep_their_magnitudes_and_take_the_tasks_signs() {
        let mut learners = Learners::default();
        let learn = Learn::Scores {
            personal: Personal::Magnitudes,
        };
        // The first time: |θ₀|, signed by the task's bits; pruned entries zero.
        assert_eq!(
            start(&mut learners, Personal::Magnitudes, &[true, false, true]),
            [0.5, -0.25, 0.0, 2.0]
        );
        // Training ends with these scores; the model computes with their effective weights.
        let g = given(SupermaskKind::Sign, &[true, false, true]);
        let weights = learners.get(learn).finish(g, vec![-3.0, 0.75, 0.0, 0.0]);
        assert_eq!(weights, [-0.5, 0.25, 0.0, -2.0]);
        // The next task: the kept magnitudes (a zero one floored), the new task's signs.
        assert_eq!(
            start(&mut learners, Personal::Magnitudes, &[false, true, true]),
            [-3.0, 0.75, 0.0, 1e-6]
        );
    }

    #[test]
    fn own_scores_carry_their_signs_and_the_global_sign_only_tips_weak_ones() {
        let bits = [true, false, true];
        for (personal, next) in [
            // Its own scores as they were, whatever the task's bits say.
            (Personal::Own, [-3.0, 0.75, 0.0, 0.01]),
            // Plus the task's sign at |θ₀| (+0.5, +0.25, −2.0 for the bits below): the strong
            // own scores keep their signs, the weak last one takes the global sign.
            (Personal::OwnPlusGlobal, [-2.5, 1.0, 0.0, -1.99]),
        ] {
            let mut learners = Learners::default();
            let learn = Learn::Scores { personal };
            start(&mut learners, personal, &bits);
            let g = given(SupermaskKind::Sign, &bits);
            learners.get(learn).finish(g, vec![-3.0, 0.75, 0.0, 0.01]);
            assert_eq!(
                start(&mut learners, personal, &[true, true, false]),
                next,
                "{personal:?}"
            );
        }
    }

    #[test]
    fn non_personal_scores_start_from_theta0_every_task() {
        let mut learners = Learners::default();
        let learn = Learn::Scores {
            personal: Personal::None,
        };
        start(&mut learners, Personal::None, &[true, true, true]);
        let g = given(SupermaskKind::Sign, &[true, true, true]);
        learners.get(learn).finish(g, vec![9.0, 9.0, 0.0, 9.0]);
        // |θ₀| again, whatever was learned before.
        assert_eq!(
            start(&mut learners, Personal::None, &[false, true, true]),
            [-0.5, 0.25, 0.0, 2.0]
        );
    }

    #[test]
    fn keep_scores_switch_weights_on_and_off() {
        let mut learners = Learners::default();
        let learn = Learn::Scores {
            personal: Personal::Own,
        };
        let g = given(SupermaskKind::Keep, &[true, true, true]);
        learners.get(learn).start(learn, g).unwrap();
        let weights = learners.get(learn).finish(g, vec![1.0, 0.5, 7.0, -1.0]);
        assert_eq!(weights, [0.5, -0.25, 0.0, 0.0]);
    }

    #[test]
    fn scores_need_a_supermask_and_weights_keep_nothing() {
        let mut learners = Learners::default();
        let plain = Given {
            params: &THETA0,
            mask: None,
            supermask: None,
        };
        let learn = Learn::Scores {
            personal: Personal::Own,
        };
        let err = learners.get(learn).start(learn, plain).err().unwrap();
        assert!(err.contains("no supermask"), "{err}");
        let w = learners.get(Learn::Weights);
        let s = w.start(Learn::Weights, plain).unwrap();
        assert_eq!(&*s.learned, &THETA0);
        assert!(s.frozen.is_none());
        assert_eq!(w.finish(plain, vec![1.0; 4]), [1.0; 4]);
    }
}
