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
// Upload forms: dropped files go into the form's file input, then submit. A selection larger than
// the form's data-max-bytes (the server's limit for one upload) is stopped here with the reason,
// before megabytes go over the wire; the server refuses it anyway.
function formatMegabytes(bytes) { return (bytes / 1048576).toFixed(1) + " MB"; }
document.querySelectorAll("[data-dropzone]").forEach(function (form) {
  var input = form.querySelector("input[type=file]");
  if (!input) { return; }
  var error = form.querySelector("[data-upload-error]");
  var limit = parseInt(form.dataset.maxBytes || "0", 10);
  function tooLarge() {
    var files = Array.prototype.slice.call(input.files || []);
    var total = files.reduce(function (sum, f) { return sum + f.size; }, 0);
    if (!limit || total <= limit) { return ""; }
    var big = files.filter(function (f) { return f.size > limit; }).map(function (f) {
      return f.name + " (" + formatMegabytes(f.size) + ")";
    });
    return (big.length ? big.join(", ") + (big.length > 1 ? " are" : " is") + " larger than the "
                       : "These " + files.length + " files total " + formatMegabytes(total) + "; one upload takes at most ")
      + formatMegabytes(limit) + (big.length ? " limit for one upload." : ". Upload fewer files at a time.");
  }
  form.addEventListener("submit", function (event) {
    var problem = tooLarge();
    if (error) { error.textContent = problem; error.classList.toggle("d-none", !problem); }
    if (problem) { event.preventDefault(); }
  });
  input.addEventListener("change", function () { if (error) { error.classList.add("d-none"); } });
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
      if (form.requestSubmit) { form.requestSubmit(); } else { form.submit(); }
    }
  });
});
// Progress bars carry their percentage in data-progress: the Content-Security-Policy refuses
// style="" attributes, while a width set from a script is allowed. Runs again on every htmx swap.
htmx.onLoad(function (root) {
  var bars = root.matches && root.matches("[data-progress]") ? [root] : [];
  bars = bars.concat(Array.prototype.slice.call(root.querySelectorAll("[data-progress]")));
  bars.forEach(function (bar) {
    var percent = Math.max(0, Math.min(100, parseInt(bar.dataset.progress || "0", 10) || 0));
    bar.style.width = percent + "%";
  });
});
// Forms with data-confirm ask before they submit (inline onsubmit handlers are refused too).
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form && form.dataset ? form.dataset.confirm : "";
  if (question && !window.confirm(question)) { event.preventDefault(); }
}, true);
