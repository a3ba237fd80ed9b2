"""When vibe checks run, and how their results reach the trainer's logs: one schedule, two trainer hooks.

Schedule (`VibeSchedule`): a baseline before the first step (a fresh run only: a resumed run already has one),
every `vibe_steps` steps, or with `vibe_steps: null` at each evaluation and each checkpoint save, and after the last
step. A step is never checked twice (an evaluation and a save at the same step make one check).

- `VibeCallback` for transformers' `Trainer` and every TRL trainer built on it (SFT, DPO, ORPO, GRPO, RLOO). The
  per-category scores go through `transformers.Trainer.log`, so they land in tensorboard as
  `train/vibes/<category>/<metric>` beside `train/loss` and in `trainer_state.json`'s log history. The base class's
  `log` is called on purpose: TRL's trainers override `log` to flush their running metrics (token accuracy, reward
  margins, ...) into whatever is logged, and a vibe check must not cut their averaging windows short. Answers go to
  tensorboard's text tab through the TensorBoard callback's own writer.
- `PPOVibeCallback` for `dbrx_tune.ppo.PPOTrainer`, whose steps are PPO updates. Scores and answers go to its
  accelerate trackers (tensorboard); its log history keeps the update metrics only.

Either way the records go to `OUTPUT_DIR/vibes.jsonl` (`dbrx_tune.vibes.check`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback

from dbrx_tune.vibes.check import VibeCheckResult, VibeChecker
from dbrx_tune.vibes.generation import needs_every_rank

if TYPE_CHECKING:
    from dbrx_tune.ppo.trainer import PPOTrainer


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
    """Vibe checks in a transformers/TRL `Trainer` (attach with `trainer.add_callback`)."""

    def __init__(self, trainer: Trainer, checker: VibeChecker, every: int | None):
        self.trainer = trainer
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
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        result = self.checker.run(model, step, is_main=trainer.is_world_process_zero(),
                                  every_rank=needs_every_rank(model), engine=trainer.model_wrapped)
        if result is not None:
            # Logging resets `control.should_log`: a check right after a step the trainer is about to log would
            # swallow that step's loss. The trainer's flow decisions are put back as they were.
            flow = dataclasses.asdict(trainer.control)
            Trainer.log(trainer, dict(result.scalars))  # not TRL's override: see the module docstring
            for name, value in flow.items():
                setattr(trainer.control, name, value)
            self._write_answers(result)

    def _write_answers(self, result: VibeCheckResult) -> None:
        # After `log`: the TensorBoard callback opens its writer on the first log if it has none.
        writer = next((callback.tb_writer for callback in self.trainer.callback_handler.callbacks
                       if isinstance(callback, TensorBoardCallback)), None)
        if writer is None:
            return
        for tag, text in result.answer_texts().items():
            writer.add_text(tag, text, result.step)
        writer.flush()


class PPOVibeCallback:
    """Vibe checks in `dbrx_tune.ppo.PPOTrainer` (attach with `trainer.add_callback`); steps are PPO updates."""

    def __init__(self, checker: VibeChecker, every: int | None):
        self.checker = checker
        self.schedule = VibeSchedule(every)

    def on_train_begin(self, trainer: PPOTrainer) -> None:
        self._maybe_check(trainer, "start")

    def on_update_end(self, trainer: PPOTrainer) -> None:
        self._maybe_check(trainer, "end" if trainer.state["global_step"] >= trainer.num_updates else "step")

    def on_save(self, trainer: PPOTrainer) -> None:
        self._maybe_check(trainer, "checkpoint")

    def on_train_end(self, trainer: PPOTrainer) -> None:
        self._maybe_check(trainer, "end")

    def _maybe_check(self, trainer: PPOTrainer, event: str) -> None:
        step = trainer.state["global_step"]
        if not self.schedule.due(step, event):
            return
        policy = trainer.policy
        result = self.checker.run(policy, step, is_main=trainer.accelerator.is_main_process,
                                  every_rank=needs_every_rank(policy), engine=trainer.model)
        if result is not None:
            trainer.accelerator.log({**result.scalars, **result.answer_texts()}, step=step)
