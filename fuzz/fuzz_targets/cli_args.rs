//! Fuzz target: command lines of `attnc`, run in-process.
//!
//! Each input byte picks a token of the CLI's vocabulary: subcommands,
//! flags, values at and far beyond every limit (0, 2^31, 10^12, 2^64 - 1,
//! 2^64, negative and malformed numbers, huge tiles), specs, `.npy` inputs
//! (among them files whose header claims more than they hold), devices and
//! missing files, and outputs in a scratch directory; a byte with the high
//! bit set takes the next bytes as a raw argument (without `/`) instead.
//! The target works in a scratch directory holding copies of the specs and
//! fixtures, so outputs (also those a command line aims at a spec or an
//! input) never touch the repository (`cargo fuzz` gives libFuzzer an
//! absolute `-artifact_prefix`; when running the binary directly, give one
//! too, or crashes are saved in the scratch directory). The command line
//! goes through the binary's own entry point (`src/main.rs` is compiled
//! into this target as a module), so every check of the CLI is exercised.
//!
//! A panic or an abort (a failed allocation) is a bug: attnc answers every
//! command line with its output, an error (status 1) or a usage error
//! (status 2). Run it with an RSS limit, e.g.
//! `cargo +nightly fuzz run cli_args -- -rss_limit_mb=4096 -timeout=60`:
//! the CLI checks every allocation sized by its input against the memory
//! available, so none may exceed the RSS limit by an input's doing.
//! Repetition counts (`--runs`, `--warmup`, `--repeat`) take small values
//! only: a billion timed runs is a valid, long request.
//! The same property runs on stable in `tests/suite/robustness.rs`
//! (`command_lines_never_crash`).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/main.rs"]
mod cli;

/// The scratch directory this target works in: copies of the specs and
/// fixtures the command lines name (relative paths resolve here, so no
/// command line can overwrite the repository's files), a few crafted `.npy`
/// files, and the outputs.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("attnc-fuzz-cli-{}", std::process::id()));
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for sub in ["examples", "tests/errors", "tests/fixtures/packed_docs"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            for entry in std::fs::read_dir(repo.join(sub)).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_file() {
                    std::fs::copy(entry.path(), dir.join(sub).join(entry.file_name())).unwrap();
                }
            }
        }
        std::env::set_current_dir(&dir).unwrap();
        let npy = attnc::npy::v1_file_bytes;
        let huge = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2147483648, 16), }";
        std::fs::write(dir.join("huge.npy"), npy(huge, &[0; 64])).unwrap();
        let small = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3, 4), }";
        std::fs::write(dir.join("small.npy"), npy(small, &[0; 96])).unwrap();
        let ints = "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }";
        std::fs::write(dir.join("ints.npy"), npy(ints, &[0; 24])).unwrap();
        dir
    })
}

const TOKENS: &[&str] = &[
    // Subcommands and their flags.
    "check",
    "run",
    "emit",
    "blocks",
    "bench",
    "--help",
    "--q",
    "--k",
    "--v",
    "--out",
    "--lse",
    "--buffer",
    "--param",
    "--entry",
    "--backend",
    "--gemm",
    "--block",
    "--dtype",
    "--q-offset",
    "--stage",
    "--dim",
    "--exp",
    "--q-len",
    "--kv-len",
    "--target",
    "--arch",
    "-o",
    "--b",
    "--h",
    "--at",
    "--json",
    "--png",
    "--repeat",
    "--batch",
    "--heads",
    "--kv-heads",
    "--threads",
    "--runs",
    "--warmup",
    "--seed",
    "--peak",
    // Values.
    "0",
    "1",
    "2",
    "3",
    "16",
    "64",
    "100",
    "2147483648",
    "1000000000000",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "abc",
    "",
    "generic",
    "auto",
    "64x64",
    "1x1",
    "0x16",
    "100000000x100000000",
    "18446744073709551615x16",
    "reference",
    "interp",
    "jit",
    "cuda",
    "native",
    "ast",
    "checked",
    "tile",
    "tile-unopt",
    "clif",
    "blocks",
    "ptx",
    "sm_80",
    "sm_90",
    "f16",
    "bf16",
    "f32",
    "exp",
    "exp2",
    "0,0",
    "0,1",
    "doc=docs:4",
    "doc=docs:0",
    "doc=iota",
    "doc=SCRATCH/ints.npy",
    "doc=SCRATCH/huge.npy",
    "slope=alibi",
    "window=8",
    "window=-1",
    "window=1e400",
    "x=1",
    "=",
    "noequals",
    // Specs, inputs, devices, missing files.
    "examples/causal.attn",
    "examples/packed_docs.attn",
    "examples/sliding_window.attn",
    "examples/alibi.attn",
    "tests/errors/score_in_mask.attn",
    "tests/fixtures/packed_docs/q.npy",
    "tests/fixtures/packed_docs/k.npy",
    "tests/fixtures/packed_docs/v.npy",
    "tests/fixtures/packed_docs/doc.npy",
    "SCRATCH/huge.npy",
    "SCRATCH/small.npy",
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "no/such/file",
    ".",
    // Outputs.
    "SCRATCH/o.npy",
    "SCRATCH/l.npy",
    "SCRATCH/e.txt",
    "SCRATCH/m.png",
    "SCRATCH/no/o.npy",
];

/// Flags whose value is a repetition count, kept small.
const COUNTS: &[&str] = &["--runs", "--warmup", "--repeat"];

fuzz_target!(|data: &[u8]| {
    let scratch = scratch().display().to_string();
    // The first two bytes pick a subcommand and a spec, so that most inputs
    // get past the command line's grammar; the rest are tokens.
    const COMMANDS: [&str; 5] = ["check", "run", "emit", "blocks", "bench"];
    const SPECS: [&str; 5] = [
        "examples/causal.attn",
        "examples/packed_docs.attn",
        "examples/sliding_window.attn",
        "examples/alibi.attn",
        "tests/errors/score_in_mask.attn",
    ];
    let (Some(&c), Some(&s)) = (data.first(), data.get(1)) else {
        return;
    };
    let mut args = vec![
        "attnc".to_string(),
        COMMANDS[c as usize % COMMANDS.len()].to_string(),
        SPECS[s as usize % SPECS.len()].to_string(),
    ];
    let mut i = 2;
    while i < data.len() && args.len() < 24 {
        let b = data[i];
        i += 1;
        if b & 0x80 != 0 {
            // A raw argument of up to 16 bytes, without `/`: as a path it
            // stays in the scratch directory.
            let len = (b & 0x0f) as usize;
            let end = (i + len).min(data.len());
            args.push(String::from_utf8_lossy(&data[i..end]).replace('/', "_"));
            i = end;
        } else {
            let token = TOKENS[b as usize % TOKENS.len()];
            args.push(token.replace("SCRATCH", &scratch));
        }
    }
    for w in args.windows(2) {
        if COUNTS.contains(&w[0].as_str()) && w[1].parse::<u64>().is_ok_and(|n| n > 3) {
            return;
        }
    }
    let status = cli::main_with(args.clone());
    assert!(status <= 2, "attnc {args:?} exited with {status}");
});
