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

#[test]
fn jit_matches_reference_on_focused_specs_with_random_inputs() {
    use ndarray::Array4;
    insta::glob!("specs", "*.attn", |path| {
        let program = attnc::load(attnc::SourceFile::read(path).unwrap(), &Default::default()).unwrap();
        let kernels: Vec<_> = [(64, 64), (5, 16), (32, 48)]
            .into_iter()
            .map(|(bq, bkv)| program.compile_jit(bq, bkv, GemmImpl::detect()).unwrap())
            .collect();
        for (b, h, hkv, q_len, kv_len, offset, d) in [(1, 2, 1, 100, 100, 0, 8), (2, 2, 2, 37, 70, 20, 16), (1, 1, 1, 7, 3, 0, 5)] {
            let mut rng = attnc::bench::Rng::new(q_len as u64);
            let q = rng.array4((b, h, q_len, d));
            let k = rng.array4((b, hkv, kv_len, d));
            let v = rng.array4((b, hkv, kv_len, d));
            let shapes = attnc::sema::eval::Shapes { b, h, hkv, q: q_len, kv: kv_len, d };
            let mut inputs = attnc::Inputs::new(q.view(), k.view(), v.view()).q_offset(offset).with_lse();
            for decl in &program.spec.buffers {
                let recipe = match decl.elem {
                    attnc::sema::Type::Int => "docs:3",
                    attnc::sema::Type::Float => "uniform",
                    attnc::sema::Type::Bool => "bernoulli:0.6",
                };
                let data = attnc::bench::generate_buffer(decl, &shapes, recipe, &mut rng).unwrap();
                inputs.buffers.insert(decl.name.clone(), data);
            }
            let _: &Array4<f32> = &q;
            let reference = program.run_reference(&inputs);
            for kernel in &kernels {
                let got = kernel.run(&inputs);
                match (&reference, &got) {
                    (Ok(r), Ok(g)) => common::assert_close(&format!("{}", path.display()), g, &r.out, r.lse.as_ref().unwrap(), 1e-5),
                    (Err(_), Err(_)) => {}
                    (r, g) => panic!(
                        "{}: reference {:?} but jit {:?}",
                        path.display(),
                        r.as_ref().map(|_| "ok").map_err(|e| e.to_string()),
                        g.as_ref().map(|_| "ok").map_err(|e| e.to_string())
                    ),
                }
            }
        }
    });
}
