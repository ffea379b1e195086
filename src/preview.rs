//! Who would move under another weight table: the bucket ranges that change arm, and the
//! recently seen users among them.
//!
//! The users are a bounded sample kept by the circuit task: the identity ([`hash_key`]'s
//! high 64 bits) and bucket of every distinct sticky user, in two generations of
//! [`RECENT_USERS`]: when the newer one fills, it becomes the older one and the oldest is
//! dropped. The two together always hold at least the last [`RECENT_USERS`] distinct users.
//! No user id is kept. A user's arm under a table follows from its bucket alone, so the
//! preview is exact for the sample.
//!
//! [`hash_key`]: crate::routing::hash_key

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::analysis::srm::IdentityHasher;
use crate::routing::{WeightTable, BASIS_POINTS};

/// The sample holds at least this many of the most recent distinct sticky users.
pub const RECENT_USERS: usize = 10_000;

type Buckets = HashMap<u64, u16, BuildHasherDefault<IdentityHasher>>;

/// Recently seen distinct sticky users and their buckets.
#[derive(Debug, Default)]
pub struct RecentUsers {
    newer: Buckets,
    older: Buckets,
}

impl RecentUsers {
    /// Notes a sticky user (its identity and bucket).
    #[inline]
    pub fn insert(&mut self, user: u64, bucket: u16) {
        if self.newer.insert(user, bucket).is_none() && self.newer.len() >= RECENT_USERS {
            self.older = std::mem::take(&mut self.newer);
            self.newer.reserve(RECENT_USERS);
        }
    }

    /// Distinct users in the sample.
    pub fn len(&self) -> usize {
        self.newer.len()
            + self
                .older
                .keys()
                .filter(|u| !self.newer.contains_key(u))
                .count()
    }

    /// Whether no user was seen.
    pub fn is_empty(&self) -> bool {
        self.newer.is_empty() && self.older.is_empty()
    }

    /// The bucket of every distinct user in the sample.
    pub fn buckets(&self) -> impl Iterator<Item = u16> + '_ {
        self.newer.values().copied().chain(
            self.older
                .iter()
                .filter(|(u, _)| !self.newer.contains_key(u))
                .map(|(_, &b)| b),
        )
    }

    /// Forgets every user (the salt changed: the buckets no longer hold).
    pub fn clear(&mut self) {
        self.newer.clear();
        self.older.clear();
    }
}

/// A range of buckets that changes arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// First bucket.
    pub start: u16,
    /// One past the last bucket.
    pub end: u16,
    /// Arm index now.
    pub from: usize,
    /// Arm index under the other table.
    pub to: usize,
}

/// The maximal bucket ranges whose arm differs between `from` and `to`, in bucket order.
pub fn moves(from: &WeightTable, to: &WeightTable) -> Vec<Move> {
    let mut out: Vec<Move> = Vec::new();
    for b in 0..BASIS_POINTS {
        let (f, t) = (from.pick(b), to.pick(b));
        if f == t {
            continue;
        }
        match out.last_mut() {
            Some(m) if m.end == b && m.from == f && m.to == t => m.end = b + 1,
            _ => out.push(Move {
                start: b,
                end: b + 1,
                from: f,
                to: t,
            }),
        }
    }
    out
}

/// How many of `buckets` (one per user) change arm, per `(from, to)` pair of arm indices,
/// in arm order.
pub fn movers(
    from: &WeightTable,
    to: &WeightTable,
    buckets: impl IntoIterator<Item = u16>,
) -> Vec<((usize, usize), u64)> {
    let mut out: Vec<((usize, usize), u64)> = Vec::new();
    for b in buckets {
        let pair = (from.pick(b), to.pick(b));
        if pair.0 == pair.1 {
            continue;
        }
        match out.iter_mut().find(|(p, _)| *p == pair) {
            Some((_, n)) => *n += 1,
            None => out.push((pair, 1)),
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::testing::seeded_runner;
    use crate::routing::{bucket, hash_key};
    use proptest::prelude::*;

    /// A valid table of 2–4 arms from raw numbers: each arm's share of the sum, in basis
    /// points, the rounding going to the baseline.
    fn table(raw: &[u16], baseline: usize) -> WeightTable {
        let sum: u32 = raw.iter().map(|&w| u32::from(w)).sum::<u32>().max(1);
        let mut w: Vec<u16> = raw
            .iter()
            .map(|&r| (u32::from(r) * 10_000 / sum) as u16)
            .collect();
        let rest = 10_000 - w.iter().map(|&x| u32::from(x)).sum::<u32>();
        let b = baseline % w.len();
        w[b] += rest as u16;
        WeightTable::new(w, b).expect("sums to 10000")
    }

    #[test]
    fn the_users_reported_as_moving_are_exactly_those_whose_arm_changes() {
        let mut runner = seeded_runner(22, 256);
        let strategy = (
            prop::collection::vec(0u16..100, 2..5),
            prop::collection::vec(0u16..100, 2..5),
            0usize..4,
            prop::collection::vec("[a-z0-9_-]{1,12}", 0..200),
            "[a-z]{0,3}",
        );
        runner
            .run(&strategy, |(a, b, base, ids, salt)| {
                let n = a.len().min(b.len());
                let (from, to) = (table(&a[..n], base), table(&b[..n], base));
                let mut recent = RecentUsers::default();
                let mut distinct = std::collections::BTreeSet::new();
                for id in &ids {
                    let (bk, user) = hash_key(salt.as_bytes(), id.as_bytes());
                    recent.insert(user, bk);
                    distinct.insert(id.clone());
                }
                prop_assert_eq!(recent.len(), distinct.len());
                // By the routing rule, user by user.
                let mut expected: Vec<((usize, usize), u64)> = Vec::new();
                for id in &distinct {
                    let bk = bucket(salt.as_bytes(), id.as_bytes());
                    let pair = (from.pick(bk), to.pick(bk));
                    if pair.0 != pair.1 {
                        match expected.iter_mut().find(|(p, _)| *p == pair) {
                            Some((_, c)) => *c += 1,
                            None => expected.push((pair, 1)),
                        }
                    }
                }
                expected.sort_unstable();
                prop_assert_eq!(movers(&from, &to, recent.buckets()), expected);
                // The ranges cover exactly the buckets that change arm.
                let ranges = moves(&from, &to);
                for bk in 0..BASIS_POINTS {
                    let inside = ranges
                        .iter()
                        .find(|m| m.start <= bk && bk < m.end)
                        .map(|m| (m.from, m.to));
                    let changes =
                        (from.pick(bk) != to.pick(bk)).then(|| (from.pick(bk), to.pick(bk)));
                    prop_assert_eq!(inside, changes, "bucket {}", bk);
                }
                Ok(())
            })
            .expect("property holds");
    }

    #[test]
    fn the_sample_keeps_at_least_the_last_ten_thousand_users() {
        let mut recent = RecentUsers::default();
        let mut rng = fastrand::Rng::with_seed(3);
        let ids: Vec<u64> = (0..35_000).map(|_| rng.u64(..)).collect();
        for (i, &id) in ids.iter().enumerate() {
            recent.insert(id, (id % 10_000) as u16);
            if i % 997 == 0 || i == ids.len() - 1 {
                let have: std::collections::HashSet<u64> = recent
                    .newer
                    .keys()
                    .chain(recent.older.keys())
                    .copied()
                    .collect();
                let from = (i + 1).saturating_sub(RECENT_USERS);
                assert!(ids[from..=i].iter().all(|u| have.contains(u)), "at {i}");
                assert!(recent.len() <= 2 * RECENT_USERS);
            }
        }
    }

    #[test]
    fn raising_a_canary_moves_users_only_into_it() {
        let from = WeightTable::new(vec![9000, 1000], 0).expect("valid");
        let to = WeightTable::new(vec![7500, 2500], 0).expect("valid");
        assert_eq!(
            moves(&from, &to),
            vec![Move {
                start: 1000,
                end: 2500,
                from: 0,
                to: 1
            }]
        );
    }
}
