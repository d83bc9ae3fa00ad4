//! A mutation fuzzer over the readers of files tsq does not write itself or reads back after a
//! crash: the GGUF header, pipeline YAML (load and every check), expert files and SentencePiece
//! `tokenizer.model` files. Each target
//! starts from real seeds and feeds mutated bytes (bit flips, boundary integers, splices,
//! truncations) for a time budget; a panic fails the test and leaves the input under
//! `target/fuzz-failures/` to reproduce with. CI runs each target for 2 s; run longer with
//! `TSQ_FUZZ_SECONDS=300 cargo test --lib fuzz -- --nocapture` (docs/security.md has the runs).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Integers at the edges that crafted files use (as 1, 4 and 8 little-endian bytes).
const BOUNDARIES: [u64; 9] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff_ffff,
    1 << 32,
    1 << 63,
    u64::MAX,
];

fn budget() -> Duration {
    let seconds = std::env::var("TSQ_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(seconds)
}

/// One mutation of `input`, drawing from the other seeds for splices.
fn mutate(rng: &mut ChaCha8Rng, input: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    // Mostly one small change, so most inputs stay near-valid and reach past the first check.
    let changes = if rng.random_bool(0.75) {
        1
    } else {
        rng.random_range(2..=8)
    };
    for _ in 0..changes {
        let len = out.len().max(1);
        let at = rng.random_range(0..len).min(out.len());
        match rng.random_range(0..12) {
            0..=3 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            4..=6 => {
                let value = BOUNDARIES[rng.random_range(0..BOUNDARIES.len())].to_le_bytes();
                let width = [1, 4, 8][rng.random_range(0..3)];
                let end = (at + width).min(out.len());
                out[at..end].copy_from_slice(&value[..end - at]);
            }
            7 => out.truncate(at),
            8 => {
                let end = rng.random_range(at..=out.len().min(at + 64));
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
            9 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let from = rng.random_range(0..other.len().max(1)).min(other.len());
                let end = (from + rng.random_range(1..256)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
            _ => {
                let end = rng.random_range(at..=out.len().min(at + 16));
                out.drain(at..end);
            }
        }
    }
    out
}

/// Feeds mutations of `seeds` to `target` until the budget is spent; a panic fails with the
/// input saved. Returns how many inputs ran.
fn fuzz(name: &str, seeds: Vec<Vec<u8>>, target: impl Fn(&[u8])) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(
        std::env::var("TSQ_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    );
    let started = Instant::now();
    let mut runs = 0;
    while started.elapsed() < budget() {
        let seed = &seeds[rng.random_range(0..seeds.len())];
        let input = mutate(&mut rng, seed, &seeds);
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(format!("{name}-{}", blake3::hash(&input).to_hex()));
            std::fs::write(&file, &input).unwrap();
            panic!(
                "`{name}` panicked on {} (after {runs} inputs)",
                file.display()
            );
        }
        runs += 1;
    }
    eprintln!(
        "fuzz `{name}`: {runs} inputs in {:.0?}, no panic",
        started.elapsed()
    );
    runs
}

fn gguf_seed(metadata: &[(&str, candle_core::quantized::gguf_file::Value)]) -> Vec<u8> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let device = candle_core::Device::Cpu;
    let t = |dtype| {
        let x = candle_core::Tensor::arange(0f32, 64.0, &device)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        QTensor::quantize(&x, dtype).unwrap()
    };
    let (f, q) = (t(GgmlDType::F32), t(GgmlDType::Q4_0));
    let mut out = std::io::Cursor::new(Vec::new());
    let metadata: Vec<(&str, &_)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    candle_core::quantized::gguf_file::write(
        &mut out,
        &metadata,
        &[("token_embd.weight", &f), ("blk.0.attn_q.weight", &q)],
    )
    .unwrap();
    out.into_inner()
}

#[test]
fn gguf_headers() {
    use candle_core::quantized::gguf_file::Value;
    let seeds = vec![
        gguf_seed(&[]),
        gguf_seed(&[
            ("general.architecture", Value::String("llama".into())),
            ("general.alignment", Value::U32(64)),
            (
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
            ("llama.rope.freq_base", Value::F32(1e4)),
        ]),
    ];
    fuzz("gguf", seeds, |bytes| {
        let mut reader = std::io::Cursor::new(bytes);
        if let Ok(content) =
            crate::model::gguf_header::read_content(&mut reader, bytes.len() as u64)
        {
            // What the header vouches for must load.
            for name in content.tensor_infos.keys() {
                let _ = content.tensor(&mut reader, name, &candle_core::Device::Cpu);
            }
        }
    });
}

/// A project directory whose pipeline's relative paths reach the repository's datasets and
/// templates (symlinks: the checks only read).
fn yaml_project() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for sub in ["datasets", "templates"] {
        std::os::unix::fs::symlink(repo.join(sub), dir.path().join(sub)).unwrap();
    }
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    let file = dir.path().join("pipelines/fuzz.yaml");
    (dir, file)
}

#[test]
fn pipeline_yaml() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds: Vec<Vec<u8>> = ["quickstart", "experts", "transformer2", "eval_base"]
        .iter()
        .map(|p| std::fs::read(repo.join(format!("pipelines/{p}.yaml"))).unwrap())
        .collect();
    seeds.push(b"a: &x [*x, {b: !!str 1}]\nc: |\n  text\n".to_vec());
    let (_dir, file) = yaml_project();
    fuzz("yaml", seeds, |bytes| {
        std::fs::write(&file, bytes).unwrap();
        let _ = crate::pipeline::load(&file, &[]);
    });
}

#[test]
fn expert_files() {
    use crate::svf::Parametrization;
    use crate::svf::expert::{BaseModel, Expert};
    let values: Vec<(String, candle_core::Tensor)> =
        ["layers.0.mlp.up_proj", "layers.3.attn.q_proj"]
            .iter()
            .map(|n| {
                let s =
                    candle_core::Tensor::new(&[3f32, 2.0, 1.0], &candle_core::Device::Cpu).unwrap();
                (n.to_string(), s)
            })
            .collect();
    let base = BaseModel {
        name: "tiny".into(),
        blake3: "ab".repeat(32),
    };
    let dir = tempfile::tempdir().unwrap();
    let seeds: Vec<Vec<u8>> = [Parametrization::Sigmoid, Parametrization::Linear]
        .into_iter()
        .map(|p| {
            let file = dir.path().join("e.safetensors");
            Expert::initial(base.clone(), p, &values, 1)
                .unwrap()
                .save(&file)
                .unwrap();
            std::fs::read(&file).unwrap()
        })
        .collect();
    let file = Path::new("fuzzed.safetensors");
    fuzz("expert", seeds, |bytes| {
        if let Ok(expert) = Expert::from_bytes(file, bytes) {
            let _ = expert.effective_scales();
        }
    });
}

#[test]
fn sentencepiece_models() {
    use crate::model::tokenizer::Tokenizer;
    use crate::model::tokenizer::sentencepiece::testing::{
        BPE, KEEP_WHITESPACE, model_file, pieces, small_vocabulary,
    };
    let seeds = vec![
        model_file(&small_vocabulary(), &BPE, &KEEP_WHITESPACE),
        model_file(
            &pieces(&[("\u{2581}a", -1.0), ("a", -2.0)]),
            &BPE,
            &KEEP_WHITESPACE,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    fuzz("sentencepiece", seeds, |bytes| {
        std::fs::write(dir.path().join("tokenizer.model"), bytes).unwrap();
        // What loads must tokenize and decode.
        if let Ok(tok) = Tokenizer::in_directory(dir.path()) {
            let ids = tok.encode("hello wörld <s>").unwrap_or_default();
            let _ = tok.decode(&ids, false);
            let _ = tok.encode_continuation(" a");
        }
    });
}
