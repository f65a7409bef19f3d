/* credit_guard admin: charts, drawn with the vendored uPlot (static/vendor/, no CDN).
 *
 * Shared by the pricing page (usage) and the organizations view (balance history).
 * Every chart container also gets, for people and tests alike:
 *   data-series  JSON list of the series' labels, in drawing order
 *   data-totals  JSON list of each series' total over the chart (same order)
 *   a visually-hidden <table> with every number the chart draws.
 * Labels (feature keys, organization ids) reach the DOM only through textContent: uPlot
 * sets its legend labels with textContent, and the table here does the same. Styles are
 * set through the CSSOM (element.style), which the page's CSP (style-src 'self') allows.
 */
(function () {
  "use strict";

  var DAY = 86400;
  var HEIGHT = 220;
  var LABEL_MAX = 32;
  var MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  var PALETTE = ["#3b5bdb", "#f08c00", "#2f9e44", "#d6336c", "#1098ad", "#868e96", "#7048e8", "#a61e4d"];
  var plots = new WeakMap();
  /** Ticks on whole days only: a day chart has no hours to mark. */
  var DAY_INCRS = [1, 2, 7, 14, 28, 56, 91, 182, 364, 728].map(function (n) { return n * DAY; });
  /** From 0 (or below it, for a day of refunds) to a little above the top, on round numbers. */
  var countRange = function (u, min, max) { return uPlot.rangeNum(Math.min(0, min), Math.max(max, 1), 0.1, true); };

  function daySeconds(day) { return Date.parse(day + "T00:00:00Z") / 1000; }
  function isoDay(seconds) { return new Date(seconds * 1000).toISOString().slice(0, 10); }
  function dayLabel(day) {
    var parts = day.split("-");
    return MONTHS[parseInt(parts[1], 10) - 1] + " " + parseInt(parts[2], 10);
  }
  function short(label) { return label.length > LABEL_MAX ? label.slice(0, LABEL_MAX - 1) + "…" : label; }
  function color(i) { return PALETTE[i % PALETTE.length]; }
  function num(v) { return v === null || v === undefined ? "–" : Number(v).toLocaleString(); }

  /** Each day from `first` to `last` (YYYY-MM-DD, UTC), both included. */
  function daysBetween(first, last) {
    var days = [];
    for (var t = daySeconds(first), end = daySeconds(last); t <= end; t += DAY) days.push(isoDay(t));
    return days;
  }

  function cssVar(name, fallback) {
    var value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
  }

  function axis(extra) {
    var ink = cssVar("--muted", "#5c6675");
    var line = cssVar("--border", "#e2e5ea");
    var base = {
      stroke: ink,
      grid: { stroke: line, width: 1 },
      ticks: { stroke: line, width: 1, size: 4 },
      font: "11px system-ui, sans-serif"
    };
    Object.keys(extra || {}).forEach(function (k) { base[k] = extra[k]; });
    return base;
  }

  function countAxis() {
    return axis({
      size: function (u, values) {
        var longest = (values || []).reduce(function (n, v) { return Math.max(n, String(v).length); }, 1);
        return 16 + longest * 7;
      },
      values: function (u, splits) { return splits.map(function (v) { return v.toLocaleString(); }); }
    });
  }

  function parts(container) {
    var plot = container.querySelector(".chart-plot");
    var table = container.querySelector("table.chart-table");
    var empty = container.querySelector(".chart-empty");
    if (!plot) {
      plot = document.createElement("div");
      plot.className = "chart-plot";
      empty = document.createElement("p");
      empty.className = "chart-empty";
      empty.hidden = true;
      // Hidden in a div: a table's box grows to its content whatever its width says.
      var hidden = document.createElement("div");
      hidden.className = "visually-hidden";
      table = document.createElement("table");
      table.className = "chart-table";
      hidden.appendChild(table);
      container.replaceChildren(plot, empty, hidden);
    }
    return { plot: plot, table: table, empty: empty };
  }

  function fillTable(table, caption, head, rows) {
    var cap = document.createElement("caption");
    cap.textContent = caption;
    var thead = document.createElement("thead");
    var tr = document.createElement("tr");
    head.forEach(function (text) {
      var th = document.createElement("th");
      th.scope = "col";
      th.textContent = text;
      tr.appendChild(th);
    });
    thead.appendChild(tr);
    var tbody = document.createElement("tbody");
    rows.forEach(function (cells) {
      var row = document.createElement("tr");
      cells.forEach(function (value, i) {
        var cell = document.createElement(i === 0 ? "th" : "td");
        if (i === 0) cell.scope = "row";
        cell.textContent = String(value);
        row.appendChild(cell);
      });
      tbody.appendChild(row);
    });
    table.replaceChildren(cap, thead, tbody);
  }

  function describe(container, labels, totals) {
    container.dataset.series = JSON.stringify(labels);
    container.dataset.totals = JSON.stringify(totals);
  }

  function destroy(container) {
    var entry = plots.get(container);
    if (entry) {
      entry.observer.disconnect();
      entry.plot.destroy();
      plots.delete(container);
    }
  }

  function mount(container, target, opts, data) {
    destroy(container);
    var width = Math.max(container.clientWidth, 200);
    opts.width = width;
    opts.height = HEIGHT;
    var plot = new uPlot(opts, data, target);
    var entry = { plot: plot, width: width, observer: null, pending: false };
    // Resized in the next frame, not in the observer: a legend that rewraps changes the
    // container's height, which inside the callback would be a ResizeObserver loop.
    entry.observer = new ResizeObserver(function () {
      if (entry.pending) return;
      entry.pending = true;
      requestAnimationFrame(function () {
        entry.pending = false;
        var now = Math.max(container.clientWidth, 200);
        if (plots.get(container) !== entry || Math.abs(now - entry.width) < 2) return;
        entry.width = now;
        plot.setSize({ width: now, height: HEIGHT });
      });
    });
    entry.observer.observe(container);
    plots.set(container, entry);
    return plot;
  }

  function showEmpty(container, message, caption) {
    destroy(container);
    var p = parts(container);
    p.plot.replaceChildren();
    p.empty.textContent = message;
    p.empty.hidden = false;
    fillTable(p.table, caption, [], []);
    describe(container, [], []);
    container.dataset.state = "empty";
  }

  var utcAxisValues = function (u, splits) {
    return splits.map(function (t) { return dayLabel(isoDay(t)); });
  };

  /** Lines over days. `days`: YYYY-MM-DD list (x); `series`: [{label, values}] aligned with days. */
  function dailyLines(container, spec) {
    var total = spec.series.reduce(function (n, s) {
      return n + s.values.reduce(function (a, v) { return a + Math.abs(v); }, 0);
    }, 0);
    if (!spec.series.length || !total) return showEmpty(container, spec.emptyText, spec.caption);
    var p = parts(container);
    p.empty.hidden = true;
    var xs = spec.days.map(daySeconds);
    var opts = {
      class: "chart-uplot",
      legend: { live: true },
      cursor: { points: { size: 6 } },
      scales: { x: { time: true }, y: { range: countRange } },
      axes: [axis({ space: 56, incrs: DAY_INCRS, values: utcAxisValues }), countAxis()],
      series: [{ label: "Day", value: function (u, t) { return t === null ? "–" : dayLabel(isoDay(t)); } }]
    };
    spec.series.forEach(function (s, i) {
      opts.series.push({
        label: short(s.label),
        stroke: color(i),
        width: 2,
        points: { size: 5, fill: color(i) },
        value: function (u, v) { return num(v); }
      });
    });
    mount(container, p.plot, opts, [xs].concat(spec.series.map(function (s) { return s.values; })));
    var labels = spec.series.map(function (s) { return s.label; });
    fillTable(p.table, spec.caption, ["Day"].concat(labels), spec.days.map(function (day, d) {
      return [day].concat(spec.series.map(function (s) { return s.values[d]; }));
    }));
    describe(container, labels, spec.series.map(function (s) {
      return s.values.reduce(function (a, v) { return a + v; }, 0);
    }));
    container.dataset.days = String(spec.days.length);
    container.dataset.state = "drawn";
  }

  /** Bars, one per label, in the order given. */
  function bars(container, spec) {
    if (!spec.labels.length) return showEmpty(container, spec.emptyText, spec.caption);
    var p = parts(container);
    p.empty.hidden = true;
    var labels = spec.labels;
    var xs = labels.map(function (_, i) { return i; });
    var opts = {
      class: "chart-uplot",
      legend: { live: true },
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      scales: {
        x: { time: false, range: function () { return [-0.5, labels.length - 0.5]; } },
        y: { range: countRange }
      },
      axes: [
        axis({
          splits: function () { return xs; },
          values: function (u, splits) {
            var room = Math.max(4, Math.floor(u.bbox.width / (window.devicePixelRatio || 1) / labels.length / 7));
            return splits.map(function (i) {
              var label = labels[i];
              if (label === undefined) return "";
              return label.length > room ? label.slice(0, room - 1) + "…" : label;
            });
          },
          grid: { show: false }
        }),
        countAxis()
      ],
      series: [
        { label: spec.xLabel, value: function (u, i) { return i === null || labels[i] === undefined ? "–" : short(labels[i]); } },
        {
          label: spec.seriesLabel,
          stroke: color(0),
          fill: color(0) + "cc",
          width: 1,
          paths: uPlot.paths.bars({ size: [0.6, 56], align: 0 }),
          points: { show: false },
          value: function (u, v) { return num(v); }
        }
      ]
    };
    mount(container, p.plot, opts, [xs, spec.values]);
    fillTable(p.table, spec.caption, [spec.xLabel, spec.seriesLabel], labels.map(function (label, i) {
      return [label, spec.values[i]];
    }));
    describe(container, labels, spec.values.slice());
    container.dataset.state = "drawn";
  }

  /** A balance over time: `points` [{day, balance}] where it moved; held flat in between, to `until`. */
  function balance(container, spec) {
    var points = spec.points;
    if (!points.length) return showEmpty(container, spec.emptyText, spec.caption);
    var p = parts(container);
    p.empty.hidden = true;
    var last = points[points.length - 1].day;
    var days = daysBetween(points[0].day, spec.until > last ? spec.until : last);
    var at = {};
    points.forEach(function (pt) { at[pt.day] = pt.balance; });
    var held = null;
    var values = days.map(function (day) {
      if (Object.prototype.hasOwnProperty.call(at, day)) held = at[day];
      return held;
    });
    var opts = {
      class: "chart-uplot",
      legend: { live: true },
      cursor: { points: { size: 6 } },
      scales: { x: { time: true }, y: { range: countRange } },
      axes: [axis({ space: 56, incrs: DAY_INCRS, values: utcAxisValues }), countAxis()],
      series: [
        { label: "Day", value: function (u, t) { return t === null ? "–" : dayLabel(isoDay(t)); } },
        {
          label: "Balance",
          stroke: color(0),
          fill: color(0) + "22",
          width: 2,
          // a point is the balance at the END of its day: the step leads up to it
          paths: uPlot.paths.stepped({ align: -1 }),
          points: { size: 5, fill: color(0) },
          value: function (u, v) { return num(v); }
        }
      ]
    };
    mount(container, p.plot, opts, [days.map(daySeconds), values]);
    fillTable(p.table, spec.caption, ["Day", "Balance at the end of the day"], points.map(function (pt) {
      return [pt.day, pt.balance];
    }));
    describe(container, ["Balance"], [points[points.length - 1].balance]);
    container.dataset.points = String(points.length);
    container.dataset.state = "drawn";
  }

  window.creditGuardCharts = {
    dailyLines: dailyLines,
    bars: bars,
    balance: balance,
    daysBetween: daysBetween,
    dayLabel: dayLabel,
    isoDay: isoDay
  };
})();
