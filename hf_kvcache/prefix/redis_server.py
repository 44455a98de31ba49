"""Throwaway local Redis for tests and benchmarks (no persistence, loopback only): one `redis-server`, or a
Redis Cluster of several."""

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that are free now (all held open together, so none repeats)."""
    with ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def free_port() -> int:
    return free_ports(1)[0]


def _require(program: str) -> str:
    """Path of a Redis program; FileNotFoundError with the install hint when it is not on PATH."""
    path = shutil.which(program)
    if path is None:
        raise FileNotFoundError(f"{program} is not installed (Debian/Ubuntu: apt-get install redis-server)")
    return path


class LocalRedisServer:
    """Starts `redis-server` on 127.0.0.1 at a free port, with `--save '' --appendonly no`.

    `start()` waits until the server answers PING; `stop()` ends it (SIGKILL with `kill=True`);
    `start()` again reopens the same port. `extra_args` go to redis-server (e.g. `["--requirepass", "pw"]`).
    Also a context manager.

    Raises FileNotFoundError when redis-server is not installed.
    """

    def __init__(self, executable: str | None = None, port: int | None = None, extra_args: Sequence[str] = ()):
        self.executable = executable or _require("redis-server")
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "LocalRedisServer":
        """Start the server and wait up to `timeout` seconds for its PING; RuntimeError if it does not answer."""
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


class LocalRedisCluster:
    """A Redis Cluster on 127.0.0.1: `masters` masters with `replicas` replicas each, one `LocalRedisServer` per
    node (free ports, their cluster bus on other free ports), joined by `redis-cli --cluster create`.

    `start()` waits until every node reports `cluster_state:ok` with all 16384 slots served and every replica
    is in sync; `url` is the first node's URL (any node will do for a cluster client). `kill_master(key)`
    SIGKILLs the master serving a key's slot; `wait_for_failover()` waits until its replica has taken over.
    `stop()` ends every node and removes the nodes' folder. Also a context manager.

    Args:
        masters: master nodes (>= 3: Redis needs a majority of masters to agree that one failed).
        replicas: replicas per master.
        node_timeout_ms: milliseconds before an unreachable node counts as failing (`cluster-node-timeout`);
            a failover takes about two to three times this.

    Raises FileNotFoundError when redis-server or redis-cli is not installed.
    """

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000):
        from hf_kvcache.validation import check_int

        check_int("masters", masters, minimum=3, hint="a failure needs a majority of masters to be agreed")
        check_int("replicas", replicas)
        check_int("node_timeout_ms", node_timeout_ms, minimum=1, hint="milliseconds")
        executable = _require("redis-server")
        self.cli = _require("redis-cli")
        self.replicas = replicas
        self.directory: str | None = None
        ports = free_ports(2 * masters * (1 + replicas))  # each node's own port, then its cluster bus port
        self.nodes = [LocalRedisServer(executable, port) for port in ports[: len(ports) // 2]]
        self._bus_ports = ports[len(ports) // 2 :]
        self._node_timeout_ms = node_timeout_ms
        self.url = self.nodes[0].url

    def start(self, timeout: float = 30.0) -> "LocalRedisCluster":
        """Start the nodes, create the cluster, and wait up to `timeout` seconds until it serves every slot.

        Raises RuntimeError (after stopping what it started) when a node does not start, `redis-cli --cluster
        create` fails, or the cluster is not ready in time.
        """
        deadline = time.monotonic() + timeout
        self.directory = tempfile.mkdtemp(prefix="hf_kvcache_redis_cluster_")
        try:
            for node, bus_port in zip(self.nodes, self._bus_ports):
                node.extra_args = [
                    *("--cluster-enabled", "yes", "--cluster-port", str(bus_port)),
                    *("--cluster-config-file", f"{self.directory}/nodes-{node.port}.conf"),
                    *("--cluster-node-timeout", str(self._node_timeout_ms), "--dir", self.directory),
                    # A replica's first sync through a file (each master its own): a diskless one waits 5 s for more
                    # replicas, then holds back writes until the replica's first ack (up to 1 s): lost in a failover.
                    *("--repl-diskless-sync", "no", "--dbfilename", f"dump-{node.port}.rdb"),
                ]
                node.start(timeout=max(deadline - time.monotonic(), 1.0))
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            create = subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=max(deadline - time.monotonic(), 1.0),
            )
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-2000:]}{create.stderr}")
            self._wait(self._ready, deadline, "the cluster did not become ready")
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _ask(node: LocalRedisServer, *command: str):
        """A node's reply to one command, or None when it does not answer within half a second."""
        import redis

        client = redis.Redis.from_url(node.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return client.execute_command(*command)
        except redis.RedisError:
            return None
        finally:
            client.close()

    def _cluster_info(self, node: LocalRedisServer) -> dict[str, str]:
        """A node's `CLUSTER INFO` as a dict (empty when it does not answer)."""
        text = (self._ask(node, "CLUSTER", "INFO") or b"").decode()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def _alive(self) -> list[LocalRedisServer]:
        return [node for node in self.nodes if node.process is not None]

    def _slots(self) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master's port) of each slot range, as the first live node sees it."""
        ranges = self._ask(self._alive()[0], "CLUSTER", "SLOTS") or []
        return [(int(first), int(last), int(master[1])) for first, last, master, *_ in ranges]

    def _ready(self) -> bool:
        """Every live node serves all slots, every slot's master is alive, and every live replica is in sync
        (so a killed master's replica can take over)."""
        alive = self._alive()
        for node in alive:
            info = self._cluster_info(node)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            replication = self._ask(node, "INFO", "replication") or {}  # redis-py parses INFO into a dict
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        slots = self._slots()
        return bool(slots) and {port for _, _, port in slots} <= {node.port for node in alive}

    @staticmethod
    def _wait(condition, deadline: float, failure: str) -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(failure)
            time.sleep(0.05)

    def master_port(self, slot_or_key: int | str | bytes) -> int:
        """Port of the master serving a slot (an int in [0, 16383]) or a key's slot; RuntimeError if none does."""
        from redis.crc import key_slot

        if isinstance(slot_or_key, int):
            slot = slot_or_key
        else:
            slot = key_slot(slot_or_key.encode() if isinstance(slot_or_key, str) else slot_or_key)
        for first, last, port in self._slots():
            if first <= slot <= last:
                return port
        raise RuntimeError(f"no master serves slot {slot}")

    def kill_master(self, slot_or_key: int | str | bytes) -> int:
        """SIGKILL the master serving a slot or a key's slot (its replica takes over after about two to three
        `node_timeout_ms`); returns the killed node's port."""
        port = self.master_port(slot_or_key)
        next(node for node in self.nodes if node.port == port).stop(kill=True)
        return port

    def wait_for_failover(self, timeout: float = 20.0) -> None:
        """Wait up to `timeout` seconds until replicas serve every slot of the killed masters and the cluster is
        ok again on every live node; RuntimeError otherwise (e.g. a killed master had no replica)."""
        self._wait(self._ready, time.monotonic() + timeout, "no replica took over in time")

    def stop(self) -> None:
        """End every node and remove the nodes' folder."""
        for node in self.nodes:
            node.stop(kill=True)  # nothing to save; a terminated master would wait for its replicas first
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> "LocalRedisCluster":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
