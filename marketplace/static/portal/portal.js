/* The portal's small behaviours, loaded by every page (no inline scripts: CSP-safe).
 * - Copy buttons: <button class="copy" data-copy="text">.
 * - Live reservations: elements with data-live-id="res_…" hold children with data-live="field";
 *   every 15 s the figures come from the JSON endpoint named on <body data-live-url>.
 */
(function () {
  "use strict";

  function copy(button) {
    var text = button.getAttribute("data-copy");
    var done = function () {
      var label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done);
    } else {
      var area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "visually-hidden";
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      document.body.removeChild(area);
      done();
    }
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button.copy");
    if (button) { copy(button); }
  });

  function liveIds() {
    var seen = {};
    document.querySelectorAll("[data-live-id]").forEach(function (el) {
      seen[el.getAttribute("data-live-id")] = true;
    });
    return Object.keys(seen);
  }

  function apply(row) {
    document.querySelectorAll('[data-live-id="' + row.id + '"]').forEach(function (el) {
      el.querySelectorAll("[data-live]").forEach(function (cell) {
        var value = row[cell.getAttribute("data-live")];
        if (value !== null && value !== undefined) { cell.textContent = value; }
      });
    });
    document.querySelectorAll('[data-live-interruption="' + row.id + '"]').forEach(function (el) {
      if (row.interruption) { el.textContent = row.interruption; }
    });
    document.querySelectorAll('[data-live-status="' + row.id + '"]').forEach(function (el) {
      el.textContent = row.status_label;
    });
  }

  function poll() {
    var url = document.body.getAttribute("data-live-url");
    var ids = liveIds();
    if (!url || !ids.length) { return; }
    var query = ids.map(function (id) { return "id=" + encodeURIComponent(id); }).join("&");
    fetch(url + "?" + query, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (body) {
        if (!body) { return; }
        body.reservations.forEach(apply);
        document.body.setAttribute("data-live-updated", body.now);
      })
      .catch(function () { /* offline for a moment: the next poll tries again */ });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (!liveIds().length) { return; }
    var every = parseInt(document.body.getAttribute("data-live-every") || "15", 10) * 1000;
    poll();
    setInterval(poll, every);
  });
})();
