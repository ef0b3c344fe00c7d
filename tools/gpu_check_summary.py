"""Collects what tools/gpu_check.sh left in OUT_DIR into OUT_DIR/summary.json (figures to read or diff).

    python tools/gpu_check_summary.py OUT_DIR

summary.json: each step's exit code and seconds (steps.tsv), the environment log, doctor's failed checks (and
every row), pytest's counts (JUnit XML), the benchmark rows (bench.json), and ``ok``: every step exited 0.
"""

import json
import os
import sys
import xml.etree.ElementTree as ElementTree


def read_steps(out_dir):
    steps = {}
    path = os.path.join(out_dir, "steps.tsv")
    if os.path.exists(path):
        with open(path) as handle:
            for line in handle:
                fields = line.split()
                if len(fields) == 3:
                    steps[fields[0]] = {"exit_code": int(fields[1]), "seconds": int(fields[2])}
    return steps


def read_json(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def read_junit(path):
    """Test counts of a pytest JUnit XML file, and the failed tests' names."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in keys}
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for suite in suites
                              for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def summarize(out_dir):
    steps = read_steps(out_dir)
    doctor = read_json(os.path.join(out_dir, "doctor.json"))
    environment = None
    if os.path.exists(os.path.join(out_dir, "environment.log")):
        with open(os.path.join(out_dir, "environment.log")) as handle:
            environment = handle.read().strip().splitlines()
    summary = {
        "ok": bool(steps) and all(step["exit_code"] == 0 for step in steps.values()) and "bench" in steps,
        "steps": steps,
        "environment": environment,
        "doctor_failures": None if doctor is None else [
            f"{row['op']} ({row['device']} {row['backend']} {row['dtype']}): {row['note']}"
            for row in doctor["checks"] if row["ok"] is False],
        "doctor": doctor,
        "pytest_gpu": read_junit(os.path.join(out_dir, "pytest_gpu.xml")),
        "bench": read_json(os.path.join(out_dir, "bench.json")),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python tools/gpu_check_summary.py OUT_DIR (an existing folder)", file=sys.stderr)
        return 2
    summary = summarize(argv[0])
    print(f"gpu_check: ok={summary['ok']}; steps: "
          + ", ".join(f"{name} exit {step['exit_code']} ({step['seconds']} s)"
                      for name, step in summary["steps"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
