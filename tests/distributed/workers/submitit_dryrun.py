"""``python -m train -m hydra/launcher=hybridlm_slurm ...`` up to the sbatch call, without SLURM.

    python submitit_dryrun.py OUT_DIR <train overrides...>
Runs the real Hydra entry point (train.__main__) with the submitit launcher plugin. Submitit
pickles one job per sweep point, renders the sbatch array script and would run ``sbatch``; here
its probe for ``srun`` answers yes and the ``sbatch`` call is replaced: OUT_DIR/sbatch.sh gets the rendered script and OUT_DIR/jobs.json, for
each job, the overrides and the launcher parameters submitit would run it with. Then it exits 0
(nothing is run; no training starts).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    from submitit.slurm import slurm

    process = slurm.SlurmExecutor._internal_process_submissions

    def record_jobs(self, delayed_submissions):
        jobs = [{"overrides": list(d.args[0]), "job_num": d.args[2],
                 "launcher": type(d.function).__name__, "params": d.function.params}
                for d in delayed_submissions]
        (out / "jobs.json").write_text(json.dumps(jobs, indent=1, default=str))
        return process(self, delayed_submissions)

    def no_sbatch(self, command):
        (out / "sbatch.sh").write_text(self._make_submission_file_text(command, "dryrun"))
        raise SystemExit(0)     # not an Exception: Hydra's error reporting lets it through

    slurm.SlurmExecutor.affinity = classmethod(lambda cls: 1)   # "is srun there?"
    slurm.SlurmExecutor._internal_process_submissions = record_jobs
    slurm.SlurmExecutor._submit_command = no_sbatch
    sys.argv = ["train", "-m", *sys.argv[2:]]
    from train.__main__ import main as train_main

    train_main()
    raise SystemExit("the launcher never tried to submit")


if __name__ == "__main__":
    main()
