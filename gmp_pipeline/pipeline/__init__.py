"""From a reader to a store: :mod:`.plan` (task ranges), :mod:`.tasks` (the frozen
:class:`~.tasks.TaskSpec` and :func:`~.tasks.run_task`, what a worker runs), :mod:`.executors`
(the Dask client or this process) and :mod:`.run` (:func:`featurize_to_store`, the one
execution path)."""
from .plan import plan_tasks
from .run import RunSummary, check_derivative_atoms, check_source, featurize_to_store
from .tasks import TaskSpec, run_task

__all__ = ["plan_tasks", "RunSummary", "check_derivative_atoms", "check_source", "featurize_to_store", "TaskSpec", "run_task"]
