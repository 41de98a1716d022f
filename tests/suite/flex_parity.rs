//! The reference interpreter reproduces FlexAttention's outputs (out and lse)
//! to 1e-5 on every fixture in `tests/fixtures/` (made by
//! `scripts/flex_fixtures.py` with PyTorch's flex_attention).

use crate::support::common;

#[test]
fn reference_matches_flex_attention_on_every_fixture() {
    let dirs = common::fixture_dirs();
    assert!(
        dirs.len() >= 18,
        "expected the fixture set, found {} cases",
        dirs.len()
    );
    for dir in dirs {
        let case = common::load_case(&dir);
        let got = case
            .program()
            .run_reference(&case.inputs())
            .unwrap_or_else(|e| panic!("{}: {}", case.name, e.render()));
        common::assert_close(&case.name, &got, &case.out, &case.lse, 1e-5);
    }
}

#[test]
fn every_example_is_covered_by_a_fixture() {
    let mut used: Vec<String> = common::fixture_dirs()
        .iter()
        .map(|d| {
            common::load_case(d)
                .spec_path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    used.sort();
    for e in std::fs::read_dir(common::root().join("examples")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "attn") {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                used.contains(&name),
                "example {name} has no FlexAttention fixture"
            );
        }
    }
}
