// The organizations view: find an organization, see its credits, its plan, its auto top-up
// and its member caps, grant credits, change the plan, the auto top-up or a member's cap.
// Every value from the server is set with textContent: nothing it sends is parsed as HTML
// (a member id is whatever the app's user id is, markup included). The balance history chart is drawn by static/charts.js (the
// vendored uPlot).
(function () {
  "use strict";
  var main = document.getElementById("main");
  var API = main.getAttribute("data-base") + "/api/admin";
  var current = null;
  var currentPlan = null;  // the open organization's subscription (null: no plan)
  var currentTopup = null;  // the open organization's auto top-up (null: none)
  var currentBalance = null;  // its spendable balance, as last read
  var currentMembers = [];  // its member caps, as last read
  var plans = [];

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
    return request("GET", "/organizations?q=" + encodeURIComponent(prefix)).then(function (result) {
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
    return request("GET", "/organizations/" + encodeURIComponent(org)).then(function (result) {
      if (!result.ok) { status(problemText(result)); return; }
      var d = result.data;
      current = d.organization_id;
      currentBalance = d.balance;
      $("detail").hidden = false;
      $("org-name").textContent = d.organization_id;
      $("org-balance").textContent = d.balance;
      $("org-overdraft").textContent = d.overdraft.limit || d.overdraft.owed
        ? "· overdraft limit " + d.overdraft.limit + ", owed " + d.overdraft.owed : "";
      var pooled = d.pools.filter(function (p) { return p.pool !== null; });
      $("org-pools").textContent = pooled.length
        ? "· of which " + pooled.map(function (p) { return p.pool + " " + p.balance; }).join(", ") : "";
      clear("grants");
      d.grants.forEach(function (g) {
        row("grants", [g.reason || "(no reason)", g.remaining, g.amount, g.expires_at || "never", g.priority, g.pool || "general"]);
      });
      clear("reservations");
      d.reservations.forEach(function (r) { row("reservations", [r.job_id, r.feature_key, r.credits, r.expires_at]); });
      clear("ledger");
      d.ledger.forEach(function (e) {
        row("ledger", [e.id, e.kind, e.amount, e.balance_after, e.feature_key || e.reason || "", e.created_at]);
      });
      $("detail").setAttribute("data-org", d.organization_id);
      return Promise.all([
        history(d.organization_id), subscription(d.organization_id), topup(d.organization_id), members(d.organization_id)
      ]);
    });
  }

  function history(org) {
    var chart = $("chart-balance");
    chart.dataset.state = "loading";
    return request("GET", "/organizations/" + encodeURIComponent(org) + "/balance-history").then(function (result) {
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
    var pool = $("grant-pool").value.trim() || null;
    var body = { amount: amount, reason: $("grant-reason").value || null, expires_at: expires ? expires + ":00Z" : null, pool: pool };
    var question = "Grant " + amount + (pool ? " " + pool : "") + " credits to " + current + (expires ? ", expiring " + expires + " UTC" : "") + "?";
    if (!window.confirm(question)) { status("Nothing granted."); return; }
    var key = "admin-grant-" + (window.crypto && crypto.randomUUID ? crypto.randomUUID() : String(Date.now()));
    request("POST", "/organizations/" + encodeURIComponent(current) + "/grants", body, { "Idempotency-Key": key }).then(function (result) {
      if (!result.ok) { $("grant-error").textContent = problemText(result); return; }
      status("Granted " + amount + " credits to " + current + ": balance " + result.data.balance);
      $("grant-form").reset();
      open(current);
    });
  });

  // ---- the organization's plan ----------------------------------------------------------

  function count(n) { return Number(n).toLocaleString("en"); }

  /** "2026-02-08 12:00 UTC" from an ISO 8601 instant. */
  function when(iso) {
    var t = Date.parse(iso);
    return isNaN(t) ? String(iso) : new Date(t).toISOString().slice(0, 16).replace("T", " ") + " UTC";
  }

  function planName(p) { return p.name === p.plan_key ? p.plan_key : p.name + " (" + p.plan_key + ")"; }

  /** What a plan grants, in words: "1,000 credits a month, up to 500 roll over". */
  function terms(p) {
    var carried = p.rollover === null ? "all unused credits roll over"
      : p.rollover === 0 ? "unused credits reset" : "up to " + count(p.rollover) + " roll over";
    return count(p.credits) + " credits a " + p.period + ", " + carried;
  }

  function loadPlans() {
    return request("GET", "/plans").then(function (result) {
      if (!result.ok) { $("plan-error").textContent = "Could not load the plans: " + problemText(result); return; }
      plans = result.data;
      fillPlanSelect();
    });
  }

  function fillPlanSelect() {
    var select = $("plan-select");
    select.textContent = "";
    plans.forEach(function (p) {
      var option = document.createElement("option");
      option.value = p.plan_key;
      option.textContent = planName(p) + " · " + terms(p);
      select.appendChild(option);
    });
    if (!plans.length) {
      var none = document.createElement("option");
      none.value = "";
      none.textContent = "No plans yet: define one on the Plans page";
      select.appendChild(none);
    }
    select.disabled = !plans.length;
    $("plan-submit").disabled = !plans.length;
    if (currentPlan) select.value = currentPlan.plan_key;
  }

  function showPlan(sub) {
    currentPlan = sub;
    var box = $("org-plan");
    box.setAttribute("data-plan", sub ? sub.plan_key : "");
    $("plan-summary").textContent = !sub ? "No plan"
      : sub.plan ? planName(sub.plan) + ": " + terms(sub.plan) : sub.plan_key;
    $("plan-facts").hidden = !sub;
    $("plan-period").textContent = sub && sub.period_start ? "since " + when(sub.period_start) : "not started";
    $("plan-renews").textContent = sub ? when(sub.renews_at) : "";
    $("plan-end").hidden = !sub;
    $("plan-submit").textContent = sub ? "Change plan" : "Subscribe";
    Array.prototype.forEach.call(document.querySelectorAll(".plan-change-only"), function (el) { el.hidden = !sub; });
    $("plan-on-change").value = "expire";
    fillPlanSelect();
    box.setAttribute("data-loaded", "true");
  }

  function subscription(org) {
    $("org-plan").setAttribute("data-loaded", "false");
    $("plan-error").textContent = "";
    return request("GET", "/organizations/" + encodeURIComponent(org) + "/subscription").then(function (result) {
      if (current !== org) return;  // another organization was opened meanwhile
      if (result.status === 404) { showPlan(null); return; }
      if (!result.ok) { $("plan-error").textContent = problemText(result); return; }
      showPlan(result.data);
    });
  }

  $("plan-form").addEventListener("submit", function (event) {
    event.preventDefault();
    $("plan-error").textContent = "";
    var org = current;
    var chosen = null;
    plans.forEach(function (p) { if (p.plan_key === $("plan-select").value) chosen = p; });
    if (!chosen) { $("plan-error").textContent = "choose a plan"; return; }
    if (currentPlan && currentPlan.plan_key === chosen.plan_key) {
      status(org + " is on " + planName(chosen) + " already: nothing changed.");
      return;
    }
    var onChange = $("plan-on-change").value;
    var grants = planName(chosen) + " grants " + count(chosen.credits) + " credits now, then every " + chosen.period + ".";
    var question = currentPlan
      ? "Move " + org + " from " + currentPlan.plan_key + " to " + chosen.plan_key + "? " + grants + " " +
        (onChange === "keep" ? "The credits left from " + currentPlan.plan_key + " last until they expire."
          : "The credits left from " + currentPlan.plan_key + " are written off now.")
      : "Put " + org + " on " + chosen.plan_key + "? " + grants;
    if (!window.confirm(question)) { status("Plan unchanged."); return; }
    var body = { plan_key: chosen.plan_key, on_change: onChange };
    request("PUT", "/organizations/" + encodeURIComponent(org) + "/subscription", body).then(function (result) {
      if (!result.ok) { $("plan-error").textContent = problemText(result); return; }
      status(org + " is on " + planName(chosen) + ": next renewal " + when(result.data.renews_at) + ".");
      return Promise.all([open(org), loadPlans()]);
    });
  });

  $("plan-end").addEventListener("click", function () {
    var org = current;
    if (!currentPlan) return;
    var question = "End " + org + "'s plan " + currentPlan.plan_key + "? No period is granted after this; " +
      "the credits it granted last until they expire.";
    if (!window.confirm(question)) { status("Plan unchanged."); return; }
    request("DELETE", "/organizations/" + encodeURIComponent(org) + "/subscription?on_change=keep").then(function (result) {
      if (!result.ok) { $("plan-error").textContent = problemText(result); return; }
      status(org + " is on no plan now.");
      return Promise.all([open(org), loadPlans()]);
    });
  });

  // ---- the organization's auto top-up ---------------------------------------------------

  var TOPUP_STATES = {
    armed: "Armed: buys when the balance next falls below the line",
    running: "Buying now",
    fired: "Fired: armed again once the balance is back at or above the line"
  };

  /** "Buys 500 credits when the balance falls below 100". */
  function topupTerms(t) {
    return "Buys " + count(t.credits) + " credits when the balance falls below " + count(t.below);
  }

  function showTopup(t, chargeRegistered) {
    currentTopup = t;
    var box = $("org-topup");
    box.setAttribute("data-topup", t ? t.below + ":" + t.credits : "");
    box.setAttribute("data-charge-registered", chargeRegistered ? "true" : "false");
    $("topup-no-charge").hidden = !!chargeRegistered;
    $("topup-summary").textContent = t ? topupTerms(t) : "No auto top-up";
    $("topup-facts").hidden = !t;
    $("topup-state").textContent = t ? TOPUP_STATES[t.state] || t.state : "";
    $("topup-crossings").textContent = t ? count(t.crossings) : "";
    $("topup-last-run").textContent = t && t.last_run_at ? when(t.last_run_at) : "never";
    $("topup-last-result").textContent = t && t.last_result !== null ? t.last_result : "none";
    $("topup-last-error").textContent = t && t.last_error !== null ? t.last_error : "";
    $("topup-last-error-row").hidden = !(t && t.last_error !== null);
    $("topup-below").value = t ? t.below : "";
    $("topup-credits").value = t ? t.credits : "";
    $("topup-submit").textContent = t ? "Change auto top-up" : "Set auto top-up";
    $("topup-remove").hidden = !t;
    box.setAttribute("data-loaded", "true");
  }

  function topup(org) {
    $("org-topup").setAttribute("data-loaded", "false");
    $("topup-error").textContent = "";
    return request("GET", "/organizations/" + encodeURIComponent(org) + "/auto-topup").then(function (result) {
      if (current !== org) return;  // another organization was opened meanwhile
      if (result.status === 404) { showTopup(null, result.data.charge_registered); return; }
      if (!result.ok) { $("topup-error").textContent = problemText(result); return; }
      showTopup(result.data, result.data.charge_registered);
    });
  }

  function wholeField(id, name) {
    var value = Number($(id).value);
    return $(id).value !== "" && Number.isInteger(value) && value >= 1 ? value : name;
  }

  $("topup-form").addEventListener("submit", function (event) {
    event.preventDefault();
    $("topup-error").textContent = "";
    var org = current;
    var below = wholeField("topup-below", "below"), credits = wholeField("topup-credits", "credits");
    var bad = [below, credits].filter(function (v) { return typeof v === "string"; });
    if (bad.length) { $("topup-error").textContent = bad.join(" and ") + " must be a whole number of credits from 1"; return; }
    if (currentTopup && currentTopup.below === below && currentTopup.credits === credits) {
      status(org + "'s auto top-up is that already: nothing changed.");
      return;
    }
    var wanted = { below: below, credits: credits };
    var charging = $("org-topup").getAttribute("data-charge-registered") === "true";
    var question = currentTopup
      ? "Change " + org + "'s auto top-up from " + count(currentTopup.credits) + " credits below " +
        count(currentTopup.below) + " to " + count(credits) + " credits below " + count(below) + "?"
      : "Buy " + count(credits) + " credits for " + org + " each time its balance falls below " + count(below) + "?";
    if (currentBalance !== null && currentBalance < below) {
      question += " Its balance (" + count(currentBalance) + ") is below that already" +
        (charging ? ": a top-up is bought at once." : ".");
    }
    if (!charging) question += " No charge is registered in this app process: nothing is bought here until the app registers one.";
    if (!window.confirm(question)) { status("Auto top-up unchanged."); return; }
    request("PUT", "/organizations/" + encodeURIComponent(org) + "/auto-topup", wanted).then(function (result) {
      if (!result.ok) { $("topup-error").textContent = problemText(result); return; }
      status(org + "'s auto top-up: " + topupTerms(result.data).toLowerCase() + ".");
      return open(org);
    });
  });

  $("topup-remove").addEventListener("click", function () {
    var org = current;
    if (!currentTopup) return;
    var question = "Remove " + org + "'s auto top-up (" + count(currentTopup.credits) + " credits below " +
      count(currentTopup.below) + ")? Nothing is bought automatically after this.";
    if (!window.confirm(question)) { status("Auto top-up unchanged."); return; }
    request("DELETE", "/organizations/" + encodeURIComponent(org) + "/auto-topup").then(function (result) {
      if (!result.ok) { $("topup-error").textContent = problemText(result); return; }
      status(org + " has no auto top-up now.");
      return open(org);
    });
  });

  // ---- the organization's member caps ----------------------------------------------------

  function memberPath(org, member) {
    return "/organizations/" + encodeURIComponent(org) + "/members/" + encodeURIComponent(member);
  }

  /** "12 credits a day", "0 credits in all". */
  function capTerms(credits, per) { return count(credits) + " credits " + (per ? "a " + per : "in all"); }

  function cell(tr, label, value, tag) {
    var td = document.createElement(tag || "td");
    if (tag) td.setAttribute("scope", "row");
    td.setAttribute("data-label", label);
    td.textContent = value;
    tr.appendChild(td);
    return td;
  }

  function button(text, name, className, onClick) {
    var b = document.createElement("button");
    b.type = "button";
    b.className = "btn btn-sm " + className;
    b.textContent = text;
    b.setAttribute("aria-label", name);
    b.addEventListener("click", onClick);
    return b;
  }

  function showMembers(list) {
    currentMembers = list;
    var tbody = $("members").querySelector("tbody");
    tbody.textContent = "";
    list.forEach(function (m) {
      var tr = document.createElement("tr");
      tr.className = "member-row";
      tr.setAttribute("data-member", m.member);
      cell(tr, "Member", m.member, "th").className = "member-id";
      cell(tr, "Cap", count(m.credits));
      cell(tr, "Per", m.per || "in all");
      cell(tr, "Used", count(m.used));
      cell(tr, "Remaining", count(m.remaining));
      cell(tr, "Resets (UTC)", m.resets_at ? when(m.resets_at).replace(/ UTC$/, "") : "never");
      var actions = document.createElement("div");
      actions.className = "member-actions";
      cell(tr, "Actions", "").appendChild(actions);
      actions.appendChild(button("Change", "Change the cap of " + m.member, "btn-secondary", function () { editMember(tr, m); }));
      actions.appendChild(button("Remove", "Remove the cap of " + m.member, "btn-ghost-danger", function () { removeMember(m); }));
      tbody.appendChild(tr);
    });
    $("members").hidden = !list.length;
    $("members-summary").textContent = list.length
      ? list.length + (list.length === 1 ? " member has a cap" : " members have caps") +
        "; everyone else may spend all of the organization's credits."
      : "No member caps: every member may spend all of the organization's credits.";
    $("org-members").setAttribute("data-loaded", "true");
  }

  function members(org) {
    $("org-members").setAttribute("data-loaded", "false");
    $("member-error").textContent = "";
    return request("GET", "/organizations/" + encodeURIComponent(org) + "/members").then(function (result) {
      if (current !== org) return;  // another organization was opened meanwhile
      if (!result.ok) { $("member-error").textContent = problemText(result); return; }
      showMembers(result.data.members);
    });
  }

  /** A whole number of credits from 0, or null. */
  function capCredits(raw) {
    var value = Number(raw);
    return raw !== "" && Number.isInteger(value) && value >= 0 ? value : null;
  }

  /** Ask, then PUT the cap; ``fail`` shows a refusal next to the form that sent it. */
  function writeCap(org, member, credits, per, fail) {
    var before = null;
    currentMembers.forEach(function (m) { if (m.member === member) before = m; });
    if (before && before.credits === credits && before.per === per) {
      status(member + "'s cap is that already: nothing changed.");
      return Promise.resolve(false);
    }
    var question = before
      ? "Change " + member + "'s cap in " + org + " from " + capTerms(before.credits, before.per) + " to " +
        capTerms(credits, per) + "? " + (before.per === per
          ? "What it used this period (" + count(before.used) + ") still counts."
          : "A new period starts its count again at 0 (it used " + count(before.used) + ").")
      : "Let " + member + " spend at most " + capTerms(credits, per) + " of " + org + "'s credits? " +
        "A charge over the cap is refused.";
    if (credits === 0) question += " A cap of 0 refuses all of its paid calls.";
    if (!window.confirm(question)) { status("Member caps unchanged."); return Promise.resolve(false); }
    return request("PUT", memberPath(org, member), { credits: credits, per: per }).then(function (result) {
      if (!result.ok) { fail(problemText(result)); return false; }
      var said = member + " may spend " + capTerms(result.data.credits, result.data.per) + " of " + org + "'s credits.";
      return members(org).then(function () { status(said); return true; });  // said once the table shows it
    });
  }

  function removeMember(m) {
    var org = current;
    var question = "Remove " + m.member + "'s cap in " + org + " (" + capTerms(m.credits, m.per) + ")? " +
      "It may then spend all of the organization's credits.";
    if (!window.confirm(question)) { status("Member caps unchanged."); return; }
    request("DELETE", memberPath(org, m.member)).then(function (result) {
      if (!result.ok) { $("member-error").textContent = problemText(result); return; }
      return members(org).then(function () { status(m.member + " has no cap in " + org + " now."); });
    });
  }

  /** An editor row under the member's row: its cap and period, saved with a confirmation. */
  function editMember(tr, m) {
    var shown = tr.nextSibling;
    if (shown && shown.className === "member-editor") { shown.querySelector("input").focus(); return; }
    var index = Array.prototype.indexOf.call(tr.parentNode.children, tr);
    var editor = document.createElement("tr");
    editor.className = "member-editor";
    var td = document.createElement("td");
    td.colSpan = 7;
    var form = document.createElement("form");
    form.className = "member-edit-form";
    form.noValidate = true;
    function field(label, control, id) {
      var l = document.createElement("label");
      l.htmlFor = control.id = id;
      l.textContent = label;
      form.appendChild(l);
      form.appendChild(control);
    }
    var credits = document.createElement("input");
    credits.type = "number";
    credits.min = "0";
    credits.step = "1";
    credits.inputMode = "numeric";
    credits.value = m.credits;
    field("New cap for " + m.member, credits, "member-edit-credits-" + index);
    var per = $("member-per").cloneNode(true);
    per.removeAttribute("name");
    per.value = m.per || "";
    field("Period for " + m.member, per, "member-edit-per-" + index);
    var error = document.createElement("p");
    error.className = "field-error";
    error.setAttribute("role", "alert");
    var save = document.createElement("button");
    save.type = "submit";
    save.className = "btn btn-sm btn-primary";
    save.textContent = "Save cap";
    save.setAttribute("aria-label", "Save the cap of " + m.member);
    var cancel = button("Cancel", "Cancel changing the cap of " + m.member, "btn-secondary", function () {
      editor.remove();
    });
    var actions = document.createElement("div");
    actions.className = "org-plan-actions";
    actions.appendChild(save);
    actions.appendChild(cancel);
    form.appendChild(actions);
    form.appendChild(error);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      error.textContent = "";
      var value = capCredits(credits.value);
      if (value === null) { error.textContent = "credits must be a whole number from 0"; return; }
      writeCap(current, m.member, value, per.value || null, function (text) { error.textContent = text; });
    });
    td.appendChild(form);
    editor.appendChild(td);
    tr.parentNode.insertBefore(editor, tr.nextSibling);
    credits.focus();
  }

  $("member-form").addEventListener("submit", function (event) {
    event.preventDefault();
    $("member-error").textContent = "";
    var member = $("member-id").value, credits = capCredits($("member-credits").value);
    var bad = [];
    if (!member) bad.push("member must not be empty");
    if (credits === null) bad.push("credits must be a whole number from 0");
    if (bad.length) { $("member-error").textContent = bad.join("; "); return; }
    writeCap(current, member, credits, $("member-per").value || null, function (text) {
      $("member-error").textContent = text;
    }).then(function (written) { if (written) $("member-form").reset(); });
  });

  loadPlans();
  search("");
})();
