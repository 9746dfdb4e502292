"""The server as a process: SIGTERM stops it gracefully; after SIGKILL nothing acknowledged is lost."""

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from fgkeras.serving import Client

SERVER = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from fgkeras.serving import BatchingParameters, serve
server = serve(sys.argv[1], port=0, index_dir=sys.argv[2], grace_seconds=20, intra_op_parallelism=1,
               batching=BatchingParameters(batch_timeout_micros=int(sys.argv[3])))
import tensorflow as tf
print("INTRA-OP THREADS", tf.config.threading.get_intra_op_parallelism_threads(), flush=True)
print("PORT", server.port, flush=True)
server.wait()
print("EXITED CLEANLY", flush=True)
"""


class ServerProcess:
    def __init__(self, model_root, index_dir, batch_timeout_micros=0):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, model_root, index_dir,
                                         str(batch_timeout_micros)],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("PORT "):
                self.address = f"127.0.0.1:{int(line.split()[1])}"
                break
        else:
            raise RuntimeError("the server process did not start:\n" + "".join(self.lines))

    def finish(self, timeout=60):
        """Waits for the process; returns (exit code, its output)."""
        output, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode, "".join(self.lines) + output

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def test_sigterm_finishes_in_flight_requests_then_exits(kit, model_root, tmp_path):
    images = kit.random_images(2)
    server = ServerProcess(model_root, str(tmp_path / "gallery"), batch_timeout_micros=400_000)
    try:
        client = Client(server.address, timeout=30)
        client.upsert(["a"], images[:1])
        outcomes, lock = [], threading.Lock()

        def call():
            started = time.monotonic()
            try:
                client.embed(images)
                outcome = "OK"
            except grpc.RpcError as error:
                outcome = error.code().name
            with lock:
                outcomes.append((started, outcome))

        threads = [threading.Thread(target=call) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)  # the requests wait (400 ms) for their batch to fill: they are in flight now
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        code, output = server.finish()
        assert code == 0 and "EXITED CLEANLY" in output, output
        assert "INTRA-OP THREADS 1" in output
        assert [o for _, o in outcomes] == ["OK"] * 6
        assert all(started < signalled for started, _ in outcomes)
        with pytest.raises(grpc.RpcError) as error:
            client.embed(images)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        client.close()
    finally:
        server.kill()
    # the graceful stop snapshotted the inventory
    from fgkeras.index import Index

    assert Index.load(str(tmp_path / "gallery" / "1")).ids.tolist() == ["a"]  # saved at the shutdown
    assert Index.load(str(tmp_path / "gallery" / "1")).metadata["log_seq"] == 1


def test_acknowledged_upserts_survive_sigkill(kit, model_root, tmp_path):
    index_dir = str(tmp_path / "gallery")
    gallery = kit.random_images(5, seed=4)
    server = ServerProcess(model_root, index_dir)
    try:
        with Client(server.address) as client:
            client.upsert([f"sku-{i}" for i in range(5)], gallery)
            client.delete(["sku-4"])
            client.upsert(["sku-0"], gallery[1:2])  # sku-0 now has image 1's vector
    finally:
        server.process.kill()  # no graceful shutdown, no snapshot
        server.finish()
    assert not os.path.exists(os.path.join(index_dir, "1", "manifest.json"))  # all in the log
    with kit.running(model_root, index_dir=index_dir) as restarted, Client(restarted.address) as client:
        assert client.count() == 4
        ids, scores = client.search(gallery[1:2], k=2)
        assert set(ids[0].tolist()) == {"sku-0", "sku-1"} and np.allclose(scores[0], scores[0, 0], atol=1e-5)
        ids, _ = client.search(gallery[4:5], k=4)
        assert "sku-4" not in ids[0].tolist()
