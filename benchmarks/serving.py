"""Serving: the SavedModel called in process vs the same call through our gRPC server.

One exported embedder (`fgkeras.export`, a tiny ResNet-18 on small images), measured in one run:

1. latency at concurrency 1 of the `embed` signature on one small image: the in-process
   SavedModel call vs a `PredictionServiceStub.Predict` round trip to the server (batching on,
   its default), interleaved call by call so both see the same machine load;
   goal: gRPC p99 <= in-process p99 + 1 ms;
2. throughput (images/s) at concurrency 1, 8 and 32 closed-loop clients, batching off vs on,
   with the sizes of the batches formed; goal: >= 3x with batching at concurrency 32.

The servers run in subprocesses (as in production: the client does not share their interpreter).
Both servers and the in-process calls use the same TensorFlow threading (`--intra-op-parallelism`).

    python benchmarks/serving.py [--requests 2000] [--seconds 10] [--quick]
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import _common
import numpy as np

# argv: model root, batching parameters as JSON (or "off"), intra-op threads (0: TensorFlow's choice).
# Each line read from stdin is answered with the batching counters as JSON.
SERVER_SCRIPT = """
import json, logging, sys, threading
logging.basicConfig(level=logging.WARNING)
from fgkeras.serving import BatchingParameters, serve
batching = False if sys.argv[2] == "off" else BatchingParameters(**json.loads(sys.argv[2]))
server = serve(sys.argv[1], port=0, batching=batching, poll_seconds=0, intra_op_parallelism=int(sys.argv[3]) or None)
print(server.port, flush=True)

def answer_stats():
    for _ in sys.stdin:
        print(json.dumps(server.stats()["batching"]), flush=True)

threading.Thread(target=answer_stats, daemon=True).start()
server.wait()
"""


def export_model(root, args):
    import keras

    from fgkeras.export import export_and_push
    from fgkeras.models import build_embedder

    keras.utils.set_random_seed(0)
    embedder = build_embedder("resnet18", width=args.width, embedding_dim=64, image_size=args.image_size)
    result = export_and_push(embedder, root, args.image_size, metrics={"recall@1": 0.0})
    return result.path


def start_server(root, batching, intra_op_parallelism):
    """A server subprocess and its address; `batching` is a `BatchingParameters` or None."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    parameters = "off" if batching is None else json.dumps(dataclasses.asdict(batching))
    process = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, root, parameters, str(intra_op_parallelism)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    line = process.stdout.readline()
    if not line.strip().isdigit():
        process.kill()
        raise RuntimeError(f"the server (batching {parameters}) did not start (printed {line!r})")
    return process, f"127.0.0.1:{int(line)}"


def batching_stats(process):
    """The batching counters (`Server.stats()["batching"]`) of a server subprocess with batching on."""
    process.stdin.write("stats\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


def stop_server(process):
    process.terminate()
    process.wait(timeout=60)


def embed_request(image):
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "embedder"
    request.model_spec.signature_name = "embed"
    proto = request.inputs["images"]
    proto.dtype = types_pb2.DT_STRING
    proto.tensor_shape.dim.add().size = 1
    proto.string_val.append(image)
    return request


def latency(version_dir, target, image, requests):
    """Interleaved calls: in-process, gRPC Predict, and gRPC GetModelStatus (the transport alone,
    no model work): three arrays of milliseconds."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc

    function = tf.saved_model.load(version_dir).signatures["embed"]
    channel = grpc.insecure_channel(target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "embedder"
    times = []
    for i in range(requests + 50):
        start = time.perf_counter()
        function(images=tf.constant([image]))["embeddings"].numpy()
        local = time.perf_counter()
        response = stub.Predict(embed_request(image), timeout=30)  # built per call, as a client does
        remote = time.perf_counter()
        models.GetModelStatus(status, timeout=30)
        end = time.perf_counter()
        assert response.outputs["embeddings"].tensor_shape.dim[0].size == 1
        if i >= 50:  # warm-up calls
            times.append((local - start, remote - local, end - remote))
    channel.close()
    return [np.array(column) * 1e3 for column in zip(*times)]


def batch_costs(version_dir, image, sizes=(1, 4, 16, 32), repeats=30):
    """{batch size: best milliseconds of one in-process `embed` call on that many images}: what
    the model itself costs per image as batches grow, the most server-side batching can save."""
    import tensorflow as tf

    from fgkeras.index import best_seconds as _best_seconds  # the timing index.py uses too

    function = tf.saved_model.load(version_dir).signatures["embed"]
    costs = {}
    for size in sizes:
        images = tf.constant([image] * size)
        call = lambda: function(images=images)["embeddings"].numpy()  # noqa: E731
        call()  # traced and warm before timing
        costs[size] = _best_seconds(call, repeats) * 1e3
    return costs


def cpu_seconds(pid):
    """CPU time (user + system, all threads) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(target, image, concurrency, seconds, pid, transport_only=False):
    """(calls/s, calls per server CPU-second, client CPU ms per call) of `concurrency` closed-loop
    clients for `seconds`: Predict of one image, or GetModelStatus with `transport_only`; raises on
    any failed call. The clients' CPU is this process's (every client thread runs in it)."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc

    channel = grpc.insecure_channel(target)
    if transport_only:
        call = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "embedder"
    else:
        call = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
        request = embed_request(image)
    call(request, timeout=30)
    stop, counts, errors = threading.Event(), [0] * concurrency, []

    def client(slot):
        while not stop.is_set():
            try:
                call(request, timeout=30)
            except grpc.RpcError as error:
                errors.append(error)
                return
            counts[slot] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    start, cpu, own = time.perf_counter(), cpu_seconds(pid), time.process_time()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed, cpu, own = time.perf_counter() - start, cpu_seconds(pid) - cpu, time.process_time() - own
    channel.close()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests at concurrency {concurrency}: {errors[0]}")
    calls = sum(counts)
    return calls / elapsed, calls / max(cpu, 1e-9), own * 1e3 / max(calls, 1)


def main():
    from fgkeras.serving import BatchingParameters, default_batch_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="latency samples per path")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per cell (the median is reported)")
    parser.add_argument("--image-size", type=int, default=32, help="model input side")
    parser.add_argument("--width", type=float, default=0.25, help="ResNet-18 width multiplier")
    parser.add_argument("--quick", action="store_true", help="300 latency samples, 2 x 2 s throughput runs")
    parser.add_argument("--intra-op-parallelism", type=int, default=1,
                        help="TensorFlow intra-op threads of both servers and of the in-process calls (0: TF's choice)")
    defaults = BatchingParameters()
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--batch-timeout-micros", type=int, default=defaults.batch_timeout_micros)
    parser.add_argument("--num-batch-threads", type=int, default=defaults.num_batch_threads)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.seconds, args.rounds = 300, 2.0, 2
    batching = BatchingParameters(
        max_batch_size=args.max_batch_size, batch_timeout_micros=args.batch_timeout_micros,
        num_batch_threads=args.num_batch_threads or default_batch_threads(args.intra_op_parallelism or None))
    load = os.getloadavg()

    import tensorflow as tf

    if args.intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_parallelism)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "embedder")
        version_dir = export_model(root, args)
        pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
        image = tf.io.encode_jpeg(pixels).numpy()
        servers = {mode: start_server(root, parameters, args.intra_op_parallelism)
                   for mode, parameters in (("off", None), ("on", batching))}
        try:
            local, remote, transport = latency(version_dir, servers["on"][1], image, args.requests)
            costs = batch_costs(version_dir, image)
            samples, batches, floor = {}, {}, []
            for concurrency in (1, 8, 32):
                for _ in range(args.rounds):  # alternated, so both modes see the same machine load
                    for mode in ("off", "on"):
                        process, target = servers[mode]
                        before = batching_stats(process) if mode == "on" else None
                        rate, per_cpu, client_ms = throughput(target, image, concurrency, args.seconds, process.pid)
                        samples.setdefault((mode, concurrency), []).append((rate, per_cpu, client_ms))
                        if before is not None:
                            after = batching_stats(process)
                            count = batches.setdefault(concurrency, [0, 0])
                            count[0] += after["images"] - before["images"]
                            count[1] += after["batches"] - before["batches"]
                        print(f"concurrency {concurrency:2d}, batching {mode:3s}: {rate:8.1f} images/s, "
                              f"{per_cpu:8.1f} images per server CPU-second", flush=True)
                    if concurrency == 32:  # the transport alone, in the same conditions
                        process, target = servers["off"]
                        floor.append(throughput(target, image, concurrency, args.seconds, process.pid,
                                                transport_only=True))
            rates = {cell: float(np.median([r for r, _, _ in values])) for cell, values in samples.items()}
            efficiency = {cell: float(np.median([e for _, e, _ in values])) for cell, values in samples.items()}
            floor_rate, floor_per_cpu, _ = (float(np.median(column)) for column in zip(*floor))
            client_ms = float(np.median([c for mode in ("off", "on") for _, _, c in samples[mode, 32]]))
        finally:
            for process, _ in servers.values():
                stop_server(process)

    latency_rows = [
        {"path": "in-process SavedModel call", "p50": np.percentile(local, 50), "p99": np.percentile(local, 99),
         "mean": local.mean()},
        {"path": "gRPC Predict (stock stub, batching on)", "p50": np.percentile(remote, 50),
         "p99": np.percentile(remote, 99), "mean": remote.mean()},
        {"path": "gRPC GetModelStatus (transport floor: no model work)", "p50": np.percentile(transport, 50),
         "p99": np.percentile(transport, 99), "mean": transport.mean()},
    ]
    overhead_p50 = latency_rows[1]["p50"] - latency_rows[0]["p50"]
    overhead_p99 = latency_rows[1]["p99"] - latency_rows[0]["p99"]
    throughput_rows = [{"concurrency": c, "off": rates["off", c], "on": rates["on", c],
                        "ratio": rates["on", c] / rates["off", c], "off_cpu": efficiency["off", c],
                        "on_cpu": efficiency["on", c], "cpu_ratio": efficiency["on", c] / efficiency["off", c],
                        "batch": batches[c][0] / max(batches[c][1], 1)}
                       for c in (1, 8, 32)]
    latency_table = _common.markdown_table(latency_rows, [
        ("path", "embed, one 48x40 JPEG, concurrency 1", "{}"), ("p50", "p50 ms", "{:.2f}"),
        ("p99", "p99 ms", "{:.2f}"), ("mean", "mean ms", "{:.2f}")])
    latency_text = (f"{latency_table}\n\ngRPC overhead: p50 {overhead_p50:+.2f} ms, p99 {overhead_p99:+.2f} ms "
                    f"(goal: p99 <= +1 ms: {'met' if overhead_p99 <= 1.0 else 'NOT met'}); "
                    f"{args.requests} interleaved samples per path. The GetModelStatus row is Python gRPC's own "
                    "round trip on this machine (no model work, no tensors): the floor under any Python server.")
    throughput_table = _common.markdown_table(throughput_rows, [
        ("concurrency", "concurrent clients", "{}"), ("off", "batching off, images/s", "{:.1f}"),
        ("on", "batching on, images/s", "{:.1f}"), ("ratio", "on / off", "{:.2f}x"),
        ("off_cpu", "off, images per server CPU-s", "{:.0f}"), ("on_cpu", "on, images per server CPU-s", "{:.0f}"),
        ("cpu_ratio", "on / off per CPU-s", "{:.2f}x"), ("batch", "on, mean batch (images)", "{:.1f}")])
    ratio = rates["on", 32] / rates["off", 32]
    throughput_text = (
        f"{throughput_table}\n\nGoal at concurrency 32: >= 3x with batching ({'met' if ratio >= 3 else 'NOT met'}: "
        f"{ratio:.2f}x); {args.seconds:g} s per run, median of {args.rounds} alternated runs; zero failed requests. "
        f"Batching parameters: max_batch_size {batching.max_batch_size}, batch_timeout_micros "
        f"{batching.batch_timeout_micros}, num_batch_threads {batching.num_batch_threads}. "
        "Images per server CPU-second (user + system time of the server process) makes the comparison insensitive "
        "to the share of the CPUs each server got: on a loaded machine 32 busy request threads (batching off) win "
        "a larger share than one batch thread does.\n\n"
        f"The transport alone (GetModelStatus, no model work) at 32 clients: {floor_rate:.0f} calls/s, "
        f"{floor_per_cpu:.0f} calls per server CPU-second: batching divides the model's cost per image, not "
        "this cost per request, which caps what it can gain.")
    largest = max(costs)
    transport_ms = 1e3 / floor_per_cpu
    alone, batched = transport_ms + costs[1], transport_ms + costs[largest] / largest
    cost_rows = [{"size": size, "ms": ms, "per_image": ms / size} for size, ms in costs.items()]
    cost_text = (
        _common.markdown_table(cost_rows, [("size", "images in one in-process embed call", "{}"),
                                           ("ms", "ms (best of 30)", "{:.2f}"), ("per_image", "ms per image", "{:.3f}")])
        + f"\n\nWhat batching can gain at most: a request costs the server {transport_ms:.2f} ms of CPU for the "
        f"transport (GetModelStatus above) plus the model, {costs[1]:.2f} ms alone or {costs[largest] / largest:.2f} ms "
        f"per image in a batch of {largest}, so perfect batching gives at most **{alone / batched:.2f}x** images per "
        f"server CPU-second (measured at 32 clients: {throughput_rows[-1]['cpu_ratio']:.2f}x). The clients, on the same "
        f"{os.cpu_count()} cores here, spend {client_ms:.2f} ms of CPU per call, which bounds the wall-clock gain of a "
        f"CPU-bound machine at **{(client_ms + alone) / (client_ms + batched):.2f}x** (measured: "
        f"{throughput_rows[-1]['ratio']:.2f}x). A 3x gain needs a model whose batch-1 call is mostly fixed overhead, "
        "clients on other machines, or a transport cheaper than Python gRPC's.")
    model = (f"Load average before the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) on "
             f"{os.cpu_count()} CPUs (other jobs share them: tails, p99, are noisy). TensorFlow intra-op threads: "
             f"{args.intra_op_parallelism or 'its default'} in both servers and in the in-process calls. "
             f"ResNet-18 (width {args.width}) embedder, {args.image_size} px input, 64-d embeddings, exported with "
             "`fgkeras.export.export_and_push`; servers in subprocesses on 127.0.0.1, client in this process.")
    print(latency_text)
    print(throughput_text)
    print(cost_text)
    path = _common.write_results("serving", [("Model", model), ("Latency", latency_text),
                                             ("Throughput", throughput_text), ("What batching can gain", cost_text)])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
