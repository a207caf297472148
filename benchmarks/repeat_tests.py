"""Run tests many times over and count how often each passes: the learning tests are
meant to pass every time, which one run cannot show.

    python benchmarks/repeat_tests.py -n 20 \
        "tests/test_coordinator.py::test_short_campaign_labels_exactly_the_budget_and_learns"

Each run is a fresh pytest process with a different ``PALFLOW_TEST_SEED`` (0, 1, ...,
or from ``--first-seed``: fresh seeds for a test changed after failing on the first ones),
which the campaign tests take as the campaign's seed, so that the runs differ. Writes
``benchmarks/results/repeat_tests.json``: per test, the runs, the passes and the
failure of each failed run (its last lines).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import common


def repeat(test: str, runs: int, first_seed: int = 0) -> dict:
    outcomes = []
    for seed in range(first_seed, first_seed + runs):
        started = time.time()
        env = {**os.environ, "PALFLOW_TEST_SEED": str(seed)}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", test, "-q", "-x", "-p", "no:cacheprovider"],
            cwd=common.ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        passed = proc.returncode == 0
        outcomes.append(
            {
                "seed": seed,
                "passed": passed,
                "wall_s": round(time.time() - started, 1),
                "failure": None if passed else "\n".join(proc.stdout.splitlines()[-15:]),
            }
        )
        print(f"{test} seed {seed}: {'pass' if passed else 'FAIL'} ({time.time() - started:.0f} s)")
    return {
        "runs": runs,
        "passed": sum(o["passed"] for o in outcomes),
        "commit": common.commit(),
        "load_average_at_end": os.getloadavg(),
        "outcomes": outcomes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", nargs="+", help="pytest node ids")
    parser.add_argument("-n", "--runs", type=int, default=20)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + runs - 1"
    )
    parser.add_argument("--name", default="repeat_tests", help="results file stem")
    args = parser.parse_args()
    results = {test: repeat(test, args.runs, args.first_seed) for test in args.tests}
    for test, result in results.items():
        print(f"{result['passed']}/{result['runs']}  {test}")
    common.write_results(args.name, results)


if __name__ == "__main__":
    main()
