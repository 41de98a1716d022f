//! Every backend against the reference interpreter on random specs.
//!
//! The specs, shapes and data come from `support::specgen` (random masks and
//! score mods of the field's patterns, GQA/MQA, Q != KV, query and key offsets, k/v
//! batch broadcast, fully masked rows). For each case the loop-IR
//! interpreter and the Cranelift backend (both tile-product
//! implementations) run under a random tiling, and the PTX backend's f32
//! kernels on the CPU emulator, and must agree with the
//! reference to 1e-5 (out and lse; NaN where it has NaN), or fail with the
//! same error. The JIT runs with every read bounds-checked, so a range proof
//! of the optimiser that does not hold fails the test.

use crate::support;
use crate::support::ptx_run;

use attnc::codegen::clif::GemmImpl;
use proptest::prelude::*;
use support::agree_to;
use support::specgen::{arb_case, GenCase};

fn agree(
    what: &str,
    case: &GenCase,
    reference: &Result<attnc::Outputs, attnc::Error>,
    got: Result<attnc::Outputs, attnc::Error>,
) -> Result<(), TestCaseError> {
    agree_to(what, case, reference, got, 1e-5)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_a77c), ..ProptestConfig::default() })]

    #[test]
    fn backends_agree_with_reference(case in arb_case(), bq in 1usize..70, panels in 1usize..5, native in any::<bool>()) {
        let program = attnc::load(case.spec.source_file(), &case.spec.options()).unwrap();
        let data = case.data();
        let inputs = case.inputs(&data);
        let reference = program.run_reference(&inputs);
        // NaN scores (e.g. `0.0 * -inf`) propagate as in the reference: NaN
        // cases are compared too (NaN where the reference has NaN).
        agree(&format!("interp {bq}x{}", 16 * panels), &case, &reference, program.run_interp(&inputs, attnc::mask::Tiling { bq, bkv: 16 * panels }))?;
        let gemm = if native { GemmImpl::detect() } else { GemmImpl::Jit };
        // Every read is bounds-checked, the ones the optimiser proved in range
        // too: a proof that does not hold panics (and fails the case).
        let options = attnc::CompileOptions {
            tiles: attnc::Tiles::Fixed(attnc::mask::Tiling::new(bq, 16 * panels).unwrap()),
            gemm,
            check_proven_loads: true,
            ..Default::default()
        };
        let kernel = program.compile_jit_with(&options).unwrap();
        agree(&format!("jit {bq}x{} {}", 16 * panels, gemm.name()), &case, &reference, kernel.run(&inputs))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_a77c), ..ProptestConfig::default() })]

    /// The PTX backend (f32 kernels, run on the CPU emulator with the
    /// approximate instructions off by their PTX ISA bounds) on the same random
    /// specs: 1e-4 absolute, for `ex2.approx` and `rcp.approx`. Fewer cases: the
    /// emulator interprets every thread.
    #[test]
    fn ptx_agrees_with_reference(case in arb_case()) {
        let program = attnc::load(case.spec.source_file(), &case.spec.options()).unwrap();
        let data = case.data();
        let inputs = case.inputs(&data);
        let reference = program.run_reference(&inputs);
        let schedule = attnc::codegen::ptx::schedule(case.shapes.d, attnc::codegen::ptx::Dtype::F32);
        let got = ptx_run::emulate(&program.spec, &schedule, attnc::codegen::ptx::Dtype::F32, &inputs)
            .map_err(|e| program.first_error_of(&inputs, e));
        agree_to("ptx f32 (emulated)", &case, &reference, got, 1e-4)?;
    }
}
