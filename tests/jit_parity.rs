//! The Cranelift backend against the reference interpreter: every fixture,
//! several tilings, both tile-product implementations.

mod common;

use attnc::codegen::clif::GemmImpl;

fn gemms() -> Vec<GemmImpl> {
    let mut g = vec![GemmImpl::Jit, GemmImpl::detect()];
    g.dedup();
    g
}

#[test]
fn jit_matches_reference_on_every_fixture() {
    for dir in common::fixture_dirs() {
        let case = common::load_case(&dir);
        let program = case.program();
        let reference = program.run_reference(&case.inputs()).unwrap();
        let lse = reference.lse.clone().unwrap();
        for gemm in gemms() {
            for (bq, bkv) in [(64, 64), (16, 16), (7, 32), (1, 16)] {
                let kernel = program.compile_jit(bq, bkv, gemm).unwrap();
                let got = kernel.run(&case.inputs()).unwrap_or_else(|e| panic!("{}: {}", case.name, e.render()));
                common::assert_close(&format!("{} {bq}x{bkv} {}", case.name, gemm.name()), &got, &reference.out, &lse, 1e-5);
            }
        }
    }
}
