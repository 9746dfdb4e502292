"""Mixed traffic — embed, search, upsert, delete — from concurrent clients: no request fails."""

import itertools
import threading
import time

import numpy as np
import pytest

from fgkeras.serving import Client


def _mixed_load(kit, model_root, index_dir, seconds, threads=8):
    images = kit.random_images(32, seed=11)
    counter = itertools.count()
    with kit.running(model_root, index_dir=index_dir) as server:
        clients = [Client(server.address) for _ in range(threads)]
        stop, failures, done = threading.Event(), [], [0] * threads

        def worker(slot):
            client, rng = clients[slot], np.random.default_rng(slot)
            mine = []
            while not stop.is_set():
                try:
                    action = rng.integers(10)
                    if action < 4:
                        batch = [images[i] for i in rng.integers(0, 32, rng.integers(1, 5))]
                        assert client.embed(batch).shape == (len(batch), kit.DIM)
                    elif action < 8 or not mine:
                        item = f"item-{next(counter)}"
                        image = kit.encode(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))  # a new image
                        client.upsert([item], [image])
                        mine.append((item, image))
                        ids, _ = client.search([image], k=5)
                        assert item in ids[0].tolist()  # its own write is visible at once
                    else:
                        item, _ = mine.pop(0)
                        assert client.delete([item])["deleted"] == 1
                    done[slot] += 1
                except Exception as error:  # every failure is reported by the test
                    failures.append(repr(error))

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for thread in workers:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in workers:
            thread.join(60)
        count = clients[0].count()
        for client in clients:
            client.close()
        stats = server.stats()
    return failures, sum(done), count, stats


def test_mixed_load_has_zero_errors(kit, model_root, tmp_path):
    failures, requests, count, stats = _mixed_load(kit, model_root, str(tmp_path / "gallery"), seconds=10)
    assert failures == []
    assert requests > 50 and count > 0 and stats["batching"]["tasks"] > requests


@pytest.mark.slow
def test_mixed_load_for_30_seconds_has_zero_errors(kit, model_root, tmp_path):
    failures, requests, count, _ = _mixed_load(kit, model_root, str(tmp_path / "gallery"), seconds=30, threads=16)
    assert failures == [] and requests > 150 and count > 0
