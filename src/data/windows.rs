//! Training samples for I-LLMRec (docs/illmrec-method.md, "Data"): per user and epoch one window (the
//! paper) or several, each a slice of the user's training sequence and the item after it. Every random
//! choice draws from a stream named by (seed, epoch, user, window), so a sample does not depend on
//! batch size, step, or how users are spread over ranks: the property the data-parallel equivalence
//! and exact resume rest on.

use rand::Rng as _;

use super::dataset::{Dataset, Split};
use super::prompt::Property;
use crate::seed::stream;

#[derive(Debug, Clone, PartialEq)]
pub struct TrainingSample {
    pub user: usize,
    pub history: Vec<u32>,
    pub target: u32,
    /// Items drawn uniformly from the catalog minus the target (the RERI negatives).
    pub negatives: Vec<u32>,
    pub property: Property,
    pub paraphrase: usize,
}

/// Users with at least one (history, target) pair in their training part.
pub fn trainable_users(ds: &Dataset) -> Vec<usize> {
    (0..ds.num_users()).filter(|&u| ds.train(u).len() >= 2).collect()
}

/// Which sample of an epoch: a user's `window`-th (0-based) window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleKey {
    pub user: usize,
    pub window: usize,
}

/// The `key.window`-th sample of a user for `epoch`, with `negatives` RERI negatives. The window cap
/// is `max_history` or half of it with equal chance; the history length is uniform in 2..cap
/// (shorter when the sequence is), its start uniform.
pub fn training_sample(
    ds: &Dataset,
    key: SampleKey,
    epoch: u64,
    seed: u64,
    max_history: usize,
    negatives: usize,
) -> TrainingSample {
    let SampleKey { user, window } = key;
    // Window 0 keeps the stream name of the one-window-per-user schedule, so its samples are the same.
    let name = if window == 0 { format!("illmrec/sample/{epoch}") } else { format!("illmrec/sample/{epoch}/{window}") };
    let mut rng = stream(seed, &name, user as u64);
    let seq = ds.train(user);
    let cap = if rng.random::<bool>() { max_history } else { (max_history / 2).max(2) };
    let longest = (cap - 1).min(seq.len() - 1).max(1);
    let len = if longest >= 2 { rng.random_range(2..=longest) } else { longest };
    let start = rng.random_range(0..=seq.len() - 1 - len);
    let history = seq[start..start + len].to_vec();
    let target = seq[start + len];
    let n = ds.num_items() as u32;
    let draw = |rng: &mut crate::seed::Rng| loop {
        let c = rng.random_range(1..=n);
        if c != target || n == 1 {
            break c;
        }
    };
    let first = draw(&mut rng);
    let item = ds.item(target);
    let with_value: Vec<Property> = Property::ALL.into_iter().filter(|p| !p.value(item).trim().is_empty()).collect();
    let property =
        if with_value.is_empty() { Property::Title } else { with_value[rng.random_range(0..with_value.len())] };
    let paraphrase = rng.random_range(0..5);
    // Further negatives come from a stream of their own: the first negative, the property and the
    // paraphrase stay what they are with one negative.
    let mut more = stream(seed, &format!("{name}/negatives"), user as u64);
    let negatives = std::iter::once(first).chain((1..negatives).map(|_| draw(&mut more))).collect();
    TrainingSample { user, history, target, negatives, property, paraphrase }
}

/// The history a model sees when predicting the `split` target: the last `max_history` items.
pub fn eval_history(ds: &Dataset, user: usize, split: Split, max_history: usize) -> &[u32] {
    let h = ds.history(user, split);
    &h[h.len().saturating_sub(max_history)..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Item, Negatives};

    fn ds() -> Dataset {
        let items = (1..=30)
            .map(|i| {
                let mut meta = crate::data::ingest::ItemMeta { title: format!("t{i}"), ..Default::default() };
                if i % 2 == 0 {
                    meta.brand = "B".into();
                }
                Item { index: i, id: format!("i{i}"), meta, image: None }
            })
            .collect();
        Dataset {
            name: "t".into(),
            key: "k".into(),
            items,
            user_ids: vec!["a".into(), "b".into()],
            sequences: vec![(1..=20).collect(), vec![5, 6, 7, 8]],
            negatives: Negatives { per_user: 0, valid: vec![], test: vec![] },
            candidates: vec![],
        }
    }

    #[test]
    fn windows_respect_the_caps_and_come_from_the_training_part() {
        let ds = ds();
        let mut lens = std::collections::BTreeSet::new();
        for epoch in 0..200 {
            let s = training_sample(&ds, SampleKey { user: 0, window: 0 }, epoch, 7, 10, 3);
            lens.insert(s.history.len());
            let train = ds.train(0);
            let pos = train.iter().position(|&x| x == s.history[0]).unwrap();
            assert_eq!(&train[pos..pos + s.history.len()], &s.history[..]);
            assert_eq!(train[pos + s.history.len()], s.target);
            assert_eq!(s.negatives.len(), 3);
            assert!(!s.negatives.contains(&s.target));
            if s.property == Property::Brand {
                assert_eq!(s.target % 2, 0, "only targets with a brand are asked about it");
            }
        }
        assert_eq!(lens.into_iter().collect::<Vec<_>>(), (2..=9).collect::<Vec<_>>());
        // User b's training part is [5, 6]: one item of history.
        let s = training_sample(&ds, SampleKey { user: 1, window: 0 }, 0, 7, 10, 1);
        assert_eq!((s.history, s.target), (vec![5], 6));
    }

    #[test]
    fn samples_depend_on_seed_epoch_user_and_window_only() {
        let ds = ds();
        let k = |window| SampleKey { user: 0, window };
        assert_eq!(training_sample(&ds, k(0), 3, 7, 10, 1), training_sample(&ds, k(0), 3, 7, 10, 1));
        assert_ne!(training_sample(&ds, k(0), 3, 7, 10, 1), training_sample(&ds, k(0), 4, 7, 10, 1));
        assert_ne!(training_sample(&ds, k(0), 3, 7, 10, 1), training_sample(&ds, k(1), 3, 7, 10, 1));
        // More negatives extend the list; they change nothing else.
        let one = training_sample(&ds, k(2), 3, 7, 10, 1);
        let four = training_sample(&ds, k(2), 3, 7, 10, 4);
        assert_eq!(four.negatives[0], one.negatives[0]);
        assert_eq!((&four.history, four.property, four.paraphrase), (&one.history, one.property, one.paraphrase));
        assert_eq!(eval_history(&ds, 0, Split::Test, 10), &(10..=19).collect::<Vec<u32>>()[..]);
    }
}
