"""Start many short training processes cheaply: a server process imports torch, sklearn and the
repository once, then forks one child per command. Each child is a real, separate process running a
script as `python SCRIPT ARGS...` would (runpy as __main__, its own argv, cwd, stdout/stderr files,
default signal handlers), so it can be SIGKILLed mid-write like any training job; only the ~5 s of
imports are shared. Used by test_resume.py and test_bad_input.py (through the `forks` fixture).

Protocol: one JSON object per line on the server's stdin, one reply per line on its stdout.
    {"cmd": "start", "argv": [script, ...], "cwd": DIR, "out": FILE, "err": FILE, "env": {...}}
        -> {"pid": PID}
    {"cmd": "wait", "pid": PID} -> {"status": exit code, or -signal if a signal killed it}
"""
import json
import os
import select
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(msg):
    import runpy
    import traceback

    code = 1
    try:
        os.chdir(msg['cwd'])
        for fd, path in ((1, msg['out']), (2, msg['err'])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout.reconfigure(line_buffering=True)  # progress is readable while the child runs
        os.environ.update(msg.get('env') or {})
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        sys.argv = list(msg['argv'])
        script = os.path.join(REPO, sys.argv[0])
        try:
            runpy.run_path(script, run_name='__main__')
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve():
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    sys.path.insert(0, REPO)
    # everything the scripts import, loaded once (no torch op runs here, so no thread pool exists)
    import sklearn.datasets  # noqa: F401  (digits)
    import sklearn.model_selection  # noqa: F401
    import torch  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import PIL.Image  # noqa: F401
    import gen_condense  # noqa: F401
    import pool_match  # noqa: F401
    import validate  # noqa: F401
    out = sys.stdout
    print(json.dumps({'ready': os.getpid()}), file=out, flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg['cmd'] == 'start':
            pid = os.fork()
            if pid == 0:
                _child(msg)
            reply = {'pid': pid}
        elif msg['cmd'] == 'wait':
            _, status = os.waitpid(msg['pid'], 0)
            reply = {'status': os.waitstatus_to_exitcode(status)}
        else:
            reply = {'error': f"unknown command {msg['cmd']}"}
        print(json.dumps(reply), file=out, flush=True)


class ForkServer:
    """The test side: start the server once, then `start` children and `wait` for them."""

    def __init__(self, env=None):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), 'serve'], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, 'PYTHONPATH': REPO, 'OMP_NUM_THREADS': '1',
                                          **(env or {})})
        reply = self._read(timeout=180)
        assert 'ready' in reply, reply

    def _read(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"fork server gave no answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server ended (status {self.proc.poll()})")
        return json.loads(line)

    def _ask(self, timeout=60, **msg):
        self.proc.stdin.write(json.dumps(msg) + '\n')
        self.proc.stdin.flush()
        return self._read(timeout)

    def start(self, argv, cwd, out, err, env=None):
        return self._ask(cmd='start', argv=[str(a) for a in argv], cwd=str(cwd), out=str(out), err=str(err),
                         env=env or {})['pid']

    @staticmethod
    def running(pid):
        """Whether the child still runs (an exited child stays a zombie until `wait`: state 'Z')."""
        try:
            with open(f'/proc/{pid}/stat') as f:
                return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
        except FileNotFoundError:
            return False

    def wait(self, pid, timeout=120):
        """The child's exit status (-N: killed by signal N); SIGKILLs it after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.running(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        return self._ask(cmd='wait', pid=pid)['status']

    def run(self, argv, cwd, out, err, env=None, timeout=120):
        return self.wait(self.start(argv, cwd, out, err, env), timeout)

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == '__main__' and sys.argv[1:] == ['serve']:
    serve()
