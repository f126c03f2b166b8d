//! STUB
pub mod fold;
pub mod ui;
