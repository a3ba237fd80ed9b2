"""When vibe checks run, and how their results reach the trainer's logs: one schedule, one callback.

Schedule (`VibeSchedule`): a baseline before the first step (a fresh run only: a resumed run already has one),
every `vibe_steps` steps, or with `vibe_steps: null` at each evaluation and each checkpoint save, and after the last
step. A step is never checked twice (an evaluation and a save at the same step make one check).

`VibeCallback` is a `transformers.TrainerCallback` for transformers' `Trainer`, every TRL trainer built on it (SFT,
DPO, ORPO, GRPO, RLOO) and the toolkit's PPO trainer, which fires the same events (a step there is a PPO update).
What differs between trainers is where the scores go, which a `VibeHost` says:
- `TrainerHost` (transformers' `Trainer`): the per-category scores go through `transformers.Trainer.log`, so they
  land in tensorboard as `train/vibes/<category>/<metric>` beside `train/loss` and in `trainer_state.json`'s log
  history. The base class's `log` is called on purpose: TRL's trainers override `log` to flush their running
  metrics (token accuracy, reward margins, ...) into whatever is logged, and a vibe check must not cut their
  averaging windows short. Answers go to tensorboard's text tab through the TensorBoard callback's own writer.
- a trainer with its own `vibe_host()` (the PPO trainer): scores and answers go to its accelerate trackers.

Either way the records go to `OUTPUT_DIR/vibes.jsonl` (`dbrx_tune.evals.vibes.check`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback

from dbrx_tune.evals.vibes.check import VibeChecker, VibeCheckResult
from dbrx_tune.evals.vibes.generation import needs_every_rank


class VibeHost(Protocol):
    """What a vibe check needs from the trainer it runs in."""

    def generating_model(self) -> nn.Module:
        """The model that answers (unwrapped from DeepSpeed/DDP; a PEFT model with LoRA)."""

    def engine(self) -> Any:
        """The DeepSpeed engine (or other wrapper) training that model, or the model itself."""

    def is_main(self) -> bool: ...

    def log_result(self, result: VibeCheckResult) -> None:
        """Put the check's scores and answers into the trainer's logs."""


class TrainerHost:
    """`VibeHost` of a transformers/TRL `Trainer`."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def generating_model(self) -> nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def engine(self) -> Any:
        return self.trainer.model_wrapped

    def is_main(self) -> bool:
        return self.trainer.is_world_process_zero()

    def log_result(self, result: VibeCheckResult) -> None:
        trainer = self.trainer
        # Logging resets `control.should_log`: a check right after a step the trainer is about to log would swallow
        # that step's loss. The trainer's flow decisions are put back as they were.
        flow = dataclasses.asdict(trainer.control)
        Trainer.log(trainer, dict(result.scalars))  # not TRL's override: see the module docstring
        for name, value in flow.items():
            setattr(trainer.control, name, value)
        # After `log`: the TensorBoard callback opens its writer on the first log if it has none.
        writer = next(
            (
                callback.tb_writer
                for callback in trainer.callback_handler.callbacks
                if isinstance(callback, TensorBoardCallback)
            ),
            None,
        )
        if writer is None:
            return
        for tag, text in result.answer_texts().items():
            writer.add_text(tag, text, result.step)
        writer.flush()


def vibe_host(trainer: Any) -> VibeHost:
    """The host of `trainer`: its own `vibe_host()` if it has one, else that of a transformers `Trainer`."""
    return trainer.vibe_host() if hasattr(trainer, "vibe_host") else TrainerHost(trainer)


class VibeSchedule:
    """Decides whether a trainer event at `step` triggers a check (see the module docstring)."""

    def __init__(self, every: int | None):
        self.every = every
        self.last_step: int | None = None

    def due(self, step: int, *events: str) -> bool:
        """`events` at `step`: 'start' (before training), 'step' (after an optimizer step), 'checkpoint' (an
        evaluation or a save) or 'end' (after the last step). Marks the step as checked when it returns True."""
        wanted = {
            "start": step == 0,
            "step": self.every is not None and step % self.every == 0,
            "checkpoint": self.every is None,
            "end": True,
        }
        if not any(wanted[event] for event in events) or step == self.last_step:
            return False
        self.last_step = step
        return True


class VibeCallback(TrainerCallback):
    """Vibe checks in a trainer (attach with `trainer.add_callback(VibeCallback(trainer, checker, every))`)."""

    def __init__(self, trainer: Any, checker: VibeChecker, every: int | None):
        self.host = vibe_host(trainer)
        self.checker = checker
        self.schedule = VibeSchedule(every)

    def on_train_begin(self, args, state, control, **kwargs):
        self._maybe_check(state.global_step, "start")

    def on_step_end(self, args, state, control, **kwargs):
        # The trainer has decided by now whether it evaluates and saves after this step: checking first puts the
        # step's scores into the checkpoint's log history too.
        events = ["step"]
        if control.should_evaluate or control.should_save:
            events.append("checkpoint")
        if state.global_step >= state.max_steps:
            events.append("end")
        self._maybe_check(state.global_step, *events)

    def on_evaluate(self, args, state, control, **kwargs):
        self._maybe_check(state.global_step, "checkpoint")  # evaluations decided at an epoch's end, or on request

    def on_save(self, args, state, control, **kwargs):
        self._maybe_check(state.global_step, "checkpoint")  # saves decided at an epoch's end

    def on_train_end(self, args, state, control, **kwargs):
        self._maybe_check(state.global_step, "end")  # training stopped before max_steps

    def _maybe_check(self, step: int, *events: str) -> None:
        if not self.schedule.due(step, *events):
            return
        model = self.host.generating_model()
        result = self.checker.run(
            model, step, is_main=self.host.is_main(), every_rank=needs_every_rank(model), engine=self.host.engine()
        )
        if result is not None:
            self.host.log_result(result)
