//! Sampling: the system inputs of [`crate::system`] and the process
//! watchdog (`/proc/PID/stat` through [`crate::procs`]). Series keys are
//! built once.
//!
//! Watched processes (by exact name, or by pid) yield, labelled
//! `process=<name>` (and `pid=<pid>` for pid watches):
//! `proc.cpu_pct` (sum over matching processes, % of one core),
//! `proc.rss_bytes`, `proc.threads`, `proc.count`, `proc.up` (1/0) and
//! `proc.restarts` (times the process went away or was replaced and came
//! back, during this agent run). The full process table is scanned only
//! every few ticks (or while a watched name is down); in between only the
//! known pids are refreshed, which keeps the agent's own CPU low.

use std::collections::BTreeMap;

use std::collections::HashMap;
use std::time::Instant;

use widgetry_proto::SeriesKey;

use crate::procs::{self, ProcStat};

use crate::system::label_value;

/// Full process-table scans happen every this many ticks.
const SCAN_EVERY: u32 = 10;

struct Keys {
    cpu: SeriesKey,
    rss: SeriesKey,
    threads: SeriesKey,
    count: SeriesKey,
    up: SeriesKey,
    restarts: SeriesKey,
}

impl Keys {
    fn new(labels: BTreeMap<String, String>) -> Keys {
        let key = |name: &str| SeriesKey {
            name: name.to_string(),
            labels: labels.clone(),
        };
        Keys {
            cpu: key("proc.cpu_pct"),
            rss: key("proc.rss_bytes"),
            threads: key("proc.threads"),
            count: key("proc.count"),
            up: key("proc.up"),
            restarts: key("proc.restarts"),
        }
    }
}

/// What to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Name(String),
    Pid(u32),
}

struct Watch {
    target: Target,
    keys: Keys,
    pids: Vec<u32>,
    /// Start time of the oldest matching process when last seen.
    oldest_start: Option<u64>,
    was_up: bool,
    restarts: u64,
}

/// Reads the system inputs and watched-process statistics.
pub struct Sampler {
    system: crate::system::System,
    /// Each watched pid's CPU ticks and start when last read (a pid reused
    /// by another process has another start), for its CPU share.
    last: HashMap<u32, (u64, u64)>,
    last_at: Option<Instant>,
    /// Clock ticks per second and page size.
    units: (u64, u64),
    watches: Vec<Watch>,
    tick: u32,
}

impl Sampler {
    /// Creates a sampler; the first CPU reading is a baseline.
    pub fn new(targets: &[Target], inputs: &[crate::system::Input]) -> Result<Self, String> {
        let watches = targets
            .iter()
            .map(|t| {
                let mut labels = BTreeMap::new();
                match t {
                    Target::Name(n) => {
                        labels.insert("process".to_string(), label_value(n));
                    }
                    Target::Pid(p) => {
                        labels.insert("pid".to_string(), p.to_string());
                    }
                }
                Watch {
                    target: t.clone(),
                    keys: Keys::new(labels),
                    pids: match t {
                        Target::Pid(p) => vec![*p],
                        Target::Name(_) => Vec::new(),
                    },
                    oldest_start: None,
                    was_up: false,
                    restarts: 0,
                }
            })
            .collect();
        Ok(Sampler {
            system: crate::system::System::new(inputs),
            last: HashMap::new(),
            last_at: None,
            units: procs::units(),
            watches,
            tick: 0,
        })
    }

    /// Takes one reading of every series and hands each to `emit`.
    pub fn sample(&mut self, mut emit: impl FnMut(&SeriesKey, f64)) {
        self.system.sample(&mut emit);
        if !self.watches.is_empty() {
            self.sample_processes(&mut emit);
        }
    }

    fn sample_processes(&mut self, emit: &mut impl FnMut(&SeriesKey, f64)) {
        let scan = self.tick.is_multiple_of(SCAN_EVERY)
            || self
                .watches
                .iter()
                .any(|w| matches!(w.target, Target::Name(_)) && w.pids.is_empty());
        self.tick = self.tick.wrapping_add(1);
        let mut seen: HashMap<u32, ProcStat> = HashMap::new();
        if scan {
            let table = procs::all();
            for w in &mut self.watches {
                if let Target::Name(name) = &w.target {
                    w.pids = table
                        .iter()
                        .filter(|(pid, p)| procs::is_named(*pid, &p.comm, name))
                        .map(|(pid, _)| *pid)
                        .collect();
                }
            }
            let wanted: Vec<u32> = self.watches.iter().flat_map(|w| w.pids.clone()).collect();
            seen.extend(table.into_iter().filter(|(pid, _)| wanted.contains(pid)));
        } else {
            for w in &self.watches {
                for pid in &w.pids {
                    if let Some(p) = procs::stat(*pid) {
                        seen.insert(*pid, p);
                    }
                }
            }
        }
        let now = Instant::now();
        let elapsed = self
            .last_at
            .map(|t| now.duration_since(t).as_secs_f64())
            .filter(|e| *e > 0.0);
        self.last_at = Some(now);
        let (hz, page) = self.units;
        // CPU share of each pid since its last reading (0 on the first).
        let mut share: HashMap<u32, f64> = HashMap::new();
        for (pid, p) in &seen {
            let pct = match (self.last.get(pid), elapsed) {
                (Some((ticks, start)), Some(e)) if *start == p.start_ticks => {
                    p.cpu_ticks.saturating_sub(*ticks) as f64 / hz as f64 / e * 100.0
                }
                _ => 0.0,
            };
            share.insert(*pid, pct);
        }
        self.last = seen
            .iter()
            .map(|(pid, p)| (*pid, (p.cpu_ticks, p.start_ticks)))
            .collect();
        for w in &mut self.watches {
            let (mut cpu, mut rss, mut threads, mut count) = (0.0f64, 0u64, 0u64, 0u32);
            let mut oldest: Option<u64> = None;
            w.pids.retain(|pid| seen.contains_key(pid));
            for pid in &w.pids {
                if let Some(p) = seen.get(pid) {
                    cpu += share.get(pid).copied().unwrap_or(0.0);
                    rss += p.rss_pages.saturating_mul(page);
                    threads += p.threads.max(1);
                    count += 1;
                    oldest = Some(oldest.map_or(p.start_ticks, |o: u64| o.min(p.start_ticks)));
                }
            }
            let up = count > 0;
            // Back after being down, or the oldest process was replaced.
            let replaced = matches!((w.oldest_start, oldest), (Some(a), Some(b)) if b > a);
            if up && (replaced || (!w.was_up && w.oldest_start.is_some())) {
                w.restarts += 1;
            }
            if up {
                w.oldest_start = oldest;
            }
            w.was_up = up;
            emit(&w.keys.up, if up { 1.0 } else { 0.0 });
            emit(&w.keys.count, f64::from(count));
            emit(&w.keys.restarts, w.restarts as f64);
            if up {
                emit(&w.keys.cpu, cpu);
                emit(&w.keys.rss, rss as f64);
                emit(&w.keys.threads, threads as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::process::Command;

    fn readings(s: &mut Sampler) -> HashMap<String, f64> {
        let mut out = HashMap::new();
        s.sample(|k, v| {
            out.insert(k.to_string(), v);
        });
        out
    }

    /// Waits (10 s at most) until process `pid` is called `name` and has
    /// resident pages, i.e. exec has mapped its program.
    fn loaded(pid: u32, name: &str) -> Result<(), String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let stat = procs::stat(pid);
            if stat
                .as_ref()
                .is_some_and(|p| p.comm == name && p.rss_pages > 0)
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("{name} not loaded within 10 s: {stat:?}"));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn watches_a_process_by_name_and_counts_restarts() {
        // A copy of `sleep` under a name no other process has (Linux keeps
        // 15 characters of a process name).
        let dir = tempfile::tempdir().expect("dir");
        let name = format!("wdgs{}", std::process::id() % 1_000_000);
        let bin = dir.path().join(&name);
        let sleep = ["/bin/sleep", "/usr/bin/sleep"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("sleep binary");
        std::fs::copy(sleep, &bin).expect("copy sleep");
        // The kernel renames a process at exec before it maps the new
        // program: a sample taken in that window sees the name with no
        // resident pages. Each child is sampled once it is loaded.
        let start = || {
            let mut child = Command::new(&bin).arg("30").spawn().expect("spawn");
            if let Err(e) = loaded(child.id(), &name) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{e}");
            }
            child
        };
        let key = |series: &str| format!("{series}{{process={name}}}");
        let mut child = start();
        let mut s = Sampler::new(
            &[Target::Name(name.clone()), Target::Pid(std::process::id())],
            &[],
        )
        .expect("sampler");
        let r = readings(&mut s);
        assert_eq!(r[&key("proc.up")], 1.0, "{r:?}");
        assert_eq!(r[&key("proc.count")], 1.0);
        assert!(r[&key("proc.rss_bytes")] > 0.0);
        assert!(r[&key("proc.threads")] >= 1.0);
        assert_eq!(r[&key("proc.restarts")], 0.0);
        let me = format!("proc.rss_bytes{{pid={}}}", std::process::id());
        assert!(
            r[&me] > 0.0,
            "the test process itself is watched by pid: {r:?}"
        );
        child.kill().expect("kill");
        child.wait().expect("reap");
        let r = readings(&mut s);
        assert_eq!(r[&key("proc.up")], 0.0, "{r:?}");
        assert!(
            !r.contains_key(&key("proc.cpu_pct")),
            "no cpu reading while down"
        );
        let mut again = start();
        let r = readings(&mut s);
        assert_eq!(r[&key("proc.up")], 1.0);
        assert_eq!(r[&key("proc.restarts")], 1.0, "{r:?}");
        again.kill().expect("kill");
        again.wait().expect("reap");
    }
}
