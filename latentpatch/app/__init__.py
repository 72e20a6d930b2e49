"""`latentpatch serve`: a local web app over the Python API (latents, patch, steer, circuits).

FastAPI and uvicorn are imported only when the app is built or served."""

from latentpatch.app.checks import AppLimits
from latentpatch.app.jobs import AppInputError, BusyError, Job, JobCancelled, JobRunner
from latentpatch.app.server import create_app
from latentpatch.app.workbench import Workbench

__all__ = ["AppInputError", "AppLimits", "BusyError", "Job", "JobCancelled", "JobRunner", "Workbench", "create_app"]
