//! Running untrusted generated code: a `python3 -I` subprocess, never in-process.
//!
//! Each program runs in its own session and process group, with stdin closed, a cleared
//! environment, captured output (capped), and rlimits on CPU time, address space, file size and
//! processes. Run as root (CI and these machines), it also gets what makes containment real:
//! - a network namespace with no interfaces up (no network at all),
//! - a mount namespace whose `/tmp`, `/var/tmp` and `/dev/shm` are fresh tmpfs mounts; the working
//!   directory is an empty directory there, gone when the program's last process exits,
//! - a uid of its own (one per concurrent slot, no files anywhere belong to it), so it can write
//!   nowhere else, the process limit counts exactly its processes, and every process left behind
//!   (a daemon that left the process group) is killed afterwards by signalling that uid.
//!
//! Without root, the kernel may still allow a user namespace for the network; what could not be
//! isolated is reported in every outcome ([`Isolation`]).

use std::ffi::CString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::pipeline::spec::SandboxSpec;

/// Programs longer than this are refused (they travel as one `-c` argument).
const MAX_PROGRAM_BYTES: usize = 120 * 1024;
/// The sandbox uids (no account needs to exist): each running program holds one, claimed with
/// a lock file so that concurrent programs, of this process or another, never share one.
const FIRST_UID: u32 = 61_000;
const UIDS: u32 = 1024;

/// A program to run and the code the model wrote (empty: nothing to judge).
pub struct Program {
    pub source: String,
    pub solution: String,
}

/// What containment a run had.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Isolation {
    pub network: bool,
    pub filesystem: bool,
    pub own_uid: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct SandboxOutcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub seconds: f64,
    pub isolation: Isolation,
}

impl SandboxOutcome {
    pub fn passed(&self) -> bool {
        !self.timed_out && self.exit_code == Some(0)
    }

    /// One line saying what happened, for sample records.
    pub fn describe(&self) -> String {
        let last_err = self
            .stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        let what = if self.timed_out {
            format!("timed out after {:.1}s", self.seconds)
        } else if let Some(sig) = self.signal {
            let name = match sig {
                libc::SIGXCPU => "CPU time limit",
                libc::SIGKILL => "killed",
                libc::SIGSEGV => "segmentation fault",
                libc::SIGXFSZ => "file size limit",
                _ => "signal",
            };
            format!("{name} (signal {sig})")
        } else if self.passed() {
            "passed".into()
        } else {
            format!("failed (exit {}): {last_err}", self.exit_code.unwrap_or(-1))
        };
        let missing: Vec<&str> = [
            (self.isolation.network, "network"),
            (self.isolation.filesystem, "filesystem"),
            (self.isolation.own_uid, "uid"),
        ]
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, n)| *n)
        .collect();
        if missing.is_empty() {
            what
        } else {
            format!("{what} [not isolated: {}]", missing.join(", "))
        }
    }
}

/// Runs programs under one [`SandboxSpec`]; shared by the threads judging a batch.
pub struct Sandbox {
    spec: SandboxSpec,
    python: OnceLock<Result<PathBuf, String>>,
}

/// A uid claimed for one program; released (unlocked) on drop.
struct ClaimedUid {
    uid: u32,
    _lock: std::fs::File,
}

/// Claims a free sandbox uid (waiting if all are taken).
fn claim_uid() -> Result<ClaimedUid, String> {
    let dir = crate::assets::TsqHome::from_env().0.join("sandbox-uids");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    loop {
        for uid in FIRST_UID..FIRST_UID + UIDS {
            let path = dir.join(uid.to_string());
            let file = std::fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| format!("cannot open `{}`: {e}", path.display()))?;
            if file.try_lock().is_ok() {
                return Ok(ClaimedUid { uid, _lock: file });
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Sandbox {
    pub fn new(spec: SandboxSpec) -> Self {
        Self {
            spec,
            python: OnceLock::new(),
        }
    }

    pub fn concurrency(&self) -> usize {
        self.spec.concurrency
    }

    /// Runs one program to completion, a timeout or a limit.
    pub fn run(&self, program: &Program) -> Result<SandboxOutcome, String> {
        if program.source.len() > MAX_PROGRAM_BYTES || program.source.contains('\0') {
            return Ok(self.refused("program too large or not text"));
        }
        let python = self.python().clone()?;
        let root = unsafe { libc::geteuid() } == 0;
        let claimed = if root { Some(claim_uid()?) } else { None };
        self.run_as(&python, program, claimed.as_ref().map(|c| c.uid))
    }

    fn refused(&self, why: &str) -> SandboxOutcome {
        SandboxOutcome {
            exit_code: None,
            signal: None,
            timed_out: false,
            stdout: String::new(),
            stderr: why.into(),
            seconds: 0.0,
            isolation: Isolation {
                network: true,
                filesystem: true,
                own_uid: true,
            },
        }
    }

    /// The interpreter: `TSQ_SANDBOX_PYTHON`, else the system's `/usr/bin/python3` (one the
    /// sandbox uid can execute; a pyenv under root's home is not), else `python3` on PATH.
    fn python(&self) -> &Result<PathBuf, String> {
        self.python.get_or_init(|| {
            if let Ok(name) = std::env::var("TSQ_SANDBOX_PYTHON") {
                return find_in_path(&name)
                    .ok_or_else(|| format!("TSQ_SANDBOX_PYTHON `{name}` was not found"));
            }
            ["/usr/bin/python3", "/usr/local/bin/python3"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
                .or_else(|| find_in_path("python3"))
                .ok_or_else(|| {
                    "python3 was not found (code rewards run it; set TSQ_SANDBOX_PYTHON)".into()
                })
        })
    }

    /// Runs `program`, as `uid` with full isolation when one was claimed (root).
    fn run_as(
        &self,
        python: &PathBuf,
        program: &Program,
        uid: Option<u32>,
    ) -> Result<SandboxOutcome, String> {
        // Without root there is no mount namespace to hide `/tmp` in: work in a private temp dir.
        let scratch = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let limits = Limits::from(&self.spec);
        let mut attempts = match uid {
            Some(uid) => vec![Setup::Root { uid }, Setup::UserNamespace, Setup::Plain],
            None => vec![Setup::UserNamespace, Setup::Plain],
        };
        let started = Instant::now();
        let (mut child, setup) = loop {
            let setup = attempts.remove(0);
            let mut cmd = Command::new(python);
            cmd.args(["-I", "-B", "-c", &program.source])
                .env_clear()
                .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                .env("LANG", "C.UTF-8")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if !matches!(setup, Setup::Root { .. }) {
                cmd.current_dir(scratch.path());
            }
            let prepared = Prepared::new(setup, limits)?;
            // SAFETY: the closure makes only async-signal-safe system calls on data prepared
            // before the fork (no allocation, no locks).
            unsafe { cmd.pre_exec(move || prepared.apply()) };
            match tsq_linalg::fork_safely(|| cmd.spawn()) {
                Ok(child) => break (child, setup),
                Err(e) if attempts.is_empty() => return Err(format!("cannot start python3: {e}")),
                Err(_) => continue,
            }
        };
        let stdout = capture(child.stdout.take(), self.spec.output_bytes);
        let stderr = capture(child.stderr.take(), self.spec.output_bytes);
        let (status, timed_out) = wait_with_timeout(&mut child, self.spec.timeout_s);
        let pgid = child.id() as i32;
        // The whole process group, then (as root) everything the slot's uid still runs.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        if let Setup::Root { uid } = setup {
            kill_uid(uid);
        }
        let _ = child.wait();
        let seconds = started.elapsed().as_secs_f64();
        use std::os::unix::process::ExitStatusExt;
        Ok(SandboxOutcome {
            exit_code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            timed_out,
            stdout: stdout.finish(),
            stderr: stderr.finish(),
            seconds,
            isolation: setup.isolation(),
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Setup {
    /// Network and mount namespaces, private tmpfs, own uid.
    Root { uid: u32 },
    /// An unprivileged user namespace with a network namespace.
    UserNamespace,
    /// Session, rlimits and a private working directory only.
    Plain,
}

impl Setup {
    fn isolation(self) -> Isolation {
        match self {
            Self::Root { .. } => Isolation {
                network: true,
                filesystem: true,
                own_uid: true,
            },
            Self::UserNamespace => Isolation {
                network: true,
                filesystem: false,
                own_uid: false,
            },
            Self::Plain => Isolation {
                network: false,
                filesystem: false,
                own_uid: false,
            },
        }
    }
}

#[derive(Clone, Copy)]
struct Limits {
    cpu_s: u64,
    memory_bytes: u64,
    file_bytes: u64,
    processes: u64,
}

impl From<&SandboxSpec> for Limits {
    fn from(s: &SandboxSpec) -> Self {
        Self {
            cpu_s: s.cpu_s,
            memory_bytes: s.memory_mb << 20,
            file_bytes: s.file_mb << 20,
            processes: s.processes,
        }
    }
}

/// Everything the child needs after `fork`, allocated before it.
struct Prepared {
    setup: Setup,
    limits: Limits,
    tmpfs: CString,
    tmp_dirs: [CString; 3],
    root: CString,
    work: CString,
    options: CString,
}

impl Prepared {
    fn new(setup: Setup, limits: Limits) -> Result<Self, String> {
        let c = |s: &str| CString::new(s).map_err(|e| e.to_string());
        Ok(Self {
            setup,
            limits,
            tmpfs: c("tmpfs")?,
            tmp_dirs: [c("/tmp")?, c("/var/tmp")?, c("/dev/shm")?],
            root: c("/")?,
            work: c("/tmp/work")?,
            options: c("size=64m,mode=1777")?,
        })
    }

    /// Runs in the child between `fork` and `exec`.
    fn apply(&self) -> std::io::Result<()> {
        let check = |r: libc::c_int| {
            if r == -1 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        unsafe {
            check(libc::setsid())?;
            match self.setup {
                Setup::Root { uid } => {
                    check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWNET))?;
                    check(libc::mount(
                        std::ptr::null(),
                        self.root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ))?;
                    for (i, dir) in self.tmp_dirs.iter().enumerate() {
                        let r = libc::mount(
                            self.tmpfs.as_ptr(),
                            dir.as_ptr(),
                            self.tmpfs.as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV,
                            self.options.as_ptr().cast(),
                        );
                        // `/tmp` must be hidden; the others may not exist on every system.
                        if i == 0 {
                            check(r)?;
                        }
                    }
                    check(libc::mkdir(self.work.as_ptr(), 0o777))?;
                    check(libc::chown(self.work.as_ptr(), uid, uid))?;
                    check(libc::chdir(self.work.as_ptr()))?;
                    self.set_limits()?;
                    check(libc::setgroups(0, std::ptr::null()))?;
                    check(libc::setgid(uid))?;
                    check(libc::setuid(uid))?;
                }
                Setup::UserNamespace => {
                    check(libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET))?;
                    self.set_limits()?;
                }
                Setup::Plain => self.set_limits()?,
            }
        }
        Ok(())
    }

    fn set_limits(&self) -> std::io::Result<()> {
        let l = &self.limits;
        for (resource, value) in [
            (libc::RLIMIT_CPU, l.cpu_s),
            (libc::RLIMIT_AS, l.memory_bytes),
            (libc::RLIMIT_FSIZE, l.file_bytes),
            (libc::RLIMIT_NPROC, l.processes),
            (libc::RLIMIT_CORE, 0),
        ] {
            let limit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if unsafe { libc::setrlimit(resource, &limit) } == -1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Kills every process of `uid` from a helper that takes that uid (kill(-1) spares the caller).
fn kill_uid(uid: u32) {
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "exit 0"])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgid(uid) == -1 || libc::setuid(uid) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::kill(-1, libc::SIGKILL);
            Ok(())
        })
    };
    if let Ok(mut child) = tsq_linalg::fork_safely(|| cmd.spawn()) {
        let _ = child.wait();
    }
}

/// Waits for the child up to `timeout_s`; `None` status when it had to be killed.
fn wait_with_timeout(
    child: &mut Child,
    timeout_s: f64,
) -> (Option<std::process::ExitStatus>, bool) {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout_s);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (Some(status), false),
            Ok(None) if Instant::now() >= deadline => {
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                return (None, true);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => return (None, false),
        }
    }
}

/// Reads a pipe on a thread, keeping the first `cap` bytes and draining the rest.
struct Capture {
    kept: Arc<Mutex<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn capture(pipe: Option<impl Read + Send + 'static>, cap: usize) -> Capture {
    let kept = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&kept);
    let thread = pipe.map(|mut pipe| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut kept = sink.lock().unwrap_or_else(|e| e.into_inner());
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        })
    });
    Capture { kept, thread }
}

impl Capture {
    /// What was captured; waits a bounded time for the reader (a pipe held open by a process
    /// that escaped could block it forever). Once every writer is dead the reader finishes at
    /// once; the bound is generous because under load the reader thread may not have been
    /// scheduled yet (200 ms lost a daemon's whole output in a parallel test run).
    fn finish(mut self) -> String {
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&kept).into_owned()
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name)).filter(|p| p.is_file());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(timeout_s: f64) -> Sandbox {
        Sandbox::new(SandboxSpec {
            timeout_s,
            cpu_s: 5,
            memory_mb: 512,
            processes: 32,
            ..SandboxSpec::default()
        })
    }

    fn run(code: &str, timeout_s: f64) -> SandboxOutcome {
        let program = Program {
            source: code.into(),
            solution: code.into(),
        };
        sandbox(timeout_s)
            .run(&program)
            .expect("the sandbox starts")
    }

    fn root() -> bool {
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn passing_failing_and_looping_programs() {
        let ok = run(
            "def f(x):\n    return x + 1\nassert f(1) == 2\nprint('hi')",
            10.0,
        );
        assert!(ok.passed(), "{ok:?}");
        assert_eq!(ok.stdout, "hi\n");
        let wrong = run("def f(x):\n    return x\nassert f(1) == 2", 10.0);
        assert!(!wrong.passed());
        assert!(
            wrong.describe().contains("AssertionError"),
            "{}",
            wrong.describe()
        );
        let started = Instant::now();
        let looping = run("while True:\n    pass", 1.0);
        assert!(!looping.passed() && looping.timed_out, "{looping:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let chatty = run("print('x' * 1_000_000)", 10.0);
        assert!(chatty.passed() && chatty.stdout.len() == SandboxSpec::default().output_bytes);
    }

    #[test]
    fn memory_hogs_and_fork_bombs_are_contained() {
        let hog = run("x = bytearray(8 << 30)", 10.0);
        assert!(
            !hog.passed() && hog.stderr.contains("MemoryError"),
            "{hog:?}"
        );
        let started = Instant::now();
        let bomb = run("import os\nwhile True:\n    os.fork()", 3.0);
        assert!(!bomb.passed(), "{bomb:?}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
        // tsq goes on: the next program runs normally.
        assert!(run("assert 1 + 1 == 2", 10.0).passed());
    }

    /// Starting programs while another thread multiplies matrices must not stall either side:
    /// OpenBLAS's fork handler used to strand a running product (see `tsq_linalg::fork_safely`).
    #[test]
    fn programs_start_while_products_run_on_other_threads() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tsq_linalg::{Mat, MatMut, Threads, matmul};
        let stop = Arc::new(AtomicBool::new(false));
        let multiplying = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let n = 384;
                let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
                let mut c = vec![0f32; n * n];
                let mut products = 0;
                while !stop.load(Ordering::Relaxed) || products < 20 {
                    let (x, y) = (Mat::new(&a, n, n), Mat::new(&a, n, n));
                    matmul(MatMut::new(&mut c, n, n), x, y, false, Threads::All);
                    products += 1;
                }
                products
            })
        };
        let (done, finished) = std::sync::mpsc::channel();
        let starting = std::thread::spawn(move || {
            let passed = (0..6).filter(|_| run("assert 2 + 2 == 4", 10.0).passed());
            let _ = done.send(passed.count());
        });
        let passed = finished.recv_timeout(Duration::from_secs(120));
        stop.store(true, Ordering::Relaxed);
        assert_eq!(passed, Ok(6), "programs stalled beside running products");
        starting.join().unwrap();
        let (products_done, products) = std::sync::mpsc::channel();
        std::thread::spawn(move || products_done.send(multiplying.join().unwrap()));
        let products = products.recv_timeout(Duration::from_secs(60));
        assert!(
            products.is_ok(),
            "a product stalled beside starting programs"
        );
    }

    #[test]
    fn network_files_and_escaped_children_are_contained() {
        if !root() {
            eprintln!("not root: network, filesystem and uid isolation are not available");
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let net = run(
            &format!("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"),
            10.0,
        );
        assert!(!net.passed(), "{net:?}");
        listener.set_nonblocking(true).unwrap();
        assert!(
            listener.accept().is_err(),
            "the sandbox reached the host's loopback"
        );

        let outside = std::env::temp_dir().join(format!("tsq-escape-{}", std::process::id()));
        let write = run(
            &format!(
                "open({:?}, 'w').write('x')\nopen('/etc/tsq-escape', 'w')",
                outside.to_str().unwrap()
            ),
            10.0,
        );
        assert!(!write.passed(), "{write:?}");
        assert!(write.stderr.contains("PermissionError"), "{write:?}");
        assert!(!outside.exists(), "a file escaped the sandbox's /tmp");

        let daemon = run(
            // The parent exits once the child has printed its pid (a pipe, not a sleep: under
            // load 0.3 s was not always enough).
            "import os, sys, time\nr, w = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n    print(os.getpid(), flush=True)\n    os.write(w, b'x')\n    time.sleep(60)\nelse:\n    os.read(r, 1)\n    sys.exit(1)",
            10.0,
        );
        assert!(!daemon.passed());
        let pid: u32 = daemon
            .stdout
            .trim()
            .parse()
            .expect("the daemon printed its pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(
            status.is_empty() || status.contains("State:\tZ"),
            "the escaped child survives: {status}"
        );
        assert_eq!(daemon.isolation, Setup::Root { uid: FIRST_UID }.isolation());
        assert!(
            daemon.describe().starts_with("failed"),
            "{}",
            daemon.describe()
        );
    }
}
