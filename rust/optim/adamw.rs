//! AdamW (Loshchilov & Hutter): decoupled weight decay, bias-corrected moments, one pass over
//! memory per tensor, every tensor of a parameter group in one parallel call.

use rayon::prelude::*;

use crate::linalg::simd::vectorized;

/// Hyper-parameters of one AdamW step (the same for every tensor of a group).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// The step number being taken, starting at 1 (for bias correction).
    pub step: u64,
}

/// Why an AdamW call was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdamWError {
    #[error("tensor {index}: {what} has {got} elements but the parameter has {expected}")]
    LengthMismatch {
        index: usize,
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("step must be at least 1, got 0")]
    StepZero,
    #[error("{name} must be {rule}, got {value}")]
    BadHyperParameter {
        name: &'static str,
        rule: &'static str,
        value: f32,
    },
}

impl AdamW {
    fn validate(&self) -> Result<(), AdamWError> {
        let checks = [
            ("lr", self.lr >= 0.0, "non-negative", self.lr),
            (
                "beta1",
                (0.0..1.0).contains(&self.beta1),
                "in [0, 1)",
                self.beta1,
            ),
            (
                "beta2",
                (0.0..1.0).contains(&self.beta2),
                "in [0, 1)",
                self.beta2,
            ),
            ("eps", self.eps > 0.0, "positive", self.eps),
            (
                "weight_decay",
                self.weight_decay >= 0.0,
                "non-negative",
                self.weight_decay,
            ),
        ];
        for (name, ok, rule, value) in checks {
            if !ok {
                return Err(AdamWError::BadHyperParameter { name, rule, value });
            }
        }
        if self.step == 0 {
            return Err(AdamWError::StepZero);
        }
        Ok(())
    }

    /// Updates one tensor in place: `m`, `v` moments and the parameter `p`.
    pub fn update(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - (b1 as f64).powi(self.step.min(i32::MAX as u64) as i32) as f32;
        let bc2 = 1.0 - (b2 as f64).powi(self.step.min(i32::MAX as u64) as i32) as f32;
        let step_size = self.lr / bc1;
        let inv_sqrt_bc2 = 1.0 / bc2.sqrt();
        let decay = 1.0 - self.lr * self.weight_decay;
        let eps = self.eps;
        vectorized(
            #[inline(always)]
            || {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let denom = v.sqrt() * inv_sqrt_bc2 + eps;
                    *p = *p * decay - step_size * *m / denom;
                }
            },
        )
    }
}

/// One parameter tensor with its gradient and moment buffers.
pub struct Slot<'a> {
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
}

/// Elements per parallel task: large enough to amortise scheduling, small enough to
/// balance one big tensor across cores.
const CHUNK: usize = 1 << 15;

/// Applies one AdamW step to every slot, in parallel over chunks of all tensors.
pub fn adamw_step(hp: &AdamW, slots: &mut [Slot<'_>]) -> Result<(), AdamWError> {
    hp.validate()?;
    for (index, s) in slots.iter().enumerate() {
        let n = s.param.len();
        for (what, got) in [
            ("grad", s.grad.len()),
            ("exp_avg", s.exp_avg.len()),
            ("exp_avg_sq", s.exp_avg_sq.len()),
        ] {
            if got != n {
                return Err(AdamWError::LengthMismatch {
                    index,
                    what,
                    expected: n,
                    got,
                });
            }
        }
    }
    let mut tasks: Vec<Slot<'_>> = Vec::new();
    for s in slots.iter_mut() {
        let chunks = s
            .param
            .chunks_mut(CHUNK)
            .zip(s.grad.chunks(CHUNK))
            .zip(s.exp_avg.chunks_mut(CHUNK))
            .zip(s.exp_avg_sq.chunks_mut(CHUNK));
        for (((param, grad), exp_avg), exp_avg_sq) in chunks {
            tasks.push(Slot {
                param,
                grad,
                exp_avg,
                exp_avg_sq,
            });
        }
    }
    tasks
        .into_par_iter()
        .for_each(|s| hp.update(s.param, s.grad, s.exp_avg, s.exp_avg_sq));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(hp: &AdamW, p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64]) {
        let t = hp.step as i32;
        for i in 0..p.len() {
            p[i] *= 1.0 - hp.lr as f64 * hp.weight_decay as f64;
            m[i] = hp.beta1 as f64 * m[i] + (1.0 - hp.beta1 as f64) * g[i];
            v[i] = hp.beta2 as f64 * v[i] + (1.0 - hp.beta2 as f64) * g[i] * g[i];
            let mhat = m[i] / (1.0 - (hp.beta1 as f64).powi(t));
            let vhat = v[i] / (1.0 - (hp.beta2 as f64).powi(t));
            p[i] -= hp.lr as f64 * mhat / (vhat.sqrt() + hp.eps as f64);
        }
    }

    #[test]
    fn matches_the_textbook_update_over_several_steps() {
        let n = 70_000; // spans several chunks
        let mut p: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let mut m = vec![0.0f32; n];
        let mut v = vec![0.0f32; n];
        let mut pr: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let mut mr = vec![0.0f64; n];
        let mut vr = vec![0.0f64; n];
        for step in 1..=5u64 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i as f32) * 0.11 + step as f32).cos())
                .collect();
            let gr: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            let hp = AdamW {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
            };
            let mut slots = [Slot {
                param: &mut p,
                grad: &g,
                exp_avg: &mut m,
                exp_avg_sq: &mut v,
            }];
            adamw_step(&hp, &mut slots).unwrap();
            reference(&hp, &mut pr, &gr, &mut mr, &mut vr);
        }
        let worst = p
            .iter()
            .zip(&pr)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "max deviation {worst}");
    }

    #[test]
    fn refuses_mismatched_lengths_and_bad_hyper_parameters() {
        let (mut p, g, mut m, mut v) = (
            vec![0.0f32; 4],
            vec![0.0f32; 3],
            vec![0.0f32; 4],
            vec![0.0f32; 4],
        );
        let hp = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        };
        let mut slots = [Slot {
            param: &mut p,
            grad: &g,
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
        }];
        let err = adamw_step(&hp, &mut slots).unwrap_err();
        assert_eq!(
            err,
            AdamWError::LengthMismatch {
                index: 0,
                what: "grad",
                expected: 4,
                got: 3
            }
        );
        let bad = AdamW { lr: -1.0, ..hp };
        assert!(matches!(
            adamw_step(&bad, &mut []),
            Err(AdamWError::BadHyperParameter { name: "lr", .. })
        ));
        let zero = AdamW { step: 0, ..hp };
        assert_eq!(adamw_step(&zero, &mut []), Err(AdamWError::StepZero));
    }
}
