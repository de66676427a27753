//! The uniform block sampler: determinism, validity, uniformity.

use std::collections::BTreeSet;

use crate::common::*;
use candle_lisa::{BlockSampler, LisaAdamW, LisaConfig, UniformSampler};
use candle_nn::{Optimizer, ParamsAdamW};

#[test]
fn same_seed_same_sequence() {
    let (mut a, mut b, mut c) = (
        UniformSampler::new(42),
        UniformSampler::new(42),
        UniformSampler::new(43),
    );
    let seq = |s: &mut UniformSampler| (0..50).map(|_| s.draw(30, 2)).collect::<Vec<_>>();
    let (sa, sb, sc) = (seq(&mut a), seq(&mut b), seq(&mut c));
    assert_eq!(sa, sb);
    assert_ne!(sa, sc);
}

/// Golden draws. They come from this crate's own `UniformSampler::new(0).draw(8, 2)` (ChaCha8
/// under rand 0.9); a change here means seeded runs no longer reproduce across versions.
#[test]
fn golden_sequence_for_seed_0() {
    let mut s = UniformSampler::new(0);
    let draws: Vec<_> = (0..5).map(|_| s.draw(8, 2)).collect();
    assert_eq!(draws, [[4, 5], [3, 5], [3, 5], [0, 3], [1, 7]]);
}

#[test]
fn every_draw_is_gamma_distinct_in_range_blocks() {
    let mut s = UniformSampler::new(1);
    for num_blocks in 1..=12 {
        for gamma in 1..=num_blocks {
            for _ in 0..20 {
                let draw = s.draw(num_blocks, gamma);
                let set: BTreeSet<_> = draw.iter().copied().collect();
                assert_eq!(draw.len(), gamma);
                assert_eq!(set.len(), gamma, "{draw:?} repeats a block");
                assert!(
                    draw.iter().all(|&b| b < num_blocks),
                    "{draw:?} out of range"
                );
            }
        }
    }
}

/// Pearson's chi-square over 20 000 draws of 3 blocks out of 10: single blocks (9 degrees of
/// freedom, 0.1% critical value 27.88) and pairs (44 degrees of freedom, 0.1% critical value
/// 78.75). The seed is fixed, so the test is deterministic; a biased sampler fails it.
#[test]
fn draws_are_uniform_chi_square() {
    let (n, gamma, draws) = (10usize, 3usize, 20_000usize);
    let mut s = UniformSampler::new(2024);
    let mut singles = vec![0f64; n];
    let mut pairs = vec![vec![0f64; n]; n];
    for _ in 0..draws {
        let d = s.draw(n, gamma);
        for (k, &a) in d.iter().enumerate() {
            singles[a] += 1.0;
            for &b in &d[k + 1..] {
                pairs[a.min(b)][a.max(b)] += 1.0;
            }
        }
    }
    let chi2 = |observed: &[f64], expected: f64| -> f64 {
        observed
            .iter()
            .map(|o| (o - expected).powi(2) / expected)
            .sum()
    };
    let single_chi2 = chi2(&singles, (draws * gamma) as f64 / n as f64);
    assert!(
        single_chi2 < 27.88,
        "blocks are not drawn uniformly: chi2 = {single_chi2}"
    );
    let pair_counts: Vec<f64> = (0..n)
        .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
        .map(|(a, b)| pairs[a][b])
        .collect();
    let pair_expected = (draws * gamma * (gamma - 1) / 2) as f64 / pair_counts.len() as f64;
    let pair_chi2 = chi2(&pair_counts, pair_expected);
    assert!(
        pair_chi2 < 78.75,
        "pairs are not drawn uniformly: chi2 = {pair_chi2}"
    );
    // The same statistic catches a sampler that favours low indices.
    let mut skewed = singles.clone();
    skewed[0] += 400.0;
    skewed[9] -= 400.0;
    assert!(chi2(&skewed, (draws * gamma) as f64 / n as f64) > 27.88);
}

/// The optimizer draws at construction and after every `period` steps, from the seeded
/// sampler; the period index counts the draws after the first.
#[test]
fn optimizer_follows_the_seeded_sequence() -> candle_core::Result<()> {
    let n = 8;
    let varmap = toy_varmap(n, 10)?;
    let config = LisaConfig {
        gamma: 2,
        period: 3,
        seed: 0,
        ..Default::default()
    };
    let mut opt = LisaAdamW::new(&varmap, ParamsAdamW::default(), config)?;
    let mut reference = UniformSampler::new(0);
    let mut expected = reference.draw(n, 2);
    assert_eq!(opt.active_blocks(), expected);
    assert_eq!(opt.period_index(), 0);
    let mut model = Toy::new(n, opt.var_builder())?;
    let batch = batch()?;
    for step in 1..=12u64 {
        opt.backward_step(&model.loss(&batch)?)?;
        assert_eq!(opt.resampled(), step % 3 == 0, "step {step}");
        if opt.resampled() {
            expected = reference.draw(n, 2);
            model = Toy::new(n, opt.var_builder())?;
        }
        assert_eq!(opt.active_blocks(), expected, "step {step}");
        assert_eq!(opt.period_index(), step / 3);
        assert_eq!(opt.step_count(), step);
    }
    Ok(())
}
