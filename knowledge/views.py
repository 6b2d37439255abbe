"""Console pages of the knowledge base."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from config.errors import DomainError, TooManyRequests
from config.htmx import after_write, domain_errors_as_pages, is_fragment, render_page, toast
from config.middleware import body_limit_for
from knowledge import selectors, services
from knowledge.forms import CollectionForm, SearchForm
from knowledge.retrieval import SearchTimings, chunk_search
from tenants.principal import request_principal


@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def collection_list(request: HttpRequest) -> HttpResponse:
    """Collections; POST creates one."""
    principal = request_principal(request)
    form = CollectionForm(request.POST or None)
    if request.method == "POST":
        principal.require("kb:write")
        if form.is_valid():
            try:
                collection = services.collection_create(principal=principal, **form.cleaned_data)
            except DomainError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, f"Collection “{collection.name}” created. Upload documents to it.")
                return redirect("collection_detail", collection_id=collection.pk)
    return render_page(request, "knowledge/collection_list.html", {
        "collections": list(selectors.collection_list(principal=principal)),
        "form": form, "can_write": principal.can("kb:write"),
    }, status=422 if form.errors else 200)


def _detail_context(request: HttpRequest, collection_id: int, settings_form: CollectionForm | None = None
                    ) -> dict[str, Any]:
    principal = request_principal(request)
    collection = selectors.collection_get(principal=principal, collection_id=collection_id)
    documents = selectors.document_list(principal=principal, collection=collection)
    status = request.GET.get("status") or None
    if status:
        documents = documents.filter(status=status)
    page = Paginator(documents, 50).get_page(request.GET.get("page"))
    active = any(d.is_active for d in page.object_list)
    return {
        "collection": collection, "page": page, "active": active, "status": status or "",
        "can_write": principal.can("kb:write"),
        "max_upload_mb": settings.KB_MAX_UPLOAD_MB, "max_upload_bytes": body_limit_for(
            reverse("collection_upload", args=[collection.pk])),
        "settings_form": settings_form or CollectionForm(initial={
            "name": collection.name, "description": collection.description,
            "chunk_size_tokens": collection.chunk_size_tokens,
            "chunk_overlap_tokens": collection.chunk_overlap_tokens, "language": collection.language}),
    }


@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def collection_detail(request: HttpRequest, collection_id: int) -> HttpResponse:
    """A collection's documents with live status; POST changes its settings. htmx polls the
    ``document-table`` fragment every two seconds while a document is being indexed."""
    principal = request_principal(request)
    if request.method == "POST":
        principal.require("kb:write")
        form = CollectionForm(request.POST)
        if form.is_valid():
            collection = selectors.collection_get(principal=principal, collection_id=collection_id)
            try:
                services.collection_update(principal=principal, collection=collection, **form.cleaned_data)
            except DomainError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, "Settings saved. Changed chunking re-indexes every document.")
                return redirect("collection_detail", collection_id=collection_id)
        return render_page(request, "knowledge/collection_detail.html",
                           _detail_context(request, collection_id, form), status=422)
    return render_page(request, "knowledge/collection_detail.html", _detail_context(request, collection_id),
                       partial="document-table")


@require_POST
@domain_errors_as_pages
def collection_upload(request: HttpRequest, collection_id: int) -> HttpResponse:
    """Upload one or more files. Each file is judged on its own: good ones are stored and queued,
    duplicates point at the existing document, rejected ones are listed with the reason."""
    principal = request_principal(request)
    principal.require("kb:write")
    collection = selectors.collection_get(principal=principal, collection_id=collection_id)
    files = request.FILES.getlist("files")
    if not files:
        messages.error(request, "Choose at least one file.")
        return redirect("collection_detail", collection_id=collection_id)
    created = duplicates = 0
    problems: list[str] = []
    for upload in files:
        try:
            result = services.document_upload(principal=principal, collection=collection,
                                              filename=upload.name or "upload", data=upload.read())
        except DomainError as exc:
            problems.append(exc.message)
            continue
        created += len(result.created) + len(result.updated)
        duplicates += len(result.duplicates)
        problems.extend(f"{upload.name} line {e['line']}: {e['error']}" for e in result.line_errors[:20])
        if len(result.line_errors) > 20:
            problems.append(f"{upload.name}: {len(result.line_errors) - 20} more bad lines")
    summary = f"{created} document(s) queued for indexing"
    if duplicates:
        summary += f", {duplicates} already in the collection"
    if created or duplicates:
        messages.success(request, summary + ".")
    for problem in problems:
        messages.error(request, problem)
    return redirect("collection_detail", collection_id=collection_id)


@require_POST
@domain_errors_as_pages
def collection_delete(request: HttpRequest, collection_id: int) -> HttpResponse:
    principal = request_principal(request)
    collection = selectors.collection_get(principal=principal, collection_id=collection_id)
    if request.POST.get("confirm") != collection.name:
        messages.error(request, "Type the collection's name to confirm its deletion.")
        return redirect("collection_detail", collection_id=collection_id)
    services.collection_delete(principal=principal, collection=collection)
    messages.success(request, f"Collection “{collection.name}” and its documents were deleted.")
    return redirect("collection_list")


@require_GET
@domain_errors_as_pages
def document_detail(request: HttpRequest, document_id: int) -> HttpResponse:
    """A document: status, error, warnings and its chunks (page, heading path, tokens)."""
    principal = request_principal(request)
    document = selectors.document_get(principal=principal, document_id=document_id)
    chunks = Paginator(selectors.chunk_list(principal=principal, document=document), 25).get_page(
        request.GET.get("page"))
    return render_page(request, "knowledge/document_detail.html", {
        "document": document, "chunks": chunks, "can_write": principal.can("kb:write"),
        "warnings": document.metadata.get("warnings", []),
    }, partial="document-status")


@require_POST
@domain_errors_as_pages
def document_reindex(request: HttpRequest, document_id: int) -> HttpResponse:
    principal = request_principal(request)
    principal.require("kb:write")
    document = selectors.document_get(principal=principal, document_id=document_id)
    try:
        services.document_reindex(principal=principal, document=document)
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"“{document.title}” queued for indexing.")
    return redirect("document_detail", document_id=document_id)


@require_POST
@domain_errors_as_pages
def document_delete(request: HttpRequest, document_id: int) -> HttpResponse:
    principal = request_principal(request)
    document = selectors.document_get(principal=principal, document_id=document_id)
    services.document_delete(principal=principal, document=document)
    if is_fragment(request):
        return toast(HttpResponse(""), f"“{document.title}” deleted.")
    return after_write(request, message=f"“{document.title}” deleted.", fragment=lambda: HttpResponse(""),
                       redirect_to=reverse("collection_detail", kwargs={"collection_id": document.collection_id}))


@require_GET
@domain_errors_as_pages
def search_playground(request: HttpRequest) -> HttpResponse:
    """Run a query and show, for each chunk, its vector, keyword and fused scores and ranks."""
    principal = request_principal(request)
    collections = list(selectors.collection_list(principal=principal))
    data = None
    if "query" in request.GET:
        data = request.GET.copy()
        # A bare ?query= searches every collection in hybrid mode.
        if not data.getlist("collections"):
            data.setlist("collections", [str(c.pk) for c in collections])
        for key, default in (("mode", "hybrid"), ("fusion", "convex"), ("top_k", "10")):
            data.setdefault(key, default)
    # Unbound until a query is sent: "Search this collection" opens the form with its collection chosen.
    initial = {"collections": request.GET.getlist("collections")} if data is None else None
    form = SearchForm(data, collections=collections, initial=initial)
    context: dict[str, Any] = {"form": form, "collections": collections, "hits": None}
    if data is not None and form.is_valid():
        try:
            chosen = selectors.collections_for_search(
                principal=principal, collection_ids=[int(i) for i in form.cleaned_data["collections"]])
        except TooManyRequests as exc:
            return _search_refused(request, form, context, exc)
        timings = SearchTimings()
        try:
            context["hits"] = chunk_search(query=form.cleaned_data["query"], collections=chosen,
                                           top_k=form.cleaned_data["top_k"], mode=form.cleaned_data["mode"],
                                           fusion=form.cleaned_data["fusion"],
                                           max_chunks_per_document=form.cleaned_data["max_chunks_per_document"],
                                           timings=timings)
        except DomainError as exc:
            form.add_error(None, exc.message)
        context["timings"] = timings
        context["mode"] = form.cleaned_data["mode"]
    return render_page(request, "knowledge/search.html", context, partial="search-results")


def _search_refused(request: HttpRequest, form: SearchForm, context: dict[str, Any],
                    exc: TooManyRequests) -> HttpResponse:
    """The search page with the rate limit's message in place of results: status 429 with
    ``Retry-After``; an htmx request (which does not swap a 4xx answer) also gets it as a toast."""
    form.add_error(None, exc.message)
    response = render_page(request, "knowledge/search.html", context, partial="search-results", status=429)
    for name, value in exc.headers.items():
        response[name] = value
    return toast(response, exc.message, "danger") if is_fragment(request) else response
