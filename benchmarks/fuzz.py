"""Fuzz: 10,000+ malformed requests against a running server, counted per category.

The requests are `tests/serving/test_fuzz.py`'s (`Malformed`, the same seeded generator and the
same `fuzz()` loop as the default test, which sends 3,000): wrong dtypes, shapes and value
counts, declared batches and tensors over the limits, truncated, corrupted and hostile images of
every format, GIF frame bombs, animated WebP, requests over the pixel budget, unknown models,
versions, labels and signatures, bad metadata, status, upsert and delete requests. A well-formed
Predict is sent every 10 requests. The server runs in a subprocess (its RSS is its own, read from
/proc every 20 ms); the tiny model is the tests' (`tests/serving/conftest.py`).

Reported per category: requests, the status codes returned, and the requests answered with a
code (or a reason) other than expected; overall: well-formed requests answered, the server's RSS
growth over the run (after a warm-up of `--warmup` requests), and whether it still answers.

Writes (or replaces) the "Fuzz" section of `benchmarks/results/serving.md`; the timing sections
of `benchmarks/serving.py` are left as they are.

    python benchmarks/fuzz.py [--requests 12000] [--seed 0]
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import _common

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "serving")
SECTION = "Fuzz: malformed requests"

# argv: model root, index dir, limits as JSON. Prints the port, then serves until stdin closes.
SERVER_SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.ERROR)
from fgkeras.serving import Limits, serve
server = serve(sys.argv[1], port=0, index_dir=sys.argv[2], poll_seconds=0, limits=Limits(**json.loads(sys.argv[3])))
print(server.port, flush=True)
sys.stdin.read()
server.stop(grace=2)
"""


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rss_of(pid):
    def rss_bytes():
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {pid}")

    return rss_bytes


def run(args, workdir):
    from fgkeras.serving import Client

    helpers = _load("fuzz_conftest", os.path.join(TESTS, "conftest.py"))
    fuzzing = _load("fuzz_cases", os.path.join(TESTS, "test_fuzz.py"))
    root = os.path.join(workdir, "tiny")
    helpers.install_version(root, helpers.save_tiny(os.path.join(workdir, "export"), seed=0), 1)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, root, os.path.join(workdir, "gallery"), json.dumps(fuzzing.LIMITS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        rss_bytes = _rss_of(server.pid)
        images = fuzzing.sample_images()
        with Client(f"127.0.0.1:{port}") as client:
            client.upsert(["seed"], images["JPEG"][:1])
            calls = fuzzing.stubs_of(client)
            generator = fuzzing.Malformed(args.seed, images)
            good_request, check_good = fuzzing.good_requests(images, helpers.DIM)
            warm = fuzzing.fuzz(calls, generator, args.warmup, good_request, check_good, rss_bytes)
            started = time.monotonic()
            report = fuzzing.fuzz(calls, generator, args.requests, good_request, check_good, rss_bytes)
            seconds = time.monotonic() - started
            after = {"health": client.health(), "count": client.count(),
                     "embed": list(client.embed([images[kind][0] for kind in fuzzing.FORMATS]).shape)}
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    return report, warm, seconds, after, fuzzing.LIMITS


def section(report, warm, seconds, after, limits, args):
    rows = []
    for kind in sorted(report.codes):
        codes = report.codes[kind]
        wrong = sum(1 for k, *_ in report.wrong if k == kind)
        rows.append({"kind": kind.removeprefix("bad_"), "requests": sum(codes.values()),
                     "codes": ", ".join(f"{code} {n}" for code, n in codes.most_common()), "wrong": wrong})
    table = _common.markdown_table(rows, [("kind", "category", "{}"), ("requests", "requests", "{}"),
                                          ("codes", "status codes returned", "{}"),
                                          ("wrong", "wrong code or reason", "{}")])
    wrong_total = len(report.wrong)
    examples = "".join(f"\n- {kind}: {code.name} {details[:200]!r}" for kind, code, details in report.wrong[:10])
    return (
        f"Command: `python benchmarks/fuzz.py --requests {args.requests} --seed {args.seed}` "
        f"({_common.machine_facts()['date']}). {report.requests} malformed requests of {len(report.codes)} kinds "
        f"(`tests/serving/test_fuzz.py`'s generator, seed {args.seed}) from 8 threads against a server in a "
        f"subprocess with the tests' tiny model and the limits {limits}, after a warm-up of {warm.requests}; "
        f"one well-formed Predict (1-4 images of any format) every 10 requests.\n\n"
        f"{table}\n\n"
        f"- requests with a wrong code or reason: **{wrong_total}**{examples}\n"
        f"- well-formed requests answered correctly meanwhile: **{report.good_answered} of {report.good_sent}**\n"
        f"- server RSS: {report.rss_start / 2 ** 20:.0f} MiB after the warm-up, max growth during the run "
        f"**{report.rss_growth / 2 ** 20:.1f} MiB** (sampled every 20 ms)\n"
        f"- after the run: health {after['health']}, inventory count {after['count']}, an embed of 5 images "
        f"(one per format) gives {after['embed']}\n"
        f"- {seconds:.0f} s for the run ({(report.requests + report.good_sent) / seconds:.0f} requests/s; "
        "a figure of this machine's load, not a result)\n\n"
        "`bad_corrupted` (bytes of a valid image's body overwritten, its header intact) may be decoded "
        "(noise: OK) or refused by the decoder (INVALID_ARGUMENT): both are right. The hostile images "
        "(declared dimensions, GIF frame bombs, frame counts, animated WebP, pixel budget) must be refused "
        "by the checks before decoding: their expected reason is checked in the error's details."
    )


def write_section(text):
    """Replaces (or appends) the fuzz section of results/serving.md, leaving the other sections alone."""
    path = os.path.join(_common.RESULTS_DIR, "serving.md")
    with open(path) as f:
        content = f.read()
    heading = f"## {SECTION}"
    start = content.find(heading)
    if start >= 0:  # cut the previous run's section out, keep what follows it
        end = content.find("\n## ", start + len(heading))
        content = content[:start] + (content[end + 1:] if end >= 0 else "")
    content = f"{content.rstrip()}\n\n{heading}\n\n{text.rstrip()}\n"
    with open(path, "w") as f:
        f.write(content)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12000, help="malformed requests (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=500, help="requests before the RSS baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        report, warm, seconds, after, limits = run(args, workdir)
    text = section(report, warm, seconds, after, limits, args)
    print(text)
    print(f"\nwritten to {write_section(text)}")
    return 1 if report.wrong or report.good_answered != report.good_sent else 0


if __name__ == "__main__":
    sys.exit(main())
