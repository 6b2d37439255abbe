// Charts of the usage page (templates/billing/usage_dashboard.html), drawn with the vendored
// Chart.js from the page's `usage-data` JSON (json_script: no inline script, which the CSP
// forbids). Each canvas starts hidden and is shown only once drawn; the tables beside the
// charts hold the same numbers for readers without JavaScript.
(function () {
  "use strict";
  var source = document.getElementById("usage-data");
  if (!source || typeof window.Chart === "undefined") { return; }
  var data = JSON.parse(source.textContent);
  var currency = data.currency || "";
  var colors = { input: "#0d6efd", output: "#6f42c1", cost: "#fd7e14" };

  function draw(canvas, config) {
    canvas.hidden = false;
    return new window.Chart(canvas, config);
  }

  // Per day: input and output tokens stacked, cost as a line on its own axis.
  var dayCanvas = document.querySelector("canvas[data-chart=day]");
  if (dayCanvas && data.day) {
    draw(dayCanvas, {
      type: "bar",
      data: {
        labels: data.day.labels,
        datasets: [
          { label: "Input tokens", data: data.day.input_tokens, backgroundColor: colors.input, stack: "tokens", yAxisID: "tokens" },
          { label: "Output tokens", data: data.day.output_tokens, backgroundColor: colors.output, stack: "tokens", yAxisID: "tokens" },
          { label: "Cost (" + currency + ")", data: data.day.cost, type: "line", borderColor: colors.cost,
            backgroundColor: colors.cost, yAxisID: "cost", tension: 0.2 }
        ]
      },
      options: {
        responsive: true,
        interaction: { mode: "index", intersect: false },
        scales: {
          tokens: { type: "linear", position: "left", stacked: true, beginAtZero: true, title: { display: true, text: "tokens" } },
          cost: { type: "linear", position: "right", beginAtZero: true, grid: { drawOnChartArea: false },
                  title: { display: true, text: currency } },
          x: { stacked: true }
        }
      }
    });
  }

  // By agent, model, member and key: cost per group as horizontal bars, tokens in the tooltip.
  document.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
    var name = canvas.dataset.chart;
    var series = data[name];
    if (name === "day" || !series || !series.labels.length) { return; }
    draw(canvas, {
      type: "bar",
      data: {
        labels: series.labels,
        datasets: [{ label: "Cost (" + currency + ")", data: series.cost, backgroundColor: colors.cost, maxBarThickness: 28 }]
      },
      options: {
        responsive: true,
        indexAxis: "y",
        plugins: {
          legend: { display: false },
          tooltip: {
            callbacks: {
              afterLabel: function (item) {
                var i = item.dataIndex;
                return series.input_tokens[i] + " in · " + series.output_tokens[i] + " out tokens";
              }
            }
          }
        },
        scales: { x: { beginAtZero: true } }
      }
    });
  });
}());
