//! `widgetry-codec-bench`: bytes per sample and encode/decode speed of
//! every codec on folders of `timestamp,value` CSV files (one series per
//! file) and on a generated day of agent samples. Prints a Markdown table
//! (docs/BENCHMARKS.md records it). Every encoding is decoded and compared
//! bit for bit before it is timed; a mismatch aborts the run.
//!
//! Usage: widgetry-codec-bench [--chunk-points N] [--agent] [DIR ...]
//!        widgetry-codec-bench --write-agent-csv DIR   (the agent day as CSV
//!        files, for `widgetry import` in scripts/bench-storage.sh)

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use widgetry_codec::{Codec, decode};
use widgetry_common::csv::{Row, SampleReader};

const CODECS: [Codec; 4] = [
    Codec::Gorilla,
    Codec::Pcodec,
    Codec::DeltaZstd(3),
    Codec::DeltaZstd(19),
];

/// Each timing repeats the work until at least this long has passed.
const MIN_TIME: Duration = Duration::from_millis(400);

struct Series {
    ts: Vec<i64>,
    values: Vec<f64>,
}

struct Dataset {
    name: String,
    series: Vec<Series>,
    /// The CSV files' bytes (none for generated data).
    csv: Vec<Vec<u8>>,
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut chunk = 0usize;
    let mut sets = Vec::new();
    while let Some(a) = args.next() {
        let loaded = match a.as_str() {
            "-h" | "--help" => {
                println!(
                    "usage: widgetry-codec-bench [--chunk-points N] [--agent] [DIR ...]\n\
                     DIR: a folder of timestamp,value CSV files (one series each);\n\
                     --agent: a generated day of 1 Hz agent samples (CPU %, memory bytes);\n\
                     --write-agent-csv DIR: write that day as DIR/cpu.usage_pct.csv and DIR/mem.used_bytes.csv;\n\
                     --chunk-points N: encode each series in chunks of N points (default: whole)"
                );
                return ExitCode::SUCCESS;
            }
            "--agent" => Ok(agent_day()),
            "--write-agent-csv" => {
                let Some(dir) = args.next() else {
                    eprintln!("widgetry-codec-bench: --write-agent-csv needs a folder");
                    return ExitCode::from(2);
                };
                return match write_agent_csv(Path::new(&dir)) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("widgetry-codec-bench: {dir}: {e}");
                        ExitCode::FAILURE
                    }
                };
            }
            "--chunk-points" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) => {
                    chunk = n;
                    continue;
                }
                None => Err("--chunk-points needs a number".to_string()),
            },
            dir => load_dir(Path::new(dir)),
        };
        match loaded {
            Ok(set) => sets.push(set),
            Err(e) => {
                eprintln!("widgetry-codec-bench: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if sets.is_empty() {
        eprintln!("widgetry-codec-bench: give at least one DIR or --agent (see --help)");
        return ExitCode::from(2);
    }
    println!(
        "chunks: {}",
        if chunk == 0 {
            "one per series".to_string()
        } else {
            format!("{chunk} points")
        }
    );
    println!(
        "| data | series | samples | codec | bytes/sample | encode Msamples/s | encode MB/s | decode Msamples/s | decode MB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for set in &sets {
        let chunks: Vec<(&[i64], &[f64])> = set
            .series
            .iter()
            .flat_map(|s| {
                let n = if chunk == 0 { s.ts.len().max(1) } else { chunk };
                s.ts.chunks(n).zip(s.values.chunks(n))
            })
            .collect();
        let samples: usize = set.series.iter().map(|s| s.ts.len()).sum();
        for codec in CODECS {
            if let Err(e) = bench(set, &chunks, samples, codec) {
                eprintln!("widgetry-codec-bench: {}: {}: {e}", set.name, codec.name());
                return ExitCode::FAILURE;
            }
        }
        if !set.csv.is_empty() {
            bench_csv_zstd(set, samples);
        }
    }
    ExitCode::SUCCESS
}

fn bench(
    set: &Dataset,
    chunks: &[(&[i64], &[f64])],
    samples: usize,
    codec: Codec,
) -> Result<(), String> {
    let encoded: Vec<Vec<u8>> = chunks
        .iter()
        .map(|(t, v)| codec.encode(t, v).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    for ((t, v), bytes) in chunks.iter().zip(&encoded) {
        let (t2, v2) = decode(bytes).map_err(|e| e.to_string())?;
        let same_values = v2.len() == v.len()
            && v2
                .iter()
                .zip(v.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits());
        if t2 != *t || !same_values {
            return Err("decoded points differ from the input".into());
        }
    }
    let size: usize = encoded.iter().map(Vec::len).sum();
    let enc = time(|| {
        for (t, v) in chunks {
            std::hint::black_box(codec.encode(t, v).map(|b| b.len()).unwrap_or(0));
        }
    });
    let dec = time(|| {
        for bytes in &encoded {
            std::hint::black_box(decode(bytes).map(|(t, _)| t.len()).unwrap_or(0));
        }
    });
    row(set, samples, &codec.name(), size, Some(enc), Some(dec));
    Ok(())
}

/// The reference row: zstd-19 of the CSV text (decode is decompression
/// only, without parsing, so it flatters this row).
fn bench_csv_zstd(set: &Dataset, samples: usize) {
    let frames: Vec<Vec<u8>> = set
        .csv
        .iter()
        .map(|c| zstd::bulk::compress(c, 19).unwrap_or_default())
        .collect();
    let size = frames.iter().map(Vec::len).sum();
    let enc = time(|| {
        for c in &set.csv {
            std::hint::black_box(zstd::bulk::compress(c, 19).map(|f| f.len()).unwrap_or(0));
        }
    });
    let dec = time(|| {
        for (f, c) in frames.iter().zip(&set.csv) {
            std::hint::black_box(
                zstd::bulk::decompress(f, c.len())
                    .map(|d| d.len())
                    .unwrap_or(0),
            );
        }
    });
    row(
        set,
        samples,
        "zstd-19 of the CSV",
        size,
        Some(enc),
        Some(dec),
    );
}

/// Seconds per pass of `f`, repeated for at least [`MIN_TIME`].
fn time(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut passes = 0u32;
    while passes < 2 || start.elapsed() < MIN_TIME {
        f();
        passes += 1;
    }
    start.elapsed().as_secs_f64() / f64::from(passes)
}

fn row(
    set: &Dataset,
    samples: usize,
    codec: &str,
    size: usize,
    enc: Option<f64>,
    dec: Option<f64>,
) {
    let n = samples as f64;
    let speed = |s: Option<f64>| match s {
        Some(s) => format!("{:.1} | {:.0}", n / s / 1e6, n * 16.0 / s / 1e6),
        None => "– | –".into(),
    };
    println!(
        "| {} | {} | {} | {} | {:.2} | {} | {} |",
        set.name,
        set.series.len(),
        samples,
        codec,
        size as f64 / n,
        speed(enc),
        speed(dec)
    );
}

fn load_dir(dir: &Path) -> Result<Dataset, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("{}: no .csv files", dir.display()));
    }
    let mut set = Dataset {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string()),
        series: Vec::new(),
        csv: Vec::new(),
    };
    for f in files {
        let bytes = std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let mut reader = SampleReader::new(&bytes[..]);
        let mut s = Series {
            ts: Vec::new(),
            values: Vec::new(),
        };
        while let Some(row) = reader
            .next_row()
            .map_err(|e| format!("{}: {e}", f.display()))?
        {
            match row {
                Row::Header { .. } => {}
                Row::Sample { ts_ms, value, .. } => {
                    s.ts.push(ts_ms);
                    s.values.push(value);
                }
                Row::Bad { line, error } => {
                    return Err(format!("{}:{line}: {error}", f.display()));
                }
            }
        }
        set.series.push(s);
        set.csv.push(bytes);
    }
    Ok(set)
}

/// Writes [`agent_day`] as `timestamp,value` files (epoch ms; values in
/// Rust's shortest round-trip form, so an import is bit-exact).
fn write_agent_csv(dir: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir)?;
    let day = agent_day();
    for (name, s) in ["cpu.usage_pct", "mem.used_bytes"].iter().zip(&day.series) {
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(dir.join(format!("{name}.csv")))?);
        writeln!(out, "timestamp,value")?;
        for (t, v) in s.ts.iter().zip(&s.values) {
            writeln!(out, "{t},{v:?}")?;
        }
        out.flush()?;
    }
    Ok(())
}

/// A deterministic stand-in for a day of the agent's two host series at
/// 1 Hz, shaped like what `widgetry-agent` samples: `cpu.usage_pct` is
/// sysinfo's f32 average of two cores' busy/total tick ratios (about 100
/// ticks a second each) widened to f64; `mem.used_bytes` is a whole number
/// of 4 KiB pages drifting around 1.2 GiB; timestamps are the sampler's
/// 1 s ticks with a few ms of jitter.
fn agent_day() -> Dataset {
    let mut rng = SplitMix(0x5eed_0001);
    let n = 86_400usize;
    let start = 1_764_633_600_000i64; // 2025-12-02 00:00:00 UTC
    let ts: Vec<i64> = (0..n as i64)
        .map(|i| start + i * 1000 + (rng.next() % 7) as i64 - 3)
        .collect();
    let mut load = 0.1f64;
    let cpu = (0..n)
        .map(|_| {
            load = (load + (rng.unit() - 0.5) * 0.05).clamp(0.01, 0.95);
            let mut sum = 0f32;
            for _ in 0..2 {
                let total = 99 + (rng.next() % 3) as u32;
                let busy = ((f64::from(total) * load) + rng.unit() * 4.0 - 2.0)
                    .clamp(0.0, f64::from(total)) as u32;
                sum += busy as f32 / total as f32 * 100.0;
            }
            f64::from(sum / 2.0)
        })
        .collect();
    let mut pages = 300_000i64;
    let mem = (0..n)
        .map(|_| {
            let r = rng.next() % 100;
            pages += match r {
                0..=59 => 0,
                60..=94 => (rng.next() % 9) as i64 - 4,
                _ => (rng.next() % 2001) as i64 - 1000,
            };
            pages = pages.clamp(100_000, 1_000_000);
            (pages * 4096) as f64
        })
        .collect();
    Dataset {
        name: "agent day (generated)".into(),
        series: vec![
            Series {
                ts: ts.clone(),
                values: cpu,
            },
            Series { ts, values: mem },
        ],
        csv: Vec::new(),
    }
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}
