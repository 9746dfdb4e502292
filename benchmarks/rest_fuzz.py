"""REST fuzz: malformed HTTP requests against the server's REST API, counted per category.

Each request is sent on its own loopback connection as raw bytes (so that broken HTTP can be sent
too); each answer must be the category's HTTP code with a JSON `{"error": ...}` body, and after
the run the server must still answer a good request. The counts go to the `## REST fuzz` section
of `benchmarks/results/serving.md` (the other sections of that file are left as they are).

`tests/serving/test_rest.py` runs the same generator on 2,000 requests.

    python benchmarks/rest_fuzz.py [--requests 10000] [--threads 8] [--seed 0]
"""

import argparse
import base64
import collections
import json
import os
import random
import socket
import sys
import tempfile
import time
from concurrent import futures

MAX_REQUEST_BYTES = 256 * 1024
MAX_BATCH = 16


def b64(data):
    return base64.b64encode(data).decode("ascii")


def http_request(method, path, body=b"", headers=None, content_length=True):
    """The raw bytes of one HTTP/1.1 request that closes its connection."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if content_length and (body or method == "POST"):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def send_raw(port, data, timeout=30.0):
    """Sends `data` on a new connection to 127.0.0.1:`port`; `(status, headers, body)` of the answer
    (status None when the server closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        try:
            connection.sendall(data)
            connection.shutdown(socket.SHUT_WR)  # all sent: the server's lingering close ends at once
        except OSError:  # the server answered and closed before the whole request was sent
            pass
        chunks = []
        while True:
            try:
                chunk = connection.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        return None, {}, raw
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body[:int(headers.get("content-length", len(body)))]


class MalformedRest:
    """Seeded generators of malformed REST requests: `make()` gives `(category, raw bytes, codes)`.

    Args:
        seed: the random seed.
        images: valid encoded images (JPEG / PNG bytes) to damage.
        model: the served model's name (its only version is 1).
        side: the side of the model's decoded input (`embed_decoded`).
    """

    def __init__(self, seed, images, model="tiny", side=8):
        self.rng = random.Random(seed)
        self.images = images
        self.model = model
        self.side = side
        self.categories = sorted(name[len("bad_"):] for name in dir(self) if name.startswith("bad_"))

    def make(self):
        category = self.rng.choice(self.categories)
        data, codes = getattr(self, "bad_" + category)()
        return category, data, codes

    def _predict(self, document, signature=None, path=None):
        if signature is not None and isinstance(document, dict):
            document = {"signature_name": signature, **document}
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        return http_request("POST", path or f"/v1/models/{self.model}:predict", body)

    def _image(self):
        return self.rng.choice(self.images)

    def bad_json(self):
        rng = self.rng
        body = rng.choice([
            lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400))),
            lambda: json.dumps({"instances": [{"b64": b64(self._image())}]}).encode()[:rng.randint(1, 40)],
            lambda: b"[" * rng.randint(2000, 100000),
            lambda: b'{"instances": ' + b"[" * 50000 + b"]" * 50000 + b"}",
            lambda: b'{"instances": [1' + b"0" * 5000 + b"]}",
            lambda: b'{"instances": ["\xff\xfe"]}',
            lambda: rng.choice([b"[]", b"3", b'"x"', b"null", b"true", b""]),
        ])()
        return self._predict(body), {400}

    def bad_keys(self):
        image = {"b64": b64(self._image())}
        document = self.rng.choice([{}, {"instance": [image]}, {"input": image},
                                    {"instances": [image], "inputs": [image]}, {"signature_name": "embed"}])
        return self._predict(document), {400}

    def bad_types(self):
        image = {"b64": b64(self._image())}
        document = self.rng.choice([
            {"signature_name": self.rng.choice([3, None, ["embed"], {"a": 1}]), "instances": [image]},
            {"instances": self.rng.choice([image, "x", 3, None, {}])},
            {"instances": []},
        ])
        return self._predict(document), {400}

    def bad_base64(self):
        rng = self.rng
        value = rng.choice([
            lambda: {"b64": "".join(rng.choice("!@#$%^&*()<>?") for _ in range(rng.randint(1, 40)))},
            lambda: {"b64": b64(self._image())[:-rng.randint(1, 3)] + "==="},
            lambda: {"b64": "é" * rng.randint(1, 9)},
            lambda: {"b64": rng.choice([3, None, [], {"b64": "AA=="}])},
            lambda: {"b64": b64(self._image()), "extra": 1},
            lambda: {"b64": "A"},
        ])()
        return self._predict({"instances": [value]}, "embed"), {400}

    def bad_not_an_image(self):
        data = bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(1, 2000)))
        if data[:1] in (b"\xff", b"\x89", b"G", b"B", b"R"):
            data = b"x" + data
        value = self.rng.choice([{"b64": b64(data)}, data.decode("latin-1")])
        return self._predict({"instances": [{"b64": b64(self._image())}, value]}, "embed"), {400}

    def bad_image(self):
        image = self._image()
        if self.rng.random() < 0.5:
            data = image[: self.rng.randint(1, len(image) - 2)]
        else:
            side = self.rng.randint(5000, 100000)
            data = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + side.to_bytes(4, "big") + (7).to_bytes(4, "big") + b"\0" * 30
        return self._predict({"inputs": {"images": [{"b64": b64(data)}]}}, "embed"), {400}

    def bad_dtype(self):
        rng = self.rng
        side = self.side
        pixel = rng.choice([0.5, -1, 256, 10 ** 30, True, "7", None, {"b64": "AA=="}])
        decoded = [[[pixel, 0, 0]] + [[0, 0, 0]] * (side - 1)] + [[[0, 0, 0]] * side] * (side - 1)
        document, signature = rng.choice([
            ({"instances": [rng.choice([1, 2.5, True, None, [1, 2]])]}, "embed"),
            ({"inputs": {"images": [rng.choice([1, 2.5, False])]}}, "embed"),
            ({"instances": [decoded]}, "embed_decoded"),
            ({"instances": [[["x"] * 3] * side] * side}, "embed_decoded"),
        ])
        return self._predict(document, signature), {400}

    def bad_shape(self):
        rng = self.rng
        image = {"b64": b64(self._image())}
        side = self.side
        document, signature = rng.choice([
            ({"inputs": [[image], [image, image]]}, "embed"),
            ({"inputs": [[image]]}, "embed"),
            ({"inputs": image}, "embed"),
            ({"instances": [[image], image]}, "embed"),
            ({"instances": [[[[0, 0, 0]] * side] * side, [[[0, 0, 0]] * side] * (side - 1)]}, "embed_decoded"),
            ({"instances": [[[[0, 0, 0]] * side] * (side + rng.randint(1, 3))]}, "embed_decoded"),
            ({"inputs": [[[0, 0, 0]] * side] * side}, "embed_decoded"),
            ({"instances": [[[[0, 0]] * side] * side]}, "embed_decoded"),
        ])
        return self._predict(document, signature), {400}

    def bad_named_inputs(self):
        image = {"b64": b64(self._image())}
        name = f"input{self.rng.randint(0, 9)}"
        document = self.rng.choice([
            {"instances": [{name: image}]},
            {"instances": [{"images": image}, {"images": image, name: image}]},
            {"instances": [{"images": image}, image]},
            {"inputs": {name: [image]}},
        ])
        return self._predict(document, "embed"), {400}

    def bad_batch(self):
        count = self.rng.randint(MAX_BATCH + 1, 4 * MAX_BATCH)
        return self._predict({"instances": ["x"] * count}, "embed"), {400}

    def bad_oversized(self):
        rng = self.rng
        kind = rng.randrange(3)
        path = f"/v1/models/{self.model}:predict"
        if kind == 0:  # a declared length beyond the limit, the body never sent
            length = rng.choice([MAX_REQUEST_BYTES + 1, 10 ** 9, 10 ** 30])
            return http_request("POST", path, headers={"Content-Length": length}, content_length=False), {413}
        if kind == 1:  # chunked, beyond the limit
            chunk = b"x" * 65536
            body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_REQUEST_BYTES // 65536 + 1))
            return http_request("POST", path, body + b"0\r\n\r\n", {"Transfer-Encoding": "chunked"},
                                content_length=False), {413}
        body = json.dumps({"instances": [{"b64": b64(b"\xff\xd8\xff" + b"\0" * MAX_REQUEST_BYTES)}]}).encode()
        return http_request("POST", path, body), {413}

    def bad_unknown(self):
        rng = self.rng
        image = {"b64": b64(self._image())}
        path, signature = rng.choice([
            (f"/v1/models/model{rng.randint(0, 99)}:predict", None),
            (f"/v1/models/{self.model}/versions/{rng.randint(2, 10 ** 6)}:predict", None),
            (f"/v1/models/{self.model}/labels/label{rng.randint(0, 9)}:predict", None),
            (f"/v1/models/{self.model}:predict", f"signature{rng.randint(0, 99)}"),
        ])
        if rng.random() < 0.3:
            status_path = rng.choice([f"/v1/models/model{rng.randint(0, 99)}",
                                      f"/v1/models/{self.model}/versions/{rng.randint(2, 99)}",
                                      f"/v1/models/model{rng.randint(0, 99)}/metadata",
                                      f"/v1/models/{self.model}/labels/x/metadata"])
            return http_request("GET", status_path), {404, 400}
        return self._predict({"instances": [image]}, signature, path), {404, 400}  # labels, signatures: 400

    def bad_path(self):
        rng = self.rng
        path, codes = rng.choice([
            ("/", {404}), ("/v2/models/tiny", {404}), ("/v1/models/tiny:explain", {404}),
            ("/v1/models/tiny/versions/x", {404}), ("/v1/models/tiny/versions/1/extra", {404}),
            ("/v1/models/tiny/metadata/x", {404}), (f"/{'a' * rng.randint(1, 3000)}", {404}),
            ("/v1/models", {400}), ("/v1/models/tiny/versions/99999999999999999999", {400}),
            ("/v1/models/%ff%fe", {400}), ("/v1/models/tiny:classify", {405}), ("/v1/models/tiny:regress", {405}),
        ])
        return http_request("GET", path), codes

    def bad_method(self):
        rng = self.rng
        method = rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "GET"])
        path = rng.choice(["/v1/models/tiny:predict", "/v1/models/tiny/versions/1:predict"])
        if method == "GET" or rng.random() < 0.3:
            return http_request(rng.choice(["POST", "PUT"]), rng.choice(["/v1/models/tiny",
                                                                          "/v1/models/tiny/metadata"]),
                                b"{}"), {405}
        return http_request(method, path), {405}

    def bad_unimplemented(self):
        return self._predict({"examples": [{"x": 1}]}, path=f"/v1/models/{self.model}:"
                             f"{self.rng.choice(['classify', 'regress'])}"), {501}

    def bad_http(self):
        rng = self.rng
        kind = rng.randrange(6)
        path = f"/v1/models/{self.model}:predict"
        if kind == 0:
            return http_request("POST", path, b'{"instances": []}', content_length=False), {411}
        if kind == 1:
            value = rng.choice(["abc", "-5", "1e3", "0x10", ""])
            return http_request("POST", path, headers={"Content-Length": value}, content_length=False), {400}
        if kind == 2:
            return rng.choice([b"GARBAGE\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                               b"GET /v1/models/tiny HTTP/1.1 extra\r\n\r\n"]), {400, 505}
        if kind == 3:
            return http_request(rng.choice(["FOO", "BREW", "SEARCH"]), path), {501}
        if kind == 4:
            return b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", {414}
        return http_request("GET", "/v1/models/tiny", headers={f"X-{i}": "y" for i in range(120)}), {431}


def check_answer(category, codes, status, headers, body):
    """Why an answer is wrong, or None when it is what the category expects."""
    if status not in codes:
        return f"{category}: HTTP {status}, expected {sorted(codes)}: {body[:200]!r}"
    if headers.get("content-type") != "application/json":
        return f"{category}: Content-Type {headers.get('content-type')!r}"
    try:
        document = json.loads(body)
    except ValueError:
        return f"{category}: a body that is no JSON: {body[:200]!r}"
    if not isinstance(document, dict) or not isinstance(document.get("error"), str) or not document["error"]:
        return f"{category}: a body without an error message: {body[:200]!r}"
    return None


def run_fuzz(port, count, images, seed=0, threads=8, model="tiny", side=8):
    """Sends `count` malformed requests; `[(category, status, problem or None)]`."""
    generator = MalformedRest(seed, images, model=model, side=side)

    def send(item):
        category, data, codes = item
        status, headers, body = send_raw(port, data)
        return category, status, check_answer(category, codes, status, headers, body)

    answers = []
    with futures.ThreadPoolExecutor(threads) as pool:
        for start in range(0, count, 256):  # made a few at a time: the oversized ones are large
            answers += pool.map(send, [generator.make() for _ in range(min(256, count - start))])
    return answers


def rss_bytes():
    """This process's resident memory (the server runs in it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def good_request(port, images):
    body = json.dumps({"signature_name": "embed", "instances": [{"b64": b64(image)} for image in images]}).encode()
    status, _, answer = send_raw(port, http_request("POST", "/v1/models/tiny:predict", body))
    return status, json.loads(answer)


def _section(answers, seconds, count, threads, ok_after, growth):
    from fgkeras.evaluation import format_table

    by_category = collections.defaultdict(collections.Counter)
    for category, status, problem in answers:
        by_category[category][status] += 1
        by_category[category]["wrong"] += problem is not None
    rows = [{"category": category, "requests": sum(v for k, v in counts.items() if k != "wrong"),
             "codes": ", ".join(f"{code}: {n}" for code, n in sorted(counts.items(), key=str) if code != "wrong"),
             "wrong": counts["wrong"]} for category, counts in sorted(by_category.items())]
    wrong = sum(row["wrong"] for row in rows)
    table = format_table(rows, keys=["category", "requests", "codes", "wrong"],
                         headers={"category": "category", "requests": "requests", "codes": "HTTP codes answered",
                                  "wrong": "wrong answers"})
    return (f"{count} malformed REST requests ({len(rows)} categories, `benchmarks/rest_fuzz.py`, seed 0), {threads} "
            f"client threads, one loopback connection each, against an in-process server (max_request_bytes "
            f"{MAX_REQUEST_BYTES}, max_request_batch_size {MAX_BATCH}): {wrong} wrong answers (a wrong HTTP code, "
            f"or a body that is not a JSON error), {seconds:.1f} s ({count / seconds:.0f} requests/s). After the "
            f"run a good predict request is answered: {'yes' if ok_after else 'NO'}. Resident memory of the process "
            f"(server and clients) grew by {growth / 2 ** 20:.1f} MiB over the run, after 2,000 requests of warm-up (TensorFlow's caches fill up over the first ones)."
            f"\n\n{table}\n")


def write_section(path, heading, text):
    """Replaces (or appends) the `## heading` section of the Markdown file at `path`."""
    with open(path) as f:
        lines = f.read().rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {heading}"), None)
    new = [f"## {heading}", "", *text.rstrip("\n").split("\n")]
    if start is None:
        lines += ["", *new]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new + ([""] if end < len(lines) else [])
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import _common
    import numpy as np
    import tensorflow as tf

    from fgkeras.export import export_and_push
    from fgkeras.models import build_embedder
    from fgkeras.serving import Limits, serve

    import keras

    keras.utils.set_random_seed(0)
    image_size = 32
    with tempfile.TemporaryDirectory() as root:
        embedder = build_embedder("resnet18", width=0.25, embedding_dim=64, image_size=image_size)
        export_and_push(embedder, os.path.join(root, "tiny"), image_size, metrics={"recall@1": 0.0})
        rng = np.random.default_rng(0)
        images = [(tf.io.encode_png if i % 2 else tf.io.encode_jpeg)(
            rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).numpy() for i in range(4)]
        limits = Limits(max_request_bytes=MAX_REQUEST_BYTES, max_request_batch_size=MAX_BATCH)
        server = serve(os.path.join(root, "tiny"), port=0, rest_api_port=0, poll_seconds=0, limits=limits)
        try:
            run_fuzz(server.rest_port, 2000, images, seed=args.seed + 1, threads=args.threads, side=image_size)
            before = rss_bytes()
            started = time.perf_counter()
            answers = run_fuzz(server.rest_port, args.requests, images, seed=args.seed, threads=args.threads,
                               side=image_size)
            seconds = time.perf_counter() - started
            growth = rss_bytes() - before
            status, answer = good_request(server.rest_port, images)
            ok_after = status == 200 and np.asarray(answer["predictions"]).shape == (len(images), 64)
        finally:
            server.stop(grace=2)
    text = _section(answers, seconds, args.requests, args.threads, ok_after, growth)
    path = os.path.join(_common.RESULTS_DIR, "serving.md")
    write_section(path, "REST fuzz", text)
    print(text)
    print(f"written to {path}")
    wrong = [problem for _, _, problem in answers if problem]
    for problem in wrong[:20]:
        print(problem, file=sys.stderr)
    return 0 if ok_after and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
