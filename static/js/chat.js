// The chat page (templates/agents/chat_session_detail.html): small helpers around htmx's ws
// extension. Without this file the page still sends by plain POST.
(function () {
  var chat = document.getElementById("chat");
  if (!chat) { return; }
  var log = document.getElementById("chat-log");
  function scrollDown() { window.scrollTo(0, document.body.scrollHeight); }
  // A retry button rendered from a socket event does not know the question: read it from the turn.
  chat.addEventListener("htmx:wsConfigSend", function (event) {
    var retry = event.detail.elt && event.detail.elt.getAttribute("data-retry");
    if (retry && !event.detail.parameters.content) {
      var question = document.getElementById("turn-" + retry + "-question");
      event.detail.parameters.content = question ? question.textContent : "";
    }
    // The CSRF token is for the plain-POST fallback; the socket authenticates by its session.
    delete event.detail.parameters.csrfmiddlewaretoken;
    event.detail.headers = null;
  });
  chat.addEventListener("htmx:wsAfterSend", function (event) {
    var form = event.detail.elt;
    if (form && form.id === "chat-form") { form.reset(); }
  });
  chat.addEventListener("htmx:wsAfterMessage", scrollDown);
  // Enter sends, Shift+Enter starts a new line.
  var textarea = document.querySelector("#chat-form textarea");
  if (textarea) {
    textarea.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        document.getElementById("chat-form").requestSubmit();
      }
    });
  }
  if (log) { scrollDown(); }
})();
