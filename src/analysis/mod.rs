//! Pure statistics over request outcomes: no I/O, no clock but the one given.

pub mod compare;
pub mod diff;
pub mod drift;
pub mod histogram;
pub mod sequential;
pub mod simulate;
pub mod window;
