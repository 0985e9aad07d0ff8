//! Training samples for I-LLMRec (docs/illmrec-method.md, "Data"): one per user and epoch, a window of the
//! user's training sequence and the item after it. Every random choice draws from a stream named by
//! (seed, epoch, user), so a sample does not depend on batch size, step, or how users are spread over
//! ranks: the property the data-parallel equivalence and exact resume rest on.

use rand::Rng as _;

use super::dataset::{Dataset, Split};
use super::prompt::Property;
use crate::seed::stream;

#[derive(Debug, Clone, PartialEq)]
pub struct TrainingSample {
    pub user: usize,
    pub history: Vec<u32>,
    pub target: u32,
    /// One item drawn uniformly from the catalog minus the target (the RERI negative).
    pub negative: u32,
    pub property: Property,
    pub paraphrase: usize,
}

/// Users with at least one (history, target) pair in their training part.
pub fn trainable_users(ds: &Dataset) -> Vec<usize> {
    (0..ds.num_users()).filter(|&u| ds.train(u).len() >= 2).collect()
}

/// The user's sample for `epoch`. The window cap is `max_history` or half of it with equal chance;
/// the history length is uniform in 2..cap (shorter when the sequence is), its start uniform.
pub fn training_sample(ds: &Dataset, user: usize, epoch: u64, seed: u64, max_history: usize) -> TrainingSample {
    let mut rng = stream(seed, &format!("illmrec/sample/{epoch}"), user as u64);
    let seq = ds.train(user);
    let cap = if rng.random::<bool>() { max_history } else { (max_history / 2).max(2) };
    let longest = (cap - 1).min(seq.len() - 1).max(1);
    let len = if longest >= 2 { rng.random_range(2..=longest) } else { longest };
    let start = rng.random_range(0..=seq.len() - 1 - len);
    let history = seq[start..start + len].to_vec();
    let target = seq[start + len];
    let n = ds.num_items() as u32;
    let negative = loop {
        let c = rng.random_range(1..=n);
        if c != target || n == 1 {
            break c;
        }
    };
    let item = ds.item(target);
    let with_value: Vec<Property> = Property::ALL.into_iter().filter(|p| !p.value(item).trim().is_empty()).collect();
    let property =
        if with_value.is_empty() { Property::Title } else { with_value[rng.random_range(0..with_value.len())] };
    TrainingSample { user, history, target, negative, property, paraphrase: rng.random_range(0..5) }
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
        }
    }

    #[test]
    fn windows_respect_the_caps_and_come_from_the_training_part() {
        let ds = ds();
        let mut lens = std::collections::BTreeSet::new();
        for epoch in 0..200 {
            let s = training_sample(&ds, 0, epoch, 7, 10);
            lens.insert(s.history.len());
            let train = ds.train(0);
            let pos = train.iter().position(|&x| x == s.history[0]).unwrap();
            assert_eq!(&train[pos..pos + s.history.len()], &s.history[..]);
            assert_eq!(train[pos + s.history.len()], s.target);
            assert_ne!(s.negative, s.target);
            if s.property == Property::Brand {
                assert_eq!(s.target % 2, 0, "only targets with a brand are asked about it");
            }
        }
        assert_eq!(lens.into_iter().collect::<Vec<_>>(), (2..=9).collect::<Vec<_>>());
        // User b's training part is [5, 6]: one item of history.
        let s = training_sample(&ds, 1, 0, 7, 10);
        assert_eq!((s.history, s.target), (vec![5], 6));
    }

    #[test]
    fn samples_depend_on_seed_epoch_and_user_only() {
        let ds = ds();
        assert_eq!(training_sample(&ds, 0, 3, 7, 10), training_sample(&ds, 0, 3, 7, 10));
        assert_ne!(training_sample(&ds, 0, 3, 7, 10), training_sample(&ds, 0, 4, 7, 10));
        assert_eq!(eval_history(&ds, 0, Split::Test, 10), &(10..=19).collect::<Vec<u32>>()[..]);
    }
}
