//! The release's moving parts, off the data path: request outcomes and the rollback circuit
//! that judges them.

pub mod circuit;
pub mod outcome;
