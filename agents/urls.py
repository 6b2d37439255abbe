"""Console pages for agents, tools, approvals and chat (``/agents/``, ``/tools/``, ``/approvals/``,
``/chat/``)."""

from __future__ import annotations

from django.urls import URLPattern, path

from agents import approval_views, tool_views, views

urlpatterns: list[URLPattern] = [
    path("agents/", views.agent_list, name="agent_list"),
    path("agents/new/", views.agent_create, name="agent_create"),
    path("agents/<int:agent_id>/", views.agent_detail, name="agent_detail"),
    path("agents/<int:agent_id>/edit/", views.agent_version_new, name="agent_version_new"),
    path("agents/<int:agent_id>/diff/", views.agent_version_diff, name="agent_version_diff"),
    path("agents/<int:agent_id>/status/", views.agent_status, name="agent_status"),
    path("agents/<int:agent_id>/versions/<int:number>/publish/", views.agent_version_publish,
         name="agent_version_publish"),
    path("tools/", tool_views.tool_list, name="tool_list"),
    path("tools/new/", tool_views.tool_create, name="tool_create"),
    path("tools/<int:tool_id>/", tool_views.tool_edit, name="tool_edit"),
    path("tools/<int:tool_id>/delete/", tool_views.tool_delete, name="tool_delete"),
    path("tools/<int:tool_id>/test/", tool_views.tool_test, name="tool_test"),
    path("approvals/", approval_views.approval_list, name="approval_list"),
    path("approvals/<int:approval_id>/", approval_views.approval_detail, name="approval_detail"),
    path("approvals/<int:approval_id>/decide", approval_views.approval_decide, name="approval_decide"),
    path("chat/", views.chat_session_list, name="chat_session_list"),
    path("chat/<int:session_id>/", views.chat_session_detail, name="chat_session_detail"),
    path("chat/<int:session_id>/send", views.chat_message_send, name="chat_message_send"),
    path("chat/<int:session_id>/cancel", views.chat_turn_cancel, name="chat_turn_cancel"),
]
