// Keyboard review for /ui/trajectories/{id}: j/k move, 1-9 label, 0 unlabel, n note,
// m and l filter. Labels go to the UI's own endpoints, authenticated by the page's cookie;
// after a change the page reloads at the same step so the export preview is recomputed;
// opened from the review queue (data-queue-next), a saved label opens the queue's next item.
(() => {
  "use strict";

  const preview = document.getElementById("preview");
  if (preview) {
    // Keep the reviewer's place (#step-N) across a change of policy or mask labels.
    preview.addEventListener("change", () => {
      preview.action = preview.action.split("#")[0] + location.hash;
      preview.submit();
    });
  }

  const main = document.querySelector("main[data-trajectory]");
  if (!main) {
    return;
  }
  const labels = JSON.parse(document.getElementById("labels").textContent);
  const baseUrl = main.dataset.labelUrl;
  const statusLine = document.getElementById("status");
  const filterLine = document.getElementById("filters");
  const cards = Array.from(main.querySelectorAll("article.step"));
  const filterKey = "srft-review-filters";
  const filters = Object.assign({ masked: false, low: false }, readFilters());
  let current = null;

  function readFilters() {
    try {
      return JSON.parse(sessionStorage.getItem(filterKey) || "{}");
    } catch (_error) {
      return {};
    }
  }

  function say(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", Boolean(isError));
  }

  function shown(card) {
    if (filters.masked && card.dataset.outcome === "trained") {
      return false;
    }
    if (filters.low && card.dataset.lowAgreement !== "true") {
      return false;
    }
    return true;
  }

  function applyFilters() {
    for (const card of cards) {
      card.hidden = !shown(card);
    }
    const active = [];
    if (filters.masked) active.push("masked only");
    if (filters.low) active.push("low agreement only");
    filterLine.textContent = active.length ? "Filter: " + active.join(", ") + "." : "";
    sessionStorage.setItem(filterKey, JSON.stringify(filters));
    if (current && current.hidden) {
      focus(cards.find((card) => !card.hidden) || null);
    }
  }

  function focus(card) {
    if (current) current.classList.remove("focused");
    current = card;
    if (!card) return;
    card.classList.add("focused");
    card.focus({ preventScroll: true });
    card.scrollIntoView({ block: "nearest" });
    history.replaceState(null, "", "#" + card.id);
  }

  function move(delta) {
    const visible = cards.filter((card) => !card.hidden);
    if (!visible.length) return;
    const at = visible.indexOf(current);
    const next = at < 0 ? (delta > 0 ? 0 : visible.length - 1) : at + delta;
    focus(visible[Math.max(0, Math.min(visible.length - 1, next))]);
  }

  async function send(method, card, body, advance) {
    const step = card.dataset.step;
    say("saving step " + step + "...");
    const response = await fetch(baseUrl + step + "/label", {
      method: method,
      credentials: "same-origin",
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try {
        message = (await response.json()).error.message;
      } catch (_error) {
        // keep the status line
      }
      say("step " + step + ": " + message, true);
      return;
    }
    if (advance && main.dataset.queueNext) {
      location.assign(main.dataset.queueNext);
      return;
    }
    history.replaceState(null, "", "#" + card.id);
    location.reload();
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest && event.target.closest("input, select, textarea, button")) return;
    const key = event.key;
    if (key === "j" || key === "k") {
      move(key === "j" ? 1 : -1);
    } else if (key === "m") {
      filters.masked = !filters.masked;
      applyFilters();
    } else if (key === "l") {
      filters.low = !filters.low;
      applyFilters();
    } else if (!current) {
      if (/^[0-9n]$/.test(key)) say("move to a step first (j/k)", true);
      return;
    } else if (key >= "1" && key <= "9") {
      const label = labels[Number(key) - 1];
      if (!label) return;
      send("POST", current, { label: label, note: current.dataset.note || null }, true);
    } else if (key === "0") {
      send("DELETE", current, null);
    } else if (key === "n") {
      const label = current.dataset.humanLabel || current.dataset.label;
      if (!label) {
        say("label the step first (1-" + Math.min(labels.length, 9) + ")", true);
        return;
      }
      const note = prompt("Note for step " + current.dataset.step, current.dataset.note || "");
      if (note === null) return;
      send("POST", current, { label: label, note: note || null });
    } else {
      return;
    }
    event.preventDefault();
  });

  for (const card of cards) {
    card.addEventListener("click", () => focus(card));
  }
  applyFilters();
  const start = location.hash ? document.getElementById(location.hash.slice(1)) : null;
  if (start && cards.includes(start) && !start.hidden) {
    focus(start);
  }
})();
