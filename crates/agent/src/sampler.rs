//! System sampling with sysinfo: global CPU % and memory. Series keys are
//! built once; each sample call allocates nothing of its own.

use sysinfo::System;
use widgetry_proto::SeriesKey;

/// Reads CPU and memory statistics.
pub struct Sampler {
    sys: System,
    cpu: SeriesKey,
    used: SeriesKey,
    total: SeriesKey,
}

impl Sampler {
    /// Creates a sampler; the first CPU reading is a baseline.
    pub fn new() -> Result<Self, String> {
        let mut sys = System::new().map_err(|e| e.to_string())?;
        sys.refresh_cpu_usage();
        Ok(Sampler {
            sys,
            cpu: SeriesKey::plain("cpu.usage_pct"),
            used: SeriesKey::plain("mem.used_bytes"),
            total: SeriesKey::plain("mem.total_bytes"),
        })
    }

    /// Takes one reading of every series and hands each to `emit`.
    pub fn sample(&mut self, mut emit: impl FnMut(&SeriesKey, f64)) {
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        emit(&self.cpu, f64::from(self.sys.global_cpu_usage()));
        emit(&self.used, self.sys.used_memory() as f64);
        emit(&self.total, self.sys.total_memory() as f64);
    }
}
