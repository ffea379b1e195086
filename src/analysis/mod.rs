//! Pure statistics over request outcomes: no I/O, no clock but the one given.

pub mod compare;
pub mod diff;
pub mod drift;
pub mod fields;
pub mod histogram;
pub mod sequential;
pub mod simulate;
pub mod srm;
pub mod window;

/// Test helpers shared by the modules' property tests.
#[cfg(test)]
pub(crate) mod testing {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    /// A proptest runner with a fixed seed and no failure files: the same cases every run.
    pub(crate) fn seeded_runner(seed: u8, cases: u32) -> TestRunner {
        let config = Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        };
        TestRunner::new_with_rng(
            config,
            TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
        )
    }
}
