/* credit_guard admin: the plans page's behaviour (list, add, edit, delete), in the pricing
 * page's manner (static/admin.js): no build step, the API next to the page (the main
 * element's data-base is the prefix the admin app is mounted under), every value from the
 * server set with textContent, every error shown next to its field.
 */
(function () {
  "use strict";

  var FIELDS = ["plan_key", "name", "credits", "period", "rollover"];
  var API = document.getElementById("main").getAttribute("data-base") + "/api/admin";
  var state = { plans: [], editingKey: null };
  var $ = function (sel, root) { return (root || document).querySelector(sel); };

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

  function plural(n, one, many) { return n.toLocaleString("en") + " " + (n === 1 ? one : many); }

  /** What a plan grants, in words: "1,000 credits a month, up to 500 roll over". */
  function terms(p) {
    var carried = p.rollover === null ? "all unused credits roll over"
      : p.rollover === 0 ? "unused credits reset"
      : "up to " + plural(p.rollover, "unused credit rolls", "unused credits roll") + " over";
    return plural(p.credits, "credit", "credits") + " a " + p.period + ", " + carried;
  }

  function setSlot(root, name, text) {
    var el = root.querySelector('[data-slot="' + name + '"]');
    el.textContent = text;
    return el;
  }

  function fillPlan(li, p) {
    li.dataset.key = p.plan_key;
    li.classList.toggle("is-editing", state.editingKey === p.plan_key);
    setSlot(li, "name", p.name);
    setSlot(li, "plan_key", p.plan_key);
    setSlot(li, "terms", terms(p));
    setSlot(li, "credits", p.credits.toLocaleString("en"));
    setSlot(li, "per", "/ " + p.period);
    setSlot(li, "subscribers", plural(p.subscribers, "subscriber", "subscribers"));
    li.querySelector('[data-action="edit"]').setAttribute("aria-label", "Edit " + p.name);
    li.querySelector('[data-action="delete"]').setAttribute("aria-label", "Delete " + p.name);
  }

  function render() {
    var rows = $("#plan-rows");
    var tpl = $("#tpl-plan").content.firstElementChild;
    var fragment = document.createDocumentFragment();
    state.plans.sort(function (a, b) { return a.plan_key < b.plan_key ? -1 : a.plan_key > b.plan_key ? 1 : 0; });
    state.plans.forEach(function (p) {
      var li = tpl.cloneNode(true);
      fillPlan(li, p);
      fragment.appendChild(li);
    });
    rows.replaceChildren(fragment);
    var n = state.plans.length;
    var subscribers = state.plans.reduce(function (sum, p) { return sum + p.subscribers; }, 0);
    $("#plan-group").hidden = n === 0;
    $("#plan-count").textContent = n ? String(n) : "";
    $("#list-empty").hidden = n > 0;
    $("#summary").textContent = plural(n, "plan", "plans") + " · " + plural(subscribers, "subscriber", "subscribers");
    $("#plan-list").dataset.loaded = "true";
  }

  function findPlan(key) {
    for (var i = 0; i < state.plans.length; i++) if (state.plans[i].plan_key === key) return state.plans[i];
    return null;
  }

  function flash(key) {
    var li = document.querySelector('.plan[data-key="' + CSS.escape(key) + '"]');
    if (!li) return;
    li.classList.remove("is-flash");
    void li.offsetWidth; // restart the animation
    li.classList.add("is-flash");
  }

  function loadPlans() {
    return request("GET", "/plans").then(function (res) {
      if (!res.ok) throw new Error(problemText(res));
      state.plans = res.data;
      render();
    }).catch(function (err) {
      toast("Could not load plans: " + err.message, true);
      $("#summary").textContent = "Could not load plans";
    });
  }

  function onDelete(button, p) {
    var question = 'Delete plan "' + p.name + '" (' + p.plan_key + ")?\n\n" +
      "Only a plan nobody subscribes to can be deleted. Credits it granted stay where they are.";
    if (!window.confirm(question)) return;
    button.disabled = true;
    request("DELETE", "/plans/" + encodeURIComponent(p.plan_key)).then(function (res) {
      button.disabled = false;
      if (!res.ok && res.status !== 404) { toast(problemText(res), true); return; }
      state.plans = state.plans.filter(function (x) { return x.plan_key !== p.plan_key; });
      if (state.editingKey === p.plan_key) resetForm();
      render();
      toast("Deleted plan " + p.plan_key);
    }, function (err) {
      button.disabled = false;
      toast("Network error: " + err.message, true);
    });
  }

  // ---- the form ----------------------------------------------------------------------

  function field(name) { return $("#f-" + name); }

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

  function clearErrors() {
    $("#form-error").hidden = true;
    FIELDS.forEach(function (name) { setFieldError(name, null); });
  }

  function showFormError(message) {
    var el = $("#form-error");
    el.textContent = message;
    el.hidden = false;
  }

  /** Send what was typed and let the API judge it, so its message is the one shown. */
  function number(name) {
    var text = field(name).value.trim();
    var value = Number(text);
    return text === "" ? null : (isFinite(value) ? value : text);
  }

  function readForm() {
    var all = field("rollover_all").checked;
    var rollover = number("rollover");
    var body = {
      name: field("name").value.trim() || null,
      credits: number("credits"),
      period: field("period").value,
      rollover: all ? null : (rollover === null ? 0 : rollover)
    };
    if (!state.editingKey) body.plan_key = field("plan_key").value.trim();
    return body;
  }

  function syncRollover() {
    var all = field("rollover_all").checked;
    field("rollover").disabled = all;
    if (all) field("rollover").value = "";
  }

  function startEdit(p) {
    state.editingKey = p.plan_key;
    clearErrors();
    field("plan_key").value = p.plan_key;
    field("plan_key").readOnly = true;
    field("name").value = p.name === p.plan_key ? "" : p.name;
    field("credits").value = String(p.credits);
    field("period").value = p.period;
    field("rollover_all").checked = p.rollover === null;
    field("rollover").value = p.rollover === null ? "" : String(p.rollover);
    syncRollover();
    $("#plan-form").classList.add("is-editing");
    $("#form-title").textContent = "Edit plan";
    $("#form-sub").textContent = "Editing " + p.plan_key + ": subscribers get the change from their next period.";
    $("#submit-btn").textContent = "Save changes";
    $("#cancel-btn").hidden = false;
    render();
    var form = $("#plan-form");
    var box = form.getBoundingClientRect();
    if (box.top < 0 || box.bottom > window.innerHeight) form.scrollIntoView({ block: "start" });
    field("credits").focus({ preventScroll: true });
  }

  function resetForm() {
    state.editingKey = null;
    $("#plan-form").reset();
    field("plan_key").readOnly = false;
    syncRollover();
    $("#plan-form").classList.remove("is-editing");
    clearErrors();
    $("#form-title").textContent = "Add plan";
    $("#form-sub").textContent = "Credits granted every period.";
    $("#submit-btn").textContent = "Add plan";
    $("#cancel-btn").hidden = true;
    Array.prototype.forEach.call(document.querySelectorAll(".plan.is-editing"), function (li) {
      li.classList.remove("is-editing");
    });
  }

  function showProblem(res) {
    var data = res.data || {};
    var first = null;
    var leftovers = [];
    var errors = data.errors && typeof data.errors === "object" ? data.errors : {};
    // A 409 on a create is about the key even when the server does not say so field by field.
    if (res.status === 409 && !state.editingKey && !Object.keys(errors).length) {
      errors = { plan_key: data.detail || "already exists" };
    }
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
    var editing = state.editingKey;
    var submit = $("#submit-btn");
    submit.disabled = true;
    var call = editing
      ? request("PATCH", "/plans/" + encodeURIComponent(editing), body)
      : request("POST", "/plans", body);
    call.then(function (res) {
      submit.disabled = false;
      if (!res.ok) {
        if (editing && res.status === 404) {
          resetForm();
          toast(editing + " no longer exists; reloading", true);
          return loadPlans();
        }
        return showProblem(res);
      }
      state.plans = state.plans.filter(function (p) { return p.plan_key !== res.data.plan_key; }).concat([res.data]);
      resetForm();
      render();
      flash(res.data.plan_key);
      toast((editing ? "Saved " : "Added ") + res.data.plan_key);
    }, function (err) {
      submit.disabled = false;
      showFormError("Network error: " + err.message);
    });
  }

  // ---- wiring ------------------------------------------------------------------------

  function init() {
    $("#plan-rows").addEventListener("click", function (event) {
      var button = event.target.closest("[data-action]");
      if (!button) return;
      var p = findPlan(button.closest(".plan").dataset.key);
      if (!p) return;
      if (button.dataset.action === "edit") startEdit(p);
      else if (button.dataset.action === "delete") onDelete(button, p);
    });
    $("#plan-form").addEventListener("submit", onSubmit);
    $("#plan-form").addEventListener("input", function (event) {
      var name = event.target.name === "rollover_all" ? "rollover" : event.target.name;
      if (name && field(name) && field(name).getAttribute("aria-invalid") === "true") setFieldError(name, null);
    });
    $("#plan-form").addEventListener("keydown", function (event) {
      if (event.key === "Escape" && state.editingKey) resetForm();
    });
    field("rollover_all").addEventListener("change", syncRollover);
    $("#cancel-btn").addEventListener("click", resetForm);
    $("#add-jump").addEventListener("click", function (event) {
      event.preventDefault();
      if (state.editingKey) resetForm();
      $("#plan-form").scrollIntoView({ block: "start" });
      field("plan_key").focus({ preventScroll: true });
    });
    loadPlans();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
