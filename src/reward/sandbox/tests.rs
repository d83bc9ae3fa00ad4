//! The sandbox against honest, wrong and hostile programs, in whatever mode this process can
//! build a jail (root here and in CI). `tests/sandbox.rs` runs the hostile table through
//! `tsq validate` in the other modes (no CAP_SYS_ADMIN, an unprivileged uid, no user namespaces).

use super::*;

fn spec(timeout_s: f64) -> SandboxSpec {
    SandboxSpec {
        timeout_s,
        cpu_s: 5,
        memory_mb: 512,
        processes: 32,
        ..SandboxSpec::default()
    }
}

fn program(solution: &str, checks: &str) -> Program {
    Program {
        solution: solution.into(),
        setup: String::new(),
        checks: checks.into(),
        entry_point: String::new(),
        written: solution.into(),
    }
}

fn run_spec(spec: SandboxSpec, solution: &str, checks: &str) -> SandboxOutcome {
    Sandbox::new(spec)
        .run(&program(solution, checks))
        .expect("the sandbox starts")
}

fn run(solution: &str, timeout_s: f64) -> SandboxOutcome {
    run_spec(spec(timeout_s), solution, "assert add(1, 2) == 3")
}

const ADD: &str = "def add(a, b):\n    return a + b\n";

#[test]
fn passing_failing_and_looping_programs() {
    let ok = run(&format!("{ADD}print('hi')"), 10.0);
    assert!(ok.passed(), "{ok:?}");
    assert_eq!(ok.stdout, "hi\n");
    assert!(
        ok.describe().starts_with("passed [isolation: "),
        "{}",
        ok.describe()
    );
    let wrong = run("def add(a, b):\n    return a - b", 10.0);
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
    let chatty = run(&format!("{ADD}print('x' * 1_000_000)"), 10.0);
    assert!(chatty.passed(), "{chatty:?}");
    assert_eq!(chatty.stdout.len(), SandboxSpec::default().output_bytes);
}

/// HumanEval's shape: the tests define `check(candidate)`, the judge calls it with the entry
/// point; MBPP's setup code runs beside the solution and its objects reach the tests.
#[test]
fn entry_points_setup_code_and_values_that_stay_in_the_solution() {
    let sandbox = Sandbox::new(spec(10.0));
    let mut humaneval = program(
        "def inc(x):\n    return x + 1\n",
        "def check(candidate):\n    assert candidate(1) == 2\n    assert abs(candidate(0.5) - 1.5) < 1e-9\n",
    );
    humaneval.entry_point = "inc".into();
    assert!(sandbox.run(&humaneval).unwrap().passed());
    let mut tree = program(
        "class Node:\n    def __init__(self, v):\n        self.v = v\ndef value(n):\n    return n.v\n",
        "assert value(root) == 3\nassert root.v == 3\nassert sorted([3, 1]) == [1, 3]",
    );
    tree.setup = "root = Node(3)".into();
    let outcome = sandbox.run(&tree).unwrap();
    assert!(outcome.passed(), "{outcome:?}");
    // A list the solution sorts in place comes back sorted.
    let in_place = program(
        "def sort_it(xs):\n    xs.sort()\n",
        "xs = [3, 1, 2]\nsort_it(xs)\nassert xs == [1, 2, 3]",
    );
    assert!(sandbox.run(&in_place).unwrap().passed());
}

/// Each way a program could claim a pass it did not earn is judged a failure.
#[test]
fn forged_verdicts_fail() {
    let forgeries = [
        ("exit 0 before the tests", "import sys\nsys.exit(0)"),
        ("os._exit(0)", "import os\nos._exit(0)"),
        (
            "exit 0 from atexit after a failing assert",
            "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    return 0",
        ),
        (
            "an object equal to everything",
            "class E:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return E()",
        ),
        (
            "an int subclass equal to everything",
            "class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\ndef add(a, b):\n    return I(0)",
        ),
        (
            "a verdict written to fd 3",
            "import os\ntry:\n    os.write(3, b'{\"passed\": true, \"why\": \"\"}\\n')\nexcept OSError:\n    pass\ndef add(a, b):\n    return 0",
        ),
        (
            "a verdict printed",
            "print('{\"passed\": true, \"why\": \"\"}')\ndef add(a, b):\n    return 0",
        ),
        (
            "AssertionError patched away",
            "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\ndef add(a, b):\n    return 0",
        ),
        (
            "the judge killed",
            "import os\nos.kill(os.getppid(), 9)\ndef add(a, b):\n    return 0",
        ),
        (
            "the judge's fds through /proc",
            "import os\ntry:\n    fd = os.open('/proc/%d/fd/3' % os.getppid(), os.O_WRONLY)\n    os.write(fd, b'{\"passed\": true, \"why\": \"\"}\\n')\nexcept OSError:\n    pass\ndef add(a, b):\n    return 0",
        ),
        (
            "the judge's memory through ptrace",
            "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.ptrace(16, os.getppid(), 0, 0))\ndef add(a, b):\n    return 0",
        ),
    ];
    for (what, solution) in forgeries {
        let outcome = run(solution, 10.0);
        assert!(!outcome.passed(), "{what}: judged a pass: {outcome:?}");
    }
}

#[test]
fn memory_hogs_and_fork_bombs_are_contained() {
    let hog = run("x = bytearray(8 << 30)", 10.0);
    assert!(
        !hog.passed() && hog.describe().contains("MemoryError"),
        "{hog:?}"
    );
    // Six processes of 150 MB each stay under the per-process limit (512 MB) but not under
    // the run's total.
    let many = run(
        "import os, time\nfor _ in range(6):\n    if os.fork() == 0:\n        x = b'x' * (150 << 20)\n        time.sleep(30)\ntime.sleep(30)",
        20.0,
    );
    assert!(many.memory_exceeded && !many.timed_out, "{many:?}");
    let started = Instant::now();
    let bomb = run("import os\nwhile True:\n    os.fork()", 3.0);
    assert!(!bomb.passed(), "{bomb:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // Nothing lingers: the next program runs normally.
    assert!(run(ADD, 10.0).passed());
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
        let passed = (0..6).filter(|_| run(ADD, 10.0).passed());
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

/// What a jailed program can reach: no network, no file of the host's to write or read, no
/// process that outlives it, no signal to tsq, no SysV IPC.
#[test]
fn escapes_are_contained() {
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

    let marker = format!("tsq-escape-{}", std::process::id());
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let targets = ["/tmp", "/var/tmp", "/run/lock", "/dev/shm", home.as_str()];
    let writes: String = targets
        .iter()
        .map(|dir| {
            format!("try:\n    open('{dir}/{marker}', 'w').write('x')\nexcept OSError:\n    pass\n")
        })
        .collect();
    let wrote = run(&format!("{writes}{ADD}"), 10.0);
    assert!(wrote.passed(), "{wrote:?}");
    for dir in targets {
        assert!(
            !Path::new(dir).join(&marker).exists(),
            "a file escaped to {dir}"
        );
    }

    let secrets = run(
        "import os\nfor p in ['/etc/shadow', '/root', '/home', '/proc/1/environ', '/etc/hostname']:\n    assert not os.path.exists(p), p\ndef add(a, b):\n    return a + b",
        10.0,
    );
    assert!(
        secrets.passed(),
        "the host's files are visible: {secrets:?}"
    );

    let started = Instant::now();
    let daemon = run(
        "import os, sys, time\nr, w = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        os.write(w, b'x')\n        time.sleep(60)\n    os._exit(0)\nos.read(r, 1)\ndef add(a, b):\n    return a + b",
        10.0,
    );
    assert!(daemon.passed(), "{daemon:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the daemon held the run: {:?}",
        started.elapsed()
    );

    // Signals cannot reach tsq: it is not in the program's PID namespace.
    let signals = run(
        &format!(
            "import os\nfor pid in [{}, -1]:\n    try:\n        os.kill(pid, 9)\n    except OSError:\n        pass\n{ADD}",
            std::process::id()
        ),
        10.0,
    );
    assert!(!signals.timed_out, "{signals:?}");
    let ipc = run(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nassert libc.shmget(0, 1 << 20, 0o1666) == -1\ndef add(a, b):\n    return a + b",
        10.0,
    );
    assert!(ipc.passed(), "SysV shared memory was allowed: {ipc:?}");
    assert_ne!(ipc.containment, Containment::None);
}

/// Provenance asks before any program ran (a resumed stage): a probe finds the jail, and the
/// answer is the one later programs get.
#[test]
fn containment_is_known_without_a_program_and_matches_the_runs() {
    let sandbox = Sandbox::new(spec(10.0));
    let probed = sandbox.containment().expect("a jail on this machine");
    let outcome = sandbox.run(&program(ADD, "assert add(1, 2) == 3")).unwrap();
    assert_eq!(outcome.containment, probed);
    assert_ne!(probed, Containment::None);
    let unisolated = SandboxSpec {
        isolation: SandboxIsolation::None,
        ..spec(10.0)
    };
    assert_eq!(
        Sandbox::new(unisolated).containment().unwrap(),
        Containment::None
    );
}
