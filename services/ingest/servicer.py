"""IngestServicer: the thin gRPC layer of the ingest service (proto in, domain call, proto out).

No ingest RPC is built yet. Each one raises `Unimplemented` naming its capability and the
ingest service issue that delivers it, so callers get UNIMPLEMENTED with an `ErrorInfo`, never a
made-up result.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import empty_pb2
from kotadb.v1 import document_pb2, ingest_pb2, ingest_pb2_grpc, job_pb2, repository_pb2

from services.common.errors import Unimplemented
from services.ingest.store import IngestStore

DELIVERED_BY = "delivered by the ingest service issue"


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """IngestServicer answers `kotadb.v1.IngestService`; it translates and delegates, nothing more."""

    def __init__(self, store: IngestStore) -> None:
        self._store = store

    async def UpsertDocuments(
        self, request: ingest_pb2.UpsertDocumentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.UpsertDocumentsResponse:
        """UpsertDocuments writes a batch of documents in one transaction. Not built yet."""
        raise Unimplemented(f"document upserts (UpsertDocuments), {DELIVERED_BY}")

    async def StreamUpsertDocuments(
        self,
        request_iterator: AsyncIterator[ingest_pb2.StreamUpsertDocumentsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingest_pb2.StreamUpsertDocumentsResponse:
        """StreamUpsertDocuments upserts a client stream of documents in batches. Not built yet."""
        raise Unimplemented(f"streamed document upserts (StreamUpsertDocuments), {DELIVERED_BY}")

    async def GetDocument(
        self, request: ingest_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> document_pb2.Document:
        """GetDocument returns one document. Not built yet."""
        raise Unimplemented(f"document reads (GetDocument), {DELIVERED_BY}")

    async def ListDocuments(
        self, request: ingest_pb2.ListDocumentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.ListDocumentsResponse:
        """ListDocuments pages through the caller's documents. Not built yet."""
        raise Unimplemented(f"document listing (ListDocuments), {DELIVERED_BY}")

    async def DeleteDocument(
        self, request: ingest_pb2.DeleteDocumentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.DeleteDocumentResponse:
        """DeleteDocument removes a document and records its tombstone. Not built yet."""
        raise Unimplemented(f"document deletion (DeleteDocument), {DELIVERED_BY}")

    async def CreateRepository(
        self, request: ingest_pb2.CreateRepositoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.CreateRepositoryResponse:
        """CreateRepository registers a repository and returns its webhook secret once. Not built yet."""
        raise Unimplemented(f"repository registration (CreateRepository), {DELIVERED_BY}")

    async def GetRepository(
        self, request: ingest_pb2.GetRepositoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> repository_pb2.Repository:
        """GetRepository returns one repository. Not built yet."""
        raise Unimplemented(f"repository reads (GetRepository), {DELIVERED_BY}")

    async def ListRepositories(
        self, request: ingest_pb2.ListRepositoriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.ListRepositoriesResponse:
        """ListRepositories pages through the caller's repositories. Not built yet."""
        raise Unimplemented(f"repository listing (ListRepositories), {DELIVERED_BY}")

    async def UpdateRepository(
        self, request: ingest_pb2.UpdateRepositoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> repository_pb2.Repository:
        """UpdateRepository changes a repository's branch, globs and limits. Not built yet."""
        raise Unimplemented(f"repository updates (UpdateRepository), {DELIVERED_BY}")

    async def RotateWebhookSecret(
        self, request: ingest_pb2.RotateWebhookSecretRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.RotateWebhookSecretResponse:
        """RotateWebhookSecret replaces a repository's webhook secret. Not built yet."""
        raise Unimplemented(f"webhook secret rotation (RotateWebhookSecret), {DELIVERED_BY}")

    async def DeleteRepository(
        self, request: ingest_pb2.DeleteRepositoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        """DeleteRepository removes a repository and its documents. Not built yet."""
        raise Unimplemented(f"repository deletion (DeleteRepository), {DELIVERED_BY}")

    async def SyncRepository(
        self, request: ingest_pb2.SyncRepositoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> job_pb2.Job:
        """SyncRepository queues a job that clones and indexes a repository. Not built yet."""
        raise Unimplemented(f"repository sync jobs (SyncRepository), {DELIVERED_BY}")

    async def GetJob(
        self, request: ingest_pb2.GetJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> job_pb2.Job:
        """GetJob returns one indexing job. Not built yet."""
        raise Unimplemented(f"job reads (GetJob), {DELIVERED_BY}")

    async def ListJobs(
        self, request: ingest_pb2.ListJobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.ListJobsResponse:
        """ListJobs pages through the caller's indexing jobs. Not built yet."""
        raise Unimplemented(f"job listing (ListJobs), {DELIVERED_BY}")

    async def CancelJob(
        self, request: ingest_pb2.CancelJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> job_pb2.Job:
        """CancelJob stops a queued or running job. Not built yet."""
        raise Unimplemented(f"job cancellation (CancelJob), {DELIVERED_BY}")

    async def WatchJob(
        self, request: ingest_pb2.WatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[job_pb2.JobEvent]:
        """WatchJob streams a job's events until it finishes. Not built yet."""
        raise Unimplemented(f"job event streaming (WatchJob), {DELIVERED_BY}")
        # Unreachable, but it makes this an async generator: the shape grpc.aio streams from.
        yield

    async def ReceiveGithubWebhook(
        self, request: ingest_pb2.ReceiveGithubWebhookRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.ReceiveGithubWebhookResponse:
        """ReceiveGithubWebhook verifies and records a GitHub webhook delivery. Not built yet."""
        raise Unimplemented(f"GitHub webhook deliveries (ReceiveGithubWebhook), {DELIVERED_BY}")
