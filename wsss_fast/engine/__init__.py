"""The one training loop, typed configs, schedules, checkpoints and distributed set-up.

Example::

    from wsss_fast.engine import load_config, train
    cfg = load_config("configs/aream_voc.yaml", ["optim.lr=1e-4", "train.epochs=3"])
    result = train(cfg, method)   # method: build_model(cfg), training_step(model, batch, info)

Under ``torchrun --nproc_per_node=N`` the same call trains with DistributedDataParallel.
"""

from wsss_fast.engine.blocks import checkpoint_blocks
from wsss_fast.engine.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from wsss_fast.engine.config import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    register_section,
    save_config,
)
from wsss_fast.engine.distributed import DistInfo
from wsss_fast.engine.loop import Method, StepInfo, TrainResult, build_train_dataset, train
from wsss_fast.engine.schedule import (
    WarmupCosineLR,
    WarmupPolyLR,
    build_optimizer,
    build_scheduler,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DistInfo",
    "EvalConfig",
    "Method",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "WarmupCosineLR",
    "WarmupPolyLR",
    "apply_overrides",
    "build_optimizer",
    "build_scheduler",
    "build_train_dataset",
    "checkpoint_blocks",
    "config_from_dict",
    "config_to_dict",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_config",
    "register_section",
    "save_checkpoint",
    "save_config",
    "train",
]
