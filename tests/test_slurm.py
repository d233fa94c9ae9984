"""The cluster recipes under a real SLURM: a one-node cluster (munged, slurmctld, slurmd) started in a
temporary folder runs ``launch/preprocess_slurm.sh``, ``launch/train_slurm.sh`` (requeued mid-run) and
``launch/poster_recipe.sh`` with ``sbatch`` as a user would, on phantoms.

Not part of the default run (minutes): ``python -m pytest -m slurm``, as root, after
``apt-get install slurm-wlm munge``; skipped, with the reason, without them.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from training_runs import REPO, free_port

pytestmark = pytest.mark.slurm

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


@dataclass
class Slurm:
    root: Path
    env: dict[str, str]

    def run(self, *args: str | Path, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(map(str, args)), env=self.env, capture_output=True, text=True, check=True,
                              timeout=60, **kwargs)

    def submit(self, *args: str | Path, env: dict[str, str] | None = None) -> tuple[str, Path]:
        out = self.root / f"job-{time.monotonic_ns()}.out"
        proc = subprocess.run(["sbatch", "--parsable", "--output", str(out), *map(str, args)],
                              env={**self.env, **(env or {})}, capture_output=True, text=True, check=True,
                              timeout=60, cwd=self.root)  # the submit directory: the scripts write beside it
        return proc.stdout.strip().split(";")[0], out

    def state(self, job: str) -> str:
        return self.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip()

    def wait(self, job: str, out: Path, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while self.state(job):
            assert time.monotonic() < deadline, f"job {job} still {self.state(job)}:\n{out.read_text()}"
            time.sleep(1)
        return out.read_text()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"needs SLURM and munge ({', '.join(missing)} not found): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    (root / "munge.key").write_bytes(os.urandom(1024))
    (root / "munge.key").chmod(0o600)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=bratsgantest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=30
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["munged", "--force", f"--socket={root}/munge.sock", f"--key-file={root}/munge.key",
                    f"--pid-file={root}/munged.pid", f"--log-file={root}/log/munged.log",
                    f"--seed-file={root}/munged.seed"], check=True, env=env, timeout=30)
    subprocess.run(["slurmctld", "-f", str(conf), "-i"], check=True, env=env, timeout=30)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env, timeout=30)
    cluster = Slurm(root, env)
    deadline = time.monotonic() + 60
    while "idle" not in cluster.run("sinfo", "-h", "-o", "%T").stdout:
        assert time.monotonic() < deadline, (root / "log" / "slurmctld.log").read_text()[-2000:]
        time.sleep(0.5)
    yield cluster
    subprocess.run(["scancel", "--user", "root"], env=env, check=False, timeout=30)
    for daemon in ("slurmd", "slurmctld", "munged"):
        pid_file = root / f"{daemon}.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


@pytest.fixture(scope="module")
def phantoms_30(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 small subjects: the poster's 001-015 for training and 016-030 held out."""
    from brats_gan.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("poster") / "MICCAI_BraTS2020_TrainingData"
    write_phantom_dataset(root, n_subjects=30, layout="2020", shape=(64, 64, 48), modalities=("flair",),
                          with_seg=False)
    return root


def _steps(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def test_preprocess_slurm_owns_its_scheduler(slurm: Slurm, phantoms_30: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    job, out = slurm.submit("--nodes=1", "--ntasks-per-node=2", "--mem-per-cpu=1G", "--time=10",
                            REPO / "launch" / "preprocess_slurm.sh", phantoms_30, store)
    output = slurm.wait(job, out)
    assert f"{store}: complete, 30 subjects" in output, output
    assert "scheduler tcp://" in output and "dashboard:" in output
    left = subprocess.run(["pgrep", "-f", f"dask-scheduler-{job}.json"], capture_output=True, text=True, check=False)
    assert left.stdout == "", "the job's scheduler and workers end with it"
    assert not (slurm.root / f"dask-scheduler-{job}.json").exists()
    assert not (slurm.root / f"dask-config-{job}").exists(), "nothing of the job's scheduler is left"


def test_train_slurm_survives_a_requeue_and_resumes(slurm: Slurm, store_factory, tmp_path: Path) -> None:
    store = store_factory(subjects=4, slices=12)
    run = tmp_path / "run"
    job, out = slurm.submit("--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0", "--time=20",
                            REPO / "launch" / "train_slurm.sh", store, run, "--preset", "tiny", "--steps", "40",
                            "--checkpoint-every", "5", "--sample-every", "0", "--seed", "0",
                            "--checkpoint-on-signal", env={"SLOTS": "1", "OMP_NUM_THREADS": "1"})
    from brats_gan.checkpoints import read_latest

    deadline = time.monotonic() + 300
    while read_latest(run) is None:
        assert slurm.state(job), out.read_text()
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.5)
    slurm.run("scontrol", "requeue", job)  # what preemption, a node failure or the time-limit trap do
    while slurm.state(job) != "PENDING":  # the ranks stop after their step and save it
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.5)
    slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now")  # skip SLURM's requeue delay
    output = slurm.wait(job, out)
    assert "stopped by SIGTERM after step" in output, output
    stopped = int(output.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert f"resumed from step {stopped}" in output, "the requeued job resumes the checkpoint the stop saved"
    assert _steps(run) == list(range(1, 41)) and read_latest(run) == 40


def test_the_poster_recipe_runs_under_sbatch_with_extra_training_options(slurm: Slurm, phantoms_30: Path,
                                                                         tmp_path: Path) -> None:
    work = tmp_path / "poster"
    job, out = slurm.submit("--nodes=1", "--cpus-per-task=2", "--time=20", REPO / "launch" / "poster_recipe.sh",
                            phantoms_30, work, "1", "--preset", "tiny", "--steps", "4", "--checkpoint-every", "2",
                            "--swd-images", "16", env={"OMP_NUM_THREADS": "1"})
    output = slurm.wait(job, out)
    assert "train arguments: --preset paper" in output and "--preset tiny --steps 4" in output, output
    assert _steps(work / "run") == [1, 2, 3, 4]
    assert (work / "synthetic.png").exists() and (work / "report" / "metrics.json").exists(), output
