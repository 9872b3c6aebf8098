"""SLURM submission: the rendered script, its errors, and real jobs on a one-node Slurm
cluster started for the session (tests/slurm_cluster.py): a CPU pretraining job of two
processes runs to the end, and one sent USR1 mid-epoch checkpoints, is requeued and
resumes with no step lost or repeated.

Run as root, the fixture installs Slurm when it is missing (``apt-get install -y slurm-wlm
munge``). Not root, or no way to install it, or ``MAE_SKIP_SLURM=1``: those tests skip,
with the reason in pytest's summary. Installed but not starting: they fail."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import submit
from pipelines.launch import EXIT_STOPPED

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import PARTITION, SlurmCluster, SlurmFailed, SlurmUnavailable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # 4 shards for 2 processes x 1 loader worker; 16 steps an epoch
    "data.train=shards/cifar10/test-{000000..000003}.tar", "data.val=", "batch_size=32", "epochs=2",
    "model_overrides.depth=2", "data.num_workers=1", "progress=false", "log_every=1",
]  # fmt: skip
STEPS = 32
CPU_JOB = ["--nodes", "1", "--gpus-per-node", "0", "--processes-per-node", "2", "--time", "10:00"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm():
    if os.environ.get("MAE_SKIP_SLURM") == "1":
        pytest.skip("MAE_SKIP_SLURM=1: no Slurm test cluster")
    cluster, unavailable, failed = SlurmCluster(), None, None
    try:
        cluster.start()
    except SlurmUnavailable as err:
        unavailable = str(err)
    except SlurmFailed as err:
        failed = str(err)
    if unavailable is not None:
        pytest.skip(f"no Slurm test cluster: {unavailable}")
    if failed is not None:
        pytest.fail(f"cannot start the Slurm test cluster (set MAE_SKIP_SLURM=1 to skip these tests): {failed}",
                    pytrace=False)  # fmt: skip
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = submit.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def dry_run(capsys, *argv: str) -> str:
    code, out, err = run_main(capsys, argv[0], "--dry-run", *argv[1:])
    assert code == 0, err
    return out


def sbatch_options(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


# -- the script


def test_dry_run_renders_the_options_and_the_launch(capsys, tmp_path):
    config = ROOT / "pipelines/configs/mae_vit_tiny_cifar10.yaml"
    script = dry_run(
        capsys, "pretrain", "--nodes", "8", "--gpus-per-node", "8", "--cpus-per-task", "64", "--mem", "400G",
        "--time", "72:00:00", "--partition", "gpu", "--account", "vision", "--qos", "high", "--constraint", "h100",
        "--job-name", "vitl", "--output-dir", str(tmp_path / "logs"), "--sbatch-line=--exclusive",
        "--setup", "source venv/bin/activate", "--signal-grace", "600", "--config", str(config),
        "--", "epochs=800", "data.train=data/train-{000000..000127}.tar",
    )  # fmt: skip
    options = sbatch_options(script)
    for expected in ["--job-name=vitl", "--nodes=8", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
                     "--mem=400G", "--time=72:00:00", "--partition=gpu", "--account=vision", "--qos=high",
                     "--constraint=h100", f"--output={tmp_path / 'logs'}/%x-%j.log", "--open-mode=append",
                     "--requeue", "--signal=B:USR1@600", f"--chdir={ROOT}", "--exclusive"]:  # fmt: skip
        assert expected in options, (expected, options)
    assert "source venv/bin/activate" in script.splitlines()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in script
    assert "ACCELERATE_USE_CPU" not in script
    launch = script[script.index("srun ") : script.index(" &\n")]
    for expected in ["--ntasks-per-node=1", "--cpus-per-task=64", '--machine_rank "$SLURM_NODEID"', "--multi_gpu",
                     '--num_machines "$SLURM_NNODES"', "--num_processes $((SLURM_NNODES * 8))",
                     '--main_process_ip "$MASTER_ADDR"', '--main_process_port "$MASTER_PORT"',
                     f"-m pipelines.pretrain --config {config} epochs=800 "
                     "'data.train=data/train-{000000..000127}.tar' resume=auto"]:  # fmt: skip
        assert expected in launch, (expected, launch)
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


def test_cpu_and_single_process_jobs(capsys):
    cpu = dry_run(capsys, "linprobe", *CPU_JOB, "--", "pretrained=runs/pretrain")
    assert "export ACCELERATE_USE_CPU=true" in cpu
    assert "--gpus-per-node" not in "".join(sbatch_options(cpu))
    assert "--multi_gpu --num_machines" in cpu and "$((SLURM_NNODES * 2))" in cpu
    assert "-m pipelines.linprobe pretrained=runs/pretrain resume=auto" in cpu
    single = dry_run(capsys, "finetune", "--gpus-per-node", "1", "--signal-grace", "0")
    assert "--multi_gpu" not in single and "$((SLURM_NNODES * 1))" in single
    assert not any(o.startswith("--signal") for o in sbatch_options(single))
    assert "--gpus-per-node=8" in sbatch_options(dry_run(capsys, "pretrain"))  # a whole 8-GPU node by default
    assert "$((SLURM_NNODES * 8))" in dry_run(capsys, "pretrain")


def test_tools_run_once_as_one_process(capsys, tmp_path):
    """analyze and reconstruct come from the same stage table: one srun of the tool, its own
    arguments, one GPU by default, no requeue and no time-limit warning."""
    script = dry_run(capsys, "analyze", "--time", "1:00:00", "--", "runs/pt", "--out", "runs/pt/analysis")
    options = sbatch_options(script)
    assert "--nodes=1" in options and "--gpus-per-node=1" in options and "--time=1:00:00" in options
    assert "--requeue" not in options and not any(o.startswith("--signal") for o in options)
    assert "exec srun --ntasks=1 python -m pipelines.analyze runs/pt --out runs/pt/analysis" in script
    assert "resume=auto" not in script and "accelerate" not in script
    rec = dry_run(capsys, "reconstruct", "--gpus-per-node", "0", "--", "runs/pt", "a.jpg", "--out", "r.png")
    assert "python -m pipelines.reconstruct runs/pt a.jpg --out r.png" in rec
    assert "--gpus-per-node" not in "".join(sbatch_options(rec))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["analyze", "--dry-run", "--", "runs/pt"], "the following arguments are required: --out"),
        (["analyze", "--dry-run", "--", "runs/pt", "--out", "a", "--only", "attention"], "invalid choice: 'attention'"),
        (["analyze", "--dry-run", "--nodes", "2", "--", "runs/pt", "--out", "a"], "runs as one process on one node"),
        (["reconstruct", "--dry-run", "--config", "x.yaml", "--", "runs/pt"], "takes no --config"),
    ],
)
def test_bad_tool_arguments_stop_before_submitting(capsys, tmp_path, argv, message):
    (tmp_path / "x.yaml").write_text("{}\n")
    argv = [str(tmp_path / a) if a == "x.yaml" else a for a in argv]
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "--dry-run", "--", "epochs=many"], "config error: epochs"),
        (["pretrain", "--dry-run", "--", "no_such_key=1"], "config error: unknown config key 'no_such_key'"),
        (["pretrain", "--dry-run", "--", "resume=runs/other"], "always runs with resume=auto"),
        (["pretrain", "--dry-run", "--config", "no/such.yaml"], "no/such.yaml: no such file"),
        (["pretrain", "--dry-run", "--nodes", "0"], "nodes must be at least 1"),
    ],
)
def test_bad_settings_stop_before_submitting(capsys, argv, message):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_unknown_stage_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "pipelines.submit", "pretrian", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "invalid choice: 'pretrian'" in proc.stderr and "Traceback" not in proc.stderr


def test_sbatch_missing_from_path(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, out, err = run_main(capsys, "pretrain", "--output-dir", str(tmp_path / "logs"))
    assert code == 2 and out == ""
    assert "sbatch not found on PATH" in err and "Traceback" not in err


def run_sbatch(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", *argv], capture_output=True, text=True, timeout=60)


# -- on the test cluster


@pytest.mark.slow
def test_the_script_is_one_sbatch_accepts(slurm, capsys, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(dry_run(capsys, "pretrain", *CPU_JOB, "--partition", PARTITION, "--cpus-per-task", "1",
                              "--output-dir", str(tmp_path), "--", *TINY))  # fmt: skip
    proc = run_sbatch("--test-only", str(script))
    assert proc.returncode == 0, proc.stderr
    assert "to start at" in proc.stderr


@pytest.mark.slow
def test_sbatch_failing_shows_its_error(slurm, capsys, tmp_path):
    code, out, err = run_main(capsys, "pretrain", *CPU_JOB, "--partition", "nosuch", "--output-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert "sbatch rejected" in err and "invalid partition" in err.lower() and "Traceback" not in err
    assert len(list(tmp_path.glob("mae-pretrain-*.sbatch"))) == 1  # kept, to fix and resubmit


def submit_job(capsys, tmp_path: Path, *overrides: str) -> tuple[str, Path, Path]:
    """Submit the tiny CPU pretraining job; returns its id, its log and its output_dir."""
    logs, out = tmp_path / "slurm", tmp_path / "run"
    code, stdout, err = run_main(capsys, "pretrain", *CPU_JOB, "--output-dir", str(logs), "--",
                                 *TINY, f"output_dir={out}", *overrides)  # fmt: skip
    assert code == 0, err
    job_id = stdout.strip()
    assert job_id.isdigit(), stdout
    assert len(list(logs.glob("mae-pretrain-*.sbatch"))) == 1  # the script is kept
    return job_id, logs / f"mae-pretrain-{job_id}.log", out


def job_info(job_id: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def explain(slurm: SlurmCluster, job_id: str, log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return f"job {job_id}: {job_info(job_id)}\n--- job log\n{text[-6000:]}\n{slurm.logs()}"


def wait_until(predicate, timeout: float, slurm: SlurmCluster, job_id: str, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{explain(slurm, job_id, log)}")
        time.sleep(0.5)


def wait_for_end(slurm: SlurmCluster, job_id: str, log: Path, timeout: float = 240) -> dict[str, str]:
    wait_until(lambda: job_info(job_id).get("JobState") in FINAL_STATES, timeout, slurm, job_id, log, "the job to end")
    info = job_info(job_id)
    assert info["JobState"] == "COMPLETED", explain(slurm, job_id, log)
    return info


def logged_steps(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_trained_to_the_end(out: Path, log: str) -> None:
    assert "pipelines.pretrain: 2 process(es)" in log
    assert [r["step"] for r in logged_steps(out) if "loss" in r] == list(range(1, STEPS + 1))
    assert (out / "encoder.safetensors").is_file()
    assert (out / "checkpoints" / f"ckpt-{STEPS:08d}" / "model.safetensors").is_file()


@pytest.mark.slow
def test_cpu_job_of_two_processes_runs_to_the_end(slurm, capsys, tmp_path):
    job_id, log, out = submit_job(capsys, tmp_path)
    info = wait_for_end(slurm, job_id, log)
    text = log.read_text()
    assert info["Restarts"] == "0" and "[submit] stage exited 0" in text, text
    assert_trained_to_the_end(out, text)


@pytest.mark.slow
@pytest.mark.parametrize(
    "scancel",
    [
        pytest.param(["--batch"], id="time-limit-warning"),  # what --signal=B:USR1@N does: the batch shell only
        pytest.param([], id="signal-to-the-steps"),  # a user's `scancel --signal=USR1 <job>`: the ranks directly
    ],
)
def test_usr1_mid_epoch_checkpoints_requeues_and_resumes(slurm, capsys, tmp_path, scancel):
    job_id, log, out = submit_job(capsys, tmp_path)
    wait_until(lambda: len(logged_steps(out)) >= 3, 180, slurm, job_id, log, "3 steps in metrics.jsonl")
    proc = subprocess.run(["scancel", *scancel, "--signal=USR1", job_id], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    info = wait_for_end(slurm, job_id, log)
    text = log.read_text()
    assert int(info["Restarts"]) >= 1, explain(slurm, job_id, log)
    stopped = re.search(r"stopped by signal 10: checkpoint at step (\d+)", text)
    assert stopped and 3 <= int(stopped.group(1)) < STEPS // 2, text  # mid epoch 0
    first, second = text.index("[submit] job"), text.index("[submit] job", text.index("requeueing job"))
    assert "start 1" in text[first:].splitlines()[0] and "start 2" in text[second:].splitlines()[0]  # one appended log
    assert f"resumed from {out}/checkpoints/ckpt-{int(stopped.group(1)):08d}" in text[second:]
    assert_trained_to_the_end(out, text)  # steps 1..N exactly once: none lost, none repeated


@pytest.mark.slow
def test_analysis_job_runs_on_the_cluster(slurm, capsys, tmp_path):
    from mae.models import create_model
    from mae.pretrain import save_encoder

    encoder = save_encoder(create_model("mae_vit_tiny_patch4_32", depth=2), tmp_path / "encoder.safetensors")
    logs, out = tmp_path / "slurm", tmp_path / "analysis"
    code, stdout, err = run_main(capsys, "analyze", "--gpus-per-node", "0", "--partition", PARTITION, "--output-dir",
                                 str(logs), "--", str(encoder), "--out", str(out), "--only", "position", "filters")  # fmt: skip
    assert code == 0, err
    job_id = stdout.strip()
    log = logs / f"mae-analyze-{job_id}.log"
    wait_for_end(slurm, job_id, log)
    assert json.loads((out / "analysis.json").read_text())["files"] == ["position_similarity.png",
                                                                         "patch_embedding_components.png"]  # fmt: skip


# -- the per-node launcher and SIGUSR1, without Slurm: all of a step's processes get the signal


RANK = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
open(os.path.join(sys.argv[1], "ready-" + os.environ["RANK"]), "w").write(str(os.getpid()))
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.1)
time.sleep(1)  # the checkpoint
sys.exit(75 if got else 0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signal_the_step(launcher: list[str], tmp_path: Path) -> int:
    """Start ``launcher`` with two CPU ranks of RANK, send USR1 to the launcher and the ranks (as
    Slurm signals every process of a step), and return the launcher's exit status once every
    rank has ended."""
    (tmp_path / "rank.py").write_text(RANK)
    argv = [*launcher, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--machine_rank", "0",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
            "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "rank.py"), str(tmp_path)]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="true")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env)
    ready = [tmp_path / "ready-0", tmp_path / "ready-1"]
    try:
        deadline = time.monotonic() + 120
        while not all(p.exists() and p.read_text() for p in ready):
            assert proc.poll() is None and time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.2)
        for pid in [proc.pid, *(int(p.read_text()) for p in ready)]:  # ranks run in sessions of their own
            os.kill(pid, signal.SIGUSR1)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in (int(p.read_text()) for p in ready):  # ranks left behind by a dead launcher end by themselves
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.2)
    return code


@pytest.mark.slow
def test_launch_node_outlives_usr1_and_passes_on_exit_75(tmp_path):
    code = signal_the_step([sys.executable, "-m", "pipelines.submit", submit.LAUNCH_NODE], tmp_path)
    assert code == EXIT_STOPPED


@pytest.mark.slow
def test_plain_accelerate_launch_dies_of_usr1(tmp_path):
    """Why launch-node exists: the elastic agent has no SIGUSR1 handler, so the signal kills it."""
    code = signal_the_step([sys.executable, "-m", "accelerate.commands.launch"], tmp_path)
    assert code == -signal.SIGUSR1
