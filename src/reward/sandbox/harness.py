# The code reward's test harness, run by `python3 -I -B -c` inside the sandbox (src/reward/sandbox.rs).
#
# Why it is shaped like this: generated code must not be able to forge its verdict. Code running
# in the same interpreter as the tests can do anything the tests can (exit with status 0, patch
# builtins, return an object that equals everything, read any variable), so the tests do not run
# beside it. This process (the judge) reads the job from stdin, forks a child that runs the
# solution (and the record's setup code), and runs the tests itself: every name the solution
# defines becomes a proxy whose calls are answered by the child over a socket. Values cross as
# plain data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset of
# exactly those types; anything else stays in the child and is referred to by handle), so an
# assertion compares values the child cannot make lie. Only the judge holds fd 3, the verdict
# channel to tsq; the child closes it before running a line of the solution, and the judge is not
# dumpable (its memory and fds cannot be reached through ptrace or /proc). Whatever the child does
# (exit, crash, hang, garbage) can only make a test fail.
import builtins, json, os, socket, struct, sys

VERDICT_FD = 3
MAX_MESSAGE = 16 << 20
MAX_ITEMS = 1_000_000
sys.set_int_max_str_digits(0)


def send(sock, obj):
    # What the solution printed so far reaches tsq before the judge may end its process.
    sys.stdout.flush()
    sys.stderr.flush()
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def recv(sock):
    def exactly(n):
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError("the solution's process ended")
            buf += chunk
        return bytes(buf)

    (n,) = struct.unpack(">I", exactly(4))
    if n > MAX_MESSAGE:
        raise ValueError("message too large")
    return json.loads(exactly(n))


def encode(x, other, depth=0):
    """Plain data as JSON; instances of subclasses (Counter, a namedtuple) as their base type's
    value, read through the base type's own methods so an override cannot change it; anything
    else through `other` (a handle)."""
    if depth > 100:
        raise ValueError("value nested too deeply")
    t = type(x)
    if x is None or t is bool:
        return x
    if issubclass(t, int):
        return {"i": str(int.__index__(x))}
    if issubclass(t, float):
        return {"f": float.hex(x)}
    if issubclass(t, complex):
        return {"c": [float.hex(complex.real.__get__(x)), float.hex(complex.imag.__get__(x))]}
    if issubclass(t, str):
        return str.__str__(x)
    if issubclass(t, bytes):
        return {"b": bytes.hex(x)}
    for base, tag in ((list, "l"), (tuple, "t"), (set, "s"), (frozenset, "fs")):
        if issubclass(t, base):
            return {tag: [encode(v, other, depth + 1) for v in base.__iter__(x)]}
    if issubclass(t, dict):
        return {"d": [[encode(k, other, depth + 1), encode(v, other, depth + 1)] for k, v in dict.items(x)]}
    return other(x)


def decode(v, handle):
    """The value `encode` wrote; a handle through `handle`."""
    if v is None or type(v) in (bool, str):
        return v
    if type(v) is not dict or len(v) != 1:
        raise ValueError("malformed value")
    ((tag, body),) = v.items()
    if tag == "i":
        return int(body)
    if tag == "f":
        return float.fromhex(body)
    if tag == "c":
        return complex(float.fromhex(body[0]), float.fromhex(body[1]))
    if tag == "b":
        return bytes.fromhex(body)
    if tag == "r":
        if type(body) is not int:
            raise ValueError("malformed handle")
        return handle(body)
    if tag == "d":
        return {decode(k, handle): decode(x, handle) for k, x in body}
    kinds = {"l": list, "t": tuple, "s": set, "fs": frozenset}
    if tag not in kinds or type(body) is not list:
        raise ValueError("malformed value")
    return kinds[tag](decode(x, handle) for x in body)


# ---- the child: runs the solution, answers the judge's requests ----


def serve(sock, job):
    handles = {}

    def ref(obj):
        handles[id(obj)] = obj
        return {"r": id(obj)}

    def enc(x):
        return encode(x, ref)

    def dec(v):
        return decode(v, handles.__getitem__)

    def answer(request):
        op = request["op"]
        target = handles[request["ref"]]
        if op == "call":
            args = [dec(a) for a in request["args"]]
            kwargs = {k: dec(v) for k, v in request["kwargs"]}
            result = target(*args, **kwargs)
            # Arguments the call changed in place travel back (a list sorted in place).
            return {"v": enc(result), "args": [enc(a) for a in args]}
        if op == "getattr":
            return {"v": enc(getattr(target, request["name"]))}
        if op == "getitem":
            return {"v": enc(target[dec(request["key"])])}
        if op == "len":
            return {"v": enc(len(target))}
        if op == "contains":
            return {"v": enc(dec(request["item"]) in target)}
        if op == "iter":
            items = []
            for item in target:
                items.append(item)
                if len(items) > MAX_ITEMS:
                    raise ValueError("too many items")
            return {"v": enc(items)}
        if op == "str":
            return {"v": enc(repr(target) if request["repr"] else str(target))}
        raise ValueError("unknown request")

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(job["solution"], "<solution>", "exec"), namespace)
        if job["setup"]:
            exec(compile(job["setup"], "<setup>", "exec"), namespace)
        names = {
            k: enc(v)
            for k, v in namespace.items()
            if not k.startswith("__") and type(v).__name__ != "module"
        }
        send(sock, {"names": names})
    except BaseException as e:
        send(sock, {"error": type(e).__name__, "message": str(e)[:2000]})
        return
    while True:
        try:
            request = recv(sock)
        except EOFError:
            return
        try:
            reply = answer(request)
        except BaseException as e:
            reply = {"error": type(e).__name__, "message": str(e)[:2000]}
        send(sock, reply)


# ---- the judge: runs the tests against proxies ----


class Remote:
    """A value that stayed in the solution's process. It compares by identity only."""

    __slots__ = ("_judge", "_ref")

    def __init__(self, judge, ref):
        object.__setattr__(self, "_judge", judge)
        object.__setattr__(self, "_ref", ref)

    def __call__(self, *args, **kwargs):
        return self._judge.call(self._ref, args, kwargs)

    def __getattr__(self, name):
        return self._judge.ask({"op": "getattr", "ref": self._ref, "name": name})

    def __getitem__(self, key):
        return self._judge.ask({"op": "getitem", "ref": self._ref, "key": self._judge.enc(key)})

    def __len__(self):
        return self._judge.ask({"op": "len", "ref": self._ref})

    def __contains__(self, item):
        return self._judge.ask({"op": "contains", "ref": self._ref, "item": self._judge.enc(item)})

    def __iter__(self):
        return iter(self._judge.ask({"op": "iter", "ref": self._ref}))

    def __str__(self):
        return str(self._judge.ask({"op": "str", "ref": self._ref, "repr": False}))

    def __repr__(self):
        return str(self._judge.ask({"op": "str", "ref": self._ref, "repr": True}))

    def __eq__(self, other):
        return isinstance(other, Remote) and other._ref == self._ref

    def __hash__(self):
        return hash(self._ref)


class Judge:
    def __init__(self, sock):
        self.sock = sock

    def enc(self, x):
        def remote(x):
            if type(x) is Remote:
                return {"r": x._ref}
            raise TypeError(f"a {type(x).__name__} cannot be passed to the solution")

        return encode(x, remote)

    def dec(self, v):
        return decode(v, lambda ref: Remote(self, ref))

    def raise_from(self, reply):
        kind = getattr(builtins, str(reply["error"]), None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RuntimeError
        raise kind(str(reply.get("message", "")))

    def exchange(self, request):
        send(self.sock, request)
        reply = recv(self.sock)
        if "error" in reply:
            self.raise_from(reply)
        return reply

    def ask(self, request):
        return self.dec(self.exchange(request)["v"])

    def call(self, ref, args, kwargs):
        reply = self.exchange({
            "op": "call",
            "ref": ref,
            "args": [self.enc(a) for a in args],
            "kwargs": [[k, self.enc(v)] for k, v in kwargs.items()],
        })
        for before, after in zip(args, reply["args"]):
            after = self.dec(after)
            if type(before) is list and type(after) is list:
                before[:] = after
            elif type(before) in (dict, set) and type(after) is type(before):
                before.clear()
                before.update(after)
        return self.dec(reply["v"])


def not_dumpable():
    """Keeps the child (same uid) out of this process's memory and fds."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except Exception:
        pass  # without ctypes: no /proc in the sandbox, and its seccomp filter denies ptrace


def main():
    verdict = os.fdopen(VERDICT_FD, "w")
    job = json.loads(sys.stdin.read())
    not_dumpable()
    judge_end, child_end = socket.socketpair()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        verdict.close()
        judge_end.close()
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        try:
            serve(child_end, job)
        finally:
            sys.stdout.flush()
            os._exit(0)
    child_end.close()
    judge = Judge(judge_end)

    def report(passed, why=""):
        verdict.write(json.dumps({"passed": passed, "why": why[-2000:]}) + "\n")
        verdict.flush()

    try:
        first = recv(judge_end)
        if "error" in first:
            report(False, f"the solution raised {first['error']}: {first.get('message', '')}")
            return
        scope = {"__name__": "__main__", "__builtins__": builtins}
        for name, value in first["names"].items():
            scope[str(name)] = judge.dec(value)
        exec(compile(job["checks"], "<tests>", "exec"), scope)
        if job["entry_point"]:
            scope["check"](scope[job["entry_point"]])
        report(True)
    except AssertionError as e:
        import traceback

        line = traceback.extract_tb(e.__traceback__)[-1]
        report(False, f"AssertionError: {line.line or ''} {e}".strip())
    except BaseException as e:
        report(False, f"{type(e).__name__}: {e}")
    finally:
        os.kill(pid, 9)


main()
