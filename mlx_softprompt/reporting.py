"""Training metrics to TensorBoard or Weights & Biases (`train --report-to`, as `mlx_lm.lora`).

Each metrics line `train` writes to its JSONL file (a training report or a validation)
is also sent to every reporter asked for, at its step. The packages are optional: asking
for one that is not installed is a one-line error before training starts.
"""

from pathlib import Path
from typing import List, Optional

from .errors import UserError

CHOICES = ("tensorboard", "wandb")


# what each reporter can write with (any one of them), and the package to suggest
WRITERS = {"tensorboard": (("torch", "tensorboard"), ("tensorboardX",)), "wandb": (("wandb",),)}
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _installed(name: str) -> bool:
    from importlib.util import find_spec

    return any(all(find_spec(m) is not None for m in mods) for mods in WRITERS[name])


def parse(report_to: Optional[str]) -> List[str]:
    """"tensorboard,wandb" -> ["tensorboard", "wandb"]; unknown or uninstalled ones are an error
    (checked before training starts)."""
    names = [x.strip().lower() for x in str(report_to or "").split(",") if x.strip()]
    for name in names:
        if name not in CHOICES:
            raise UserError(f"--report-to {name!r}: choose from {', '.join(CHOICES)}")
        if not _installed(name):
            raise UserError(f"--report-to {name}: the {INSTALL[name]} package is not installed "
                            f"(pip install {INSTALL[name]})")
    return names


class TensorBoard:
    def __init__(self, log_dir: Path, config: dict, run_name: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise UserError("--report-to tensorboard: the tensorboard package is not installed "
                                "(pip install tensorboard)")
        self.writer = SummaryWriter(log_dir=str(Path(log_dir) / run_name))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, step: int, record: dict) -> None:
        prefix = "val" if "val_loss" in record else "train"
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, log_dir: Path, config: dict, run_name: str, project: Optional[str] = None):
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb: the wandb package is not installed (pip install wandb)")
        self.wandb = wandb
        self.run = wandb.init(project=project or "mlx-softprompt", name=run_name, dir=str(log_dir), config=config)

    def log(self, step: int, record: dict) -> None:
        self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                       step=step)

    def close(self) -> None:
        self.run.finish()


def open_reporters(report_to: Optional[str], log_dir, config: dict, run_name: str,
                   project: Optional[str] = None) -> list:
    out = []
    for name in parse(report_to):
        out.append(TensorBoard(log_dir, config, run_name) if name == "tensorboard"
                   else WandB(log_dir, config, run_name, project))
    return out
