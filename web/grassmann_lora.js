// Grassmann LoRA front-end extension (no build step; loaded by ComfyUI from WEB_DIRECTORY).
//
// 1. Shows the tables our nodes send in `ui.grassmann_table` (similarity summary,
//    fidelity report, clusters, differences, file info) as HTML tables on the node,
//    and their warnings (`lines`) as wrapped paragraphs. ComfyUI does not display
//    `ui.text` for custom nodes, hence this widget.
// 2. Keeps heatmap previews (`ui.images`) visible: the node grows so the image
//    area below the table is not squeezed to nothing.
// 3. Manages the dynamic LoRA inputs lora_1 … lora_N of the Kernel Matrix and
//    Karcher Merge nodes: connected slots are kept (renumbered in order) and
//    exactly one empty slot is shown after them.
import { app } from "../../scripts/app.js";

const PREFIX = "GrassmannLoRA";
const TABLE_KEY = "grassmann_table";
const LORA_SLOT = /^lora_(\d+)$/;
const LORA_TYPE = "LORA_FACTORS";
const TABLE_WIDGET = "grassmann_table";
const MIN_PREVIEW_HEIGHT = 380;
const MAX_TABLE_HEIGHT = 420;

const STYLE = `
.grassmann-lora-tables { font: 11px/1.35 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  color: var(--input-text, #ddd); overflow: auto; box-sizing: border-box; padding: 2px 4px;
  background: var(--comfy-input-bg, #222); border-radius: 6px; }
.grassmann-lora-tables h4 { margin: 4px 0 2px; font: 600 12px/1.3 sans-serif; }
.grassmann-lora-tables table { border-collapse: collapse; width: 100%; }
.grassmann-lora-tables th, .grassmann-lora-tables td { border-bottom: 1px solid rgba(128,128,128,.35);
  padding: 1px 6px; text-align: left; vertical-align: top; }
.grassmann-lora-tables th { white-space: nowrap; }
.grassmann-lora-tables td { white-space: normal; overflow-wrap: anywhere; }
.grassmann-lora-tables td.num { text-align: right; white-space: nowrap; overflow-wrap: normal; }
.grassmann-lora-tables table.kv td:first-child { white-space: nowrap; opacity: .8; width: 1%; }
.grassmann-lora-tables th { position: sticky; top: 0; background: var(--comfy-input-bg, #222); }
.grassmann-lora-tables pre { margin: 2px 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.grassmann-lora-tables .note { opacity: .75; margin: 2px 0 4px; white-space: normal; overflow-wrap: anywhere; }
.grassmann-lora-tables .line { margin: 2px 0; padding-left: 10px; text-indent: -10px; white-space: normal;
  overflow-wrap: anywhere; }
.grassmann-lora-tables .line::before { content: "• "; }
`;

function ensureStyle() {
  if (document.getElementById("grassmann-lora-style")) return;
  const style = document.createElement("style");
  style.id = "grassmann-lora-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

const isNumber = (s) => /^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?[%×]?$/i.test(String(s).trim());

function renderTables(container, tables) {
  container.replaceChildren();
  for (const t of tables || []) {
    if (t.title) {
      const h = document.createElement("h4");
      h.textContent = t.title;
      container.appendChild(h);
    }
    if (t.text !== undefined) {
      const pre = document.createElement("pre");
      pre.textContent = t.text;
      container.appendChild(pre);
    }
    for (const line of Array.isArray(t.lines) ? t.lines : []) {
      const p = document.createElement("div");
      p.className = "line";
      p.textContent = line;
      container.appendChild(p);
    }
    if (Array.isArray(t.rows)) {
      const table = document.createElement("table");
      const cols = t.columns || [];
      const keyValue = cols.length === 2 && !cols.some((c) => c);   // label → value, no headers
      if (keyValue) table.className = "kv";
      if (!keyValue) {
        const tr = table.createTHead().insertRow();
        for (const c of cols) {
          const th = document.createElement("th");
          th.textContent = c;
          tr.appendChild(th);
        }
      }
      const body = table.createTBody();
      for (const row of t.rows) {
        const tr = body.insertRow();
        for (const cell of row) {
          const td = tr.insertCell();
          td.textContent = cell;
          if (!keyValue && isNumber(cell)) td.className = "num";
        }
      }
      container.appendChild(table);
    }
    if (t.note) {
      const p = document.createElement("div");
      p.className = "note";
      p.textContent = t.note;
      container.appendChild(p);
    }
  }
}

// Height the tables need at the node's current width. Measured on an off-screen
// copy: the widget's own element is hidden while its node is off-screen.
function measureTables(node, el) {
  const probe = el.cloneNode(true);
  probe.style.cssText = `position:absolute;left:-10000px;top:0;visibility:hidden;` +
    `width:${Math.max(120, node.size[0] - 20)}px;height:auto;max-height:none;overflow:visible`;
  document.body.appendChild(probe);
  const h = probe.scrollHeight;
  probe.remove();
  return h;
}

function tableWidget(node) {
  let widget = node.widgets?.find((w) => w.name === TABLE_WIDGET);
  if (widget) return widget;
  ensureStyle();
  const el = document.createElement("div");
  el.className = "grassmann-lora-tables";
  el.dataset.node = String(node.id);
  let value = [];
  let measured = { width: 0, height: 60 };
  const needed = () => {
    if (el.isConnected && el.offsetParent !== null && el.clientWidth > 0) {
      // on screen: the element's own content height (in graph units; the canvas
      // zoom is a CSS transform on top)
      measured = { width: node.size[0], height: el.scrollHeight + 16 };
    } else if (Math.abs(measured.width - node.size[0]) > 8) {
      measured = { width: node.size[0], height: measureTables(node, el) + 16 };
    }
    return Math.min(Math.max(60, measured.height), MAX_TABLE_HEIGHT);
  };
  widget = node.addDOMWidget(TABLE_WIDGET, "grassmann_table", el, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => value,
    setValue: (v) => {
      value = Array.isArray(v) ? v : [];
      renderTables(el, value);
      measured = { width: 0, height: 60 };
    },
    getMinHeight: needed,
    getMaxHeight: needed,        // spare height goes to the image previews below
  });
  widget.serialize = false;
  return widget;
}

function showTables(node, tables) {
  const widget = tableWidget(node);
  widget.value = tables;
  requestAnimationFrame(() => fitNode(node));
  setTimeout(() => fitNode(node), 250);   // again once the table has been laid out on screen
}

function fitNode(node, withPreview) {
  const want = node.computeSize();
  const w = Math.max(node.size[0], want[0], 360);
  let h = Math.max(node.size[1], want[1]);
  if (withPreview) h = Math.max(h, want[1] + MIN_PREVIEW_HEIGHT);
  if (w !== node.size[0] || h !== node.size[1]) node.setSize([w, h]);
  node.setDirtyCanvas(true, true);
}

// ---------------------------------------------------------------- dynamic inputs

function loraSlots(node) {
  return (node.inputs || [])
    .map((input, index) => ({ input, index }))
    .filter(({ input }) => LORA_SLOT.test(input.name));
}

function normalizeLoraInputs(node, max) {
  if (!node.inputs) return;
  // Drop every empty lora slot (from the end so indices stay valid) …
  const slots = loraSlots(node);
  for (let i = slots.length - 1; i >= 0; i--) {
    if (slots[i].input.link == null) node.removeInput(slots[i].index);
  }
  // … renumber the connected ones in order …
  const kept = loraSlots(node);
  kept.forEach(({ input }, i) => {
    const name = `lora_${i + 1}`;
    if (input.name !== name) {
      input.name = name;
      input.label = name;
      input.localized_name = name;
    }
  });
  // … and offer exactly one empty slot after them.
  if (kept.length < max) {
    const name = `lora_${kept.length + 1}`;
    node.addInput(name, LORA_TYPE, { label: name, localized_name: name });
  }
  node.setSize([Math.max(node.size[0], node.computeSize()[0]), Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
}

function installDynamicInputs(nodeType, max) {
  const pending = new WeakSet();
  const schedule = (node) => {
    if (pending.has(node)) return;
    pending.add(node);
    // after LiteGraph has finished the connect/disconnect that triggered us
    setTimeout(() => {
      pending.delete(node);
      normalizeLoraInputs(node, max);
    }, 0);
  };

  // Deferred: app.loadApiJson creates every node first and connects the inputs
  // right after, by name; trimming at creation would drop lora_2 … before that.
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const r = onNodeCreated?.apply(this, arguments);
    schedule(this);
    return r;
  };

  const onConfigure = nodeType.prototype.onConfigure;
  nodeType.prototype.onConfigure = function () {
    const r = onConfigure?.apply(this, arguments);
    schedule(this);
    return r;
  };

  const onConnectionsChange = nodeType.prototype.onConnectionsChange;
  nodeType.prototype.onConnectionsChange = function (type, slot, connected, link, ioSlot) {
    const r = onConnectionsChange?.apply(this, arguments);
    if (type === 1 && ioSlot && LORA_SLOT.test(ioSlot.name ?? "")) schedule(this);
    return r;
  };
}

// ---------------------------------------------------------------- registration

app.registerExtension({
  name: "grassmann_lora.nodes",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(PREFIX)) return;

    const optional = Object.keys(nodeData.input?.optional || {});
    const loraInputs = optional.filter((k) => LORA_SLOT.test(k));
    if (loraInputs.length > 1) installDynamicInputs(nodeType, loraInputs.length);

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const tables = message?.[TABLE_KEY];
      if (Array.isArray(tables) && tables.length) showTables(this, tables);
      if (Array.isArray(message?.images) && message.images.length) {
        requestAnimationFrame(() => fitNode(this, true));
      }
      return r;
    };
  },
});
