"""osediff-lab's Hydra launchers (Hydra loads launchers only from the ``hydra_plugins`` package): submitit's,
plus what ``osediff_lab.slurm.CheckedSweep`` adds. Selected by ``hydra/launcher=slurm_cpu|slurm_gpu|local``."""

from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from osediff_lab.slurm import CheckedSweep


class SlurmLauncher(CheckedSweep, submitit_launcher.SlurmLauncher):
    """Slurm through submitit: request checked with sinfo, jobs followed through requeues, a job table."""

    executor_name = "slurm"


class LocalLauncher(CheckedSweep, submitit_launcher.LocalLauncher):
    """Local processes through submitit: the same code path and job table as Slurm."""

    executor_name = "local"
