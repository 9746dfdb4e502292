"""Request errors and the gRPC status each one is answered with.

The codes and messages are TF Serving's where it has one (a client written against TF Serving
tests them): an unknown model or version is NOT_FOUND `Servable not found for request:
Latest(name)` / `Specific(name, version)`; an unknown signature is FAILED_PRECONDITION `Serving
signature key "key" not found.`; an unknown version label is INVALID_ARGUMENT `Unrecognized
servable version label: label`; GetModelStatus says `Could not find version V of model name` /
`Could not find any versions of model name` (NOT_FOUND).
"""

import contextlib
import logging
import time

import grpc


class ServingError(Exception):
    """A request that cannot be served, with the gRPC status code to answer it with.

    Args:
        code: a `grpc.StatusCode`.
        message: what was wrong, for the client (one line).
    """

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self):
        return f"ServingError({self.code.name}, {self.message!r})"


def invalid_argument(message):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message):
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message):
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def resource_exhausted(message):
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def unavailable(message):
    return ServingError(grpc.StatusCode.UNAVAILABLE, message)


def deadline_exceeded(message):
    return ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def from_tensorflow(error, what):
    """The `ServingError` for a TensorFlow error raised while running `what` (e.g. a signature).

    TensorFlow's messages carry a graph stack trace after the first lines; the client gets the
    message up to it.
    """
    import tensorflow as tf

    message = _first_lines(getattr(error, "message", None) or str(error))
    if isinstance(error, tf.errors.InvalidArgumentError):
        return invalid_argument(f"{what}: {message}")
    if isinstance(error, tf.errors.ResourceExhaustedError):
        return resource_exhausted(f"{what}: {message}")
    if isinstance(error, tf.errors.DeadlineExceededError):
        return deadline_exceeded(f"{what}: {message}")
    if isinstance(error, tf.errors.CancelledError):
        return ServingError(grpc.StatusCode.CANCELLED, f"{what}: {message}")
    return ServingError(grpc.StatusCode.INTERNAL, f"{what} failed: {type(error).__name__}: {message}")


def _first_lines(message, limit=600):
    lines = []
    for line in str(message).splitlines():
        if line.strip().startswith(("Graph execution error", "Detected at node", "Stack trace", "[[")):
            if lines:
                break
            continue
        line = line.replace("<stack traces unavailable>", "").strip()
        if line:
            lines.append(line)
    text = " ".join(lines) or str(message).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def abort_on_error(context):
    """Answers a `ServingError` raised in the block with its status (`context.abort`)."""
    try:
        yield
    except ServingError as error:
        context.abort(error.code, error.message)
    except Exception as error:  # a bug: answered INTERNAL (not gRPC's UNKNOWN) and logged
        logging.getLogger(__name__).exception("request failed")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


def deadline_of(context):
    """The RPC's deadline as a `time.monotonic()` value, or None when it has none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e7:  # gRPC reports "no deadline" as a huge remainder
        return None
    return time.monotonic() + remaining
