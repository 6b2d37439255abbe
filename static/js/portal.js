// Small progressive enhancements; every page works without this file.
// Toasts: views send `HX-Trigger: {"toast": {"level": "success", "message": "..."}}`.
document.body.addEventListener("toast", function (event) {
  var detail = event.detail || {};
  var container = document.getElementById("toasts");
  if (!container) { return; }
  var toast = document.createElement("div");
  toast.className = "toast show align-items-center text-bg-" + (detail.level || "success") + " border-0 mb-2";
  toast.setAttribute("role", "status");
  var body = document.createElement("div");
  body.className = "toast-body";
  body.textContent = detail.message || "";
  toast.appendChild(body);
  container.appendChild(toast);
  setTimeout(function () { toast.remove(); }, 5000);
});
// Send Django's CSRF token with every htmx request.
document.body.addEventListener("htmx:configRequest", function (event) {
  var token = document.querySelector("meta[name=csrf-token]");
  if (token) { event.detail.headers["X-CSRFToken"] = token.content; }
});
// Drag-and-drop onto upload forms: dropped files go into the form's file input, then submit.
document.querySelectorAll("[data-dropzone]").forEach(function (form) {
  var input = form.querySelector("input[type=file]");
  if (!input) { return; }
  ["dragenter", "dragover"].forEach(function (name) {
    form.addEventListener(name, function (event) { event.preventDefault(); form.classList.add("border-primary"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    form.addEventListener(name, function () { form.classList.remove("border-primary"); });
  });
  form.addEventListener("drop", function (event) {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      form.submit();
    }
  });
});
