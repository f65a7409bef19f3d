// The organizations view: find an organization, see its credits, grant some.
// Every value from the server is set with textContent: nothing it sends is parsed as HTML.
// The balance history chart is drawn by static/charts.js (the vendored uPlot).
(function () {
  "use strict";
  var main = document.getElementById("main");
  var API = main.getAttribute("data-base") + "/api/admin/organizations";
  var current = null;

  function $(id) { return document.getElementById(id); }

  function request(method, path, body, headers) {
    var init = { method: method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    Object.keys(headers || {}).forEach(function (k) { init.headers[k] = headers[k]; });
    return fetch(API + path, init).then(function (res) {
      return res.json().catch(function () { return null; }).then(function (data) {
        return { ok: res.ok, status: res.status, data: data || {} };
      });
    });
  }

  function problemText(result) {
    var data = result.data;
    var fields = data.errors ? Object.keys(data.errors).map(function (k) { return k + " " + data.errors[k]; }) : [];
    return fields.join("; ") || data.detail || data.title || "The server answered " + result.status + ".";
  }

  function status(text) { $("status").textContent = text; }

  function row(table, cells) {
    var tr = document.createElement("tr");
    cells.forEach(function (value) {
      var td = document.createElement("td");
      td.textContent = value === null || value === undefined ? "" : String(value);
      tr.appendChild(td);
    });
    $(table).querySelector("tbody").appendChild(tr);
  }

  function clear(table) { $(table).querySelector("tbody").textContent = ""; }

  function search(prefix) {
    return request("GET", "?q=" + encodeURIComponent(prefix)).then(function (result) {
      var list = $("results");
      list.textContent = "";
      if (!result.ok) { status(problemText(result)); return; }
      result.data.organizations.forEach(function (org) {
        var li = document.createElement("li");
        var button = document.createElement("button");
        button.type = "button";
        button.className = "btn btn-ghost";
        button.textContent = org.organization_id;
        button.setAttribute("data-org", org.organization_id);
        button.addEventListener("click", function () { open(org.organization_id); });
        li.appendChild(button);
        list.appendChild(li);
      });
      list.setAttribute("data-loaded", "true");
      status(result.data.organizations.length + " found");
    });
  }

  function open(org) {
    return request("GET", "/" + encodeURIComponent(org)).then(function (result) {
      if (!result.ok) { status(problemText(result)); return; }
      var d = result.data;
      current = d.organization_id;
      $("detail").hidden = false;
      $("org-name").textContent = d.organization_id;
      $("org-balance").textContent = d.balance;
      $("org-overdraft").textContent = d.overdraft.limit || d.overdraft.owed
        ? "· overdraft limit " + d.overdraft.limit + ", owed " + d.overdraft.owed : "";
      clear("grants");
      d.grants.forEach(function (g) {
        row("grants", [g.reason || "(no reason)", g.remaining, g.amount, g.expires_at || "never", g.priority]);
      });
      clear("reservations");
      d.reservations.forEach(function (r) { row("reservations", [r.job_id, r.feature_key, r.credits, r.expires_at]); });
      clear("ledger");
      d.ledger.forEach(function (e) {
        row("ledger", [e.id, e.kind, e.amount, e.balance_after, e.feature_key || e.reason || "", e.created_at]);
      });
      $("detail").setAttribute("data-org", d.organization_id);
      return history(d.organization_id);
    });
  }

  function history(org) {
    var chart = $("chart-balance");
    chart.dataset.state = "loading";
    return request("GET", "/" + encodeURIComponent(org) + "/balance-history").then(function (result) {
      if (current !== org) return;  // another organization was opened meanwhile
      if (!result.ok) { status(problemText(result)); return; }
      window.creditGuardCharts.balance(chart, {
        points: result.data.points,
        until: new Date().toISOString().slice(0, 10),
        emptyText: "No credits moved yet",
        caption: "Balance of " + org + " at the end of each day it moved (UTC)"
      });
      chart.setAttribute("data-org", org);
    });
  }

  $("search").addEventListener("submit", function (event) {
    event.preventDefault();
    search($("q").value);
  });

  $("grant-form").addEventListener("submit", function (event) {
    event.preventDefault();
    $("grant-error").textContent = "";
    var amount = Number($("grant-amount").value);
    if (!Number.isInteger(amount) || amount < 1) { $("grant-error").textContent = "amount must be a whole number of credits"; return; }
    var expires = $("grant-expires").value;
    var body = { amount: amount, reason: $("grant-reason").value || null, expires_at: expires ? expires + ":00Z" : null };
    var question = "Grant " + amount + " credits to " + current + (expires ? ", expiring " + expires + " UTC" : "") + "?";
    if (!window.confirm(question)) { status("Nothing granted."); return; }
    var key = "admin-grant-" + (window.crypto && crypto.randomUUID ? crypto.randomUUID() : String(Date.now()));
    request("POST", "/" + encodeURIComponent(current) + "/grants", body, { "Idempotency-Key": key }).then(function (result) {
      if (!result.ok) { $("grant-error").textContent = problemText(result); return; }
      status("Granted " + amount + " credits to " + current + ": balance " + result.data.balance);
      $("grant-form").reset();
      open(current);
    });
  });

  search("");
})();
