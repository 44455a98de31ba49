"""A throwaway local `redis-server` (no persistence, loopback only) for tests and benchmarks."""

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalRedisServer:
    """Starts `redis-server` on 127.0.0.1 at a free port, with `--save '' --appendonly no`.

    `start()` waits until the server answers PING; `stop()` ends it (SIGKILL with `kill=True`);
    `start()` again reopens the same port. `extra_args` go to redis-server (e.g. `["--requirepass", "pw"]`).
    Also a context manager.
    """

    def __init__(self, executable: str | None = None, port: int | None = None, extra_args: Sequence[str] = ()):
        self.executable = executable or shutil.which("redis-server")
        if self.executable is None:
            raise FileNotFoundError("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "LocalRedisServer":
        import redis

        command = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += self.extra_args
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.AuthenticationError:  # up, with a password (`extra_args=["--requirepass", ...]`)
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)
            finally:
                client.close()

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        self.process.kill() if kill else self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> "LocalRedisServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
