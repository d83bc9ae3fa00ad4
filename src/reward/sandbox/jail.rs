//! What runs in the sandbox's child between `fork` and `exec`: namespaces, a minimal read-only
//! root, a private uid, rlimits and the system-call filter.
//!
//! The child `C` (forked by `Command::spawn`) starts a new session, enters new mount, network,
//! PID, IPC and UTS namespaces (directly as root with `CAP_SYS_ADMIN`; inside a new user
//! namespace otherwise, after first dropping to a private uid when root) and forks `C1`, the
//! first process of the new PID namespace, which becomes the program. `C` only waits for it and
//! exits with its status. When `C1` exits, or `C` dies (`PR_SET_PDEATHSIG`), the kernel kills
//! every process left in the namespace: nothing a program starts outlives it, and nothing in it
//! can see or signal a process outside.
//!
//! `C1` builds its root on a fresh tmpfs: the system's `/usr`, `/bin`, `/sbin`, `/lib*`, the
//! interpreter's prefix, a few files of `/etc` (bound read-only), `/dev/null`, `zero`, `full`,
//! `random`, `urandom`, and size-capped tmpfs at `/tmp` (the working directory) and `/dev/shm`;
//! no `/proc`, no home directories, nothing else of the host. It pivots into that root, makes it
//! read-only, sets the rlimits and `PR_SET_NO_NEW_PRIVS`, installs the filter and returns, and
//! `std` execs the interpreter.
//!
//! Everything the children use is allocated here before the fork: after it only
//! async-signal-safe system calls run.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::seccomp::Filter;

/// Where each set-up step's failure is reported: the step's number, one byte, on this pipe.
pub type StepPipe = libc::c_int;

/// How the namespaces are entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// As root with `CAP_SYS_ADMIN`: namespaces directly, then the private uid.
    Root { uid: u32 },
    /// A new user namespace, as a private uid when root (without `CAP_SYS_ADMIN`), else as the
    /// user tsq runs as.
    UserNamespace { uid: Option<u32> },
    /// No namespaces (`isolation: none`): a session, rlimits and the filter only.
    Unisolated,
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub cpu_s: u64,
    pub memory_bytes: u64,
    pub file_bytes: u64,
    pub processes: u64,
    /// Size of each of `/tmp` and `/dev/shm`.
    pub tmpfs_bytes: u64,
}

/// One step of building the root (paths under the staging mount, or absolute in it).
enum Step {
    Mkdir(CString),
    /// Creates an empty file to bind a file over.
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    /// Binds `source` at `target`, read-only (recursively) unless `writable`.
    Bind {
        source: CString,
        target: CString,
        writable: bool,
    },
    Tmpfs {
        target: CString,
        options: CString,
    },
}

/// Numbers reported on the step pipe: the ones of [`Jail::steps`] start at [`FIRST_ROOT_STEP`].
pub const STEP_NAMES: [&str; 14] = [
    "setsid",
    "dropping to the sandbox uid",
    "unshare (new namespaces)",
    "writing the user namespace's uid/gid maps",
    "fork into the new PID namespace",
    "making mounts private",
    "mounting the staging tmpfs",
    "pivot_root",
    "making the root read-only",
    "chdir /tmp",
    "setting rlimits",
    "installing the seccomp filter",
    "redirecting the verdict channel",
    "building the root (a mount, bind or mkdir)",
];
const FIRST_ROOT_STEP: u8 = 13;

/// Everything the children need, prepared before the fork.
pub struct Jail {
    entry: Entry,
    limits: Limits,
    filter: Filter,
    /// Staging directory the new root is mounted on (the host's `/tmp`, hidden by it).
    stage: CString,
    stage_options: CString,
    tmpfs: CString,
    steps: Vec<Step>,
    proc_setgroups: CString,
    proc_uid_map: CString,
    proc_gid_map: CString,
    deny: &'static [u8],
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    root: CString,
    dot: CString,
    tmp: CString,
    verdict_fd: libc::c_int,
    step_pipe: StepPipe,
}

fn c(path: impl AsRef<[u8]>) -> CString {
    // Paths come from the file system or from this file: none holds a NUL.
    CString::new(path.as_ref().to_vec()).unwrap_or_default()
}

/// Host paths the program sees, read-only, when they exist: the system's programs and
/// libraries and the few files the dynamic loader and Python read from `/etc`.
const SYSTEM_PATHS: [&str; 11] = [
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/lib32",
    "/libx32",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
];
const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

impl Jail {
    /// Prepares a jail that runs `python` (whose installation prefix is bound too when it is
    /// not under `/usr`), reporting on `verdict_fd` (moved to fd 3) and `step_pipe`.
    pub fn new(
        entry: Entry,
        limits: Limits,
        python: &Path,
        verdict_fd: libc::c_int,
        step_pipe: StepPipe,
    ) -> Self {
        let stage = Path::new("/tmp");
        let mut steps = Vec::new();
        let under = |p: &Path| {
            c(stage
                .join(p.strip_prefix("/").unwrap_or(p))
                .as_os_str()
                .as_bytes())
        };
        let mut bound: Vec<PathBuf> = Vec::new();
        let add = |host: &Path, steps: &mut Vec<Step>, bound: &mut Vec<PathBuf>| {
            let Ok(meta) = std::fs::symlink_metadata(host) else {
                return;
            };
            if let Some(parent) = host.parent() {
                mkdir_all(parent, &under, steps);
            }
            if meta.file_type().is_symlink() {
                if let Ok(target) = std::fs::read_link(host) {
                    steps.push(Step::Symlink {
                        target: c(target.as_os_str().as_bytes()),
                        link: under(host),
                    });
                }
                return;
            }
            steps.push(if meta.is_dir() {
                Step::Mkdir(under(host))
            } else {
                Step::Touch(under(host))
            });
            steps.push(Step::Bind {
                source: c(host.as_os_str().as_bytes()),
                target: under(host),
                writable: false,
            });
            bound.push(host.to_path_buf());
        };
        for path in SYSTEM_PATHS {
            add(Path::new(path), &mut steps, &mut bound);
        }
        // An interpreter installed elsewhere (pyenv, /opt): its whole prefix, at the same path.
        if let Some(prefix) = interpreter_prefix(python)
            && !bound.iter().any(|b| prefix.starts_with(b))
        {
            add(&prefix, &mut steps, &mut bound);
        }
        steps.push(Step::Mkdir(under(Path::new("/dev"))));
        for device in DEVICES {
            let host = Path::new("/dev").join(device);
            steps.push(Step::Touch(under(&host)));
            steps.push(Step::Bind {
                source: c(host.as_os_str().as_bytes()),
                target: under(&host),
                writable: true,
            });
        }
        let options = c(format!("size={},mode=1777", limits.tmpfs_bytes));
        for dir in ["/tmp", "/dev/shm"] {
            steps.push(Step::Mkdir(under(Path::new(dir))));
            steps.push(Step::Tmpfs {
                target: under(Path::new(dir)),
                options: options.clone(),
            });
        }
        let (uid_map, gid_map) = match entry {
            Entry::UserNamespace { uid } => {
                let outer_uid = uid.unwrap_or_else(|| unsafe { libc::geteuid() });
                let outer_gid = uid.unwrap_or_else(|| unsafe { libc::getegid() });
                (
                    format!("1000 {outer_uid} 1\n").into_bytes(),
                    format!("1000 {outer_gid} 1\n").into_bytes(),
                )
            }
            _ => (Vec::new(), Vec::new()),
        };
        Self {
            entry,
            limits,
            filter: Filter::new(),
            stage: c("/tmp"),
            stage_options: c("size=1048576,mode=0755"),
            tmpfs: c("tmpfs"),
            steps,
            proc_setgroups: c("/proc/self/setgroups"),
            proc_uid_map: c("/proc/self/uid_map"),
            proc_gid_map: c("/proc/self/gid_map"),
            deny: b"deny",
            uid_map,
            gid_map,
            root: c("/"),
            dot: c("."),
            tmp: c("/tmp"),
            verdict_fd,
            step_pipe,
        }
    }

    /// Runs in `C` between `fork` and `exec`; returns in the program's process only.
    ///
    /// # Safety
    /// Only in a child just forked by `Command::spawn`.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        unsafe {
            self.step(0, libc::setsid())?;
            // fd 3 is the verdict channel (a plain dup2 onto itself would keep close-on-exec).
            let moved = if self.verdict_fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(self.verdict_fd, 3)
            };
            self.step(12, moved)?;
            // Every other descriptor closes at exec (std's own are close-on-exec already).
            libc::syscall(
                libc::SYS_close_range,
                4u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if self.entry == Entry::Unisolated {
                return self.finish();
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            self.enter_namespaces()?;
            let child = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0);
            self.step(4, child as libc::c_int)?;
            if child != 0 {
                self.wait_and_exit(child as libc::pid_t);
            }
            // C1: the first process of the PID namespace.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            self.build_root()?;
            if let Entry::Root { uid } = self.entry {
                self.step(1, drop_to(uid))?;
            }
            self.finish()
        }
    }

    /// Limits and the filter: the last steps before `exec`, in every mode.
    unsafe fn finish(&self) -> std::io::Result<()> {
        self.step(10, unsafe { self.set_limits() })?;
        self.filter.install().map_err(|e| self.report(11, e))
    }

    unsafe fn enter_namespaces(&self) -> std::io::Result<()> {
        let others = libc::CLONE_NEWNS
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS;
        unsafe {
            match self.entry {
                Entry::Root { .. } => self.step(2, libc::unshare(others)),
                Entry::UserNamespace { uid } => {
                    if let Some(uid) = uid {
                        self.step(1, drop_to(uid))?;
                        // Dropping root made the process undumpable, which leaves its /proc
                        // files (the maps below) to root.
                        libc::prctl(libc::PR_SET_DUMPABLE, 1);
                    }
                    self.step(2, libc::unshare(libc::CLONE_NEWUSER | others))?;
                    for (file, content) in [
                        (&self.proc_setgroups, self.deny),
                        (&self.proc_uid_map, &self.uid_map[..]),
                        (&self.proc_gid_map, &self.gid_map[..]),
                    ] {
                        self.step(3, write_file(file, content))?;
                    }
                    Ok(())
                }
                Entry::Unisolated => Ok(()),
            }
        }
    }

    /// `C`: nothing to do but wait for the program and pass its status on.
    unsafe fn wait_and_exit(&self, child: libc::pid_t) -> ! {
        unsafe {
            // Releases std's exec-status pipe, so `spawn` returns once C1 has exec'd.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            let mut status = 0;
            while libc::waitpid(child, &mut status, 0) == -1 {
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    libc::_exit(127);
                }
            }
            if libc::WIFSIGNALED(status) {
                libc::_exit(128 + libc::WTERMSIG(status));
            }
            libc::_exit(libc::WEXITSTATUS(status))
        }
    }

    unsafe fn build_root(&self) -> std::io::Result<()> {
        let null = std::ptr::null();
        unsafe {
            self.step(
                5,
                libc::mount(
                    null,
                    self.root.as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    null.cast(),
                ),
            )?;
            self.step(
                6,
                libc::mount(
                    self.tmpfs.as_ptr(),
                    self.stage.as_ptr(),
                    self.tmpfs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    self.stage_options.as_ptr().cast(),
                ),
            )?;
            for step in &self.steps {
                self.run(step)?;
            }
            self.step(7, libc::chdir(self.stage.as_ptr()))?;
            self.step(
                7,
                libc::syscall(libc::SYS_pivot_root, self.dot.as_ptr(), self.dot.as_ptr())
                    as libc::c_int,
            )?;
            self.step(7, libc::umount2(self.dot.as_ptr(), libc::MNT_DETACH))?;
            self.step(
                8,
                libc::mount(
                    null,
                    self.root.as_ptr(),
                    null,
                    libc::MS_REMOUNT
                        | libc::MS_BIND
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV,
                    null.cast(),
                ),
            )?;
            self.step(9, libc::chdir(self.tmp.as_ptr()))
        }
    }

    unsafe fn run(&self, step: &Step) -> std::io::Result<()> {
        let null = std::ptr::null();
        let r = unsafe {
            match step {
                Step::Mkdir(path) => match libc::mkdir(path.as_ptr(), 0o755) {
                    -1 if std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) => 0,
                    r => r,
                },
                Step::Touch(path) => {
                    let fd = libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    fd.min(0)
                }
                Step::Symlink { target, link } => libc::symlink(target.as_ptr(), link.as_ptr()),
                Step::Tmpfs { target, options } => libc::mount(
                    self.tmpfs.as_ptr(),
                    target.as_ptr(),
                    self.tmpfs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    options.as_ptr().cast(),
                ),
                Step::Bind {
                    source,
                    target,
                    writable,
                } => {
                    let r = libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        null.cast(),
                    );
                    if r == -1 {
                        -1
                    } else if *writable {
                        0
                    } else {
                        read_only(target)
                    }
                }
            }
        };
        self.step(FIRST_ROOT_STEP, r)
    }

    unsafe fn set_limits(&self) -> libc::c_int {
        let l = &self.limits;
        for (resource, value) in [
            (libc::RLIMIT_CPU, l.cpu_s),
            (libc::RLIMIT_AS, l.memory_bytes),
            (libc::RLIMIT_FSIZE, l.file_bytes),
            (libc::RLIMIT_NPROC, l.processes),
            (libc::RLIMIT_NOFILE, 256),
            (libc::RLIMIT_CORE, 0),
        ] {
            let limit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if unsafe { libc::setrlimit(resource, &limit) } == -1 {
                return -1;
            }
        }
        0
    }

    /// `r` as a result; on failure, the step's number goes to the step pipe first.
    fn step(&self, number: u8, r: libc::c_int) -> std::io::Result<()> {
        if r == -1 {
            Err(self.report(number, std::io::Error::last_os_error()))
        } else {
            Ok(())
        }
    }

    fn report(&self, number: u8, e: std::io::Error) -> std::io::Error {
        unsafe { libc::write(self.step_pipe, (&number as *const u8).cast(), 1) };
        e
    }
}

/// Makes the mount at `target` and every mount below it read-only, nosuid and nodev
/// (`mount_setattr` only adds flags, so it works on mounts a user namespace may not change
/// otherwise); before Linux 5.12, a plain read-only remount of the top mount.
unsafe fn read_only(target: &CString) -> libc::c_int {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    unsafe {
        let r = libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            target.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        );
        if r == 0 {
            return 0;
        }
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(target.as_ptr(), &mut stat) == -1 {
            return -1;
        }
        // A remount must keep the flags the mount already has (the kernel refuses to clear
        // them); `ST_*` and `MS_*` share these values.
        let kept = stat.f_flag as libc::c_ulong
            & (libc::MS_NOEXEC | libc::MS_NOATIME | libc::MS_NODIRATIME | libc::MS_RELATIME);
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | kept,
            std::ptr::null(),
        )
    }
}

/// Gives up root for `uid` (groups, gid, uid).
unsafe fn drop_to(uid: u32) -> libc::c_int {
    unsafe {
        if libc::setgroups(0, std::ptr::null()) == -1 || libc::setgid(uid) == -1 {
            return -1;
        }
        libc::setuid(uid)
    }
}

unsafe fn write_file(path: &CString, content: &[u8]) -> libc::c_int {
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd == -1 {
            return -1;
        }
        let written = libc::write(fd, content.as_ptr().cast(), content.len());
        libc::close(fd);
        if written == content.len() as isize {
            0
        } else {
            -1
        }
    }
}

/// Mkdir steps for `dir` and its parents under the stage.
fn mkdir_all(dir: &Path, under: &dyn Fn(&Path) -> CString, steps: &mut Vec<Step>) {
    let mut parts: Vec<&Path> = dir.ancestors().filter(|p| *p != Path::new("/")).collect();
    parts.reverse();
    for part in parts {
        steps.push(Step::Mkdir(under(part)));
    }
}

/// The installation an interpreter belongs to: the parent of its `bin` directory.
fn interpreter_prefix(python: &Path) -> Option<PathBuf> {
    let real = std::fs::canonicalize(python).ok()?;
    let bin = real.parent()?;
    Some(if bin.file_name()? == "bin" {
        bin.parent()?.to_path_buf()
    } else {
        bin.to_path_buf()
    })
}

/// Which step failed, from the byte the child wrote.
pub fn step_name(number: u8) -> &'static str {
    STEP_NAMES
        .get(number as usize)
        .copied()
        .unwrap_or("setting up")
}
