"""What a chaos run does (issue 11): its task mix, the adapters' scripts, the plan of faults,
what it counted. The run itself is :mod:`tests.e2e.chaos_harness`."""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.e2e.operator_harness import Kubectl

#: Reads the seconds to sleep from the prompt ("sleep N"), then changes a file.
SLEEPER = (
    "import pathlib, sys, time\n"
    "n = float(open(sys.argv[1]).read().split()[1])\n"
    "for i in range(int(n)):\n    print('working', i, flush=True)\n    time.sleep(1)\n"
    "pathlib.Path('docs').mkdir(exist_ok=True)\n"
    "pathlib.Path('docs/chaos.md').write_text('slept %s\\n' % n)\n"
)
#: Fails its first attempt, succeeds on the next (the same adapter is tried again).
FLAKY = (
    "import pathlib, sys\n"
    "if sys.argv[1] == '1':\n    print('first attempt fails', flush=True)\n    sys.exit(3)\n"
    "pathlib.Path('docs').mkdir(exist_ok=True)\n"
    "pathlib.Path('docs/flaky.md').write_text('second time lucky\\n')\n"
)
CRASH = "import sys\nprint('crashing', flush=True)\nsys.exit(1)\n"

#: kind -> (weight, expected final state when nobody deleted its pods or Jobs)
MIX: dict[str, tuple[float, str]] = {
    "ok": (0.30, "COMPLETED"),
    "gate_fail": (0.15, "FAILED"),
    "fallback": (0.15, "COMPLETED"),
    "retry": (0.10, "COMPLETED"),
    "slow": (0.25, "COMPLETED"),
    "timeout": (0.05, "TIMEOUT"),
}


@dataclass(frozen=True)
class Cluster:
    kubectl: Kubectl
    kubectl_bin: str
    kubeconfig: str
    image: str
    pull_policy: str


@dataclass
class Plan:
    tasks: int = 200
    operator_kills: int = 100
    pods_deleted: int = 10
    jobs_deleted: int = 5
    leader_kills: int = 1
    #: API errors injected through the fault proxy, spread over the kills phase (0: the
    #: operators talk to the API server directly)
    api_faults: int = 0
    apiserver_restarts: int = 0
    db_outages: int = 0
    db_outage_seconds: float = 30.0
    seed: int = 11
    max_in_flight: int = 8
    #: share of the tasks kept for the pair phase (their work spans the disruptions there)
    pair_share: float = 0.2
    uptime: tuple[float, float] = (0.2, 12.0)  # seconds after it started leading
    startup_kill_share: float = 0.25  # kills at a random moment of the start-up instead
    restart_delay: tuple[float, float] = (0.2, 3.0)
    cpu: str = "150m"
    converge_timeout: float = 900.0
    gc_sample: int = 5
    gc_timeout: float = 180.0


@dataclass
class Counts:
    operator_kills: int = 0
    leader_kills: int = 0
    apiserver_restarts: int = 0
    db_outages: int = 0
    pods_deleted: int = 0
    jobs_deleted: int = 0
    api_faults_injected: int = 0
    submitted: int = 0
    kills_while_leading: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    apiserver_down_seconds: list[float] = field(default_factory=list)
    leader_takeover_seconds: list[float] = field(default_factory=list)
