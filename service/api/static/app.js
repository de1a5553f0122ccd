// synthperf dashboard: live refresh of server-rendered fragments. No framework, no build step.
// An element with data-poll="URL" gets its inner HTML replaced by GET URL every data-interval ms;
// an element with id and data-poll-page="ms" is replaced by the same element of a fresh page load.
(function () {
  "use strict";
  var status = null;

  function say(text, bad) {
    status = status || document.getElementById("live-status");
    if (!status) return;
    status.textContent = text;
    status.className = bad ? "live-bad" : "";
  }

  function stamp() {
    var d = new Date();
    return d.toISOString().substring(11, 19) + " UTC";
  }

  function fetchText(url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } }).then(function (r) {
      if (r.status === 401 || r.redirected && r.url.indexOf("/login") >= 0) {
        window.location.href = "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search);
        throw new Error("logged out");
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.text();
    });
  }

  function poll(el) {
    var url = el.getAttribute("data-poll");
    var every = parseInt(el.getAttribute("data-interval") || "3000", 10);
    function tick() {
      if (document.hidden) { setTimeout(tick, every); return; }
      fetchText(url).then(function (html) {
        el.innerHTML = html;
        say("Live: updated " + stamp(), false);
      }).catch(function (e) {
        say("Live update failed (" + e.message + "); retrying…", true);
      }).then(function () { setTimeout(tick, every); });
    }
    setTimeout(tick, every);
  }

  function pollPage(el) {
    var every = parseInt(el.getAttribute("data-poll-page") || "5000", 10);
    function tick() {
      if (document.hidden) { setTimeout(tick, every); return; }
      fetchText(window.location.href).then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById(el.id);
        if (fresh) el.innerHTML = fresh.innerHTML;
      }).catch(function () { /* keep the last good view */ }).then(function () { setTimeout(tick, every); });
    }
    setTimeout(tick, every);
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("[data-poll]"), poll);
    Array.prototype.forEach.call(document.querySelectorAll("[data-poll-page][id]"), pollPage);
  });
})();
