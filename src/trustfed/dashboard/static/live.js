// Live updates without user action: fetch this page's fragment every few seconds and swap it in when
// it changed. The fragment is rendered (and escaped) on the server; no data is turned into markup here.
(function () {
  "use strict";
  var main = document.getElementById("live");
  if (!main || !main.dataset.src) {
    return;
  }
  var every = Number(main.dataset.every || "0");
  if (!(every > 0)) {
    return;
  }
  var status = document.getElementById("live-status");
  var last = null;
  var updates = 0;
  function tick() {
    fetch(main.dataset.src, { cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) {
          throw new Error("HTTP " + r.status);
        }
        return r.text();
      })
      .then(function (html) {
        if (html !== last) {
          main.innerHTML = html;
          if (last !== null) {
            updates += 1;
            main.dataset.updates = String(updates);
          }
          last = html;
        }
        if (status) {
          status.textContent = "live: checked at " + new Date().toLocaleTimeString();
        }
      })
      .catch(function (e) {
        if (status) {
          status.textContent = "live: " + e.message + "; trying again";
        }
      })
      .finally(function () {
        setTimeout(tick, every * 1000);
      });
  }
  tick();
})();
