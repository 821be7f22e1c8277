"""Where the ranks of a Slurm job meet: the first node of the allocation, at the address Slurm itself uses.

Slurm node names need not be host names (a cluster may call its nodes n1, n2 and reach them at
NodeAddr=10.1.0.7, or on one test machine at 127.0.0.2 and 127.0.0.3), so a rendezvous at the node's
name can fail to resolve on every rank. The rule, used by run_job.sh, launch.py's job script and
launch.py's tasks alike:

1. the first node of SLURM_STEP_NODELIST (inside a job step, where rank 0 runs on the step's first
   node) or else of SLURM_JOB_NODELIST (the batch script), expanded here (`n[1-3,5]` -> n1 n2 n3 n5);
2. that node's NodeAddr from `scontrol show node`, the address slurmctld and srun reach it at;
3. the node name when scontrol cannot answer (no scontrol on PATH, the controller down), and this
   machine's host name outside Slurm.

Standard library only, no import from this repository: `python3 training/rendezvous.py` (or
`python -m training.rendezvous`) prints the host in a batch script with any python 3, once per job
rather than once per rank, before any heavy import.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping

# scontrol talks to slurmctld; a controller that does not answer must not hold the job's start for long.
SCONTROL_TIMEOUT_S = 10.0


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: 'n[1-2,4],gpu07' -> ['n[1-2,4]', 'gpu07']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_ranges(body: str, where: str) -> list[str]:
    """'1-3,05' -> ['1', '2', '3', '05']; a bound's zero padding is kept, as Slurm does ('07-10')."""
    out = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in the Slurm host list {where!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"range {part!r} runs backwards in the Slurm host list {where!r}")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list in order, as `scontrol show hostnames` prints it.

    'n[1-3,5]' -> n1 n2 n3 n5; 'gpu[07-08],cpu3' -> gpu07 gpu08 cpu3; 'r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2.
    """
    hosts: list[str] = []
    for item in _split_top_level(text):
        match = re.search(r"\[([^\[\]]*)\]", item)
        if match is None:
            if "[" in item or "]" in item:
                raise ValueError(f"unbalanced bracket in the Slurm host list {text!r}")
            hosts.append(item)
            continue
        head, tail = item[: match.start()], item[match.end() :]
        for value in _expand_ranges(match.group(1), text):
            hosts.extend(expand_hostlist(head + value + tail))  # further bracket groups in the tail
    return hosts


def first_node(env: Mapping[str, str]) -> str | None:
    """The node rank 0 runs on: the first of the step's nodes inside a step, else of the job's."""
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"):
        if env.get(key):
            nodes = expand_hostlist(env[key])
            if nodes:
                return nodes[0]
    return None


def node_addr(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """NodeAddr of the node `name` as slurmctld knows it; None when scontrol cannot say."""
    try:
        proc = subprocess.run(
            ["scontrol", "show", "node", "--oneliner", name],
            capture_output=True,
            text=True,
            timeout=SCONTROL_TIMEOUT_S,
            env=None if env is None else dict(env),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"(?:^|\s)NodeAddr=(\S+)", proc.stdout) if proc.returncode == 0 else None
    return match.group(1) if match else None


def rendezvous_host(env: Mapping[str, str] | None = None) -> str:
    """The host every rank of this job meets rank 0 at (the module docstring has the rule)."""
    env = os.environ if env is None else env
    name = first_node(env)
    if name is None:
        return socket.gethostname().split(".")[0]
    return node_addr(name, env) or name


if __name__ == "__main__":
    try:
        print(rendezvous_host())
    except ValueError as exc:  # a host list this parser does not understand: one line, bad input
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
