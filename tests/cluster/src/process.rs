//! Daemons started by `up`: each in its own session, output to a log file, pid in a pid file.
//! `down` stops exactly these: a pid is only signalled while its command line still names the
//! program we started (pids get reused).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// One daemon: `name` keys its pid and log files.
pub struct Daemon<'a> {
    pub name: &'a str,
    pub program: &'a Path,
    pub args: Vec<String>,
}

fn pid_file(pids: &Path, name: &str) -> PathBuf {
    pids.join(format!("{name}.pid"))
}

pub fn log_file(logs: &Path, name: &str) -> PathBuf {
    logs.join(format!("{name}.log"))
}

/// Starts the daemon detached from our session, appending its output to `logs/<name>.log`.
pub fn spawn(pids: &Path, logs: &Path, d: &Daemon) -> Result<u32> {
    fs::create_dir_all(pids)?;
    fs::create_dir_all(logs)?;
    let log_path = log_file(logs, d.name);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let child = Command::new(d.program)
        .args(&d.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} ({})", d.name, d.program.display()))?;
    let pid = child.id();
    fs::write(
        pid_file(pids, d.name),
        format!("{pid}\n{}\n", d.program.display()),
    )?;
    Ok(pid)
}

/// The daemon's pid if it is alive and still the program we started.
pub fn running(pids: &Path, name: &str) -> Option<u32> {
    let text = fs::read_to_string(pid_file(pids, name)).ok()?;
    let mut lines = text.lines();
    let pid: u32 = lines.next()?.trim().parse().ok()?;
    let program = lines.next()?;
    let exe_name = Path::new(program)
        .file_name()?
        .to_string_lossy()
        .into_owned();
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|b| *b == 0).next()?;
    let argv0 = String::from_utf8_lossy(argv0);
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // A zombie (state Z) has exited; it is not running.
    let state = stat.rsplit(')').next()?.split_whitespace().next()?;
    // An empty command line is a process still inside execve (spawn can return before /proc
    // shows the new image); it is ours.
    let ours = argv0.is_empty() || argv0.ends_with(exe_name.as_str());
    (ours && state != "Z").then_some(pid)
}

/// What the pid file and /proc say, for error messages.
pub fn describe(pids: &Path, name: &str) -> String {
    let text = fs::read_to_string(pid_file(pids, name)).unwrap_or_default();
    let pid = text.lines().next().unwrap_or("?").trim().to_string();
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| e.to_string());
    let cmd = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_else(|e| e.to_string());
    format!("pid file {text:?}, stat {stat:?}, cmdline {cmd:?}")
}

/// SIGTERM, up to `grace`, then SIGKILL. Removes the pid file. Returns whether it was running.
pub fn stop(pids: &Path, name: &str, grace: Duration) -> Result<bool> {
    let Some(pid) = running(pids, name) else {
        let _ = fs::remove_file(pid_file(pids, name));
        return Ok(false);
    };
    let p = Pid::from_raw(pid as i32);
    kill(p, Signal::SIGTERM).with_context(|| format!("SIGTERM {name} ({pid})"))?;
    let deadline = Instant::now() + grace;
    while running(pids, name).is_some() {
        if Instant::now() > deadline {
            eprintln!("    {name} ({pid}) ignored SIGTERM for {grace:?}: SIGKILL");
            let _ = kill(p, Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(200));
            if running(pids, name).is_some() {
                bail!("{name} ({pid}) survived SIGKILL");
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = fs::remove_file(pid_file(pids, name));
    Ok(true)
}
