//! CPU load traces: one utilisation sample per VM per interval, stored as whole percents
//! in one flat `u8` array (a PlanetLab day of 1052 VMs is 300 KB), so memory grows
//! linearly with VMs x samples.
//!
//! Two sources: a PlanetLab folder (one file per VM, one integer percent per line, plain
//! or gzip-compressed) and a seeded synthetic generator (a daily wave plus autocorrelated
//! noise around a per-VM mean).

use std::io::Read;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::SimError;

/// Utilisation samples for a set of VMs.
#[derive(Clone, Debug)]
pub struct Traces {
    /// Seconds between two samples.
    pub interval: f64,
    /// Samples per VM.
    pub samples: usize,
    /// `vms x samples` whole percents, VM-major.
    data: Vec<u8>,
    /// Where each VM's trace came from (file name or a synthetic label).
    pub names: Vec<String>,
}

impl Traces {
    pub fn vms(&self) -> usize {
        self.names.len()
    }

    /// Utilisation (0..=1) of `vm` during sample `k`; past the end the last sample holds.
    pub fn utilisation(&self, vm: usize, k: usize) -> f64 {
        let k = k.min(self.samples - 1);
        f64::from(self.data[vm * self.samples + k]) / 100.0
    }

    /// Builds traces from whole-percent rows (each row one VM, all the same length).
    pub fn from_rows(interval: f64, rows: Vec<(String, Vec<u8>)>) -> Result<Traces, SimError> {
        let samples = rows.first().map_or(0, |r| r.1.len());
        if samples == 0 {
            return Err(SimError::BadTrace("no samples in the traces".into()));
        }
        let mut data = Vec::with_capacity(rows.len() * samples);
        let mut names = Vec::with_capacity(rows.len());
        for (name, row) in rows {
            if row.len() != samples {
                return Err(SimError::BadTrace(format!(
                    "{name}: {} samples, expected {samples} like the others",
                    row.len()
                )));
            }
            data.extend(row.iter().map(|v| (*v).min(100)));
            names.push(name);
        }
        Ok(Traces {
            interval,
            samples,
            data,
            names,
        })
    }

    /// Reads a PlanetLab day: every regular file in `dir`, sorted by name, one VM each.
    /// A file named `NAME.gz` is gzip-compressed and read as `NAME` (the repository
    /// ships its days that way), so a compressed day and CloudSim's plain one give the
    /// same VMs in the same order. Files shorter than `samples` lines are rejected;
    /// longer ones are cut.
    pub fn load_planetlab(dir: &Path, samples: usize, interval: f64) -> Result<Traces, SimError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| SimError::Io { path, source }
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                let file_name = entry.file_name().to_string_lossy().into_owned();
                let (name, gzip) = match file_name.strip_suffix(".gz") {
                    Some(stem) => (stem.to_owned(), true),
                    None => (file_name, false),
                };
                files.push((name, gzip, entry.path()));
            }
        }
        // By the name without `.gz`: the suffix would reorder names that are prefixes of
        // others ("a-b.gz" sorts before "a.gz", "a" before "a-b").
        files.sort();
        if files.is_empty() {
            return Err(SimError::BadTrace(format!(
                "{} holds no trace files (expected one file per VM, one CPU percent per line)",
                dir.display()
            )));
        }
        let mut rows = Vec::with_capacity(files.len());
        for (name, gzip, path) in files {
            let text = read_text(&path, gzip).map_err(io(&path))?;
            let row = parse_percent_lines(&text, samples)
                .map_err(|msg| SimError::BadTrace(format!("{}: {msg}", path.display())))?;
            rows.push((name, row));
        }
        Traces::from_rows(interval, rows)
    }

    /// Generates `vms` seeded synthetic traces with `samples` samples each.
    pub fn synthetic(
        spec: &SyntheticLoad,
        vms: usize,
        samples: usize,
        interval: f64,
        seed: u64,
    ) -> Traces {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut data = Vec::with_capacity(vms * samples);
        let day_phase = std::f64::consts::TAU * interval / 86_400.0;
        for _ in 0..vms {
            let mean =
                (spec.mean + spec.mean_spread * (rng.gen::<f64>() * 2.0 - 1.0)).clamp(0.0, 1.0);
            let phase = rng.gen::<f64>() * std::f64::consts::TAU;
            let mut noise = 0.0;
            for k in 0..samples {
                // Sum of three uniforms: a cheap, bounded stand-in for a normal draw.
                let eps = rng.gen::<f64>() + rng.gen::<f64>() + rng.gen::<f64>() - 1.5;
                noise = spec.noise_correlation * noise + spec.noise * eps * 2.0;
                let u = mean + spec.daily_amplitude * (day_phase * k as f64 + phase).sin() + noise;
                data.push((u.clamp(0.0, 1.0) * 100.0).round() as u8);
            }
        }
        Traces {
            interval,
            samples,
            data,
            names: (0..vms).map(|i| format!("synthetic-{i}")).collect(),
        }
    }
}

/// Parameters of the synthetic load, all as fractions of a VM's CPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticLoad {
    /// Average utilisation over all VMs.
    #[serde(default = "default_mean")]
    pub mean: f64,
    /// Per-VM means are drawn uniformly from `mean ± mean_spread`.
    #[serde(default = "default_spread")]
    pub mean_spread: f64,
    /// Height of the daily wave (each VM gets a random phase).
    #[serde(default = "default_amplitude")]
    pub daily_amplitude: f64,
    /// Scale of the per-sample noise.
    #[serde(default = "default_noise")]
    pub noise: f64,
    /// How much of the previous sample's noise carries over (0 = white noise).
    #[serde(default = "default_correlation")]
    pub noise_correlation: f64,
}

fn default_mean() -> f64 {
    0.25
}
fn default_spread() -> f64 {
    0.15
}
fn default_amplitude() -> f64 {
    0.1
}
fn default_noise() -> f64 {
    0.05
}
fn default_correlation() -> f64 {
    0.8
}

impl Default for SyntheticLoad {
    fn default() -> Self {
        SyntheticLoad {
            mean: default_mean(),
            mean_spread: default_spread(),
            daily_amplitude: default_amplitude(),
            noise: default_noise(),
            noise_correlation: default_correlation(),
        }
    }
}

/// A trace file's text, gunzipped when `gzip`.
fn read_text(path: &Path, gzip: bool) -> std::io::Result<String> {
    if !gzip {
        return std::fs::read_to_string(path);
    }
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path)?).read_to_string(&mut text)?;
    Ok(text)
}

/// Parses one trace file: `samples` lines, each a whole percent 0..=100.
pub fn parse_percent_lines(text: &str, samples: usize) -> Result<Vec<u8>, String> {
    let mut row = Vec::with_capacity(samples);
    for (i, line) in text.lines().enumerate() {
        if row.len() == samples {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: f64 = line
            .parse()
            .map_err(|_| format!("line {}: `{line}` is not a CPU percent", i + 1))?;
        if !(0.0..=100.0).contains(&v) {
            return Err(format!("line {}: {v} is outside 0..=100", i + 1));
        }
        row.push(v.round() as u8);
    }
    if row.len() < samples {
        return Err(format!(
            "{} samples, need {samples} (one per line)",
            row.len()
        ));
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_lines() {
        assert_eq!(
            parse_percent_lines("1\n2\n\n3\n4\n", 3).unwrap(),
            vec![1, 2, 3]
        );
        assert!(parse_percent_lines("1\nx\n", 2)
            .unwrap_err()
            .contains("line 2"));
        assert!(parse_percent_lines("1\n", 2)
            .unwrap_err()
            .contains("need 2"));
        assert!(parse_percent_lines("101\n", 1)
            .unwrap_err()
            .contains("outside"));
    }

    #[test]
    fn gzip_files_read_as_their_plain_names_in_plain_order() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let lines = |v: u8| format!("{v}\n{v}\n");
        // "a" sorts before "a-b", but "a.gz" after "a-b.gz": the order must be "a" first.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(lines(7).as_bytes()).unwrap();
        std::fs::write(dir.path().join("a.gz"), gz.finish().unwrap()).unwrap();
        std::fs::write(dir.path().join("a-b"), lines(9)).unwrap();
        let t = Traces::load_planetlab(dir.path(), 2, 300.0).unwrap();
        assert_eq!(t.names, vec!["a", "a-b"]);
        assert_eq!(t.utilisation(0, 1), 0.07);
        assert_eq!(t.utilisation(1, 0), 0.09);
        std::fs::write(dir.path().join("c.gz"), lines(1)).unwrap();
        let err = Traces::load_planetlab(dir.path(), 2, 300.0).unwrap_err();
        assert!(err.to_string().contains("c.gz"), "{err}");
    }

    #[test]
    fn synthetic_is_seeded_and_bounded() {
        let spec = SyntheticLoad::default();
        let a = Traces::synthetic(&spec, 50, 288, 300.0, 7);
        let b = Traces::synthetic(&spec, 50, 288, 300.0, 7);
        let c = Traces::synthetic(&spec, 50, 288, 300.0, 8);
        assert_eq!(a.data, b.data);
        assert_ne!(a.data, c.data);
        assert!(a.data.iter().all(|v| *v <= 100));
        let mean: f64 = a.data.iter().map(|v| f64::from(*v)).sum::<f64>() / a.data.len() as f64;
        assert!((mean - 25.0).abs() < 8.0, "mean {mean}");
    }

    #[test]
    fn past_the_end_holds_the_last_sample() {
        let t = Traces::from_rows(300.0, vec![("a".into(), vec![10, 20])]).unwrap();
        assert_eq!(t.utilisation(0, 5), 0.2);
    }
}
