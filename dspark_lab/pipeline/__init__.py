"""Pipeline schedules: one IR (:mod:`.ir`), generators from the papers (:mod:`.schedules`), an event-driven
simulator (:mod:`.simulate`), timeline pictures (:mod:`.show`), and a real executor over torch.distributed
(:mod:`.execute`, :mod:`.run`). See docs/pipeline.md."""

from dspark_lab.pipeline.checks import validate
from dspark_lab.pipeline.ir import Op, Schedule, ScheduleError
from dspark_lab.pipeline.schedules import SCHEDULES, build
from dspark_lab.pipeline.simulate import Costs, Simulation, simulate

__all__ = ["Costs", "Op", "SCHEDULES", "Schedule", "ScheduleError", "Simulation", "build", "simulate", "validate"]
