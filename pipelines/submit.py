"""Submit a stage to SLURM as a batch job that checkpoints and requeues itself.

    python -m pipelines.submit pretrain --nodes 8 --gpus-per-node 8 --partition gpu --time 72:00:00 \\
        --config pipelines/configs/mae_vit_large_in1k.yaml
    python -m pipelines.submit pretrain ... --dry-run          # print the sbatch script, submit nothing
    python -m pipelines.submit pretrain --nodes 2 -- epochs=800 data.train=...   # stage settings after --
    python -m pipelines.submit analyze --gpus-per-node 1 -- runs/pt --out runs/pt/analysis   # a tool's arguments

The stages come from one table, ``pipelines/stages.py``, which the entry points read too.
Training stages run as below; the tools (``analyze``, ``reconstruct``) run once, as one
process on one node (``srun python -m pipelines.<tool> ARGS``), with no requeue.

It renders a plain sbatch script, keeps it as ``<output-dir>/<job-name>-<timestamp>.sbatch``,
submits it with ``sbatch --parsable`` and prints the job id; the job's log is
``<output-dir>/<job-name>-<job id>.log``. A plain script rather than submitit: you can
read it, keep it next to the run and resubmit it with ``sbatch`` alone, nothing is
pickled (no Python callables or objects travel to the nodes), and ``--dry-run`` shows
exactly what will run. The stage's settings are checked before anything is submitted.

What the job does
-----------------
One Slurm task per node (``--ntasks-per-node=1``); on every node ``srun`` starts ONE
``accelerate launch`` (run in-process by ``python -m pipelines.submit launch-node``, see
below) with ``--num_machines $SLURM_NNODES --machine_rank $SLURM_NODEID --num_processes
$((SLURM_NNODES * processes_per_node))``, rendezvous at the first node of the allocation
(``MASTER_ADDR``) on a port derived from the job id. The job runs in the root of this
checkout (relative paths in the settings are read there). ``resume=auto`` is always
appended, so a requeued job continues from its latest checkpoint in the same
``output_dir`` (fixed in the script, hence the same after a requeue). CPU-only jobs
(``--gpus-per-node 0``) export ``ACCELERATE_USE_CPU=true`` and still pass ``--multi_gpu``:
that is what gives one gloo group of all processes (``accelerate launch --cpu
--num_processes 2`` quietly starts a single process).

Time limit and requeue (the design, and why)
--------------------------------------------
The stage catches SIGTERM/SIGUSR1 (``mae.guards.StopSignal``), writes a checkpoint at the
next optimiser step and exits 75 (``EXIT_STOPPED``). Getting that signal to the ranks,
and knowing afterwards that the job should be requeued, takes three pieces
(``tests/test_submit.py`` runs them on a real Slurm cluster, sending the warning with
``scancel --batch --signal=USR1``, the way Slurm delivers ``B:USR1``):

* ``#SBATCH --signal=B:USR1@<grace>``: Slurm sends the time-limit warning to the batch
  shell only. Without ``B:`` it would go to the job steps' processes and the batch shell
  would never learn of it, so nothing could decide to requeue.
* The batch shell runs ``srun`` in the background and waits in 5 s naps (bash runs a
  trap only once the foreground command returns); its USR1 trap notes the warning, and
  from then on it sends USR1 to ``srun`` every nap until the stage ends. ``srun`` forwards
  it to every process of the step on every node: launchers, ranks and loader workers
  alike (as ``scancel --signal=USR1 <job>`` does). Sending it again matters: a rank
  still starting up (or a resumed one loading its checkpoint) ignores it, and a warning
  can come before ``srun`` has even started (a short time limit after a requeue).
* The per-node launcher ignores USR1. ``accelerate launch`` runs torch's elastic agent,
  which does not handle SIGUSR1: the default action kills it at once, the step then
  ends and Slurm kills the ranks before they can checkpoint. So ``launch-node`` sets
  SIGUSR1 to ignored and runs ``accelerate launch`` in the same process; the ranks
  inherit "ignored" and replace it with their own handler when training starts (loader
  workers, forked later, inherit that handler and only set a flag). ``launch-node`` also
  turns the ranks' exit 75 back into its own exit status (accelerate reports any
  failing rank as 1).

``srun --kill-on-bad-exit=0 --wait=120``: nodes end a stop a moment apart, and killing the
others when the first one exits 75 would turn their 75 into 137; a node left hanging by
another node's failure is killed two minutes after that node ended.

After ``srun`` returns, the script runs ``scontrol requeue $SLURM_JOB_ID`` when the stage
stopped for a checkpoint (exit 75: also after a ``scancel --signal=USR1 <job>`` sent to
the steps directly) or when the warning arrived and the stage did not finish; a stage
that finished (0) or failed on its own is not requeued. ``--requeue`` makes the job
requeueable (and requeued by Slurm on node failure), ``--open-mode=append`` continues the
same log. A requeued job waits about the cluster's credential lifetime (120 s by
default) before it starts again. Pre-emption is the cluster's PreemptMode: with REQUEUE,
Slurm sends SIGTERM (the ranks checkpoint; the elastic agent passes SIGTERM on and gives
them 30 s) and requeues the job itself. Keep ``--signal-grace`` longer than one
optimiser step plus a checkpoint write, plus 5 s (Slurm may also send it up to a minute
early).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mae.files import write_atomic
from pipelines.launch import EXIT_STOPPED
from pipelines.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_NODE = "launch-node"


class SubmitError(Exception):
    """A problem the user can fix: reported in one line, exit status 2."""


@dataclass
class Job:
    stage: str
    nodes: int = 1
    gpus_per_node: int = 8
    processes_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None
    output_dir: Path = Path("runs/slurm")
    sbatch_lines: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    signal_grace: int = 300
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def procs_per_node(self) -> int:
        if self.processes_per_node is not None:
            return self.processes_per_node
        return self.gpus_per_node or 1

    @property
    def name(self) -> str:
        return self.job_name or f"mae-{self.stage}"


def render(job: Job) -> str:
    """The sbatch script for ``job`` (what ``--dry-run`` prints and what is submitted)."""
    if not STAGES[job.stage].training:
        return render_tool(job)
    world = f"$((SLURM_NNODES * {job.procs_per_node}))"
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "--wait=120"]
    if job.cpus_per_task is not None:
        srun.append(f"--cpus-per-task={job.cpus_per_task}")  # srun does not take it from sbatch
    stage_args = ["-m", f"pipelines.{job.stage}"]
    if job.config is not None:
        stage_args += ["--config", str(job.config)]
    stage_args += [*job.overrides, "resume=auto"]
    multi = job.nodes * job.procs_per_node > 1
    lines = [
        *header(job, f"{job.stage} on {job.nodes} node(s) x {job.procs_per_node} process(es)"),
        'echo "[submit] job $SLURM_JOB_ID start $((${SLURM_RESTART_COUNT:-0} + 1))'
        ' on $SLURM_JOB_NODELIST at $(date -Is)"',
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        *(["export ACCELERATE_USE_CPU=true  # CPU only: --multi_gpu then means one gloo group"]
          if not job.gpus_per_node else []),  # fmt: skip
        "",
        "# The time-limit warning (--signal=B:USR1@N) reaches this shell only: note it, and pass it",
        "# to srun (which forwards it to every process of the step, on every node) every 5 s until",
        "# the stage ends: ranks still starting up ignore it and need it again.",
        "warned=0",
        "trap 'warned=1; echo \"[submit] USR1: time limit near, the stage checkpoints at its next step\"' USR1",
        "",
        "# One `accelerate launch` per node; machine_rank is expanded on each node.",
        f"{' '.join(srun)} bash -c 'exec python -m pipelines.submit {LAUNCH_NODE} "
        '--machine_rank "$SLURM_NODEID" "$@"\' launch \\',
        f"    {'--multi_gpu ' if multi else ''}--num_machines \"$SLURM_NNODES\" --num_processes {world} \\",
        '    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \\',
        "    --mixed_precision no --dynamo_backend no \\",
        f"    {shlex.join(stage_args)} &",
        "srun_pid=$!",
        'while kill -0 "$srun_pid" 2>/dev/null; do',
        '    if [ "$warned" = 1 ]; then kill -USR1 "$srun_pid" 2>/dev/null; fi',
        "    sleep 5 & wait $!  # a trap cuts this wait short",
        "done",
        'wait "$srun_pid"; rc=$?',
        "",
        f'if [ "$rc" = {EXIT_STOPPED} ] || {{ [ "$warned" = 1 ] && [ "$rc" != 0 ]; }}; then',
        '    echo "[submit] stage stopped (exit $rc): requeueing job $SLURM_JOB_ID; resume=auto continues it"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        'echo "[submit] stage exited $rc"',
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def render_tool(job: Job) -> str:
    """A tool (analysis, reconstruction): one process on one node, run once, not requeued."""
    srun = ["srun", "--ntasks=1", *([f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task else [])]
    lines = [
        *header(job, f"{job.stage}: one process on one node"),
        'echo "[submit] job $SLURM_JOB_ID on $SLURM_JOB_NODELIST at $(date -Is)"',
        f"exec {shlex.join([*srun, 'python', '-m', STAGES[job.stage].module, *job.overrides])}",
        "",
    ]
    return "\n".join(lines)


def header(job: Job, what: str) -> list[str]:
    """The script's first lines: what it runs, the #SBATCH options and the set-up. A training
    stage's job is requeueable and warned before its time limit; a tool's is neither."""
    training = STAGES[job.stage].training
    options = [
        f"--job-name={job.name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        *([f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []),
        *(f"--{key}={value}" for key, value in (
            ("cpus-per-task", job.cpus_per_task), ("mem", job.mem), ("time", job.time),
            ("partition", job.partition), ("account", job.account), ("qos", job.qos),
            ("constraint", job.constraint),
        ) if value is not None),  # fmt: skip
        f"--output={job.output_dir.resolve()}/%x-%j.log",
        "--open-mode=append",
        *(["--requeue"] if training else []),
        *([f"--signal=B:USR1@{job.signal_grace}"] if training and job.signal_grace > 0 else []),
        f"--chdir={ROOT}",
        *job.sbatch_lines,
    ]
    return [
        "#!/bin/bash",
        f"# {what}, rendered by",
        "# `python -m pipelines.submit`; resubmit with `sbatch <this file>`.",
        *(f"#SBATCH {option}" for option in options),
        "",
        f"cd {shlex.quote(str(ROOT))}",
        *job.setup,
        "",
    ]


def check_settings(job: Job) -> None:
    """The stage's own config check, run here so that a typo fails now, not after queueing."""
    stage = STAGES[job.stage]
    if not stage.training:
        if job.config is not None:
            raise SubmitError(f"{job.stage} takes no --config: give its arguments after --")
        if job.nodes != 1 or job.procs_per_node != 1:
            raise SubmitError(f"{job.stage} runs as one process on one node: leave --nodes and --processes-per-node out")
        problem = stage.check_args(job.overrides)
        if problem:
            raise SubmitError(problem)
        return
    for item in job.overrides:
        key, sep, value = item.partition("=")
        if key.strip() == "resume" and value.strip() != "auto":
            raise SubmitError(f"{item!r}: a submitted job always runs with resume=auto (a requeued job "
                              "continues from its latest checkpoint); leave resume out")  # fmt: skip
    from mae.config import ConfigError, load_config

    try:
        load_config(stage.config_class(), job.config, job.overrides)
    except ConfigError as err:
        raise SubmitError(f"config error: {err}") from None


def submit(job: Job, script: str) -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch not found on PATH: run this on a Slurm login node (or use --dry-run)")
    folder = job.output_dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}-{n}.sbatch"
    write_atomic(path, script)  # Slurm reads it again when it requeues the job
    proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch rejected {path} (exit {proc.returncode}):\n{proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted {path}; log {folder}/{job.name}-{job_id}.log", file=sys.stderr)
    return job_id


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.submit", description=__doc__.split("\n\n")[0],
        usage="%(prog)s {" + ",".join(STAGES) + "} [options] [-- key=value ... | -- tool arguments]",
        epilog="Stage settings (key=value, as for the stage itself) go after --; for the tools (" +
               ", ".join(s.name for s in STAGES.values() if not s.training) + "), their own arguments. Stages:\n" +
               "\n".join(f"  {s.name:12s} {s.summary}" for s in STAGES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("stage", choices=list(STAGES), help="the stage to run")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (0: CPU only); default 8, or 1 for the tools")
    p.add_argument("--processes-per-node", type=int, help="default: gpus-per-node, or 1 with no GPUs")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node (the one task of each node)")
    p.add_argument("--mem", help="memory per node, as sbatch takes it (e.g. 400G, 0 for all)")
    p.add_argument("--time", help="time limit, e.g. 72:00:00")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--job-name", help="default: mae-<stage>")
    p.add_argument("--output-dir", type=Path, default=Path("runs/slurm"),
                   help="folder for the job script and the job's log (default runs/slurm)")
    p.add_argument("--sbatch-line", action="append", default=[], metavar="OPTION",
                   help="an extra #SBATCH option, e.g. --exclusive (repeatable)")
    p.add_argument("--setup", action="append", default=[], metavar="SHELL",
                   help="a shell line run before the launch, e.g. 'source venv/bin/activate' (repeatable)")
    p.add_argument("--signal-grace", type=int, default=300, metavar="SECONDS",
                   help="USR1 this long before the time limit: the stage checkpoints and the job requeues "
                        "(default 300; 0: no warning)")  # fmt: skip
    p.add_argument("--config", type=Path, help="the stage's YAML config file")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    return p


def launch_node(argv: list[str]) -> int:
    """One node's launcher inside the job: ``accelerate launch ARGV`` in this process with
    SIGUSR1 ignored (see the module docstring); exit 75 when a rank stopped for a checkpoint."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_command(launch_command_parser().parse_args(argv))
    except ChildFailedError as err:  # several processes: torch's elastic agent
        codes = {rank: failure.exitcode for rank, failure in err.failures.items()}
    except subprocess.CalledProcessError as err:  # one process
        codes = {0: err.returncode}
    else:
        return 0
    if EXIT_STOPPED in codes.values():  # a rank exits only after the checkpoint is complete on all
        return EXIT_STOPPED
    print(f"{LAUNCH_NODE}: processes failed with exit codes {codes}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [LAUNCH_NODE]:
        return launch_node(argv[1:])
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    job = Job(
        stage=args.stage, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node if args.gpus_per_node is not None else 8 if STAGES[args.stage].training else 1,
        processes_per_node=args.processes_per_node, cpus_per_task=args.cpus_per_task, mem=args.mem,
        time=args.time, partition=args.partition, account=args.account, qos=args.qos,
        constraint=args.constraint, job_name=args.job_name, output_dir=args.output_dir,
        sbatch_lines=args.sbatch_line, setup=args.setup, signal_grace=args.signal_grace,
        config=args.config.resolve() if args.config else None, overrides=overrides,
    )  # fmt: skip
    try:
        for name in ("nodes", "procs_per_node"):
            if getattr(job, name) < 1:
                raise SubmitError(f"{name.replace('_', '-')} must be at least 1")
        if job.gpus_per_node < 0 or job.signal_grace < 0:
            raise SubmitError("--gpus-per-node and --signal-grace cannot be negative")
        if job.config is not None and not job.config.is_file():
            raise SubmitError(f"--config {args.config}: no such file")
        check_settings(job)
        script = render(job)
        if args.dry_run:
            print(script, end="")
            return 0
        print(submit(job, script))
    except SubmitError as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
