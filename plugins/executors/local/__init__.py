"""The local executor: a bench's steps in this process or in N worker processes on this machine."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_executors(register):
    register(
        "local",
        "mergeplug_plugins.executors.local.executor:LocalExecutor",
        description="Run bench steps on this machine: in-process (workers: 0) or in N worker processes.",
        parameters=HERE / "parameters.json",
    )
