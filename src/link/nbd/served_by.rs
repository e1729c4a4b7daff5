//! Which live process serves an NBD device. The kernel's `/sys/block/nbdN/pid` names the process
//! that connected the device and is not updated by a reattach (`nbd_genl_reconfigure` leaves
//! `nbd->pid` alone), so a server that reattached records itself in
//! `/run/userblk/nbdN.server`: its pid and its start time (so that a reused pid is not taken for
//! it). A record whose process is gone means nothing; the next reattach overwrites it.

use std::io;
use std::path::PathBuf;

/// Where reattached servers are recorded.
const RECORD_DIR: &str = "/run/userblk";

fn record_path(index: u32) -> PathBuf {
    PathBuf::from(format!("{RECORD_DIR}/nbd{index}.server"))
}

/// A process's state and start time (clock ticks since boot) from `/proc/PID/stat`, whose
/// second field, the command name, may hold spaces and parentheses: what follows the last ')'
/// is "state ppid ... starttime", starttime being the 22nd field of the line.
fn stat(pid: u32) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<(String, u64)> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    Some((fields.first()?.to_string(), fields.get(19)?.parse().ok()?))
}

/// Whether `pid` runs (and is not a zombie).
pub(crate) fn process_alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != "Z" && state != "X")
}

/// Records this process as the server of `/dev/nbd{index}`.
pub(crate) fn record_self(index: u32) -> io::Result<()> {
    let pid = std::process::id();
    let (_, start) = stat(pid).ok_or_else(|| io::Error::other("no /proc/self/stat"))?;
    std::fs::create_dir_all(RECORD_DIR)?;
    let path = record_path(index);
    let tmp = path.with_extension(format!("{pid}.tmp"));
    std::fs::write(&tmp, format!("{pid} {start}\n"))?;
    std::fs::rename(&tmp, &path)
}

/// Removes this process's record for `/dev/nbd{index}`, if the record is ours.
pub(crate) fn forget_self(index: u32) {
    let path = record_path(index);
    if read_record(index).is_some_and(|(pid, _)| pid == std::process::id()) {
        let _ = std::fs::remove_file(path);
    }
}

fn read_record(index: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(record_path(index)).ok()?;
    let mut it = text.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The process recorded as `/dev/nbd{index}`'s reattached server, if it still runs.
fn recorded_server(index: u32) -> Option<u32> {
    let (pid, start) = read_record(index)?;
    match stat(pid) {
        Some((state, now)) if now == start && state != "Z" && state != "X" => Some(pid),
        _ => None,
    }
}

/// The pid the kernel has for `/dev/nbd{index}`: the process that connected it.
fn kernel_pid(index: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The live process serving `/dev/nbd{index}`: the one that connected it while it runs, else
/// the last one that reattached to it while that runs.
pub(crate) fn live_server(index: u32) -> Option<u32> {
    kernel_pid(index)
        .filter(|&pid| process_alive(pid))
        .or_else(|| recorded_server(index))
}

/// The pid of the gone server that still holds `/dev/nbd{index}`, if that is its state:
/// connected, the process that connected it gone, and no reattached server running.
pub(crate) fn orphaned_by(index: u32) -> Option<u32> {
    let pid = kernel_pid(index)?;
    (live_server(index).is_none()).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_whatever_the_command_name() {
        let line = "4242 (userblk (serve) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 3 4 0 0 20 0 \
                    3 0 987654 123 456";
        assert_eq!(parse_stat(line), Some(("S".to_string(), 987654)));
        assert_eq!(parse_stat("1 (init) S 0"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_has_a_start_time() {
        let pid = std::process::id();
        assert!(process_alive(pid));
        assert!(stat(pid).is_some_and(|(_, start)| start > 0));
        // Pid 0 has no /proc entry; beyond PID_MAX_LIMIT (4,194,304) is never a process.
        assert!(!process_alive(0));
        assert!(!process_alive(4_194_305));
    }
}
