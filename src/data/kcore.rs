//! Iterative k-core: drop users and items with too few interactions until none is left to drop.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::ingest::RawInteraction;

/// Users, items and interactions in a list of interactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub users: usize,
    pub items: usize,
    pub interactions: usize,
}

impl Counts {
    pub fn of(list: &[RawInteraction]) -> Self {
        let users: std::collections::HashSet<&str> = list.iter().map(|i| i.user.as_str()).collect();
        let items: std::collections::HashSet<&str> = list.iter().map(|i| i.item.as_str()).collect();
        Self { users: users.len(), items: items.len(), interactions: list.len() }
    }
}

/// Keeps interactions whose user has at least `user_min` and whose item has at least `item_min`
/// interactions, repeating until stable. Order is preserved.
pub fn k_core(mut list: Vec<RawInteraction>, user_min: usize, item_min: usize) -> Vec<RawInteraction> {
    loop {
        let mut per_user: HashMap<&str, usize> = HashMap::new();
        let mut per_item: HashMap<&str, usize> = HashMap::new();
        for i in &list {
            *per_user.entry(&i.user).or_default() += 1;
            *per_item.entry(&i.item).or_default() += 1;
        }
        let keep: Vec<bool> = list
            .iter()
            .map(|i| per_user[i.user.as_str()] >= user_min && per_item[i.item.as_str()] >= item_min)
            .collect();
        if keep.iter().all(|&k| k) {
            return list;
        }
        let mut k = keep.into_iter();
        list.retain(|_| k.next().unwrap_or(false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(u: &str, i: &str) -> RawInteraction {
        RawInteraction { user: u.into(), item: i.into(), timestamp: 0.0 }
    }

    #[test]
    fn removal_cascades_until_stable() {
        // Item c has 2 interactions; once u3 (who needs c) drops, item b falls below 2 and then u2 too.
        let list = vec![
            it("u1", "a"),
            it("u1", "b"),
            it("u2", "a"),
            it("u2", "b"),
            it("u3", "b"),
            it("u3", "c"),
            it("u4", "a"),
        ];
        let kept = k_core(list, 2, 2);
        let c = Counts::of(&kept);
        assert_eq!(c, Counts { users: 2, items: 2, interactions: 4 });
        assert!(kept.iter().all(|i| i.user == "u1" || i.user == "u2"));
    }

    #[test]
    fn everything_can_vanish() {
        assert!(k_core(vec![it("u", "a")], 2, 1).is_empty());
    }
}
