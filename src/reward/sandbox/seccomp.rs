//! The sandbox's system-call filter: a classic-BPF program built before `fork` and installed in
//! the child just before `exec`.
//!
//! It allows by default (Python needs a broad set of calls) and refuses what a test program never
//! needs and an escape would: debugging or reading other processes (`ptrace`,
//! `process_vm_*`, `pidfd_getfd`), new namespaces and mounts (a way back to capabilities),
//! kernel interfaces with a history of escapes (`bpf`, `userfaultfd`, `io_uring`, `keyctl`,
//! `perf_event_open`), SysV IPC (segments outlive their processes and are not counted as any
//! process's memory), `memfd_create` (uncounted memory), and every socket but a Unix one.
//! Another architecture's calling convention (x32, or a foreign `AUDIT_ARCH`) kills the process.

/// One classic-BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Instruction {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// `struct sock_fprog`.
#[repr(C)]
struct Program {
    len: u16,
    filter: *const Instruction,
}

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JMP_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const JMP_JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
const JMP_JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

const RET_ALLOW: u32 = 0x7fff_0000; // SECCOMP_RET_ALLOW
const RET_ERRNO: u32 = 0x0005_0000; // SECCOMP_RET_ERRNO | errno
const RET_KILL_PROCESS: u32 = 0x8000_0000;

/// Offsets in `struct seccomp_data`: nr, arch, then the arguments (low word first here).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0: u32 = 16;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// The x32 ABI's marker bit in a system-call number on x86_64.
const X32_BIT: u32 = 0x4000_0000;

/// `clone` flags that create namespaces.
const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u32;

/// Calls refused with `EPERM`.
fn refused() -> Vec<libc::c_long> {
    let everywhere = [
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_kcmp,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount_setattr,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_syslog,
        libc::SYS_personality,
        libc::SYS_shmget,
        libc::SYS_shmat,
        libc::SYS_shmctl,
        libc::SYS_shmdt,
        libc::SYS_msgget,
        libc::SYS_msgsnd,
        libc::SYS_msgrcv,
        libc::SYS_msgctl,
        libc::SYS_semget,
        libc::SYS_semop,
        libc::SYS_semctl,
        libc::SYS_semtimedop,
        libc::SYS_memfd_create,
    ];
    #[cfg(target_arch = "x86_64")]
    let this_arch_only = [libc::SYS_iopl, libc::SYS_ioperm, libc::SYS_uselib];
    #[cfg(not(target_arch = "x86_64"))]
    let this_arch_only: [libc::c_long; 0] = [];
    [everywhere.as_slice(), &this_arch_only].concat()
}

/// The filter, ready to install in a child.
pub struct Filter(Vec<Instruction>);

/// Where a conditional jump goes (classic BPF jumps forward only, by distance).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Label {
    Next,
    /// The socket family check.
    Family,
    /// The clone flags check.
    Flags,
    Allow,
    Refuse,
    NoSys,
    Kill,
}

/// Instructions with symbolic jumps, resolved once every label has its place.
#[derive(Default)]
struct Assembler {
    code: Vec<(u16, u32, Label, Label)>,
    labels: Vec<(Label, usize)>,
}

impl Assembler {
    fn load(&mut self, offset: u32) {
        self.code.push((LD_W_ABS, offset, Label::Next, Label::Next));
    }
    fn jump(&mut self, code: u16, k: u32, yes: Label, no: Label) {
        self.code.push((code, k, yes, no));
    }
    fn ret(&mut self, value: u32) {
        self.code.push((RET_K, value, Label::Next, Label::Next));
    }
    fn label(&mut self, label: Label) {
        self.labels.push((label, self.code.len()));
    }
    fn finish(self) -> Vec<Instruction> {
        let place = |label: Label, at: usize| -> u8 {
            if label == Label::Next {
                return 0;
            }
            let (_, target) = self
                .labels
                .iter()
                .find(|(l, _)| *l == label)
                .copied()
                .expect("every label is placed");
            u8::try_from(target - at - 1).expect("jumps stay within 255 instructions")
        };
        self.code
            .iter()
            .enumerate()
            .map(|(at, &(code, k, yes, no))| Instruction {
                code,
                jt: place(yes, at),
                jf: place(no, at),
                k,
            })
            .collect()
    }
}

impl Filter {
    pub fn new() -> Self {
        use Label::*;
        let mut a = Assembler::default();
        a.load(ARCH);
        a.jump(JMP_JEQ_K, AUDIT_ARCH, Next, Kill);
        a.load(NR);
        if cfg!(target_arch = "x86_64") {
            a.jump(JMP_JGE_K, X32_BIT, Refuse, Next);
        }
        for nr in refused() {
            a.jump(JMP_JEQ_K, nr as u32, Refuse, Next);
        }
        // glibc falls back to `clone`, whose flags (unlike `clone3`'s) a filter can read.
        a.jump(JMP_JEQ_K, libc::SYS_clone3 as u32, NoSys, Next);
        a.jump(JMP_JEQ_K, libc::SYS_socket as u32, Family, Next);
        a.jump(JMP_JEQ_K, libc::SYS_socketpair as u32, Family, Next);
        a.jump(JMP_JEQ_K, libc::SYS_clone as u32, Flags, Next);
        a.ret(RET_ALLOW);
        a.label(Family);
        a.load(ARG0);
        a.jump(JMP_JEQ_K, libc::AF_UNIX as u32, Allow, Refuse);
        a.label(Flags);
        a.load(ARG0);
        a.jump(JMP_JSET_K, NAMESPACE_FLAGS, Refuse, Allow);
        a.label(Allow);
        a.ret(RET_ALLOW);
        a.label(Refuse);
        a.ret(RET_ERRNO | libc::EPERM as u32);
        a.label(NoSys);
        a.ret(RET_ERRNO | libc::ENOSYS as u32);
        a.label(Kill);
        a.ret(RET_KILL_PROCESS);
        Self(a.finish())
    }

    /// Installs the filter (in the child, after `fork`: no allocation). `PR_SET_NO_NEW_PRIVS`
    /// first, which an unprivileged filter requires and which keeps setuid binaries inert.
    pub fn install(&self) -> std::io::Result<()> {
        let program = Program {
            len: self.0.len() as u16,
            filter: self.0.as_ptr(),
        };
        // SAFETY: `program` points at instructions that outlive the call.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const Program,
                ) == -1
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
