//! Reads a guest's kernel log (the serial console and `dmesg`) for what must fail a run: a
//! panic, a hung task, an oops, a BUG; warnings are reported without failing it.
//!
//! On the console only kernel lines count (those with the `[    1.234567] ` time stamp), so that
//! a test printing "BUG:" on its stderr, which reaches the console too, is not taken for one.

use std::fmt;

/// What a log line says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Problem {
    /// `Kernel panic - not syncing`.
    Panic,
    /// `INFO: task ... blocked for more than N seconds` (the hung-task watchdog).
    HungTask,
    /// `Oops:`, `general protection fault`, `Unable to handle kernel ...`.
    Oops,
    /// `BUG:` (`BUG: unable to handle page fault`, `BUG: soft lockup`, ...) or `kernel BUG at`.
    Bug,
    /// `WARNING:` (a `WARN_ON` that fired): printed, does not fail the run.
    Warning,
}

impl Problem {
    /// Whether this fails the run.
    pub fn fails(self) -> bool {
        self != Problem::Warning
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Problem::Panic => "kernel panic",
            Problem::HungTask => "hung task",
            Problem::Oops => "oops",
            Problem::Bug => "kernel BUG",
            Problem::Warning => "kernel warning",
        })
    }
}

/// One problem found, with the lines after it (the call trace, usually).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// What it is.
    pub problem: Problem,
    /// The line that says so, without its time stamp.
    pub line: String,
    /// Up to [`CONTEXT_LINES`] kernel lines that follow it.
    pub context: Vec<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {}", self.problem, self.line)?;
        for l in &self.context {
            writeln!(f, "    {l}")?;
        }
        Ok(())
    }
}

/// Lines of context kept after a finding.
pub const CONTEXT_LINES: usize = 12;

/// Where a log comes from: the console mixes kernel lines with the command's stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The serial console: only time-stamped lines are the kernel's.
    Console,
    /// `dmesg` output: every line is the kernel's.
    Dmesg,
}

/// The text of a kernel line without its `[ 12.345678] ` time stamp, or `None` for a console line
/// that has none (not the kernel's).
pub fn kernel_text(line: &str, source: Source) -> Option<&str> {
    let line = line.trim_end_matches(['\r', '\n']);
    match strip_timestamp(line) {
        Some(rest) => Some(rest),
        None if source == Source::Dmesg => Some(line),
        None => None,
    }
}

fn strip_timestamp(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (stamp, after) = rest.split_once(']')?;
    let (secs, frac) = stamp.trim().split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(secs) && digits(frac)).then(|| after.strip_prefix(' ').unwrap_or(after))
}

/// What a kernel line (without time stamp) reports, if anything.
pub fn classify(text: &str) -> Option<Problem> {
    if text.contains("Kernel panic - not syncing") {
        Some(Problem::Panic)
    } else if text.contains("blocked for more than") && text.contains("seconds") {
        Some(Problem::HungTask)
    } else if text.starts_with("Oops:")
        || text.contains("] Oops:")
        || text.contains("general protection fault")
        || text.contains("Unable to handle kernel")
    {
        Some(Problem::Oops)
    } else if text.starts_with("BUG:") || text.contains("kernel BUG at") {
        Some(Problem::Bug)
    } else if text.starts_with("WARNING:") {
        Some(Problem::Warning)
    } else {
        None
    }
}

/// Every problem in `log`, in order, each with its context. A line that is part of an earlier
/// finding's context (an oops right after a BUG line, as the kernel prints them) is still a
/// finding of its own.
pub fn scan(log: &str, source: Source) -> Vec<Finding> {
    let lines: Vec<&str> = log.lines().filter_map(|l| kernel_text(l, source)).collect();
    let mut out = Vec::new();
    for (i, text) in lines.iter().enumerate() {
        if let Some(problem) = classify(text) {
            out.push(Finding {
                problem,
                line: text.trim().to_owned(),
                context: lines[i + 1..]
                    .iter()
                    .take(CONTEXT_LINES)
                    .map(|l| l.trim_end().to_owned())
                    .collect(),
            });
        }
    }
    out
}

/// The findings of the console and of `dmesg`, each line once: dmesg repeats what the console
/// showed, and its context is the more complete, so it wins.
pub fn merge(console: Vec<Finding>, dmesg: Vec<Finding>) -> Vec<Finding> {
    let mut out = dmesg;
    for f in console {
        if !out.iter().any(|d| d.line == f.line) {
            out.push(f);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = "\
[    0.000000] Linux version 6.12.117+deb12-amd64 (debian-kernel@lists.debian.org)
[    1.234567] nbd: registered device at major 43
[    2.000000] EXT4-fs (nbd0): mounted filesystem with ordered data mode
[    3.100000] block nbd0: NBD_DISCONNECT
running 12 tests
test conformance ... ok
";

    const PANIC: &str = "\
[   21.456789] sysrq: Trigger a crash
[   21.456900] Kernel panic - not syncing: sysrq triggered crash
[   21.457000] CPU: 0 UID: 0 PID: 180 Comm: bash Not tainted 6.12.117+deb12-amd64 #1
[   21.457100] Call Trace:
[   21.457200]  <TASK>
";

    const HUNG: &str = "\
[  245.000001] INFO: task kworker/u4:2:87 blocked for more than 120 seconds.
[  245.000002]       Not tainted 6.1.0-41-amd64 #1 Debian 6.1.158-1
[  245.000003] \"echo 0 > /proc/sys/kernel/hung_task_timeout_secs\" disables this message.
";

    const OOPS: &str = "\
[   30.000001] BUG: kernel NULL pointer dereference, address: 0000000000000008
[   30.000002] #PF: supervisor read access in kernel mode
[   30.000003] Oops: 0000 [#1] PREEMPT SMP NOPTI
[   30.000004] RIP: 0010:nbd_queue_rq+0x4a/0x3c0 [nbd]
";

    #[test]
    fn a_clean_log_has_no_findings() {
        assert_eq!(scan(CLEAN, Source::Console), []);
        assert_eq!(scan(CLEAN, Source::Dmesg), []);
    }

    #[test]
    fn a_panic_is_found_with_its_context() {
        let f = scan(PANIC, Source::Console);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].problem, Problem::Panic);
        assert_eq!(
            f[0].line,
            "Kernel panic - not syncing: sysrq triggered crash"
        );
        assert_eq!(f[0].context.len(), 3);
        assert!(f[0].context[1].starts_with("Call Trace"));
        assert!(f[0].problem.fails());
    }

    #[test]
    fn a_hung_task_is_found() {
        let f = scan(HUNG, Source::Dmesg);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].problem, Problem::HungTask);
        assert!(f[0].line.starts_with("INFO: task kworker/u4:2:87 blocked"));
    }

    #[test]
    fn a_bug_and_its_oops_are_both_found() {
        let f = scan(OOPS, Source::Console);
        let kinds: Vec<Problem> = f.iter().map(|f| f.problem).collect();
        assert_eq!(kinds, [Problem::Bug, Problem::Oops]);
        assert!(f[1].context[0].contains("nbd_queue_rq"));
    }

    #[test]
    fn other_oops_shapes_and_kernel_bug_at() {
        for (line, want) in [
            (
                "Oops: general protection fault, probably for non-canonical address",
                Problem::Oops,
            ),
            (
                "general protection fault, probably for non-canonical address 0xdead: 0000 [#1]",
                Problem::Oops,
            ),
            (
                "Unable to handle kernel paging request at virtual address 0",
                Problem::Oops,
            ),
            ("kernel BUG at drivers/block/nbd.c:1234!", Problem::Bug),
            (
                "BUG: soft lockup - CPU#1 stuck for 22s! [fio:300]",
                Problem::Bug,
            ),
            (
                "WARNING: CPU: 1 PID: 99 at block/blk-mq.c:1000 blk_mq_start_request+0x10/0x20",
                Problem::Warning,
            ),
        ] {
            assert_eq!(classify(line), Some(want), "{line}");
        }
        assert!(!Problem::Warning.fails());
        assert_eq!(classify("EXT4-fs (nbd0): recovery complete"), None);
        assert_eq!(classify("block nbd0: Possible stuck request 0000: control (read@0,4096B). Runtime 30 seconds"), None);
    }

    #[test]
    fn console_lines_without_a_time_stamp_are_not_the_kernel() {
        // A test that prints these on its stderr (which reaches the console) is not a BUG.
        let log = "BUG: this is a test's own output\nKernel panic - not syncing: also not\n";
        assert_eq!(scan(log, Source::Console), []);
        assert_eq!(scan(log, Source::Dmesg).len(), 2);
    }

    #[test]
    fn time_stamps_are_stripped_and_odd_brackets_kept() {
        assert_eq!(
            kernel_text("[    1.000000] hello\r", Source::Console),
            Some("hello")
        );
        assert_eq!(kernel_text("[12345.678901] x", Source::Console), Some("x"));
        assert_eq!(kernel_text("[ok] not a stamp", Source::Console), None);
        assert_eq!(kernel_text("[1] not a stamp", Source::Console), None);
        assert_eq!(
            kernel_text("[1] plain dmesg", Source::Dmesg),
            Some("[1] plain dmesg")
        );
    }

    #[test]
    fn merge_keeps_each_line_once() {
        let console = scan(PANIC, Source::Console);
        let dmesg = scan(OOPS, Source::Dmesg);
        let both = merge(console.clone(), scan(PANIC, Source::Dmesg));
        assert_eq!(both.len(), 1);
        let all = merge(console, dmesg);
        assert_eq!(all.len(), 3);
    }
}
