"""All ORM models on one metadata, so Alembic sees every table."""

from app.models.base import Base, new_id, utcnow
from app.models.export import Export, ExportPart
from app.models.job import Job, JobBatch, JobTally, JobTrajectory, Verdict
from app.models.project import ApiKey, Project
from app.models.review import HumanLabel
from app.models.session import UiSession
from app.models.trajectory import Step, Trajectory, Upload

__all__ = [
    "ApiKey",
    "Base",
    "Export",
    "ExportPart",
    "HumanLabel",
    "Job",
    "JobBatch",
    "JobTally",
    "JobTrajectory",
    "Project",
    "Step",
    "Trajectory",
    "UiSession",
    "Upload",
    "Verdict",
    "new_id",
    "utcnow",
]
