//! Applying experts to a model, two ways with the same result:
//! - [`Application::Compose`]: W' = U diag(s ⊙ e) Vᵀ computed once, then the model runs at base
//!   speed (and can be requantized for decoding);
//! - [`Application::Factored`]: y = U (s ⊙ e ⊙ (Vᵀ x)) at every call, which lets each sequence of a
//!   batch use its own expert ([`apply_per_sequence`]).

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::model::error::Result;
use crate::model::transformer::Transformer;
use crate::svd::cache::Decomposed;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Application {
    Compose,
    Factored,
}

/// Applies one effective scale per target (as from [`super::expert::Expert::effective_scales`]).
pub fn apply(
    tf: &mut Transformer,
    factors: &[Decomposed],
    scales: &BTreeMap<String, Tensor>,
    how: Application,
) -> Result<()> {
    for d in factors {
        let Some(e) = scales.get(&d.name) else {
            continue;
        };
        let f = &d.factors;
        let scaled_s = (&f.s * e)?;
        match how {
            Application::Compose => {
                tf.replace_weight(&d.name, crate::svd::compose(&f.u, &scaled_s, &f.vt)?)?
            }
            Application::Factored => {
                tf.set_factored(&d.name, f.u.clone(), f.vt.clone(), scaled_s)?
            }
        }
    }
    Ok(())
}

/// Puts a table of experts into the factored projections: row `k` of each holds
/// `s ⊙ table[k]` (the base's `s` where expert `k` leaves a target alone), and a batch's
/// [`crate::model::transformer::Batch::with_experts`] says which row each sequence uses.
pub fn apply_per_sequence(
    tf: &mut Transformer,
    factors: &[Decomposed],
    table: &[&BTreeMap<String, Tensor>],
) -> Result<()> {
    for d in factors {
        let f = &d.factors;
        let rows = table
            .iter()
            .map(|scales| match scales.get(&d.name) {
                Some(e) => Ok((&f.s * e)?),
                None => Ok(f.s.clone()),
            })
            .collect::<Result<Vec<_>>>()?;
        tf.set_factored(&d.name, f.u.clone(), f.vt.clone(), Tensor::stack(&rows, 0)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::transformer::{Batch, LogitsAt, Mode};
    use candle_core::{Device, IndexOp};

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    use crate::svf::spread_expert as expert;

    fn logits(tf: &Transformer, seqs: &[[u32; 5]]) -> Result<Tensor> {
        logits_with(tf, seqs, None)
    }

    /// Logits of `seqs`, sequence `b` with expert `experts[b]` of the model's table if given.
    fn logits_with(tf: &Transformer, seqs: &[[u32; 5]], experts: Option<&[u32]>) -> Result<Tensor> {
        let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (seqs.len(), 5), &Device::Cpu)?;
        let mut batch = Batch::left_padded(&vec![0; seqs.len()], 0, 5, &Device::Cpu)?;
        if let Some(e) = experts {
            batch = batch.with_experts(e)?;
        }
        tf.forward(&ids, &batch, None, Mode::Fast, LogitsAt::All)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn factored_application_equals_composed_weights() -> TestResult {
        let (base, factors) = crate::svf::tiny_decomposed(11);
        let scales = expert(&factors, 1).effective_scales()?;
        let mut composed = base.clone();
        apply(&mut composed, &factors, &scales, Application::Compose)?;
        let mut factored = base.clone();
        apply(&mut factored, &factors, &scales, Application::Factored)?;
        let seqs = [[3, 1, 4, 1, 5]];
        let (c, f, b) = (
            logits(&composed, &seqs)?,
            logits(&factored, &seqs)?,
            logits(&base, &seqs)?,
        );
        assert!(max_diff(&c, &f) < 1e-4, "{}", max_diff(&c, &f));
        assert!(
            max_diff(&c, &b) > 1e-2,
            "the expert should change the logits"
        );
        Ok(())
    }

    #[test]
    fn each_sequence_of_a_batch_can_use_its_own_expert() -> TestResult {
        let (base, factors) = crate::svf::tiny_decomposed(12);
        let (a, b) = (
            expert(&factors, 2).effective_scales()?,
            expert(&factors, 3).effective_scales()?,
        );
        let none = BTreeMap::new();
        let mut table = base.clone();
        apply_per_sequence(&mut table, &factors, &[&none, &a, &b])?;
        let seqs = [
            [3, 1, 4, 1, 5],
            [2, 7, 1, 8, 2],
            [3, 1, 4, 1, 5],
            [9, 9, 2, 6, 1],
        ];
        // Rows 1, 2, 0 of the table: expert a, expert b, the base model; a again.
        let rows = [1, 2, 0, 1];
        let together = logits_with(&table, &seqs, Some(&rows))?;
        for (i, &row) in rows.iter().enumerate() {
            let mut alone = base.clone();
            if row > 0 {
                let scales = [&a, &b][row as usize - 1];
                apply(&mut alone, &factors, scales, Application::Compose)?;
            }
            let expected = logits(&alone, &seqs[i..i + 1])?;
            let got = together.i(i..i + 1)?;
            assert!(
                max_diff(&got, &expected) < 1e-4,
                "sequence {i}: {}",
                max_diff(&got, &expected)
            );
        }
        assert!(
            logits(&table, &seqs).is_err(),
            "a table without rows chosen is refused"
        );
        Ok(())
    }
}
