"""Filter form of the audit page."""

from __future__ import annotations

from django import forms


class AuditFilterForm(forms.Form):
    actor = forms.CharField(required=False, max_length=254, label="Actor")
    action = forms.CharField(required=False, max_length=64, label="Action",
                             help_text="Exact, or a prefix ending in '.' (e.g. member.)")
    since = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, label="To (inclusive)", widget=forms.DateInput(attrs={"type": "date"}))
