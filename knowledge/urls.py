from django.urls import path

from knowledge import views

urlpatterns = [
    path("", views.collection_list, name="collection_list"),
    path("collections/<int:collection_id>/", views.collection_detail, name="collection_detail"),
    path("collections/<int:collection_id>/upload/", views.collection_upload, name="collection_upload"),
    path("collections/<int:collection_id>/delete/", views.collection_delete, name="collection_delete"),
    path("documents/<int:document_id>/", views.document_detail, name="document_detail"),
    path("documents/<int:document_id>/reindex/", views.document_reindex, name="document_reindex"),
    path("documents/<int:document_id>/delete/", views.document_delete, name="document_delete"),
    path("search/", views.search_playground, name="kb_search"),
]
