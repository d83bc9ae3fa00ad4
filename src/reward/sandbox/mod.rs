//! Running untrusted generated code: `python3 -I` in a jail, never in-process, judged by a
//! harness whose verdict the code cannot forge.
//!
//! - The verdict: `harness.py` runs the solution in a child process and the tests itself,
//!   against proxies, and reports on fd 3, a pipe only it holds. A run passes only when that
//!   pipe carries exactly one verdict saying so; exit statuses are not evidence.
//! - The jail ([`jail`]): new mount, network, PID, IPC and UTS namespaces (as root directly,
//!   otherwise inside a user namespace), a minimal read-only root without `/proc` or home
//!   directories, size-capped tmpfs for `/tmp` and `/dev/shm`, a uid of its own when tsq is
//!   root, rlimits, `PR_SET_NO_NEW_PRIVS` and a system-call filter ([`seccomp`]). Every process
//!   a program starts dies with it; none can see or signal tsq.
//! - Memory: RLIMIT_AS bounds each process; the run's total (resident memory of every process
//!   in its PID namespace) is polled and the run killed past `memory_mb`.
//!
//! When no jail can be built (no root and no user namespaces), programs are refused with a
//! message saying what is missing, unless the pipeline says `isolation: none`. What a run got is
//! recorded in its outcome ([`Containment`]). docs/security.md has the threat model.

mod jail;
mod seccomp;

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::spec::{SandboxIsolation, SandboxSpec};
use jail::{Entry, Jail, Limits};

/// The judge that runs the tests (see its header).
const HARNESS: &str = include_str!("harness.py");
/// Jobs larger than this are refused (solution, setup and tests together).
const MAX_JOB_BYTES: usize = 512 * 1024;
/// The verdict line is short; anything longer is not a verdict.
const MAX_VERDICT_BYTES: usize = 8192;
/// The sandbox uids (no account needs to exist): each running program holds one, claimed with
/// a lock file so that concurrent programs, of this process or another, never share one.
const FIRST_UID: u32 = 61_000;
const UIDS: u32 = 1024;
/// How often the run's total memory is measured.
const MEMORY_POLL: Duration = Duration::from_millis(10);

/// A solution and the tests it must pass.
pub struct Program {
    /// The code that runs in the solution's process (the completion's code, with the prompt's
    /// signature prepended where the completion continues it).
    pub solution: String,
    /// Code run after the solution in its process (MBPP's `test_setup_code`).
    pub setup: String,
    /// The tests, run by the judge (assert statements, or HumanEval's `def check`).
    pub checks: String,
    /// When set, the judge calls `check(<entry_point>)` after the tests' code.
    pub entry_point: String,
    /// What the completion wrote, as it is shown in samples.
    pub written: String,
}

/// What containment a run had.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Containment {
    /// Namespaces entered as root, the program under a uid of its own.
    NamespacesAsRoot,
    /// Namespaces inside a user namespace (as a uid of its own when tsq is root).
    UserNamespace,
    /// `isolation: none`: rlimits and the system-call filter only.
    None,
}

impl Containment {
    pub fn describe(self) -> &'static str {
        match self {
            Self::NamespacesAsRoot => "namespaces (root)",
            Self::UserNamespace => "namespaces (user namespace)",
            Self::None => "none (isolation: none)",
        }
    }
}

/// The judge's report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HarnessVerdict {
    pub passed: bool,
    pub why: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SandboxOutcome {
    /// The judge's verdict, when exactly one arrived.
    pub verdict: Option<HarnessVerdict>,
    /// Why there is no verdict, when there is none.
    pub no_verdict: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// The run's processes together went past `memory_mb`.
    pub memory_exceeded: bool,
    pub stdout: String,
    pub stderr: String,
    pub seconds: f64,
    pub containment: Containment,
}

impl SandboxOutcome {
    pub fn passed(&self) -> bool {
        !self.timed_out && !self.memory_exceeded && self.verdict.as_ref().is_some_and(|v| v.passed)
    }

    /// One line saying what happened, for sample records.
    pub fn describe(&self) -> String {
        let what = if self.timed_out {
            format!("timed out after {:.1}s", self.seconds)
        } else if self.memory_exceeded {
            "memory limit (all processes together)".to_string()
        } else if let Some(v) = &self.verdict {
            if v.passed {
                "passed".into()
            } else {
                format!("failed: {}", v.why)
            }
        } else {
            let status = match (self.signal, self.exit_code) {
                (Some(sig), _) => signal_name(sig),
                (None, Some(code)) => format!("exit {code}"),
                (None, None) => "no status".into(),
            };
            let last_err = self
                .stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim();
            let why = self.no_verdict.as_deref().unwrap_or("no verdict");
            format!("failed ({why}; {status}): {last_err}")
        };
        format!("{what} [isolation: {}]", self.containment.describe())
    }
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGXCPU => "CPU time limit",
        libc::SIGKILL => "killed",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGXFSZ => "file size limit",
        _ => "signal",
    };
    format!("{name} (signal {sig})")
}

/// Why a program could not run at all (as opposed to running and failing).
#[derive(Clone, Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{doing}: {cause}")]
    Io {
        doing: String,
        #[source]
        cause: Arc<std::io::Error>,
    },
    #[error("TSQ_SANDBOX_PYTHON `{0}` was not found")]
    NamedPythonNotFound(String),
    #[error("python3 was not found (code rewards run it; set TSQ_SANDBOX_PYTHON)")]
    PythonNotFound,
    /// No way into a jail worked, and `isolation: none` was not given; `tried` says what each
    /// way said.
    #[error(
        "cannot isolate generated code, so it was not run ({}). A jail needs either root (with \
         CAP_SYS_ADMIN, or at least CAP_SETUID and user namespaces) or unprivileged user \
         namespaces: enable them (`sysctl -w kernel.unprivileged_userns_clone=1` on Debian, \
         `user.max_user_namespaces` > 0, `kernel.apparmor_restrict_unprivileged_userns=0` on \
         Ubuntu), or run tsq as root or in a container that allows them (e.g. podman, or docker \
         with `--security-opt seccomp=unconfined --cap-add SYS_ADMIN`). To run generated code \
         without isolation anyway, set `isolation: none` in the reward's `sandbox` (unsafe: see \
         docs/security.md)",
        tried.join("; ")
    )]
    NoJail { tried: Vec<String> },
    #[error("no program ran")]
    NothingRan,
}

impl SandboxError {
    fn io(doing: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let doing = doing.into();
        move |cause| Self::Io {
            doing,
            cause: Arc::new(cause),
        }
    }
}

/// Runs programs under one [`SandboxSpec`]; shared by the threads judging a batch.
pub struct Sandbox {
    spec: SandboxSpec,
    python: OnceLock<Result<PathBuf, SandboxError>>,
    /// The way into a jail that worked first (later runs go straight to it), or why none did.
    entry: OnceLock<Result<EntryKind, SandboxError>>,
}

/// An [`Entry`] before a uid is claimed for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EntryKind {
    Root,
    /// A user namespace entered as a claimed uid (tsq is root without `CAP_SYS_ADMIN`).
    UserNamespaceAsUid,
    /// A user namespace entered as tsq's own uid (not root, or root of a container whose user
    /// namespace maps no sandbox uid).
    UserNamespace,
    Unisolated,
}

impl EntryKind {
    fn containment(self) -> Containment {
        match self {
            Self::Root => Containment::NamespacesAsRoot,
            Self::UserNamespaceAsUid | Self::UserNamespace => Containment::UserNamespace,
            Self::Unisolated => Containment::None,
        }
    }
    fn describe(self) -> &'static str {
        match self {
            Self::Root => "namespaces as root",
            Self::UserNamespaceAsUid => "a user namespace as a sandbox uid",
            Self::UserNamespace => "a user namespace",
            Self::Unisolated => "no isolation",
        }
    }
}

/// A uid claimed for one program; released (unlocked) on drop.
struct ClaimedUid {
    uid: u32,
    _lock: std::fs::File,
}

/// Claims a free sandbox uid (waiting if all are taken). The lock files live in one place per
/// machine (`/run/tsq/sandbox-uids`, root's), so tsq processes with different `$TSQ_HOME`s never
/// share a uid.
fn claim_uid() -> Result<ClaimedUid, SandboxError> {
    let dir = Path::new("/run/tsq/sandbox-uids");
    std::fs::create_dir_all(dir).map_err(SandboxError::io(format!(
        "cannot create `{}`",
        dir.display()
    )))?;
    loop {
        for uid in FIRST_UID..FIRST_UID + UIDS {
            let path = dir.join(uid.to_string());
            let file = std::fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(SandboxError::io(format!(
                    "cannot open `{}`",
                    path.display()
                )))?;
            if file.try_lock().is_ok() {
                return Ok(ClaimedUid { uid, _lock: file });
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

impl Sandbox {
    pub fn new(spec: SandboxSpec) -> Self {
        Self {
            spec,
            python: OnceLock::new(),
            entry: OnceLock::new(),
        }
    }

    pub fn concurrency(&self) -> usize {
        self.spec.concurrency
    }

    /// Runs one program to a verdict, a timeout or a limit. `Err` when the program cannot run
    /// at all: no interpreter, or no jail and `isolation: none` not given (a refusal, which must
    /// stop training rather than count as a wrong answer).
    pub fn run(&self, program: &Program) -> Result<SandboxOutcome, SandboxError> {
        let job = serde_json::json!({
            "solution": program.solution,
            "setup": program.setup,
            "checks": program.checks,
            "entry_point": program.entry_point,
        })
        .to_string();
        if job.len() > MAX_JOB_BYTES {
            return Ok(self.refused("the program is too large to run"));
        }
        let python = self.python().clone()?;
        if let Some(found) = self.entry.get() {
            let kind = found.clone()?;
            return self.run_in(kind, &python, &job).map_err(|(_, e)| e);
        }
        let mut tried = Vec::new();
        for kind in self.candidates() {
            match self.run_in(kind, &python, &job) {
                Ok(outcome) => {
                    let _ = self.entry.set(Ok(kind));
                    return Ok(outcome);
                }
                Err((Some(step), e)) => tried.push(format!("{}: {step}: {e}", kind.describe())),
                Err((None, e)) => return Err(e),
            }
        }
        let refusal = SandboxError::NoJail { tried };
        let _ = self.entry.set(Err(refusal.clone()));
        Err(refusal)
    }

    /// The containment programs get here: the one found by the first run, or by running a
    /// program that does nothing when none ran yet (a resumed stage), for provenance.
    pub fn containment(&self) -> Result<Containment, SandboxError> {
        if self.entry.get().is_none() {
            self.run(&Program {
                solution: "pass".into(),
                setup: String::new(),
                checks: String::new(),
                entry_point: String::new(),
                written: "pass".into(),
            })?;
        }
        match self.entry.get() {
            Some(Ok(kind)) => Ok(kind.containment()),
            Some(Err(refusal)) => Err(refusal.clone()),
            None => Err(SandboxError::NothingRan),
        }
    }

    fn candidates(&self) -> Vec<EntryKind> {
        match self.spec.isolation {
            SandboxIsolation::None => vec![EntryKind::Unisolated],
            SandboxIsolation::Full if is_root() => vec![
                EntryKind::Root,
                EntryKind::UserNamespaceAsUid,
                EntryKind::UserNamespace,
            ],
            SandboxIsolation::Full => vec![EntryKind::UserNamespace],
        }
    }

    fn refused(&self, why: &str) -> SandboxOutcome {
        SandboxOutcome {
            verdict: Some(HarnessVerdict {
                passed: false,
                why: why.into(),
            }),
            no_verdict: None,
            exit_code: None,
            signal: None,
            timed_out: false,
            memory_exceeded: false,
            stdout: String::new(),
            stderr: String::new(),
            seconds: 0.0,
            containment: self.candidates()[0].containment(),
        }
    }

    /// The interpreter: `TSQ_SANDBOX_PYTHON`, else the system's `/usr/bin/python3`, else
    /// `python3` on PATH (an interpreter outside `/usr` is bound into the jail with its prefix).
    fn python(&self) -> &Result<PathBuf, SandboxError> {
        self.python.get_or_init(|| {
            if let Ok(name) = std::env::var("TSQ_SANDBOX_PYTHON") {
                return find_in_path(&name).ok_or(SandboxError::NamedPythonNotFound(name));
            }
            ["/usr/bin/python3", "/usr/local/bin/python3"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
                .or_else(|| find_in_path("python3"))
                .ok_or(SandboxError::PythonNotFound)
        })
    }

    /// Runs the job in a jail entered the `kind` way. `Err((Some(step), why))` when the jail
    /// could not be built (another way may work), `Err((None, why))` for anything else.
    fn run_in(
        &self,
        kind: EntryKind,
        python: &Path,
        job: &str,
    ) -> Result<SandboxOutcome, (Option<&'static str>, SandboxError)> {
        let plain = |e: SandboxError| (None, e);
        // The claimed uid stays locked until the run is over.
        let (entry, _claimed) = match kind {
            EntryKind::Root => {
                let claimed = claim_uid().map_err(plain)?;
                (Entry::Root { uid: claimed.uid }, Some(claimed))
            }
            EntryKind::UserNamespaceAsUid => {
                let claimed = claim_uid().map_err(plain)?;
                let uid = Some(claimed.uid);
                (Entry::UserNamespace { uid }, Some(claimed))
            }
            EntryKind::UserNamespace => (Entry::UserNamespace { uid: None }, None),
            EntryKind::Unisolated => (Entry::Unisolated, None),
        };
        let (verdict_read, verdict_write) = pipe().map_err(plain)?;
        let (step_read, step_write) = pipe().map_err(plain)?;
        let limits = Limits::from(&self.spec);
        let jail = Jail::new(
            entry,
            limits,
            python,
            verdict_write.as_raw_fd(),
            step_write.as_raw_fd(),
        );
        let mut cmd = Command::new(python);
        cmd.args(["-I", "-B", "-c", HARNESS])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Unjailed, the program works in a temp dir of its own (a jail has its own /tmp).
        let scratch = match kind {
            EntryKind::Unisolated => {
                let dir = tempfile::tempdir()
                    .map_err(|e| plain(SandboxError::io("cannot create a temp dir")(e)))?;
                cmd.current_dir(dir.path());
                Some(dir)
            }
            _ => None,
        };
        self.supervise(cmd, jail, job, (verdict_read, verdict_write), kind, scratch)
            .map_err(|(_, e)| (read_step(&step_read), e))
    }

    /// Starts the program, feeds it the job, waits for it under the limits and collects what
    /// it left: output, status and the verdict.
    fn supervise(
        &self,
        mut cmd: Command,
        jail: Jail,
        job: &str,
        (verdict_read, verdict_write): (OwnedFd, OwnedFd),
        kind: EntryKind,
        _scratch: Option<tempfile::TempDir>,
    ) -> Result<SandboxOutcome, (Option<&'static str>, SandboxError)> {
        let started = Instant::now();
        // SAFETY: `enter` makes only async-signal-safe system calls on data prepared before
        // the fork (no allocation, no locks).
        unsafe { cmd.pre_exec(move || jail.enter()) };
        let mut child = tsq_linalg::fork_safely(|| cmd.spawn())
            .map_err(|e| (None, SandboxError::io("cannot start python3")(e)))?;
        drop(verdict_write);
        let feeder = child.stdin.take().map(|mut stdin| {
            let job = job.to_string();
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(job.as_bytes());
            })
        });
        let stdout = capture(child.stdout.take(), self.spec.output_bytes);
        let stderr = capture(child.stderr.take(), self.spec.output_bytes);
        let memory = MemoryWatch::new(&child, kind, self.spec.memory_mb << 20);
        let ended = wait_within(&mut child, self.spec.timeout_s, memory);
        // The program's first process (and with it its PID namespace), then its group.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let status = child.wait().ok();
        if let Some(feeder) = feeder {
            let _ = feeder.join();
        }
        let (verdict, no_verdict) = read_verdict(verdict_read);
        use std::os::unix::process::ExitStatusExt;
        let (exit_code, signal) = match status.and_then(|s| s.code()) {
            // The jail's first process passes a signal on as 128 + its number.
            Some(code) if code > 128 && kind != EntryKind::Unisolated => (None, Some(code - 128)),
            code => (code, status.and_then(|s| s.signal())),
        };
        Ok(SandboxOutcome {
            verdict,
            no_verdict,
            exit_code,
            signal,
            timed_out: ended == Ended::TimedOut,
            memory_exceeded: ended == Ended::OverMemory,
            stdout: stdout.finish(),
            stderr: stderr.finish(),
            seconds: started.elapsed().as_secs_f64(),
            containment: kind.containment(),
        })
    }
}

impl From<&SandboxSpec> for Limits {
    fn from(s: &SandboxSpec) -> Self {
        Self {
            cpu_s: s.cpu_s,
            memory_bytes: s.memory_mb << 20,
            file_bytes: s.file_mb << 20,
            processes: s.processes,
            tmpfs_bytes: 64 << 20,
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(SandboxError::io("cannot create a pipe")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both descriptors were just created and are owned here only.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The set-up step a child reported failing, if any (read without blocking: every writer has
/// exited or exec'd by the time `spawn` returns an error).
fn read_step(pipe: &OwnedFd) -> Option<&'static str> {
    let mut byte = 0u8;
    unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let n = unsafe { libc::read(pipe.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
    (n == 1).then(|| jail::step_name(byte))
}

/// Exactly one verdict line, or why there is none. Every writer is gone by now (the program's
/// namespace is dead), so reading to the end cannot block on a live one; in `isolation: none`
/// an escaped process could hold the pipe, so the read does not block.
fn read_verdict(pipe: OwnedFd) -> (Option<HarnessVerdict>, Option<String>) {
    unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut text = Vec::new();
    let _ = std::fs::File::from(pipe)
        .take(MAX_VERDICT_BYTES as u64 + 1)
        .read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    match lines.as_slice() {
        [] => (None, Some("the tests did not finish".into())),
        [line] if text.len() <= MAX_VERDICT_BYTES => match serde_json::from_str(line) {
            Ok(verdict) => (Some(verdict), None),
            Err(_) => (None, Some("the verdict channel held no verdict".into())),
        },
        _ => (
            None,
            Some("the verdict channel held more than one verdict".into()),
        ),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Exited,
    TimedOut,
    OverMemory,
}

/// Waits for the program up to `timeout_s`, measuring its memory as it runs.
fn wait_within(child: &mut Child, timeout_s: f64, memory: MemoryWatch) -> Ended {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout_s);
    let mut next_poll = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return Ended::Exited,
            Ok(None) if Instant::now() >= deadline => return Ended::TimedOut,
            Ok(None) => {}
        }
        if Instant::now() >= next_poll {
            if memory.over_limit() {
                return Ended::OverMemory;
            }
            next_poll = Instant::now() + MEMORY_POLL;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The resident memory of every process in a program's PID namespace, together.
struct MemoryWatch {
    /// The namespace, as `/proc/<pid>/ns/pid` names it (`None`: no namespace to watch).
    namespace: Option<PathBuf>,
    limit_bytes: u64,
    page_bytes: u64,
}

impl MemoryWatch {
    fn new(child: &Child, kind: EntryKind, limit_bytes: u64) -> Self {
        let namespace = (kind != EntryKind::Unisolated)
            .then(|| std::fs::read_link(format!("/proc/{}/ns/pid_for_children", child.id())).ok())
            .flatten();
        Self {
            namespace,
            limit_bytes,
            page_bytes: unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64,
        }
    }

    fn over_limit(&self) -> bool {
        let Some(namespace) = &self.namespace else {
            return false;
        };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return false;
        };
        let mut total = 0u64;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.as_encoded_bytes().iter().all(u8::is_ascii_digit) {
                continue;
            }
            let dir = entry.path();
            if std::fs::read_link(dir.join("ns/pid")).ok().as_ref() != Some(namespace) {
                continue;
            }
            // statm: size resident shared ... (pages).
            let resident = std::fs::read_to_string(dir.join("statm"))
                .ok()
                .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
                .unwrap_or(0);
            total += resident * self.page_bytes;
        }
        total > self.limit_bytes
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
mod tests;
