"""Runs `chattune` in a child process with one fault armed (tests/reliability/faults.py), typically `kill`.

    python fault_driver.py KIND MATCH NTH HOW [--plain] -- chattune-args...

--plain also swaps the atomic writers for plain writes (the test of the tests).
"""

import sys

import pytest

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import faults  # noqa: E402

kind, match, nth, how, *rest = sys.argv[1:]
split = rest.index("--")
flags, argv = rest[:split], rest[split + 1:]
mp = pytest.MonkeyPatch()
faults.import_verbs()
if "--plain" in flags:
    faults.plain_writers(mp)
faults.install(mp, faults.Fault(kind, match, int(nth), how))

from chattune import cli  # noqa: E402

sys.exit(cli.main(argv))
