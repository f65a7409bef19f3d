/*! credit_guard billing widget: the signed-in organization's balance, grants and usage.
 *
 * Usage (the script is served by credit_endpoints(), next to the data it reads):
 *
 *   <div data-credit-guard></div>
 *   <script src="/api/credits/widget.js" defer></script>
 *
 * Options, as attributes of the div: data-days="30" (the usage window, 1 to 366 days),
 * data-features="5" (how many top features to list). The endpoints are found from this
 * script's own src; requests carry the page's cookies (credentials: same-origin).
 * Dispatch `credit-guard:refresh` on document to reload every widget (after a purchase).
 *
 * No dependencies, no inline markup: every server string goes in through textContent, the
 * chart is built with createElementNS, and the CSS is a constructable stylesheet, so it
 * runs under a strict Content-Security-Policy (script-src 'self'; style-src 'self').
 */
(function () {
  "use strict";

  var script = document.currentScript;
  var BASE = script && script.src ? script.src.replace(/\/widget\.js(?:[?#].*)?$/, "") : "/api/credits";
  var SVG = "http://www.w3.org/2000/svg";
  var CSS = [
    ".cgw{font:inherit;color:inherit;box-sizing:border-box;max-width:40rem;padding:1rem 1.25rem;",
    "border:1px solid rgba(127,127,127,.35);border-radius:.75rem;line-height:1.4}",
    ".cgw *,.cgw *::before,.cgw *::after{box-sizing:border-box}",
    ".cgw-section+.cgw-section{margin-top:1.25rem}",
    ".cgw-heading{font:inherit;font-weight:600;font-size:.95em;margin:0 0 .5rem}",
    ".cgw-balance{display:flex;align-items:baseline;gap:.5rem;flex-wrap:wrap}",
    ".cgw-balance-amount{font-size:2em;font-weight:700;font-variant-numeric:tabular-nums;line-height:1.1}",
    ".cgw-muted{opacity:.7;font-size:.875em}",
    ".cgw-list{list-style:none;margin:0;padding:0}",
    ".cgw-list>li{display:flex;justify-content:space-between;gap:.75rem;flex-wrap:wrap;padding:.35rem 0;",
    "border-top:1px solid rgba(127,127,127,.2)}",
    ".cgw-list>li:first-child{border-top:0}",
    ".cgw-num{font-variant-numeric:tabular-nums;white-space:nowrap}",
    ".cgw-chart{display:block;width:100%;height:6rem;margin:.25rem 0}",
    ".cgw-bar{fill:var(--cgw-accent,#2563eb)}",
    ".cgw-bar-empty{fill:rgba(127,127,127,.25)}",
    ".cgw-axis{display:flex;justify-content:space-between}",
    ".cgw-features{margin-top:.75rem}",
    ".cgw-error{margin:0}",
    "@media (max-width:30rem){.cgw{padding:.75rem}.cgw-balance-amount{font-size:1.6em}}",
  ].join("");

  function addStyles() {
    if (addStyles.done) return;
    addStyles.done = true;
    // A constructable stylesheet is CSSOM, which a CSP style-src does not block (a <style>
    // element would be). Without it (old browsers) the widget is unstyled but complete.
    if (!("adoptedStyleSheets" in document) || typeof CSSStyleSheet !== "function") return;
    try {
      var sheet = new CSSStyleSheet();
      sheet.replaceSync(CSS);
      document.adoptedStyleSheets = document.adoptedStyleSheets.concat([sheet]);
    } catch (e) {
      /* unstyled, not broken */
    }
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attributes) {
    var node = document.createElementNS(SVG, tag);
    for (var name in attributes) node.setAttribute(name, String(attributes[name]));
    return node;
  }

  function number(n) {
    return Number(n).toLocaleString();
  }

  function credits(n) {
    return number(n) + (Math.abs(n) === 1 ? " credit" : " credits");
  }

  function dateOf(value, options) {
    var when = new Date(value);
    if (isNaN(when.getTime())) return String(value);
    return when.toLocaleDateString(undefined, options);
  }

  function dayLabel(day) {
    // "YYYY-MM-DD" is a UTC day: shown as that day wherever the reader is.
    return dateOf(day + "T00:00:00Z", { day: "numeric", month: "short", timeZone: "UTC" });
  }

  function fetchJson(path) {
    return fetch(BASE + path, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
    }).then(function (response) {
      return response.json().then(
        function (body) {
          if (!response.ok) throw { status: response.status, body: body };
          return body;
        },
        function () {
          throw { status: response.status, body: null };
        },
      );
    });
  }

  function balanceSection(balance) {
    var section = el("section", "cgw-section cgw-balance");
    section.appendChild(el("span", "cgw-balance-amount", number(balance.credits)));
    section.appendChild(el("span", "cgw-muted", balance.credits === 1 ? "credit available" : "credits available"));
    return section;
  }

  function grantsSection(list) {
    var section = el("section", "cgw-section cgw-grants");
    section.appendChild(el("h3", "cgw-heading", "Your credits"));
    if (!list.grants.length) {
      section.appendChild(el("p", "cgw-muted", "No credits left."));
      return section;
    }
    var items = el("ul", "cgw-list");
    list.grants.forEach(function (grant) {
      var item = el("li", "cgw-grant");
      var plural = grant.remaining !== 1;
      var when = grant.expires_at
        ? (plural ? " expire on " : " expires on ") +
          dateOf(grant.expires_at, { day: "numeric", month: "short", year: "numeric" })
        : plural
          ? " never expire"
          : " never expires";
      item.appendChild(el("span", "cgw-grant-text cgw-num", credits(grant.remaining) + when));
      if (grant.reason) item.appendChild(el("span", "cgw-grant-reason cgw-muted", grant.reason));
      items.appendChild(item);
    });
    section.appendChild(items);
    return section;
  }

  function chart(days) {
    var width = 300;
    var height = 80;
    var gap = days.length > 60 ? 0.5 : 1.5;
    var step = width / days.length;
    var most = Math.max.apply(
      null,
      days.map(function (d) {
        return d.net_credits;
      }).concat([1]),
    );
    var first = days[0].day;
    var last = days[days.length - 1].day;
    var total = days.reduce(function (sum, d) {
      return sum + d.net_credits;
    }, 0);
    var picture = svg("svg", {
      class: "cgw-chart",
      viewBox: "0 0 " + width + " " + height,
      preserveAspectRatio: "none",
      role: "img",
    });
    picture.setAttribute("aria-label", "Credits used per day, " + dayLabel(first) + " to " + dayLabel(last) + ": " + credits(total));
    days.forEach(function (d, i) {
      var used = Math.max(0, d.net_credits);
      var h = used ? Math.max(2, (used / most) * (height - 2)) : 1;
      var bar = svg("rect", {
        class: used ? "cgw-bar" : "cgw-bar cgw-bar-empty",
        x: (i * step + gap / 2).toFixed(2),
        y: (height - h).toFixed(2),
        width: Math.max(0.5, step - gap).toFixed(2),
        height: h.toFixed(2),
        "data-day": d.day,
        "data-credits": d.net_credits,
      });
      var tip = svg("title", {});
      tip.textContent = dayLabel(d.day) + ": " + credits(d.net_credits) + ", " + number(d.charges) + (d.charges === 1 ? " use" : " uses");
      bar.appendChild(tip);
      picture.appendChild(bar);
    });
    return picture;
  }

  function usageSection(usage, top) {
    var section = el("section", "cgw-section cgw-usage");
    var span = usage.days.length === 1 ? "today" : "the last " + usage.days.length + " days";
    section.appendChild(el("h3", "cgw-heading", "Usage, " + span));
    section.appendChild(el("p", "cgw-usage-total cgw-muted", credits(usage.net_credits) + " used, " + number(usage.charges) + (usage.charges === 1 ? " use" : " uses")));
    section.appendChild(chart(usage.days));
    var axis = el("div", "cgw-axis cgw-muted");
    axis.appendChild(el("span", "", dayLabel(usage.first_day)));
    axis.appendChild(el("span", "", dayLabel(usage.last_day)));
    section.appendChild(axis);
    if (usage.features.length) {
      var items = el("ol", "cgw-list cgw-features");
      usage.features.slice(0, top).forEach(function (f) {
        var item = el("li", "cgw-feature");
        item.setAttribute("data-feature", f.feature);
        item.appendChild(el("span", "cgw-feature-name", f.name || f.feature));
        item.appendChild(
          el("span", "cgw-feature-credits cgw-num", credits(f.net_credits) + " · " + number(f.charges) + (f.charges === 1 ? " use" : " uses")),
        );
        items.appendChild(item);
      });
      section.appendChild(items);
    }
    return section;
  }

  function whole(value, fallback, low, high) {
    var n = parseInt(value, 10);
    return isNaN(n) ? fallback : Math.min(high, Math.max(low, n));
  }

  function load(root) {
    var days = whole(root.getAttribute("data-days"), 30, 1, 366);
    var top = whole(root.getAttribute("data-features"), 5, 1, 50);
    root.classList.add("cgw");
    root.setAttribute("aria-busy", "true");
    root.setAttribute("data-state", "loading");
    if (!root.firstChild) root.appendChild(el("p", "cgw-muted", "Loading credits…"));
    return Promise.all([fetchJson("/balance"), fetchJson("/grants"), fetchJson("/usage?days=" + days)]).then(
      function (answers) {
        var parts = [balanceSection(answers[0]), grantsSection(answers[1]), usageSection(answers[2], top)];
        root.replaceChildren.apply(root, parts);
        root.setAttribute("data-state", "ready");
        root.removeAttribute("aria-busy");
      },
      function (failure) {
        var status = failure && failure.status;
        var message =
          status === 401
            ? "Sign in to see your credits."
            : "Your credits cannot be shown right now. Please try again later.";
        root.replaceChildren(el("p", "cgw-error", message));
        root.setAttribute("data-state", "error");
        root.setAttribute("data-status", String(status || 0));
        root.removeAttribute("aria-busy");
      },
    );
  }

  function loadAll() {
    addStyles();
    var roots = document.querySelectorAll("[data-credit-guard]");
    for (var i = 0; i < roots.length; i++) load(roots[i]);
  }

  document.addEventListener("credit-guard:refresh", loadAll);
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", loadAll);
  else loadAll();
})();
