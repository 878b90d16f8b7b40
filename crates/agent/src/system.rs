//! System inputs read straight from `/proc` and `/sys` into one reused
//! buffer: CPU (total and per core), load, memory, swap, disk I/O, network,
//! uptime and temperatures; filesystem usage from the mount list and statvfs
//! ([`crate::procs`]).
//! Series keys are built once per CPU, disk, interface or mount and kept.
//!
//! Naming (also the README's table): `<input>.<quantity>_<unit>`, labels
//! for the instance (`cpu=0`, `device=vda`, `iface=eth0`, `mount=/`,
//! `zone=…`). Rates are per second over the last interval, rounded to
//! whole units; percentages are rounded to 1/16 %, load to 1/256 and
//! temperatures to 1/8 °C, so every value is exact in the batch's compact
//! integer or 32-bit float encodings (DESIGN.md's wire format): a few
//! bytes per value on the wire instead of 8.

use std::collections::HashMap;
use std::time::Instant;

use widgetry_proto::SeriesKey;

/// One switchable group of series (`--inputs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The whole machine's CPU: `cpu.usage_pct`, `cpu.iowait_pct`.
    Cpu,
    /// Per core: `cpu.usage_pct{cpu=N}`.
    Cpus,
    Load,
    Mem,
    Swap,
    Fs,
    Disk,
    Net,
    Uptime,
    Temp,
}

impl Input {
    pub const ALL: [Input; 10] = [
        Input::Cpu,
        Input::Cpus,
        Input::Load,
        Input::Mem,
        Input::Swap,
        Input::Fs,
        Input::Disk,
        Input::Net,
        Input::Uptime,
        Input::Temp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Input::Cpu => "cpu",
            Input::Cpus => "cpus",
            Input::Load => "load",
            Input::Mem => "mem",
            Input::Swap => "swap",
            Input::Fs => "fs",
            Input::Disk => "disk",
            Input::Net => "net",
            Input::Uptime => "uptime",
            Input::Temp => "temp",
        }
    }

    /// Parses a comma-separated list such as `cpu,mem,net` (`all` for
    /// every input, `none` for none).
    pub fn parse_list(text: &str) -> Result<Vec<Input>, String> {
        let text = text.trim();
        if text == "all" {
            return Ok(Input::ALL.to_vec());
        }
        if text == "none" || text.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim) {
            let input = Input::ALL
                .into_iter()
                .find(|i| i.name() == part)
                .ok_or_else(|| {
                    format!(
                        "unknown input {part:?}; choose from {}, or all / none",
                        Input::ALL.map(Input::name).join(",")
                    )
                })?;
            if !out.contains(&input) {
                out.push(input);
            }
        }
        Ok(out)
    }
}

/// Filesystem usage and the disk/mount lists are refreshed every this
/// many intervals (they change slowly; statvfs of every mount each second
/// would cost more than it tells).
const SLOW_EVERY: u32 = 10;

fn key(name: &str, label: Option<(&str, &str)>) -> SeriesKey {
    match label {
        None => SeriesKey::plain(name),
        Some((k, v)) => SeriesKey {
            name: name.to_string(),
            labels: [(k.to_string(), v.to_string())].into_iter().collect(),
        },
    }
}

/// Cumulative counters of one instance, with the keys of their rates.
struct Counters<const N: usize> {
    keys: [SeriesKey; N],
    last: Option<[u64; N]>,
    seen: bool,
}

impl<const N: usize> Counters<N> {
    fn new(names: [&str; N], label: (&str, &str)) -> Self {
        Counters {
            keys: names.map(|n| key(n, Some(label))),
            last: None,
            seen: false,
        }
    }

    /// Emits per-second rates since the last reading.
    fn update(&mut self, now: [u64; N], secs: f64, emit: &mut impl FnMut(&SeriesKey, f64)) {
        if let Some(last) = self.last
            && secs > 0.0
        {
            for i in 0..N {
                let delta = now[i].saturating_sub(last[i]) as f64;
                emit(&self.keys[i], (delta / secs).round());
            }
        }
        self.last = Some(now);
        self.seen = true;
    }
}

struct Cpu {
    all: SeriesKey,
    iowait: SeriesKey,
    cores: Vec<SeriesKey>,
    /// Per line of /proc/stat ("cpu", "cpu0", ...): (busy, total) jiffies.
    last: Vec<(u64, u64, u64)>,
}

/// Reads the system inputs; see the module docs.
pub struct System {
    inputs: Vec<Input>,
    buf: String,
    raw: Vec<u8>,
    /// Files kept open and re-read from offset 0 (procfs and sysfs make
    /// a fresh text on every read at 0): one pread instead of open, statx,
    /// read, lseek and close each interval.
    files: HashMap<std::path::PathBuf, std::fs::File>,
    /// /proc/diskstats names that are not whole disks (checked once).
    not_disks: std::collections::HashSet<String>,
    cpu: Cpu,
    load: [SeriesKey; 3],
    mem: [SeriesKey; 3],
    swap: [SeriesKey; 2],
    uptime: SeriesKey,
    disks: HashMap<String, Counters<3>>,
    nets: HashMap<String, Counters<6>>,
    temps: Vec<(std::path::PathBuf, SeriesKey)>,
    fs_keys: HashMap<std::path::PathBuf, [SeriesKey; 2]>,
    last_at: Option<Instant>,
    tick: u32,
}

/// A label value: control characters dropped, `, { } = "` made `_`,
/// at most 64 characters, `unknown` if nothing is left.
pub(crate) fn label_value(s: &str) -> String {
    let v: String = s
        .chars()
        .filter(|c| !c.is_control())
        .map(|c| {
            if matches!(c, ',' | '{' | '}' | '=' | '"') {
                '_'
            } else {
                c
            }
        })
        .take(64)
        .collect();
    if v.is_empty() { "unknown".into() } else { v }
}

fn round_to(v: f64, steps: f64) -> f64 {
    (v * steps).round() / steps
}

impl System {
    pub fn new(inputs: &[Input]) -> Self {
        let mut s = System {
            inputs: inputs.to_vec(),
            buf: String::with_capacity(8192),
            raw: Vec::with_capacity(8192),
            files: HashMap::new(),
            not_disks: Default::default(),
            cpu: Cpu {
                all: key("cpu.usage_pct", None),
                iowait: key("cpu.iowait_pct", None),
                cores: Vec::new(),
                last: Vec::new(),
            },
            load: [
                key("load.1m", None),
                key("load.5m", None),
                key("load.15m", None),
            ],
            mem: [
                key("mem.total_bytes", None),
                key("mem.used_bytes", None),
                key("mem.available_bytes", None),
            ],
            swap: [key("swap.total_bytes", None), key("swap.used_bytes", None)],
            uptime: key("system.uptime_s", None),
            disks: HashMap::new(),
            nets: HashMap::new(),
            temps: Vec::new(),
            fs_keys: HashMap::new(),
            last_at: None,
            tick: 0,
        };
        if s.on(Input::Temp) {
            s.find_temps();
        }
        s
    }

    fn on(&self, input: Input) -> bool {
        self.inputs.contains(&input)
    }

    /// Reads `path` into the reused buffer; false if it cannot be read
    /// (then it is opened again next time).
    fn read(&mut self, path: impl AsRef<std::path::Path>) -> bool {
        use std::os::unix::fs::FileExt;
        let path = path.as_ref();
        self.buf.clear();
        if !self.files.contains_key(path) {
            match std::fs::File::open(path) {
                Ok(f) => {
                    self.files.insert(path.to_path_buf(), f);
                }
                Err(_) => return false,
            }
        }
        let Some(f) = self.files.get(path) else {
            return false;
        };
        self.raw.clear();
        let mut filled = 0usize;
        loop {
            if self.raw.len() - filled < 4096 {
                self.raw.resize(filled + 8192, 0);
            }
            let space = self.raw.len() - filled;
            match f.read_at(&mut self.raw[filled..], filled as u64) {
                Ok(0) => break,
                // procfs and sysfs hand out the whole text when it fits:
                // a short read is the end (no second read to learn it).
                Ok(n) if n < space => {
                    filled += n;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.files.remove(path);
                    return false;
                }
            }
            if filled > 1 << 20 {
                break;
            }
        }
        match std::str::from_utf8(&self.raw[..filled]) {
            Ok(text) => {
                self.buf.push_str(text);
                true
            }
            Err(_) => false,
        }
    }

    /// Takes one reading of every enabled input.
    pub fn sample(&mut self, mut emit: impl FnMut(&SeriesKey, f64)) {
        let now = Instant::now();
        let secs = self
            .last_at
            .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        self.last_at = Some(now);
        let slow = self.tick.is_multiple_of(SLOW_EVERY);
        self.tick = self.tick.wrapping_add(1);
        if (self.on(Input::Cpu) || self.on(Input::Cpus)) && self.read("/proc/stat") {
            self.cpu_from_buf(&mut emit);
        }
        if self.on(Input::Load) && self.read("/proc/loadavg") {
            let mut it = self.buf.split_ascii_whitespace();
            for k in &self.load {
                if let Some(v) = it.next().and_then(|t| t.parse::<f64>().ok()) {
                    emit(k, round_to(v, 256.0));
                }
            }
        }
        if (self.on(Input::Mem) || self.on(Input::Swap)) && self.read("/proc/meminfo") {
            self.mem_from_buf(&mut emit);
        }
        if self.on(Input::Uptime)
            && self.read("/proc/uptime")
            && let Some(v) = self
                .buf
                .split_ascii_whitespace()
                .next()
                .and_then(|t| t.parse::<f64>().ok())
        {
            emit(&self.uptime, v.floor());
        }
        if self.on(Input::Disk) && self.read("/proc/diskstats") {
            self.disks_from_buf(secs, &mut emit);
        }
        if self.on(Input::Net) && self.read("/proc/net/dev") {
            self.nets_from_buf(secs, &mut emit);
        }
        if self.on(Input::Temp) {
            for i in 0..self.temps.len() {
                let path = self.temps[i].0.clone();
                let ok = self.read(&path);
                if let Some(milli) = ok.then(|| self.buf.trim().parse::<f64>().ok()).flatten() {
                    emit(&self.temps[i].1, round_to(milli / 1000.0, 8.0));
                }
            }
        }
        if self.on(Input::Fs) && slow {
            self.fs_sample(&mut emit);
        }
    }

    fn cpu_from_buf(&mut self, emit: &mut impl FnMut(&SeriesKey, f64)) {
        let (whole, cores) = (self.on(Input::Cpu), self.on(Input::Cpus));
        let mut idx = 0usize;
        for line in self.buf.lines() {
            let Some(rest) = line.strip_prefix("cpu") else {
                break;
            };
            let mut f = rest.split_ascii_whitespace();
            let label = if rest.starts_with(' ') {
                None
            } else {
                f.next()
            };
            let mut v = [0u64; 8];
            for slot in &mut v {
                *slot = f.next().and_then(|t| t.parse().ok()).unwrap_or(0);
            }
            // user nice system idle iowait irq softirq steal
            let total: u64 = v.iter().sum();
            let idle = v[3] + v[4];
            let now = (total - idle.min(total), total, v[4]);
            if idx > 0 && !cores {
                break;
            }
            if idx >= self.cpu.last.len() {
                self.cpu.last.push(now);
                if let Some(n) = label {
                    self.cpu.cores.push(key("cpu.usage_pct", Some(("cpu", n))));
                }
                idx += 1;
                continue;
            }
            let last = self.cpu.last[idx];
            self.cpu.last[idx] = now;
            let dt = now.1.saturating_sub(last.1);
            if dt > 0 && (idx > 0 || whole) {
                let busy = 100.0 * now.0.saturating_sub(last.0) as f64 / dt as f64;
                let k = match idx {
                    0 => &self.cpu.all,
                    i => match self.cpu.cores.get(i - 1) {
                        Some(k) => k,
                        None => break,
                    },
                };
                emit(k, round_to(busy, 16.0));
                if idx == 0 {
                    let iowait = 100.0 * now.2.saturating_sub(last.2) as f64 / dt as f64;
                    emit(&self.cpu.iowait, round_to(iowait, 16.0));
                }
            }
            idx += 1;
        }
    }

    fn mem_from_buf(&mut self, emit: &mut impl FnMut(&SeriesKey, f64)) {
        let (mut total, mut avail, mut swap_total, mut swap_free) = (None, None, None, None);
        for line in self.buf.lines() {
            let mut f = line.split_ascii_whitespace();
            let (Some(name), Some(kb)) = (f.next(), f.next().and_then(|t| t.parse::<u64>().ok()))
            else {
                continue;
            };
            let bytes = Some(kb * 1024);
            match name {
                "MemTotal:" => total = bytes,
                "MemAvailable:" => avail = bytes,
                "SwapTotal:" => swap_total = bytes,
                "SwapFree:" => swap_free = bytes,
                _ => {}
            }
        }
        if self.inputs.contains(&Input::Mem)
            && let (Some(t), Some(a)) = (total, avail)
        {
            emit(&self.mem[0], t as f64);
            emit(&self.mem[1], t.saturating_sub(a) as f64);
            emit(&self.mem[2], a as f64);
        }
        if self.inputs.contains(&Input::Swap)
            && let (Some(t), Some(f)) = (swap_total, swap_free)
        {
            emit(&self.swap[0], t as f64);
            emit(&self.swap[1], t.saturating_sub(f) as f64);
        }
    }

    fn disks_from_buf(&mut self, secs: f64, emit: &mut impl FnMut(&SeriesKey, f64)) {
        for line in self.buf.lines() {
            let f: Vec<&str> = line.split_ascii_whitespace().take(14).collect();
            if f.len() < 14 {
                continue;
            }
            let name = f[2];
            if !self.disks.contains_key(name) {
                // Whole disks only (not partitions, loop or RAM devices),
                // found once and then kept.
                if self.not_disks.contains(name) {
                    continue;
                }
                if name.starts_with("loop")
                    || name.starts_with("ram")
                    || name.starts_with("zram")
                    || !std::path::Path::new("/sys/block").join(name).exists()
                    || self.disks.len() >= 64
                {
                    if self.not_disks.len() < 1024 {
                        self.not_disks.insert(name.to_string());
                    }
                    continue;
                }
                self.disks.insert(
                    name.to_string(),
                    Counters::new(
                        [
                            "disk.read_bytes_per_s",
                            "disk.write_bytes_per_s",
                            "disk.busy_pct",
                        ],
                        ("device", name),
                    ),
                );
            }
            let n = |i: usize| f[i].parse::<u64>().unwrap_or(0);
            // Sectors are 512 bytes in /proc/diskstats; io_ticks is in ms:
            // its rate per second / 10 is the busy percentage.
            let now = [n(5) * 512, n(9) * 512, n(12)];
            if let Some(c) = self.disks.get_mut(name) {
                let mut scaled = |k: &SeriesKey, v: f64| {
                    if k.name == "disk.busy_pct" {
                        emit(k, round_to((v / 10.0).min(100.0), 16.0));
                    } else {
                        emit(k, v);
                    }
                };
                c.update(now, secs, &mut scaled);
            }
        }
    }

    fn nets_from_buf(&mut self, secs: f64, emit: &mut impl FnMut(&SeriesKey, f64)) {
        for line in self.buf.lines().skip(2) {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            let name = name.trim();
            if name == "lo" {
                continue;
            }
            let f: Vec<u64> = rest
                .split_ascii_whitespace()
                .take(12)
                .map(|t| t.parse().unwrap_or(0))
                .collect();
            if f.len() < 12 {
                continue;
            }
            // rx: bytes packets errs drop ...; tx (from field 8): the same.
            let now = [f[0], f[8], f[1], f[9], f[2] + f[10], f[3] + f[11]];
            if !self.nets.contains_key(name) {
                // An interface that never moved a byte is not worth a series.
                if now[0] == 0 && now[1] == 0 || self.nets.len() >= 64 {
                    continue;
                }
                self.nets.insert(
                    name.to_string(),
                    Counters::new(
                        [
                            "net.rx_bytes_per_s",
                            "net.tx_bytes_per_s",
                            "net.rx_packets_per_s",
                            "net.tx_packets_per_s",
                            "net.errors_per_s",
                            "net.drops_per_s",
                        ],
                        ("iface", name),
                    ),
                );
            }
            if let Some(c) = self.nets.get_mut(name) {
                c.update(now, secs, emit);
            }
        }
    }

    fn find_temps(&mut self) {
        let Ok(dir) = std::fs::read_dir("/sys/class/thermal") else {
            return;
        };
        let mut zones: Vec<std::path::PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("thermal_zone"))
            })
            .collect();
        zones.sort();
        for zone in zones.into_iter().take(32) {
            let kind = std::fs::read_to_string(zone.join("type"))
                .map(|t| t.trim().to_string())
                .unwrap_or_default();
            let name = zone
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("zone")
                .to_string();
            let label = if kind.is_empty() {
                name
            } else {
                format!("{kind}.{name}")
            };
            let label = label_value(&label);
            self.temps.push((
                zone.join("temp"),
                key("temp.celsius", Some(("zone", &label))),
            ));
        }
    }

    fn fs_sample(&mut self, emit: &mut impl FnMut(&SeriesKey, f64)) {
        // The mount list is read each time, so new mounts appear.
        if !self.read("/proc/self/mounts") {
            return;
        }
        for m in crate::procs::parse_mounts(&self.buf, 64) {
            let Some((size, available)) = crate::procs::usage(&m.point) else {
                continue;
            };
            if size == 0 {
                continue;
            }
            if !self.fs_keys.contains_key(&m.point) {
                if self.fs_keys.len() >= 64 {
                    continue;
                }
                let label = label_value(&m.point.to_string_lossy());
                self.fs_keys.insert(
                    m.point.clone(),
                    [
                        key("fs.size_bytes", Some(("mount", &label))),
                        key("fs.available_bytes", Some(("mount", &label))),
                    ],
                );
            }
            if let Some(k) = self.fs_keys.get(&m.point) {
                emit(&k[0], size as f64);
                emit(&k[1], available as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readings(s: &mut System) -> HashMap<String, f64> {
        let mut out = HashMap::new();
        s.sample(|k, v| {
            out.insert(k.to_string(), v);
        });
        out
    }

    #[test]
    fn inputs_parse_with_clear_errors() {
        assert_eq!(Input::parse_list("all").expect("all").len(), 10);
        assert!(Input::parse_list("none").expect("none").is_empty());
        assert_eq!(
            Input::parse_list("cpu, mem,cpu").expect("list"),
            vec![Input::Cpu, Input::Mem]
        );
        let err = Input::parse_list("cpu,gpu").expect_err("gpu");
        assert!(
            err.contains("\"gpu\"") && err.contains("cpu,cpus,load"),
            "{err}"
        );
    }

    #[test]
    fn reads_this_machine() {
        let mut s = System::new(&Input::ALL);
        let first = readings(&mut s);
        // Rates need two readings; gauges come at once.
        assert!(first["mem.total_bytes"] > 0.0, "{first:?}");
        assert!(first["mem.used_bytes"] <= first["mem.total_bytes"]);
        assert!(first.contains_key("load.1m") && first.contains_key("swap.total_bytes"));
        assert!(first["system.uptime_s"] > 0.0);
        assert!(
            first.keys().any(|k| k.starts_with("fs.size_bytes{mount=")),
            "{first:?}"
        );
        assert!(!first.contains_key("cpu.usage_pct"), "needs a baseline");
        // Burn a little CPU so the second reading has jiffies to compare.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(60) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert!(x != 1);
        let second = readings(&mut s);
        let cpu = second["cpu.usage_pct"];
        assert!((0.0..=100.0).contains(&cpu), "{second:?}");
        let cores = second
            .keys()
            .filter(|k| k.starts_with("cpu.usage_pct{cpu="))
            .count();
        assert!(cores >= 1, "{second:?}");
        assert!(second.contains_key("cpu.iowait_pct"));
        for (k, v) in &second {
            assert!(v.is_finite() && *v >= 0.0, "{k} = {v}");
            // An integer or exact in f32: the batch sends it in a varint
            // or 4 bytes, never as an 8-byte double.
            assert!(
                v.fract() == 0.0 || f64::from(*v as f32) == *v,
                "{k} = {v} needs a double"
            );
        }
        // Only the enabled inputs.
        let mut only = System::new(&[Input::Load]);
        let r = readings(&mut only);
        assert!(r.keys().all(|k| k.starts_with("load.")), "{r:?}");
        let mut whole = System::new(&[Input::Cpu]);
        readings(&mut whole);
        std::thread::sleep(std::time::Duration::from_millis(30));
        let mut keys: Vec<String> = readings(&mut whole).into_keys().collect();
        keys.sort();
        assert!(
            keys.is_empty() || keys == ["cpu.iowait_pct", "cpu.usage_pct"],
            "no per-core series without cpus: {keys:?}"
        );
    }
}
