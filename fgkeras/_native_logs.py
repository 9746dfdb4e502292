"""The log lines that native libraries write to a process's stderr (fd 2) past Python's logging.

TensorFlow's C++ logging honours TF_CPP_MIN_LOG_LEVEL, but the absl logging inside the TFLite
converter and grappler, TFLite's logger and the quantizer's prints do not. The command line
passes fd 2 through `python _native_logs.py LEVEL`, which drops their lines below LEVEL. This
module imports nothing of fgkeras, so that the filter process does not load TensorFlow.
"""

import re
import signal
import sys

# absl's (`W0000 00:00:1795700576.693136  9391 file.cc:364] ...`), TensorFlow's
# (`2026-11-26 13:42:50.372704: E file.cc:51] ...`), TensorFlow Lite's (`INFO: ...`) and the
# MLIR quantizer's print of its settings (`fully_quantize: 0, ...`).
_LINE = re.compile(
    rb"(?P<absl>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<tensorflow>[IWEF]) \S+:\d+\] "
    rb"|(?P<tflite>INFO|WARNING|ERROR): "
    rb"|(?P<quantizer>fully_quantize): "
)
# Severities as TF_CPP_MIN_LOG_LEVEL counts them.
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3, b"INFO": 0, b"WARNING": 1, b"ERROR": 2, b"fully_quantize": 0}


def severity(line):
    """The severity of a native library's log line (0 info to 3 fatal), None for any other line."""
    match = _LINE.match(line)
    if match is None:
        return None
    level = _SEVERITY[next(group for group in match.groups() if group is not None)]
    if b"failed call to cuInit" in line:  # logged as an error, but only says "no GPU driver here"
        return min(level, 1)
    return level


def copy_lines(source, target, min_level):
    """Copies the lines of binary file `source` to `target`, but native log lines below `min_level`."""
    for line in source:
        level = severity(line)
        if level is None or level >= min_level:
            target.write(line)
            target.flush()


if __name__ == "__main__":
    # The filter process: its stdin to its stderr. Ctrl-C is for the command: this one ends at EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    copy_lines(sys.stdin.buffer, sys.stderr.buffer, int(sys.argv[1]))
