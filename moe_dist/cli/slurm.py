"""``moe-dist slurm``: render launch/slurm/train.sbatch for a run config and cluster options, and submit it.

The rendered script is the repository's train.sbatch with its #SBATCH defaults replaced by the
requested ones and the job's settings (CONFIG, EXTRA_ARGS, GPUS_PER_NODE, LAUNCHER) fixed in it, so
the file alone says what ran. It is written to <output_dir>/slurm/train.sbatch before submission.

No value can add a line to the script: control characters are refused in everything rendered into it
(#SBATCH options, the config path, --set values, output_dir). #SBATCH values are quoted the way
sbatch reads them back, and the train arguments are a bash array of shell-quoted elements, so spaces,
quotes, $(...), backticks, braces and globs reach ``moe-dist train`` unchanged.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

TEMPLATE_NAME = os.path.join("launch", "slurm", "train.sbatch")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What sbatch reads literally on an #SBATCH line. It splits on whitespace, groups quoted text, takes a
# backslash as escaping the next character and an unquoted '#' as the start of a comment.
_SBATCH_PLAIN = re.compile(r"[\w@%+=:,./-]*", re.ASCII)


def refuse_control_characters(option: str, value: str) -> str:
    """``value`` unchanged, or a ``ValueError`` naming ``option`` if it holds a control character.

    A newline (or CR, NUL, any character below 0x20, DEL) in a rendered value would start a new line
    of the batch script, which bash then runs.
    """
    found = _CONTROL.search(value)
    if found:
        raise ValueError(f"{option} {value!r} contains the control character {found.group()!r}; values "
                         "rendered into the batch script must be printable (no newlines or tabs)")
    return value


def sbatch_line(option: str) -> str:
    """``#SBATCH <option>``, double-quoted where sbatch would otherwise split or cut it (spaces, quotes, #)."""
    if _SBATCH_PLAIN.fullmatch(option):
        return f"#SBATCH {option}"
    name, eq, value = option.partition("=")
    if not (eq and name.startswith("-") and _SBATCH_PLAIN.fullmatch(name)):
        name, eq, value = "", "", option
    return f'#SBATCH {name}{eq}"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def template_path() -> Path:
    here = Path(__file__).resolve().parents[2] / TEMPLATE_NAME
    installed = Path(sys.prefix) / "share" / "moe_dist" / TEMPLATE_NAME
    for path in (here, installed):
        if path.is_file():
            return path
    raise ValueError(f"cannot find {TEMPLATE_NAME} (looked in {here.parent} and {installed.parent})")


def render(config: str, nodes: int, gpus_per_node: int, sets: List[str], time: str = "", partition: str = "",
           account: str = "", job_name: str = "moe-dist", launcher: str = "deepspeed",
           output: Optional[str] = None, extra_sbatch: Optional[List[str]] = None, gres: bool = True) -> str:
    """The sbatch script text; validates the run config against nodes x GPUs first.

    Raises:
        ValueError: a control character in any rendered value (naming the option), or an invalid run
            config for this world size.
    """
    from ..engine import load_run_config

    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes ({nodes}) and --gpus-per-node ({gpus_per_node}) must be >= 1")
    if launcher not in ("deepspeed", "srun"):
        raise ValueError(f"--launcher {launcher!r}; use deepspeed or srun")
    rendered = [("--job-name", job_name), ("--time", time), ("--partition", partition), ("--account", account),
                ("--output", output or ""), ("--config", config)]
    for option, value in rendered + [("--sbatch", s) for s in extra_sbatch or []] + [("--set", s) for s in sets]:
        refuse_control_characters(option, value)
    cfg = load_run_config(config, sets)
    # the default log path is derived from output_dir ('%' escaped: sbatch expands %j, %x, ... in it)
    refuse_control_characters("output_dir", str(cfg.output_dir))
    log = output or os.path.join(os.path.abspath(cfg.output_dir).replace("%", "%%"), "slurm-%j.out")
    world = nodes * gpus_per_node
    try:
        cfg.validate(world)
    except ValueError as err:
        raise ValueError(f"for {nodes} nodes x {gpus_per_node} GPUs (world size {world}): {err}") from None
    directives = [f"--job-name={job_name}", f"--nodes={nodes}",
                  f"--ntasks-per-node={gpus_per_node if launcher == 'srun' else 1}"]
    if gres:
        directives.append(f"--gpus-per-node={gpus_per_node}")
    if not any(option.startswith("--signal") for option in extra_sbatch or []):  # --sbatch=--signal=... replaces it
        directives.append("--signal=B:USR1@120")
    directives += ["--requeue", "--open-mode=append", f"--output={log}"]
    if time:
        directives.append(f"--time={time}")
    if partition:
        directives.append(f"--partition={partition}")
    if account:
        directives.append(f"--account={account}")
    directives += list(extra_sbatch or [])
    body = [line for line in template_path().read_text().splitlines() if not line.startswith("#SBATCH")]
    settings = [
        "# --- settings fixed by moe-dist slurm ---",
        f"export CONFIG={shlex.quote(os.path.abspath(config))}",
        # one element per argument: train.sbatch passes "${EXTRA_ARGS[@]}" on unchanged
        f"EXTRA_ARGS=({' '.join(shlex.quote(arg) for s in sets for arg in ('--set', s))})",
        f"export GPUS_PER_NODE={gpus_per_node}",
        f"export LAUNCHER={launcher}",
        f"export REPO=${{REPO:-{shlex.quote(str(template_path().parents[2]))}}}",
    ]
    return "\n".join([body[0]] + [sbatch_line(d) for d in directives] + settings + body[1:]) + "\n"


def submit(script: str, path: str) -> str:
    """Write ``script`` to ``path`` and sbatch it; returns sbatch's output (the job id line)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ValueError("sbatch is not installed or not on PATH: run this on a SLURM login node, or use "
                         "--dry-run to print the script (launch/local_slurm.sh start gives a local test cluster)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(script)
    res = subprocess.run([sbatch, path], capture_output=True, text=True)
    if res.returncode != 0:
        raise ValueError(f"sbatch refused {path}: {res.stderr.strip()}")
    return res.stdout.strip()


def _run(args: argparse.Namespace) -> int:
    from ..engine import load_run_config

    script = render(args.config, args.nodes, args.gpus_per_node, args.set, args.time, args.partition, args.account,
                    args.job_name, args.launcher, args.output, args.sbatch, gres=not args.no_gres)
    if args.dry_run:
        print(script, end="")
        return 0
    path = os.path.join(load_run_config(args.config, args.set).output_dir, "slurm", "train.sbatch")
    print(submit(script, path))
    print(f"script: {path}")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="render launch/slurm/train.sbatch for a run config and submit it",
                       description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override (repeatable)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default: 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node (default: 8)")
    p.add_argument("--time", default="", help="time limit, e.g. 24:00:00")
    p.add_argument("--partition", default="", help="SLURM partition")
    p.add_argument("--account", default="", help="SLURM account")
    p.add_argument("--job-name", default="moe-dist", help="job name (default: moe-dist)")
    p.add_argument("--launcher", default="deepspeed", choices=["deepspeed", "srun"],
                   help="one deepspeed launcher per node (default) or one srun task per GPU")
    p.add_argument("--output", help="job log path (default: <output_dir>/slurm-%%j.out)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --sbatch=--exclusive (repeatable)")
    p.add_argument("--no-gres", action="store_true", help="do not request GPUs (CPU-only clusters)")
    p.add_argument("--dry-run", action="store_true", help="print the rendered script instead of submitting")
    p.set_defaults(func=_run)
