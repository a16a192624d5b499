"""IngestServicer: the thin gRPC layer of the ingest service (proto in, domain call, proto out).

The document RPCs delegate to DocumentService (services/ingest/documentservice.py), the
repository RPCs to RepositoryManager (services/ingest/repositories.py), always for the verified
caller's tenant; the GitHub webhook, which has no caller, to WebhookReceiver
(services/ingest/webhooks.py). RPCs not built yet raise `Unimplemented` naming their capability and
the ingest service issue that delivers it, so callers get UNIMPLEMENTED with an `ErrorInfo`, never
a made-up result.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import empty_pb2
from kotadb.v1 import document_pb2, ingest_pb2, ingest_pb2_grpc, job_pb2, repository_pb2

from services.common.errors import PermissionDenied
from services.common.identity import require_identity
from services.ingest import convert
from services.ingest.documents import DocumentInput
from services.ingest.documentservice import DocumentService, parse_id
from services.ingest.documentstore import ListFilter
from services.ingest.jobs import JobService
from services.ingest.repositories import RepositoryManager
from services.ingest.repostore import RepositoryRecord
from services.ingest.store import IngestStore
from services.ingest.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    Delivery,
    WebhookReceiver,
)
from services.search.engine.languages import normalize_language

DELIVERED_BY = "delivered by the ingest service issue"
# The request headers a webhook delivery reads (they arrive as gRPC metadata).
WEBHOOK_HEADERS = frozenset({EVENT_HEADER, DELIVERY_HEADER, SIGNATURE_HEADER})


def _tenant() -> uuid.UUID:
    """_tenant is the verified caller's user id: documents always belong to one tenant."""
    identity = require_identity()
    if identity.user_id is None:
        raise PermissionDenied(
            "document calls act for one user; this caller has none", reason="TENANT_REQUIRED"
        )
    return identity.user_id


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """IngestServicer answers `kotadb.v1.IngestService`; it translates and delegates, nothing more."""

    def __init__(
        self,
        store: IngestStore,
        *,
        documents: DocumentService,
        repositories: RepositoryManager,
        webhooks: WebhookReceiver,
        jobs: JobService,
    ) -> None:
        self._store = store
        self._documents = documents
        self._repositories = repositories
        self._webhooks = webhooks
        self._jobs = jobs

    async def UpsertDocuments(
        self, request: ingest_pb2.UpsertDocumentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.UpsertDocumentsResponse:
        """UpsertDocuments writes a batch of documents in one transaction; bad items are answered per item."""
        items = [convert.document_input_from_proto(d) for d in request.documents]
        outcome = await self._documents.upsert(_tenant(), items, request.request_id)
        return ingest_pb2.UpsertDocumentsResponse(
            results=convert.write_results_to_proto(outcome.results), revision=outcome.revision
        )

    async def StreamUpsertDocuments(
        self,
        request_iterator: AsyncIterator[ingest_pb2.StreamUpsertDocumentsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingest_pb2.StreamUpsertDocumentsResponse:
        """StreamUpsertDocuments upserts a client stream of documents, committing in batches."""
        user_id = _tenant()

        async def items() -> AsyncIterator[tuple[DocumentInput, str]]:
            """items converts the stream's messages to (document, request id) pairs as they arrive."""
            async for message in request_iterator:
                yield convert.document_input_from_proto(message.document), message.request_id

        summary = await self._documents.upsert_stream(user_id, items())
        return ingest_pb2.StreamUpsertDocumentsResponse(
            results=convert.write_results_to_proto(summary.results),
            revision=summary.revision,
            document_count=summary.document_count,
            created_count=summary.created,
            updated_count=summary.updated,
            unchanged_count=summary.unchanged,
            rejected_count=summary.rejected,
            results_truncated=summary.truncated,
            batch_count=summary.batches,
        )

    async def GetDocument(
        self, request: ingest_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> document_pb2.Document:
        """GetDocument returns one of the caller's documents, with its content unless the view is BASIC."""
        with_content = request.view != ingest_pb2.DOCUMENT_VIEW_BASIC
        row = await self._documents.get(_tenant(), request.id, with_content=with_content)
        return convert.document_to_proto(row)

    async def ListDocuments(
        self, request: ingest_pb2.ListDocumentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.ListDocumentsResponse:
        """ListDocuments pages through the caller's documents by path, filtered, masked."""
        user_id = _tenant()
        fields = convert.read_mask_fields(request.read_mask)
        if fields is None:
            with_content = request.view == ingest_pb2.DOCUMENT_VIEW_FULL
        else:
            with_content = bool(fields & convert.CONTENT_FIELDS)
        filters = ListFilter(
            repository_id=parse_id(request.repository_id, "repository_id") if request.repository_id else None,
            path_prefix=request.path_prefix,
            language=(normalize_language(request.language) or request.language) if request.language else "",
            tag=request.tag,
            show_deleted=request.show_deleted,
        )
        rows, token = await self._documents.list_page(
            user_id,
            filters,
            page_size=request.page_size,
            page_token=request.page_token,
            with_content=with_content,
        )
        return ingest_pb2.ListDocumentsResponse(
            documents=[convert.document_to_proto(row, fields) for row in rows], next_page_token=token
        )

    async def DeleteDocument(
        self, request: ingest_pb2.DeleteDocumentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.DeleteDocumentResponse:
        """DeleteDocument tombstones a document; the change feed carries the deletion."""
        revision = await self._documents.delete(_tenant(), request.id)
        return ingest_pb2.DeleteDocumentResponse(id=request.id, revision=revision)

    async def CreateRepository(
        self, request: ingest_pb2.CreateRepositoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.CreateRepositoryResponse:
        """CreateRepository registers a repository and returns its webhook secret once."""
        created = await self._repositories.create(
            _tenant(),
            convert.repository_spec_from_proto(request.repository),
            access_token=request.access_token,
            request_id=request.request_id,
            sync=request.sync,
            key_id=require_identity().key_id,
        )
        response = ingest_pb2.CreateRepositoryResponse(
            repository=self._repository(created.repository), webhook_secret=created.webhook_secret
        )
        if created.job is not None:
            response.job.CopyFrom(convert.job_to_proto(created.job))
        return response

    async def GetRepository(
        self, request: ingest_pb2.GetRepositoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> repository_pb2.Repository:
        """GetRepository returns one of the caller's repositories."""
        record = await self._repositories.get(_tenant(), parse_id(request.id, "id"))
        return self._repository(record)

    async def ListRepositories(
        self, request: ingest_pb2.ListRepositoriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.ListRepositoriesResponse:
        """ListRepositories pages through the caller's repositories by name."""
        records, token = await self._repositories.list(
            _tenant(), page_size=request.page_size, page_token=request.page_token
        )
        return ingest_pb2.ListRepositoriesResponse(
            repositories=[self._repository(record) for record in records], next_page_token=token
        )

    async def UpdateRepository(
        self, request: ingest_pb2.UpdateRepositoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> repository_pb2.Repository:
        """UpdateRepository changes the fields in update_mask: branch, globs, size limit."""
        repository_id = parse_id(request.repository.id, "repository.id")
        change = convert.filter_change_from_proto(request)
        return self._repository(await self._repositories.update(_tenant(), repository_id, change))

    async def RotateWebhookSecret(
        self, request: ingest_pb2.RotateWebhookSecretRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.RotateWebhookSecretResponse:
        """RotateWebhookSecret replaces a repository's webhook secret and returns the new one once."""
        record, secret = await self._repositories.rotate_webhook_secret(_tenant(), parse_id(request.id, "id"))
        return ingest_pb2.RotateWebhookSecretResponse(
            repository=self._repository(record), webhook_secret=secret
        )

    async def DeleteRepository(
        self, request: ingest_pb2.DeleteRepositoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        """DeleteRepository removes a repository and its jobs; its documents become tombstones."""
        await self._repositories.delete(_tenant(), parse_id(request.id, "id"))
        return empty_pb2.Empty()

    async def SyncRepository(
        self, request: ingest_pb2.SyncRepositoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> job_pb2.Job:
        """SyncRepository queues a sync of one of the caller's repositories and returns the job."""
        identity = require_identity()
        job = await self._jobs.sync_repository(
            _tenant(),
            request.id,
            full=request.full,
            commit_sha=request.commit_sha,
            request_id=request.request_id,
            key_id=identity.key_id,
        )
        return convert.job_to_proto(job)

    def _repository(self, record: RepositoryRecord) -> repository_pb2.Repository:
        return convert.repository_to_proto(record, self._repositories.webhook_url(record.id))

    async def GetJob(
        self, request: ingest_pb2.GetJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> job_pb2.Job:
        """GetJob returns one of the caller's indexing jobs."""
        return convert.job_to_proto(await self._jobs.get(_tenant(), request.id))

    async def ListJobs(
        self, request: ingest_pb2.ListJobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.ListJobsResponse:
        """ListJobs pages through the caller's indexing jobs, newest first."""
        jobs, token = await self._jobs.list(
            _tenant(),
            page_size=request.page_size,
            page_token=request.page_token,
            repository=request.repository_id,
            states=[convert.job_state_from_proto(state) for state in request.states],
        )
        return ingest_pb2.ListJobsResponse(
            jobs=[convert.job_to_proto(j) for j in jobs], next_page_token=token
        )

    async def CancelJob(
        self, request: ingest_pb2.CancelJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> job_pb2.Job:
        """CancelJob cancels a queued job, or asks a running one to stop at its next checkpoint."""
        return convert.job_to_proto(await self._jobs.cancel(_tenant(), request.id))

    async def WatchJob(
        self, request: ingest_pb2.WatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[job_pb2.JobEvent]:
        """WatchJob streams a job's events from after_sequence until the job has ended."""
        async for event in self._jobs.watch(_tenant(), request.id, after=request.after_sequence):
            yield convert.job_event_to_proto(event)

    async def ReceiveGithubWebhook(
        self, request: ingest_pb2.ReceiveGithubWebhookRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.ReceiveGithubWebhookResponse:
        """ReceiveGithubWebhook verifies a delivery's signature, records it and queues what it asks for.

        No identity: the HMAC under the repository's secret authenticates the call.
        """
        headers = {
            key: value
            for key, value in (context.invocation_metadata() or ())
            if isinstance(value, str) and key in WEBHOOK_HEADERS
        }
        outcome = await self._webhooks.receive(
            Delivery(
                repository_id=request.repository_id,
                headers=headers,
                body=request.body.data,
                content_type=request.body.content_type or "application/json",
            )
        )
        response = ingest_pb2.ReceiveGithubWebhookResponse(
            delivery_id=outcome.delivery_id,
            event=outcome.event,
            duplicate=outcome.duplicate,
            ignored_reason=outcome.ignored_reason,
        )
        if outcome.job is not None:
            response.job.CopyFrom(convert.job_to_proto(outcome.job))
        return response
