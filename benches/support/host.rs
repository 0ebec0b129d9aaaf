//! What the benches read from their host: settings from `REVSYNC_BENCH_*` variables, the
//! machine's description, and memory and CPU time of processes and threads from `/proc`.
//!
//! Include with `#[path = "support/host.rs"] mod host;`.

#![allow(dead_code)]

use std::path::Path;

// ---------------------------------------------------------------------------------------
// Settings

/// `name` as a number (seconds, a rate), `default` when unset; panics on anything else.
pub fn env_f64(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

/// `name` as a count (`_` separators allowed), `None` when unset; panics on anything else.
pub fn env_count(name: &str) -> Option<usize> {
    std::env::var(name).ok().map(|v| {
        v.replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a count"))
    })
}

/// `name` as a comma-separated list of counts, `default` when unset.
pub fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .replace('_', "")
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v}: not a list of counts"))
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

// ---------------------------------------------------------------------------------------
// The machine

/// The CPU's model name from `/proc/cpuinfo` ("unknown" when it has none).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The 1, 5 and 15-minute load averages, space-separated.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A KiB field of `/proc/self/status` such as `"VmRSS:"` or `"VmHWM:"`.
pub fn proc_status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------
// CPU time

/// Nanoseconds on CPU of the task at `dir` (`/proc/<pid>/task/<tid>`), from `schedstat`.
fn schedstat_ns(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Total CPU time (ns) of this process's threads whose name starts with `prefix`.
pub fn threads_cpu_ns(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .map(|t| schedstat_ns(&t.path()))
        .sum()
}

/// CPU time (ns) of the calling thread.
pub fn thread_cpu_ns() -> u64 {
    schedstat_ns(Path::new("/proc/thread-self"))
}

/// CPU time (ns) of every thread of process `pid` (utime + stime, 10 ms resolution).
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(close) = s.rfind(')') else {
        return 0;
    };
    let f: Vec<&str> = s[close + 2..].split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the command name.
    (ticks(11) + ticks(12)) * 10_000_000
}

/// The pid of a live child process of this one whose command name is `comm`: for a child
/// started by code that keeps its `std::process::Child` to itself.
pub fn child_pid(comm: &str) -> Option<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid: u32 = p.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(p.path().join("stat")).ok()?;
        // "pid (comm) state ppid ..."; comm may itself hold spaces and parentheses.
        let (head, rest) = stat.rsplit_once(')')?;
        let name = head.split_once('(')?.1;
        let ppid = rest.split_whitespace().nth(1)?;
        (name == comm && ppid == me).then_some(pid)
    })
}
