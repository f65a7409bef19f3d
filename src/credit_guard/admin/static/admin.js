/* credit_guard admin: the feature pricing page's behaviour. No build step; the charts are
 * drawn by static/charts.js with the vendored uPlot (static/vendor/), loaded before this.
 *
 * The API lives next to the page: /{prefix}/admin/feature-pricing is the page, so
 * /{prefix}/api/admin/... is the API, whatever the prefix (a tenant, a sub-path).
 * All user-provided text goes into the DOM through textContent, never innerHTML.
 */
(function () {
  "use strict";

  var PAGE_SUFFIX = "/admin/feature-pricing";
  var FIELDS = ["feature_key", "feature_name", "category", "credits", "description", "is_active", "pool", "pool_fallback"];
  var charts = window.creditGuardCharts;

  function apiBase(pathname) {
    var path = pathname.replace(/\/+$/, "");
    if (path.slice(-PAGE_SUFFIX.length) === PAGE_SUFFIX) path = path.slice(0, -PAGE_SUFFIX.length);
    return path + "/api/admin";
  }

  var API = apiBase(window.location.pathname);
  var state = { features: [], editingId: null, usage: null };
  var $ = function (sel, root) { return (root || document).querySelector(sel); };
  var $$ = function (sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); };

  // ---- talking to the API ------------------------------------------------------------

  function request(method, path, body) {
    var init = { method: method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(API + path, init).then(function (res) {
      var type = res.headers.get("Content-Type") || "";
      var parse = res.status !== 204 && type.indexOf("json") !== -1 ? res.json() : Promise.resolve(null);
      return parse.then(function (data) { return { ok: res.ok, status: res.status, data: data }; });
    });
  }

  function problemText(result) {
    var data = result.data || {};
    return data.detail || data.title || "The server answered " + result.status + ".";
  }

  // ---- feedback ----------------------------------------------------------------------

  var toastTimer = null;
  function toast(message, isError) {
    var el = $("#toast");
    el.textContent = message;
    el.classList.toggle("is-error", !!isError);
    el.classList.add("is-visible");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { el.classList.remove("is-visible"); }, isError ? 5000 : 2600);
  }

  // ---- the list ----------------------------------------------------------------------

  function byCategoryThenName(a, b) {
    return a.category.localeCompare(b.category, undefined, { sensitivity: "base" }) ||
      a.feature_name.localeCompare(b.feature_name, undefined, { sensitivity: "base" }) ||
      (a.feature_key < b.feature_key ? -1 : a.feature_key > b.feature_key ? 1 : 0);
  }

  function setSlot(root, name, text) {
    var el = root.querySelector('[data-slot="' + name + '"]');
    if (el) el.textContent = text;
    return el;
  }

  function fillFeature(li, f) {
    li.dataset.id = f.id;
    li.dataset.key = f.feature_key;
    li.classList.toggle("is-inactive", !f.is_active);
    li.classList.toggle("is-editing", state.editingId === f.id);
    setSlot(li, "feature_name", f.feature_name);
    setSlot(li, "feature_key", f.feature_key);
    setSlot(li, "credits", String(f.credits));
    setSlot(li, "credits-unit", f.credits === 1 ? "credit" : "credits");
    var desc = setSlot(li, "description", f.description || "No description");
    desc.classList.toggle("is-empty", !f.description);
    li.querySelector('[data-slot="inactive-badge"]').hidden = f.is_active;
    var pool = setSlot(li, "pool-badge", f.pool ? "pool " + f.pool + (f.pool_fallback ? " (then general)" : "") : "");
    pool.hidden = !f.pool;
    var sw = li.querySelector('[data-action="toggle"]');
    sw.setAttribute("aria-checked", f.is_active ? "true" : "false");
    sw.setAttribute("aria-label", f.feature_name + " active");
    setSlot(li, "status", f.is_active ? "Active" : "Inactive");
    li.querySelector('[data-action="copy"]').setAttribute("aria-label", "Copy feature key " + f.feature_key);
    li.querySelector('[data-action="edit"]').setAttribute("aria-label", "Edit " + f.feature_name);
    li.querySelector('[data-action="delete"]').setAttribute("aria-label", "Delete " + f.feature_name);
  }

  function render() {
    var list = $("#feature-list");
    var groupTpl = $("#tpl-group").content.firstElementChild;
    var rowTpl = $("#tpl-feature").content.firstElementChild;
    var features = state.features.slice().sort(byCategoryThenName);
    var fragment = document.createDocumentFragment();
    var group = null;
    var count = 0;
    features.forEach(function (f) {
      if (!group || group.dataset.category !== f.category) {
        if (group) setSlot(group, "count", String(count));
        group = groupTpl.cloneNode(true);
        group.dataset.category = f.category;
        setSlot(group, "category", f.category);
        fragment.appendChild(group);
        count = 0;
      }
      var li = rowTpl.cloneNode(true);
      fillFeature(li, f);
      group.querySelector(".features").appendChild(li);
      count += 1;
    });
    if (group) setSlot(group, "count", String(count));
    list.replaceChildren(fragment);
    list.dataset.loaded = "true";
    $("#list-empty").hidden = features.length > 0;
    renderSummary();
    renderCategoryOptions();
    applyFilter();
  }

  function renderSummary() {
    var fs = state.features;
    var categories = {};
    var inactive = 0;
    fs.forEach(function (f) { categories[f.category] = true; if (!f.is_active) inactive += 1; });
    var nCat = Object.keys(categories).length;
    var parts = [fs.length + (fs.length === 1 ? " feature" : " features"), nCat + (nCat === 1 ? " category" : " categories")];
    if (inactive) parts.push(inactive + " inactive");
    $("#summary").textContent = parts.join(" · ");
  }

  function renderCategoryOptions() {
    var seen = {};
    var options = document.createDocumentFragment();
    state.features.map(function (f) { return f.category; }).sort().forEach(function (c) {
      if (seen[c]) return;
      seen[c] = true;
      var opt = document.createElement("option");
      opt.value = c;
      options.appendChild(opt);
    });
    $("#category-options").replaceChildren(options);
  }

  function applyFilter() {
    var query = $("#filter").value.trim().toLowerCase();
    var showInactive = $("#show-inactive").checked;
    var anyVisible = false;
    $$("#feature-list .group").forEach(function (group) {
      var visibleInGroup = 0;
      $$(".feature", group).forEach(function (li) {
        var f = findFeature(li.dataset.id);
        var haystack = f ? [f.feature_key, f.feature_name, f.category, f.description || ""].join(" ").toLowerCase() : "";
        var visible = (!query || haystack.indexOf(query) !== -1) && (showInactive || !f || f.is_active);
        li.hidden = !visible;
        if (visible) visibleInGroup += 1;
      });
      group.hidden = visibleInGroup === 0;
      if (visibleInGroup) anyVisible = true;
    });
    $("#list-nomatch").hidden = anyVisible || state.features.length === 0;
  }

  function findFeature(id) {
    for (var i = 0; i < state.features.length; i++) if (state.features[i].id === id) return state.features[i];
    return null;
  }

  function replaceFeature(updated) {
    state.features = state.features.map(function (f) { return f.id === updated.id ? updated : f; });
  }

  function flash(id) {
    var li = document.querySelector('.feature[data-id="' + CSS.escape(id) + '"]');
    if (!li) return;
    li.classList.remove("is-flash");
    void li.offsetWidth; // restart the animation
    li.classList.add("is-flash");
  }

  function loadFeatures() {
    return request("GET", "/feature-pricing").then(function (res) {
      if (!res.ok) throw new Error(problemText(res));
      state.features = res.data;
      render();
    }).catch(function (err) {
      toast("Could not load pricing: " + err.message, true);
      if ($("#feature-list").dataset.loaded !== "true") $("#summary").textContent = "Could not load pricing";
    });
  }

  // ---- row actions -------------------------------------------------------------------

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).catch(function () { return legacyCopy(text); });
    }
    return legacyCopy(text);
  }

  function legacyCopy(text) {
    // For plain-http hosts other than localhost, where navigator.clipboard does not exist.
    return new Promise(function (resolve, reject) {
      var area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.style.position = "fixed";
      area.style.top = "-1000px";
      document.body.appendChild(area);
      area.select();
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      document.body.removeChild(area);
      if (ok) resolve(); else reject(new Error("copy refused"));
    });
  }

  function onCopy(button, f) {
    copyText(f.feature_key).then(function () {
      button.classList.add("is-copied");
      button.querySelector(".copy-label").textContent = "Copied";
      toast("Copied " + f.feature_key);
      clearTimeout(button._copyTimer);
      button._copyTimer = setTimeout(function () {
        button.classList.remove("is-copied");
        button.querySelector(".copy-label").textContent = "Copy";
      }, 1800);
    }, function () {
      toast("Copy failed: select the key and copy it by hand", true);
    });
  }

  function onToggle(button, f) {
    if (f.is_active) {
      var question = 'Deactivate "' + f.feature_name + '" (' + f.feature_key + ")?\n\n" +
        "Requests for this feature will be refused (nothing charged) until it is switched back on.";
      if (!window.confirm(question)) { toast(f.feature_name + " stays active"); return; }
    }
    button.disabled = true;
    request("PATCH", "/feature-pricing/" + encodeURIComponent(f.id), { is_active: !f.is_active }).then(function (res) {
      button.disabled = false;
      if (!res.ok) return failed(res, f);
      replaceFeature(res.data);
      render();
      flash(f.id);
      toast(res.data.feature_name + (res.data.is_active ? " is active" : " is inactive"));
    }, networkError(button));
  }

  function onDelete(button, f) {
    var question = 'Delete "' + f.feature_name + '" (' + f.feature_key + ")?\n\n" +
      "Requests for this feature will be refused until it is priced again. Past charges keep their key.";
    if (!window.confirm(question)) return;
    button.disabled = true;
    request("DELETE", "/feature-pricing/" + encodeURIComponent(f.id)).then(function (res) {
      button.disabled = false;
      if (!res.ok && res.status !== 404) return failed(res, f);
      state.features = state.features.filter(function (x) { return x.id !== f.id; });
      if (state.editingId === f.id) resetForm();
      render();
      toast("Deleted " + f.feature_key);
    }, networkError(button));
  }

  function failed(res, f) {
    if (res.status === 404) {
      toast(f.feature_key + " no longer exists; reloading", true);
      return loadFeatures();
    }
    toast(problemText(res), true);
  }

  function networkError(button) {
    return function (err) {
      if (button) button.disabled = false;
      toast("Network error: " + err.message, true);
    };
  }

  // ---- the form ----------------------------------------------------------------------

  function field(name) { return $("#f-" + name); }

  function clearErrors() {
    $("#form-error").hidden = true;
    FIELDS.forEach(function (name) { setFieldError(name, null); });
  }

  function setFieldError(name, message) {
    var input = field(name);
    var el = $("#e-" + name);
    if (!input || !el) return false;
    el.textContent = message || "";
    el.hidden = !message;
    if (message) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
    return true;
  }

  function showFormError(message) {
    var el = $("#form-error");
    el.textContent = message;
    el.hidden = false;
  }

  function label(name) {
    var el = document.querySelector('label[for="f-' + name + '"]');
    return el ? el.textContent.replace(/optional$/, "").trim() : name;
  }

  function readForm() {
    var credits = field("credits").value.trim();
    var number = Number(credits);
    return {
      feature_key: field("feature_key").value.trim(),
      feature_name: field("feature_name").value,
      category: field("category").value,
      // Send what was typed and let the API judge it, so its message is the one shown.
      credits: credits === "" ? null : (isFinite(number) ? number : credits),
      description: field("description").value.trim() || null,
      is_active: field("is_active").checked,
      pool: field("pool").value.trim() || null,
      pool_fallback: field("pool_fallback").checked
    };
  }

  function fillForm(f) {
    field("feature_key").value = f.feature_key;
    field("feature_name").value = f.feature_name;
    field("category").value = f.category;
    field("credits").value = String(f.credits);
    field("description").value = f.description || "";
    field("is_active").checked = f.is_active;
    field("pool").value = f.pool || "";
    field("pool_fallback").checked = !!f.pool_fallback;
  }

  function startEdit(f) {
    state.editingId = f.id;
    clearErrors();
    fillForm(f);
    $("#feature-form").classList.add("is-editing");
    $("#form-title").textContent = "Edit feature";
    $("#form-sub").textContent = "Editing " + f.feature_key;
    $("#submit-btn").textContent = "Save changes";
    $("#cancel-btn").hidden = false;
    $$(".feature.is-editing").forEach(function (li) { li.classList.remove("is-editing"); });
    var li = document.querySelector('.feature[data-id="' + CSS.escape(f.id) + '"]');
    if (li) li.classList.add("is-editing");
    var form = $("#feature-form");
    var box = form.getBoundingClientRect();
    if (box.top < 0 || box.bottom > window.innerHeight) form.scrollIntoView({ block: "start" });
    field("feature_name").focus({ preventScroll: true });
  }

  function resetForm() {
    state.editingId = null;
    $("#feature-form").reset();
    $("#feature-form").classList.remove("is-editing");
    clearErrors();
    $("#form-title").textContent = "Add feature";
    $("#form-sub").textContent = "Price a new feature in credits.";
    $("#submit-btn").textContent = "Add feature";
    $("#cancel-btn").hidden = true;
    $$(".feature.is-editing").forEach(function (li) { li.classList.remove("is-editing"); });
  }

  function showProblem(res) {
    var data = res.data || {};
    var first = null;
    var leftovers = [];
    var errors = data.errors && typeof data.errors === "object" ? data.errors : {};
    // A 409 is about the key even when the server does not say so field by field.
    if (res.status === 409 && !errors.feature_key) errors = { feature_key: data.detail || "already exists" };
    Object.keys(errors).forEach(function (name) {
      if (setFieldError(name, String(errors[name]))) {
        if (!first || FIELDS.indexOf(name) < FIELDS.indexOf(first)) first = name;
      } else {
        leftovers.push(name + ": " + errors[name]);
      }
    });
    if (leftovers.length) showFormError(leftovers.join("; "));
    else if (!first) showFormError(problemText(res));
    if (first) field(first).focus();
  }

  function onSubmit(event) {
    event.preventDefault();
    clearErrors();
    var body = readForm();
    var editing = state.editingId;
    var submit = $("#submit-btn");
    submit.disabled = true;
    var call = editing
      ? request("PATCH", "/feature-pricing/" + encodeURIComponent(editing), body)
      : request("POST", "/feature-pricing", body);
    call.then(function (res) {
      submit.disabled = false;
      if (!res.ok) {
        if (editing && res.status === 404) {
          resetForm();
          return failed(res, { feature_key: body.feature_key });
        }
        return showProblem(res);
      }
      if (editing) replaceFeature(res.data);
      else state.features.push(res.data);
      resetForm();
      render();
      flash(res.data.id);
      toast((editing ? "Saved " : "Added ") + res.data.feature_key);
    }, function (err) {
      submit.disabled = false;
      showFormError("Network error: " + err.message);
    });
  }

  // ---- usage -------------------------------------------------------------------------
  // Three charts (static/charts.js, drawn with the vendored uPlot) over the selected range:
  // net credits per day per feature, per day per organization (the top ORG_SERIES and the
  // rest summed), and per feature, biggest first. Days with nothing charged are 0.

  var ORG_SERIES = 5;

  function usageDays() {
    var n = parseInt($("#usage-range").value, 10) || 30;
    var today = new Date();
    var start = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - (n - 1)));
    return charts.daysBetween(charts.isoDay(start.getTime() / 1000), charts.isoDay(today.getTime() / 1000));
  }

  function loadUsage() {
    var days = usageDays();
    var query = "&since=" + encodeURIComponent(days[0] + "T00:00:00+00:00");
    $("#usage-error").hidden = true;
    return Promise.all([
      request("GET", "/usage?group_by=day&split_by=feature" + query),
      request("GET", "/usage?group_by=day&split_by=org" + query),
      request("GET", "/usage?group_by=feature" + query)
    ]).then(function (results) {
      for (var i = 0; i < results.length; i++) if (!results[i].ok) throw new Error(problemText(results[i]));
      state.usage = {
        days: days,
        byDayFeature: results[0].data.rows,
        byDayOrg: results[1].data.rows,
        byFeature: results[2].data.rows
      };
      drawUsage();
    }).catch(function (err) {
      var el = $("#usage-error");
      el.textContent = "Could not load usage: " + err.message;
      el.hidden = false;
    });
  }

  /** One series per split value, a value per day (0 where nothing happened), biggest total first. */
  function seriesByDay(days, rows) {
    var index = {};
    days.forEach(function (day, i) { index[day] = i; });
    var bySplit = {};
    rows.forEach(function (row) {
      var d = index[String(row.key).slice(0, 10)];
      if (d === undefined) return;
      var s = bySplit[row.split] || (bySplit[row.split] = { label: row.split, values: days.map(function () { return 0; }), total: 0 });
      s.values[d] += row.net_credits;
      s.total += row.net_credits;
    });
    return Object.keys(bySplit).map(function (k) { return bySplit[k]; }).sort(function (a, b) {
      return b.total - a.total || (a.label < b.label ? -1 : a.label > b.label ? 1 : 0);
    });
  }

  function topAndOthers(series, keep) {
    if (series.length <= keep + 1) return series;
    var rest = series.slice(keep);
    var others = { label: "Others (" + rest.length + ")", values: rest[0].values.map(function () { return 0; }), total: 0 };
    rest.forEach(function (s) {
      s.values.forEach(function (v, i) { others.values[i] += v; });
      others.total += s.total;
    });
    return series.slice(0, keep).concat([others]);
  }

  function drawUsage() {
    var u = state.usage;
    if (!u) return;
    var totals = { charges: 0, credits_charged: 0, credits_refunded: 0, net_credits: 0 };
    u.byFeature.forEach(function (row) { Object.keys(totals).forEach(function (k) { totals[k] += row[k]; }); });
    Object.keys(totals).forEach(function (k) {
      $('[data-stat="' + k + '"]').textContent = totals[k].toLocaleString();
    });
    // The axis runs to the last day the server reports, should its clock be ahead of this one.
    var days = u.days;
    [u.byDayFeature, u.byDayOrg].forEach(function (rows) {
      rows.forEach(function (row) {
        var day = String(row.key).slice(0, 10);
        if (day > days[days.length - 1]) days = charts.daysBetween(days[0], day);
      });
    });
    var empty = "No charges in this range";
    charts.dailyLines($("#chart-day-feature"), {
      days: days, series: seriesByDay(days, u.byDayFeature), emptyText: empty, caption: "Net credits per day, by feature"
    });
    charts.dailyLines($("#chart-day-org"), {
      days: days,
      series: topAndOthers(seriesByDay(days, u.byDayOrg), ORG_SERIES),
      emptyText: empty,
      caption: "Net credits per day, by organization (the top " + ORG_SERIES + " and the others)"
    });
    var features = u.byFeature.slice().sort(function (a, b) {
      return b.net_credits - a.net_credits || (a.key < b.key ? -1 : a.key > b.key ? 1 : 0);
    });
    charts.bars($("#chart-feature"), {
      labels: features.map(function (r) { return r.key; }),
      values: features.map(function (r) { return r.net_credits; }),
      xLabel: "Feature",
      seriesLabel: "Net credits",
      emptyText: empty,
      caption: "Net credits per feature, biggest first"
    });
  }

  // ---- wiring ------------------------------------------------------------------------

  function init() {
    $("#feature-list").addEventListener("click", function (event) {
      var button = event.target.closest("[data-action]");
      if (!button) return;
      var li = button.closest(".feature");
      var f = li && findFeature(li.dataset.id);
      if (!f) return;
      var action = button.dataset.action;
      if (action === "copy") onCopy(button, f);
      else if (action === "toggle") onToggle(button, f);
      else if (action === "edit") startEdit(f);
      else if (action === "delete") onDelete(button, f);
    });
    $("#feature-form").addEventListener("submit", onSubmit);
    $("#feature-form").addEventListener("input", function (event) {
      var name = event.target.name;
      if (name && event.target.getAttribute("aria-invalid") === "true") setFieldError(name, null);
    });
    $("#feature-form").addEventListener("keydown", function (event) {
      if (event.key === "Escape" && state.editingId) resetForm();
    });
    $("#cancel-btn").addEventListener("click", resetForm);
    $("#add-jump").addEventListener("click", function (event) {
      event.preventDefault();
      if (state.editingId) resetForm();
      $("#feature-form").scrollIntoView({ block: "start" });
      field("feature_key").focus({ preventScroll: true });
    });
    $("#filter").addEventListener("input", applyFilter);
    $("#show-inactive").addEventListener("change", applyFilter);
    $("#usage-range").addEventListener("change", loadUsage);
    $("#usage-refresh").addEventListener("click", loadUsage);
    loadFeatures();
    loadUsage();
  }

  window.creditGuardAdmin = { apiBase: apiBase };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
