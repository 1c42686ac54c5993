//! Host services cannot be starved by one plugin (issue 19, finding 2): a `host-probe` inside
//! plugin `atk` attacks `mesh.v1.Host` — a FIFO flood, unread streams on a zero window, files
//! that are not regular, a huge directory — while a probe inside plugin `other` keeps calling
//! `Stat`, which must stay answered within its deadline; the manager's threads stay bounded.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_manager::host::pool::{PER_PLUGIN, WORKERS};
use tonic::Code;

use crate::support::{DEADLINE, Mesh, Probe, echo_plugin, host_probe, script, short_tempdir};

/// A mesh with two plugins, each running a probe: `atk` (reads and writes its whole root) and
/// `other` (reads its own).
struct Two {
    mesh: Mesh,
    atk: Probe,
    other: Probe,
    atk_root: PathBuf,
    dir: tempfile::TempDir,
}

async fn two_plugins() -> Two {
    let dir = short_tempdir();
    let mut tables = String::new();
    for (name, capabilities) in [
        ("atk", "\"read:**\", \"write:**\""),
        ("other", "\"read:**\""),
    ] {
        let root = dir.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        let socket = dir.path().join(format!("{name}.sock"));
        let command = script(
            dir.path(),
            &format!("{name}.sh"),
            &format!(
                "{} {} &\nexec {}",
                host_probe().display(),
                socket.display(),
                echo_plugin().display()
            ),
        );
        tables.push_str(&format!(
            "[[plugin]]\nname = {name:?}\ncommand = {command:?}\nroot = {root:?}\n\
             capabilities = [{capabilities}]\n"
        ));
    }
    let mesh = Mesh::start(&tables).await;
    mesh.wait_lines("host-probe: listening", 2).await;
    let atk = Probe::connect(&dir.path().join("atk.sock")).await;
    let other = Probe::connect(&dir.path().join("other.sock")).await;
    Two {
        mesh,
        atk,
        other,
        atk_root: dir.path().join("atk"),
        dir,
    }
}

/// A line of `/proc/PID/status` (`Threads`, `VmRSS`), as a number.
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// `stats N` figures: (median, p99, max) in µs.
fn figures(answer: &str) -> (u64, u64, u64) {
    let value = |key: &str| -> u64 {
        answer
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {answer:?}"))
    };
    (value("median_us"), value("p99_us"), value("max_us"))
}

/// `CODE=COUNT` pairs of a `flood` or `hold` answer.
fn outcomes(answer: &str) -> Vec<(String, usize)> {
    answer
        .split_whitespace()
        .map(|pair| {
            let (code, count) = pair.split_once('=').expect("CODE=COUNT");
            (code.to_owned(), count.parse().unwrap())
        })
        .collect()
}

/// `other`'s Stat, 200 times: all answered, the slowest well within a host call's deadline.
async fn other_is_served(other: &mut Probe, when: &str) -> (u64, u64, u64) {
    let answer = other.ok("stats 200").await;
    let (median, p99, max) = figures(&answer);
    eprintln!("other's Stat {when}: {answer}");
    assert!(max < 2_000_000, "other's Stat {when}: {answer}");
    (median, p99, max)
}

/// Samples `pid`'s thread count until `done` resolves; its result and the peak.
async fn peak_threads<T>(pid: u32, done: impl Future<Output = T>) -> (T, u64) {
    let mut peak = proc_status(pid, "Threads");
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tokio::pin!(done);
    loop {
        tokio::select! {
            result = &mut done => return (result, peak.max(proc_status(pid, "Threads"))),
            _ = tick.tick() => peak = peak.max(proc_status(pid, "Threads")),
        }
    }
}

#[tokio::test]
async fn a_fifo_flood_is_refused_and_another_plugins_stat_stays_answered() {
    let Two {
        mesh,
        mut atk,
        mut other,
        atk_root,
        dir: _dir,
    } = two_plugins().await;
    let pid = mesh.pid();
    let quiet = other_is_served(&mut other, "with no flood").await;
    let before = proc_status(pid, "Threads");
    atk.ok(&format!("mkfifo {}", atk_root.join("fifo").display()))
        .await;

    // 5 rounds of 600 ReadFile calls of the FIFO at once, beside other's 200 Stats.
    let flood = async {
        let mut answers = Vec::new();
        for _ in 0..5 {
            answers.push(atk.ok("flood 600 read fifo").await);
        }
        answers
    };
    let ((answers, during), peak) = peak_threads(pid, async {
        tokio::join!(flood, other_is_served(&mut other, "during the FIFO flood"))
    })
    .await;
    for answer in &answers {
        let mut total = 0;
        for (code, count) in outcomes(answer) {
            // Refused as a FIFO, or over atk's bound: nothing else, nothing waits.
            let code: i32 = code.parse().unwrap();
            assert!(
                code == Code::FailedPrecondition as i32 || code == Code::ResourceExhausted as i32,
                "{answer}"
            );
            total += count;
        }
        assert_eq!(total, 600, "{answer}");
    }
    eprintln!(
        "manager threads: {before} before, peak {peak} during 3000 FIFO reads; other's Stat \
         median/p99/max µs: quiet {quiet:?}, during {during:?}"
    );
    assert!(
        peak <= before + WORKERS as u64 + 4,
        "threads {before} -> {peak}"
    );
    let refusal = atk.call("read fifo").await.unwrap_err();
    assert_eq!(refusal.0, Code::FailedPrecondition as i32, "{refusal:?}");
    assert!(
        refusal.1.contains("fifo is a FIFO, not a regular file"),
        "{refusal:?}"
    );

    // The FIFO gone, everyone is served, the attacker too.
    std::fs::remove_file(atk_root.join("fifo")).unwrap();
    other_is_served(&mut other, "after the FIFO is deleted").await;
    atk.ok("stat .").await;
}

#[tokio::test]
async fn unread_streams_hold_no_thread_and_are_refused_past_the_plugins_bound() {
    let Two {
        mesh,
        mut atk,
        mut other,
        atk_root,
        dir: _dir,
    } = two_plugins().await;
    let pid = mesh.pid();
    std::fs::write(atk_root.join("big.bin"), vec![7u8; 1 << 20]).unwrap();
    other_is_served(&mut other, "before the streams").await;
    let (threads, rss) = (proc_status(pid, "Threads"), proc_status(pid, "VmRSS"));

    // 600 streams on one connection whose window is zero, never read.
    let held = atk.ok("hold 600 big.bin").await;
    let held = outcomes(&held);
    let count = |code: &str| held.iter().find(|(c, _)| c == code).map_or(0, |(_, n)| *n);
    assert_eq!(count("open"), PER_PLUGIN, "{held:?}");
    assert_eq!(count("8"), 600 - PER_PLUGIN, "{held:?}");

    // While they are held: atk's own calls are refused at once, naming the bound; other's are
    // answered; threads and memory stay put.
    let started = Instant::now();
    let refusal = atk.call("stat .").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(refusal.0, Code::ResourceExhausted as i32, "{refusal:?}");
    assert!(
        refusal.1.contains(&format!(
            "plugin \"atk\" has {PER_PLUGIN} host operations open, its bound"
        )),
        "{refusal:?}"
    );
    other_is_served(&mut other, "while 600 unread streams are held").await;
    let (threads_held, rss_held) = (proc_status(pid, "Threads"), proc_status(pid, "VmRSS"));
    eprintln!("manager: threads {threads} -> {threads_held}, VmRSS {rss} -> {rss_held} kB");
    assert!(
        threads_held <= threads + WORKERS as u64,
        "{threads} -> {threads_held}"
    );
    assert!(rss_held < rss + 64 * 1024, "VmRSS {rss} -> {rss_held} kB");

    // Released (the connection closes): atk's slots come back.
    assert_eq!(atk.ok("release").await, "1");
    let freed = async {
        loop {
            match atk.call("stat .").await {
                Ok(_) => return,
                Err((code, _)) if code == Code::ResourceExhausted as i32 => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(other) => panic!("stat .: {other:?}"),
            }
        }
    };
    tokio::time::timeout(DEADLINE, freed)
        .await
        .expect("atk's slots are freed once its streams are gone");
    assert!(atk.ok("stream big.bin").await.starts_with("16 1048576 "));
}

#[tokio::test]
async fn fifos_sockets_devices_and_hard_links_are_refused_by_what_they_are() {
    let Two {
        mesh: _mesh,
        mut atk,
        mut other,
        atk_root,
        dir,
    } = two_plugins().await;
    let at = |name: &str| atk_root.join(name).display().to_string();
    atk.ok(&format!("mkfifo {}", at("fifo"))).await;
    atk.ok(&format!("listen {}", at("sock"))).await;
    let outside = dir.path().join("outside.txt");
    std::fs::write(&outside, "outside").unwrap();
    atk.ok(&format!("link {} {}", outside.display(), at("linked")))
        .await;
    // A device, where this test may make one (root): the null device's numbers.
    // (and open: a temp dir mounted `nodev` refuses it before host services see it).
    let device = nix::sys::stat::mknod(
        atk_root.join("null").as_path(),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .is_ok()
        && std::fs::File::open(atk_root.join("null")).is_ok();

    let refused = |answer: Result<String, (i32, String)>, what: &str| {
        let (code, message) = answer.expect_err(what);
        assert_eq!(code, Code::FailedPrecondition as i32, "{what}: {message}");
        assert!(message.contains(what), "{what}: {message}");
    };
    refused(atk.call("read fifo").await, "fifo is a FIFO");
    refused(atk.call("stream fifo").await, "fifo is a FIFO");
    refused(atk.call("write fifo x").await, "fifo is a FIFO");
    refused(atk.call("read sock").await, "sock is a socket");
    refused(atk.call("write sock x").await, "sock is a socket");
    if device {
        refused(atk.call("read null").await, "null is a character device");
    } else {
        eprintln!("mknod refused here: the device case is not tested");
    }
    refused(atk.call("read linked").await, "linked has 2 hard links");
    refused(atk.call("stream linked").await, "linked has 2 hard links");
    refused(
        atk.call("write linked changed").await,
        "linked has 2 hard links",
    );
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "outside");
    // Stat opens nothing for reading: it answers at once, kind 4 (other).
    assert!(atk.ok("stat fifo").await.starts_with("4 0 "));
    // Removing a name is harmless whatever it names.
    atk.ok("delete linked").await;
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "outside");
    // Plain files are served as before.
    assert_eq!(atk.ok("write plain.txt hello").await, "5");
    assert_eq!(atk.ok("read plain.txt").await, "hello");
    other_is_served(&mut other, "after the refusals").await;
}

#[tokio::test]
async fn a_huge_directory_is_refused_at_its_bound_and_others_are_served() {
    use mesh_manager::host::service::MAX_DIR_ENTRIES;
    let Two {
        mesh: _mesh,
        mut atk,
        mut other,
        atk_root,
        dir: _dir,
    } = two_plugins().await;
    let huge = atk_root.join("huge");
    std::fs::create_dir(&huge).unwrap();
    make_files(&huge, MAX_DIR_ENTRIES + 1);
    let (code, message) = atk.call("list huge").await.unwrap_err();
    assert_eq!(code, Code::ResourceExhausted as i32, "{message}");
    assert!(
        message.contains(&format!(
            "huge holds more than ReadDir answers ({MAX_DIR_ENTRIES} entries"
        )),
        "{message}"
    );
    // Many at once: each bounded, none starving the others.
    let (flood, _) = tokio::join!(
        atk.ok("flood 40 list huge"),
        other_is_served(&mut other, "during 40 listings of a huge directory")
    );
    for (code, _) in outcomes(&flood) {
        assert_eq!(
            code,
            (Code::ResourceExhausted as i32).to_string(),
            "{flood}"
        );
    }
    // At the bound, the listing is whole.
    std::fs::remove_file(huge.join("0")).unwrap();
    let listed = atk.ok("list huge").await;
    assert_eq!(listed.split(',').count(), MAX_DIR_ENTRIES);
}

/// `n` empty files named `0`..`n-1` in `dir`.
fn make_files(dir: &Path, n: usize) {
    for i in 0..n {
        std::fs::File::create(dir.join(i.to_string())).unwrap();
    }
}
