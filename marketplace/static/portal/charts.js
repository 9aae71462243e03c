/* Charts from data the page carries (no inline scripts: CSP-safe).
 * <canvas data-chart="name" data-chart-source="json-script-id"> draws charts[name] from the
 * JSON in <script type="application/json" id="json-script-id"> (Django's json_script):
 * {type, labels, datasets: [{label, data}], stacked?}. Every chart has a table or summary
 * beside it for those who do not see it; the canvas is labelled and points to it.
 */
(function () {
  "use strict";
  var COLOURS = ["#0f6b5c", "#c77c02", "#5b6475", "#a3261b", "#3b6fb6", "#7a4ea3"];

  function draw(canvas) {
    if (typeof Chart === "undefined") { return; }
    var source = document.getElementById(canvas.getAttribute("data-chart-source"));
    if (!source) { return; }
    var spec = JSON.parse(source.textContent)[canvas.getAttribute("data-chart")];
    if (!spec) { return; }
    var datasets = spec.datasets.map(function (set, i) {
      var colour = COLOURS[i % COLOURS.length];
      return Object.assign({ backgroundColor: colour, borderColor: colour, pointRadius: 2 }, set);
    });
    var scales = spec.stacked ? { x: { stacked: true }, y: { stacked: true, beginAtZero: true } }
                              : { y: { beginAtZero: true } };
    canvas.chart = new Chart(canvas, {
      type: spec.type,
      data: { labels: spec.labels, datasets: datasets },
      options: {
        responsive: true, maintainAspectRatio: false, animation: false, scales: scales,
        plugins: { legend: { display: datasets.length > 1 } }
      }
    });
    canvas.setAttribute("data-chart-drawn", "true");
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("canvas[data-chart]").forEach(draw);
  });
})();
