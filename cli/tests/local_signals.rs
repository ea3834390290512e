//! `shotlabel local` stopped by a signal leaves no child behind: SIGTERM (`kill`, systemd,
//! a container runtime), SIGHUP (a closed terminal) and SIGINT (Ctrl-C), each sent while
//! the local stack runs. Before, SIGTERM ended the process and left moto server running.
#![cfg(target_os = "linux")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// Every process whose parent is `pid` (from each of its threads' `children` file).
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return found;
    };
    for task in tasks.flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        found.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    found
}

/// True while `pid` exists and is not a zombie waiting to be reaped.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

#[test]
fn a_stop_signal_takes_the_local_stacks_children_with_it() -> anyhow::Result<()> {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    for (signal, number) in [("TERM", 15), ("HUP", 1), ("INT", 2)] {
        let mut local = Command::new(env!("CARGO_BIN_EXE_shotlabel"))
            .args([
                "local",
                "--keep-running",
                "--images",
                "tests/data/screenshots",
            ])
            .current_dir(repo)
            .env_remove("SHOTLABEL_PROVIDER_URL")
            .env_remove("SHOTLABEL_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting shotlabel local")?;
        let pid = local.id();
        // Wait for the stack's children (moto server) to be up.
        let started = Instant::now();
        let kids = loop {
            let kids = children(pid);
            if !kids.is_empty() {
                // Give moto a moment past its fork, so the signal lands mid-run.
                std::thread::sleep(Duration::from_millis(1500));
                break children(pid);
            }
            if let Some(status) = local.try_wait()? {
                bail!("shotlabel local ended before starting its stack: {status}");
            }
            ensure!(
                started.elapsed() < Duration::from_secs(120),
                "no child process after 120 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        ensure!(!kids.is_empty(), "SIG{signal}: no children to watch");
        let sent = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()?;
        ensure!(sent.success(), "kill -{signal} {pid}");
        let output = local.wait_with_output()?;
        ensure!(
            output.status.code() == Some(128 + number),
            "SIG{signal}: exit {:?}, stderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while kids.iter().any(|&k| alive(k)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let survivors: Vec<u32> = kids.iter().copied().filter(|&k| alive(k)).collect();
        ensure!(
            survivors.is_empty(),
            "SIG{signal}: children {survivors:?} outlived shotlabel local"
        );
    }
    Ok(())
}
