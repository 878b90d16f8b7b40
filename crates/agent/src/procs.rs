//! Processes, hostname, boot time and filesystem usage read straight from
//! procfs and statvfs (no general-purpose system library: the agent reads
//! exactly the fields it publishes, and its binary stays small).
//!
//! `/proc/PID/stat` is parsed from the last `)`, so a process name holding
//! spaces or parentheses cannot shift the fields.

use std::path::PathBuf;

/// What one `/proc/PID/stat` says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// The kernel's name of the process (`comm`, at most 15 bytes).
    pub comm: String,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    pub threads: u64,
    /// Start time after boot, in clock ticks (orders processes).
    pub start_ticks: u64,
    /// Resident set, in pages.
    pub rss_pages: u64,
}

/// Parses the text of a `/proc/PID/stat` file; None if it is malformed.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    // Fields after the name, counted from 3 (state) as in proc(5).
    let mut f = text.get(close + 1..)?.split_ascii_whitespace();
    let mut field = |n: usize| -> Option<u64> { f.nth(n)?.parse().ok() };
    // f starts at field 3; utime is 14, stime 15, num_threads 20,
    // starttime 22, rss 24.
    let utime = field(11)?;
    let stime = field(0)?;
    let threads = field(4)?;
    let start_ticks = field(1)?;
    let rss_pages = field(1)?;
    Some(ProcStat {
        comm,
        cpu_ticks: utime + stime,
        threads,
        start_ticks,
        rss_pages,
    })
}

/// Reads `/proc/PID/stat`; None when the process is gone.
pub fn stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether process `pid`, whose kernel name is `comm`, is called `name`:
/// the kernel keeps 15 bytes of a name, so a longer `name` is also checked
/// against the file name of the process's first argument.
pub fn is_named(pid: u32, comm: &str, name: &str) -> bool {
    if comm == name {
        return true;
    }
    if name.len() <= 15 || !name.as_bytes().starts_with(comm.as_bytes()) || comm.len() < 15 {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let base = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
    base == name.as_bytes()
}

/// Every process: (pid, stat). Processes that end while the table is read
/// are skipped.
pub fn all() -> Vec<(u32, ProcStat)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        Some((pid, stat(pid)?))
    })
    .collect()
}

/// The machine's hostname (`/proc/sys/kernel/hostname`).
pub fn host_name() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.to_string())
}

/// When the machine booted, in seconds since the epoch (`btime` of
/// `/proc/stat`).
pub fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Clock ticks per second of `/proc/PID/stat`'s times, and the page size.
pub fn units() -> (u64, u64) {
    (
        rustix::param::clock_ticks_per_second().max(1),
        rustix::param::page_size() as u64,
    )
}

/// One mounted filesystem worth reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: String,
    pub point: PathBuf,
}

/// Filesystem types that hold user data (pseudo and memory filesystems are
/// left out; tmpfs too, it is memory and shows in `mem.*`).
const DATA_FILESYSTEMS: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs", "vfat", "exfat",
    "ntfs", "ntfs3", "fuseblk", "nfs", "nfs4", "cifs", "smb3", "overlay", "ubifs", "jffs2",
    "bcachefs", "hfsplus", "apfs",
];

/// Decodes the octal escapes (`\040` for a space) of a mounts field.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0');
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The data filesystems of a `/proc/self/mounts` text, each source once
/// (its first mount point: bind mounts and a container's file mounts repeat
/// the same filesystem), at most `max`.
pub fn parse_mounts(text: &str, max: usize) -> Vec<Mount> {
    let mut out: Vec<Mount> = Vec::new();
    for line in text.lines() {
        let mut f = line.split(' ');
        let (Some(source), Some(point), Some(fstype)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if !DATA_FILESYSTEMS.contains(&fstype) {
            continue;
        }
        let point = unescape(point);
        if ["/proc", "/sys", "/dev"]
            .iter()
            .any(|p| point == *p || point.starts_with(&format!("{p}/")))
        {
            continue;
        }
        let source = unescape(source);
        if out.iter().any(|m| m.source == source) {
            continue;
        }
        if out.len() >= max {
            break;
        }
        out.push(Mount {
            source,
            point: PathBuf::from(point),
        });
    }
    out
}

/// Size and available bytes (for unprivileged users) of the filesystem at
/// `point`.
pub fn usage(point: &std::path::Path) -> Option<(u64, u64)> {
    let v = rustix::fs::statvfs(point).ok()?;
    let unit = if v.f_frsize > 0 {
        v.f_frsize
    } else {
        v.f_bsize
    };
    Some((
        v.f_blocks.saturating_mul(unit),
        v.f_bavail.saturating_mul(unit),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_taken_after_the_last_parenthesis() {
        let text = "4242 (we(ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    150 50 0 0 20 0 7 0 123456 1000000 321 18446744073709551615";
        let s = parse_stat(text).expect("parses");
        assert_eq!(s.comm, "we(ird) name");
        assert_eq!(s.cpu_ticks, 200);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_ticks, 123456);
        assert_eq!(s.rss_pages, 321);
        assert_eq!(parse_stat("12 (x) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_reads_back() {
        let me = stat(std::process::id()).expect("own stat");
        assert!(me.threads >= 1 && me.rss_pages > 0, "{me:?}");
        assert!(all().iter().any(|(p, _)| *p == std::process::id()));
        assert!(host_name().is_some());
        let boot = boot_time().expect("btime");
        assert!(boot > 1_000_000_000, "{boot}");
        let (hz, page) = units();
        assert!(hz >= 1 && page >= 4096, "{hz} {page}");
    }

    #[test]
    fn mounts_keep_data_filesystems_once_each() {
        let text = "/dev/vda1 / ext4 rw,relatime 0 0\n\
                    proc /proc proc rw 0 0\n\
                    tmpfs /run tmpfs rw 0 0\n\
                    /dev/vda1 /etc/hosts ext4 rw 0 0\n\
                    /dev/sdb1 /mnt/my\\040disk xfs rw 0 0\n\
                    overlay /var/lib/docker/overlay2/x/merged overlay rw 0 0\n\
                    /dev/sdc1 /sys/fs/x ext4 rw 0 0\n";
        let m = parse_mounts(text, 64);
        let points: Vec<_> = m
            .iter()
            .map(|m| m.point.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            points,
            ["/", "/mnt/my disk", "/var/lib/docker/overlay2/x/merged"]
        );
        assert_eq!(parse_mounts(text, 1).len(), 1);
        let (size, avail) = usage(std::path::Path::new("/")).expect("statvfs /");
        assert!(size > 0 && avail <= size, "{size} {avail}");
    }
}
