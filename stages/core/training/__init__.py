"""What every stage shares around its TRL trainer, by responsibility:

- ``args``: ``TrainingConfig``, the TRL arguments built from it, trackers, callbacks, seeding and
  process helpers;
- ``fitting``: ``fit`` itself (resume, interruption, the numerical guard, decay steps);
- ``checkpoints``: checkpoints written aside, sealed with checksums and renamed into place;
- ``outputs``: ``StageOutput`` (the atomic output directory), manifests, checksums, ``verify_output``;
- ``trainer_callbacks``: rich progress, ``NonFiniteGuard``, ``CheckpointControl``;
- ``losses``: SFT's loss on labelled positions only (``sft_trainer_class``).

The names stages use are re-exported here; the last two modules import transformers, so they are not.
"""

from stages.core.training.args import (MANAGED_TRL_ARGS, Scheduler, TrainingConfig, available_trackers, barrier,
                                       callbacks, check_trl_args, effective_batch, is_main_process, quiet_trainer,
                                       say, seed_everything, trainer_args, world_size)
from stages.core.training.checkpoints import (CHECKPOINT_MANIFEST, PENDING_CHECKPOINTS, checkpoint_bytes_needed,
                                              checkpoint_problem, last_checkpoint, seal_checkpoint)
from stages.core.training.fitting import Interrupted, StopRequest, decay_steps, fit, resume_command
from stages.core.training.outputs import (StageOutput, check_free_disk, check_interrupted, file_checksums,
                                          fsync_dir, fsync_tree, git_commit, package_versions, perplexity, sha256_of,
                                          stage_output_dir, trainable_parameters, verify_output, write_durably)

__all__ = [
    "CHECKPOINT_MANIFEST", "MANAGED_TRL_ARGS", "PENDING_CHECKPOINTS", "Interrupted", "Scheduler", "StageOutput",
    "StopRequest", "TrainingConfig", "available_trackers", "barrier", "callbacks", "check_free_disk",
    "check_interrupted", "check_trl_args", "checkpoint_bytes_needed", "checkpoint_problem", "decay_steps",
    "effective_batch", "file_checksums", "fit", "fsync_dir", "fsync_tree", "git_commit", "is_main_process",
    "last_checkpoint", "package_versions", "perplexity", "quiet_trainer", "resume_command", "say",
    "seal_checkpoint", "seed_everything", "sha256_of", "stage_output_dir", "trainable_parameters", "trainer_args",
    "verify_output", "world_size", "write_durably",
]
