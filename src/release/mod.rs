//! The release's moving parts, off the data path: request outcomes, the rollback circuit
//! that judges them, the progressive rollout, and the webhooks it calls.

pub mod circuit;
pub mod outcome;
pub mod rollout;
pub mod warmup;
pub mod webhook;
