"""Task library: functional problems and the families that sample them."""

from learned_opt.tasks.base import Batch, Task, TaskFamily, draw

__all__ = ["Batch", "Task", "TaskFamily", "draw"]
