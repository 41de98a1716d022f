//! Helpers shared by the property tests: a generator of random `.attn` specs
//! with a plain-data description of what each spec computes
//! ([`specgen`]), and a dense brute-force attention that evaluates that
//! description directly, without attnc's parser, checker or evaluator
//! ([`dense`]).
//!
//! Also: the FlexAttention fixtures and output comparisons ([`common`]),
//! and the PTX emulator and its launcher ([`ptx_emu`], [`ptx_run`]).
//!
//! Use from a test module with `use crate::support::specgen::{arb_case, GenCase};`.
#![allow(dead_code)]

pub mod common;
pub mod dense;
pub mod ptx_emu;
pub mod ptx_run;
pub mod specgen;

use proptest::test_runner::TestCaseError;

/// Whether a backend agrees with the reference on a generated case: out and
/// lse within `tol` (NaN where the reference has NaN), or the reference's
/// error word for word. `what` names the backend in the failure. Inputs that
/// do not bind are the harness's mistake, not a case: they fail (else a test
/// whose every case failed binding on every backend would pass).
pub fn agree_to(
    what: &str,
    case: &specgen::GenCase,
    reference: &Result<attnc::Outputs, attnc::Error>,
    got: Result<attnc::Outputs, attnc::Error>,
    tol: f32,
) -> Result<(), TestCaseError> {
    if let Err(e @ attnc::Error::Bind(_)) = reference {
        return Err(TestCaseError::fail(format!(
            "{what}: the test built inputs that do not bind: {e}\nspec:\n{}",
            case.spec.source
        )));
    }
    match (reference, got) {
        (Ok(r), Ok(g)) => {
            let d_out = common::max_abs_diff(g.out.iter(), r.out.iter());
            let d_lse = common::max_abs_diff(
                g.lse.as_ref().unwrap().iter(),
                r.lse.as_ref().unwrap().iter(),
            );
            if !(d_out <= tol && d_lse <= tol) {
                return Err(TestCaseError::fail(format!(
                    "{what}: |out diff| {d_out:e}, |lse diff| {d_lse:e}\nspec:\n{}",
                    case.spec.source
                )));
            }
        }
        // Every backend reports the reference's first error, word for word.
        (Err(r), Err(g)) if r.to_string() == g.to_string() => {}
        (r, g) => {
            return Err(TestCaseError::fail(format!(
                "{what}: reference {:?}, backend {:?}\nspec:\n{}",
                r.as_ref().map(|_| "ok").map_err(|e| e.to_string()),
                g.as_ref().map(|_| "ok").map_err(|e| e.to_string()),
                case.spec.source
            )))
        }
    }
    Ok(())
}
