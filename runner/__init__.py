"""runner: a cost-aware batch job runner for LLM chat requests."""

from runner.jobs import JobSummary, read_job, validate_job
from runner.models import ChatRequest, Outcome, Quote, Usage

__all__ = ["ChatRequest", "JobSummary", "Outcome", "Quote", "Usage", "read_job", "validate_job"]
