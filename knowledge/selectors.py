"""Reads on the knowledge base, scoped to the current tenant's schema and checked against the
caller's permissions. Ids of other tenants do not exist here (schema isolation), so a foreign
id is simply "not found"."""

from __future__ import annotations

from django.db.models import QuerySet

from config.errors import NotFound, ValidationFailed
from config.ratelimit import rate_limit_hit
from knowledge.models import Chunk, Collection, Document
from tenants.principal import Principal


def collection_list(*, principal: Principal) -> QuerySet[Collection]:
    """Collections with their document counts, by name. Raises ``Forbidden`` without ``kb:read``."""
    principal.require("kb:read")
    from django.db.models import Count

    return Collection.objects.annotate(document_count=Count("documents")).order_by("name")


def collection_get(*, principal: Principal, collection_id: int) -> Collection:
    collection = collection_list(principal=principal).filter(pk=collection_id).first()
    if collection is None:
        raise NotFound("No such collection.")
    return collection


def collections_for_search(*, principal: Principal, collection_ids: list[int]) -> list[Collection]:
    """The collections a search names, in the order given; the search is counted against the
    plan's ``kb_searches_per_minute`` for the principal's key or member (``config.ratelimit``),
    so both the API and the console page call this once per search.

    Raises ``Forbidden`` without ``kb:read``, ``ValidationFailed`` for no ids, ``NotFound``
    naming the ids that are not this tenant's, ``TooManyRequests`` (``rate_limited``) past the
    limit. Only a search that would run is counted.
    """
    principal.require("kb:read")
    if not collection_ids:
        raise ValidationFailed("Choose at least one collection.", code="no_collections")
    wanted = list(dict.fromkeys(collection_ids))
    found = {c.pk: c for c in Collection.objects.filter(pk__in=wanted)}
    missing = [i for i in wanted if i not in found]
    if missing:
        raise NotFound(f"No such collection: {', '.join(map(str, missing))}.", details={"collection_ids": missing})
    rate_limit_hit(tenant=principal.tenant, principal=principal, limit="kb_searches_per_minute")
    return [found[i] for i in wanted]


def document_list(*, principal: Principal, collection: Collection | None = None,
                  status: str | None = None) -> QuerySet[Document]:
    """Documents, newest first, without their (possibly large) inline source text."""
    principal.require("kb:read")
    documents = Document.objects.select_related("collection").defer("source_text")
    if collection is not None:
        documents = documents.filter(collection=collection)
    if status:
        if status not in Document.Status.values:
            raise ValidationFailed(f"Unknown status '{status}'.", code="invalid_status")
        documents = documents.filter(status=status)
    return documents.order_by("-id")


def document_get(*, principal: Principal, document_id: int) -> Document:
    document = document_list(principal=principal).filter(pk=document_id).first()
    if document is None:
        raise NotFound("No such document.")
    return document


def chunk_list(*, principal: Principal, document: Document) -> QuerySet[Chunk]:
    """A document's chunks in order, without their vectors."""
    principal.require("kb:read")
    return Chunk.objects.filter(document=document).defer("embedding").order_by("ordinal")
