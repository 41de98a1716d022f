//! Helpers shared by the property tests: a generator of random `.attn` specs
//! with a plain-data description of what each spec computes
//! ([`specgen`]), and a dense brute-force attention that evaluates that
//! description directly, without attnc's parser, checker or evaluator
//! ([`dense`]).
//!
//! Use from a test file with `mod support;` and
//! `use support::specgen::{arb_case, GenCase};`.
#![allow(dead_code)]

pub mod dense;
pub mod specgen;
