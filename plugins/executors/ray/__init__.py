"""The Ray executor: each bench step a Ray task, on an existing cluster or a local one started for the run."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_executors(register):
    register(
        "ray",
        "mergeplug_plugins.executors.ray.executor:RayExecutor",
        description="Run bench steps as Ray tasks with their CPU/GPU needs (pip install 'mergeplug[ray]').",
        parameters=HERE / "parameters.json",
        reference="https://docs.ray.io/en/latest/ray-core/tasks.html",
    )
