"""Async jobs, batches and signed webhooks: ``JobsRouter`` around one async job function."""

from aimiddleware.jobs.context import JobContext, JobLimitExceeded
from aimiddleware.jobs.dispatcher import DEFAULT_SCHEDULE, WebhookDispatcher
from aimiddleware.jobs.models import (
    Batch,
    BatchCounts,
    BatchItem,
    BatchItemResult,
    Delivery,
    DeliveryAttempt,
    Job,
    JobError,
    JobStatus,
)
from aimiddleware.jobs.router import JobsRouter
from aimiddleware.jobs.runner import JobFunction, JobRunner
from aimiddleware.jobs.store import JobStore, make_store
from aimiddleware.jobs.taskiq_queue import TaskiqQueue
from aimiddleware.jobs.webhooks import CallbackPolicy, WebhookSigner, webhook_payload

__all__ = [
    "DEFAULT_SCHEDULE",
    "Batch",
    "BatchCounts",
    "BatchItem",
    "BatchItemResult",
    "CallbackPolicy",
    "Delivery",
    "DeliveryAttempt",
    "Job",
    "JobContext",
    "JobError",
    "JobFunction",
    "JobLimitExceeded",
    "JobRunner",
    "JobStatus",
    "JobStore",
    "JobsRouter",
    "TaskiqQueue",
    "WebhookDispatcher",
    "WebhookSigner",
    "make_store",
    "webhook_payload",
]
