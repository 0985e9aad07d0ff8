//! The coordinator's shard plan: which users each rank trains on at each step.
//!
//! An epoch is a seeded permutation of the training users, cut into global batches of
//! `global_batch` users; rank r takes the r-th equal slice of each. Every rank takes the same number
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

    /// This rank's users at global step `step` (0-based), given the step's epoch order.
    pub fn rank_users(&self, order: &[usize], step: u64) -> Vec<usize> {
        let pos = (step % self.steps_per_epoch) as usize;
        let start = pos * self.global_batch + self.rank * self.per_rank;
        order[start..start + self.per_rank].to_vec()
    }

    /// The epoch's order, after rank 0's copy and every rank's own agree.
    pub fn agreed_order(&self, coll: &dyn Collective, epoch: u64) -> Result<Vec<usize>, DistError> {
        let order = self.epoch_order(epoch);
        let bytes: Vec<u8> = order.iter().flat_map(|&u| (u as u64).to_le_bytes()).collect();
        check_same(coll, &format!("the shard plan of epoch {epoch}"), &bytes)?;
        Ok(order)
    }
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
        for step in 0..4 {
            let order = one.epoch_order(one.epoch_of(step));
            let mut both = r0.rank_users(&order, step);
            both.extend(r1.rank_users(&order, step));
            assert_eq!(both, one.rank_users(&order, step));
        }
        assert_ne!(one.epoch_order(0), one.epoch_order(1));
    }

    #[test]
    fn batch_must_divide_over_ranks() {
        let err = ShardPlan::new((0..20).collect(), 3, 6, 0, 4, 1, None).unwrap_err().to_string();
        assert!(err.contains("multiple of the 4 ranks"), "{err}");
        assert_eq!(ShardPlan::new((0..20).collect(), 3, 8, 0, 1, 5, Some(3)).unwrap().total_steps, 3);
    }
}
