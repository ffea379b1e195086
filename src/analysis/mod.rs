//! Pure statistics over request outcomes: no I/O, no clock but the one given.

pub mod window;
