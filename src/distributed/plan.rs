//! The coordinator's shard plan: which users each rank trains on at each step.
//!
//! An epoch is a seeded permutation of the training users, cut into global batches of
//! `global_batch` users; each rank takes an equal share of each (`balanced_share`: shares of even
//! cost, so no rank waits long for another at the all-reduce). Every rank takes the same number
//! of steps, and the global step alone says what comes next, so a run resumed on another number of
//! ranks (with the same global batch) sees the same users in the same steps. Rank 0 broadcasts each
//! epoch's permutation and every rank checks it against its own (a rank on another dataset snapshot
//! is caught here, not by diverging weights).

use rand::seq::SliceRandom;

use super::{check_same, Collective, DistError};
use crate::seed::stream;

#[derive(Debug, Clone)]
pub struct ShardPlan {
    users: Vec<usize>,
    seed: u64,
    pub global_batch: usize,
    pub per_rank: usize,
    pub rank: usize,
    pub world: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
}

impl ShardPlan {
    /// `global_batch` users per step over `world` ranks (it must divide), `epochs` epochs or
    /// `max_steps` steps, whichever is fewer. Whole batches only: the permutation decides which users
    /// fall off an epoch's end.
    pub fn new(
        users: Vec<usize>,
        seed: u64,
        global_batch: usize,
        rank: usize,
        world: usize,
        epochs: u64,
        max_steps: Option<u64>,
    ) -> Result<Self, DistError> {
        if users.is_empty() {
            return Err(DistError::Setup("there are no users to train on".into()));
        }
        let global_batch = global_batch.min(users.len());
        if !global_batch.is_multiple_of(world) || global_batch < world {
            return Err(DistError::Setup(format!(
                "train.illmrec.batch_size {global_batch} (users per step over all ranks) must be a multiple of the {world} ranks"
            )));
        }
        let steps_per_epoch = (users.len() / global_batch) as u64;
        let total = steps_per_epoch * epochs;
        Ok(Self {
            users,
            seed,
            global_batch,
            per_rank: global_batch / world,
            rank,
            world,
            steps_per_epoch,
            total_steps: max_steps.map_or(total, |m| m.min(total).max(1)),
        })
    }

    pub fn epoch_of(&self, step: u64) -> u64 {
        step / self.steps_per_epoch
    }

    /// The epoch's seeded permutation of the users.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order = self.users.clone();
        order.shuffle(&mut stream(self.seed, "illmrec/epoch-order", epoch));
        order
    }

    /// The users of global step `step` (0-based) over all ranks, given the step's epoch order.
    pub fn step_users<'o>(&self, order: &'o [usize], step: u64) -> &'o [usize] {
        let start = (step % self.steps_per_epoch) as usize * self.global_batch;
        &order[start..start + self.global_batch]
    }

    /// This rank's share of a global batch whose items cost `costs` (e.g. tokens): `balanced_share`.
    pub fn rank_share(&self, costs: &[usize]) -> Vec<usize> {
        balanced_share(costs, self.world, self.rank)
    }

    /// The epoch's order, after rank 0's copy and every rank's own agree.
    pub fn agreed_order(&self, coll: &dyn Collective, epoch: u64) -> Result<Vec<usize>, DistError> {
        let order = self.epoch_order(epoch);
        let bytes: Vec<u8> = order.iter().flat_map(|&u| (u as u64).to_le_bytes()).collect();
        check_same(coll, &format!("the shard plan of epoch {epoch}"), &bytes)?;
        Ok(order)
    }
}

/// Splits items of the given costs into `world` shares of equal size whose cost totals are as even
/// as one greedy pass makes them (the costliest item first, each to the cheapest share with room;
/// ties go to the lower rank and the earlier item), and returns share `rank`'s item indices in
/// ascending order. Every rank computes the same split from the same costs.
pub fn balanced_share(costs: &[usize], world: usize, rank: usize) -> Vec<usize> {
    let room = costs.len() / world.max(1);
    let mut by_cost: Vec<usize> = (0..costs.len()).collect();
    by_cost.sort_by_key(|&i| (std::cmp::Reverse(costs[i]), i));
    let mut totals = vec![(0usize, 0usize); world.max(1)];
    let mut mine = Vec::with_capacity(room);
    for i in by_cost {
        let Some(share) = (0..totals.len()).filter(|&r| totals[r].1 < room).min_by_key(|&r| (totals[r].0, r)) else {
            break;
        };
        totals[share] = (totals[share].0 + costs[i], totals[share].1 + 1);
        if share == rank {
            mine.push(i);
        }
    }
    mine.sort_unstable();
    mine
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_split_each_global_batch_and_cover_it_exactly() {
        let users: Vec<usize> = (0..20).collect();
        let one = ShardPlan::new(users.clone(), 3, 8, 0, 1, 2, None).unwrap();
        let r0 = ShardPlan::new(users.clone(), 3, 8, 0, 2, 2, None).unwrap();
        let r1 = ShardPlan::new(users.clone(), 3, 8, 1, 2, 2, None).unwrap();
        assert_eq!((one.steps_per_epoch, one.total_steps, r0.per_rank), (2, 4, 4));
        let costs = [5, 9, 1, 7, 3, 3, 8, 2];
        for step in 0..4 {
            let order = one.epoch_order(one.epoch_of(step));
            let batch = one.step_users(&order, step);
            assert_eq!(batch, r1.step_users(&order, step), "every rank sees the same global batch");
            assert_eq!(one.rank_share(&costs), (0..8).collect::<Vec<_>>());
            let mut both = r0.rank_share(&costs);
            both.extend(r1.rank_share(&costs));
            both.sort_unstable();
            assert_eq!(both, (0..8).collect::<Vec<_>>(), "the shares cover the batch exactly once");
        }
        assert_ne!(one.epoch_order(0), one.epoch_order(1));
    }

    #[test]
    fn shares_are_equal_in_size_and_even_in_cost() {
        // Costs 9, 8, 7, 5, 3, 3, 2, 1 (total 38): greedy gives 9+5+3+2 = 19 and 8+7+3+1 = 19.
        let costs = [5, 9, 1, 7, 3, 3, 8, 2];
        let (a, b) = (balanced_share(&costs, 2, 0), balanced_share(&costs, 2, 1));
        assert_eq!((a.len(), b.len()), (4, 4));
        let total = |s: &[usize]| s.iter().map(|&i| costs[i]).sum::<usize>();
        assert_eq!((total(&a), total(&b)), (19, 19));
        // Equal costs: the earlier items go to the lower ranks in turn.
        assert_eq!(balanced_share(&[4; 6], 3, 0), vec![0, 3]);
        assert_eq!(balanced_share(&[4; 6], 3, 2), vec![2, 5]);
    }

    #[test]
    fn batch_must_divide_over_ranks() {
        let err = ShardPlan::new((0..20).collect(), 3, 6, 0, 4, 1, None).unwrap_err().to_string();
        assert!(err.contains("multiple of the 4 ranks"), "{err}");
        assert_eq!(ShardPlan::new((0..20).collect(), 3, 8, 0, 1, 5, Some(3)).unwrap().total_steps, 3);
    }
}
