"""`hydra/launcher=slurm` and `slurm_local`: hydra-submitit-launcher's SLURM launcher that looks at
each job before it queues anything (Hydra finds launchers only in the `hydra_plugins` namespace).

submitit composes and checks a job's config only once the job runs on a node, after its wait in
the queue: a bad override would fail in every job of the sweep, and a rerun would queue jobs that
only find their FINISHED twin and end. Here the sweep process composes each job's config first: bad
input stops the sweep with one line (exit 2) before anything is queued; and with
`jobs_run_here: true` (tools/slurm-local: the node is this machine, so `trainer=auto` and the
config hash resolve here as in the job) a configuration that already has a FINISHED run is
skipped here, as the job itself would skip it (densenet_exp/job.py, `before_queueing`).
"""


import sys
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import open_dict


@dataclass
class QueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.densenet_exp_slurm.SlurmLauncher"
    jobs_run_here: bool = False  # the cluster's node is this machine (tools/slurm-local)


ConfigStore.instance().store(group="hydra/launcher", name="densenet_exp_slurm", node=QueueConf,
                             provider="densenet_exp")


class SlurmLauncher(SubmititSlurmLauncher):
    def __init__(self, jobs_run_here: bool = False, **params: Any) -> None:
        super().__init__(**params)
        self.jobs_run_here = jobs_run_here
        self.job_nums: dict[tuple[str, ...], int] = {}  # overrides -> the job's number in the sweep

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from densenet_exp.job import before_queueing
        from densenet_exp.validate import ConfigError

        self.job_nums = {}
        returns: dict[int, JobReturn] = {}
        queued: list[Sequence[str]] = []
        for num, overrides in enumerate(job_overrides, initial_job_idx):
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                with open_dict(cfg.hydra.job):
                    cfg.hydra.job.num = num
                summary = before_queueing(cfg, self.jobs_run_here)
            except ConfigError as err:  # (a group's missing option: Hydra's sweeper stops the sweep before this)
                print(f"error: {err}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None  # passes through Hydra; the sweep's parent run is removed
            if summary is None:
                queued.append(overrides)
                self.job_nums[tuple(overrides)] = num
            else:
                returns[num] = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED,
                                         _return_value=summary["val_acc"])
        if queued:
            # submitit numbers the jobs it is given 0, 1, ...: each job looks its own number up.
            for job, result in zip(sorted(self.job_nums.values()), super().launch(queued, initial_job_idx)):
                returns[job] = result
        return [returns[num] for num in sorted(returns)]

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict[type, Singleton]) -> JobReturn:
        return super().__call__(sweep_overrides, job_dir_key, self.job_nums[tuple(sweep_overrides)], job_id,
                                singleton_state)
