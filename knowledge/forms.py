"""Console forms of the knowledge base (shape only; rules live in the services)."""

from __future__ import annotations

from typing import Any

from django import forms

from knowledge.models import LANGUAGES


class CollectionForm(forms.Form):
    name = forms.CharField(max_length=200)
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    chunk_size_tokens = forms.IntegerField(min_value=1, initial=200, label="Chunk size (tokens)")
    chunk_overlap_tokens = forms.IntegerField(min_value=0, initial=32, label="Overlap (tokens)")
    language = forms.ChoiceField(choices=LANGUAGES, initial="english",
                                 help_text="Stemming and stop words for keyword search")


class SearchForm(forms.Form):
    query = forms.CharField(max_length=2000)
    collections = forms.MultipleChoiceField(choices=[], widget=forms.CheckboxSelectMultiple)
    mode = forms.ChoiceField(choices=[("hybrid", "Hybrid"), ("vector", "Vector"), ("keyword", "Keyword (BM25)")],
                             initial="hybrid")
    fusion = forms.ChoiceField(choices=[("convex", "Convex combination"), ("rrf", "Reciprocal rank fusion")],
                               initial="convex", required=False)
    top_k = forms.IntegerField(min_value=1, max_value=50, initial=10, label="Top k")
    max_chunks_per_document = forms.TypedChoiceField(
        choices=[("", "No limit"), ("1", "1 (best chunk only)"), ("2", "Up to 2"),
                 ("3", "Up to 3")],
        coerce=int, empty_value=None, required=False, label="Chunks per document")

    def __init__(self, *args: Any, collections: list[Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["collections"]
        field.choices = [(str(c.pk), c.name) for c in collections or []]  # type: ignore[attr-defined]

    def clean_fusion(self) -> str:
        return self.cleaned_data.get("fusion") or "convex"
