// Headless-Chromium check of the pack's front end against a running ComfyUI.
// Driven by browser_check.py (which starts ComfyUI); see that file for how to run it.
//
//   node browser_check.mjs <comfy url> <out dir> <mode> [workflow json files…]
//   mode "export": load each API-format graph with app.loadApiJson, save the
//                  UI-format workflow the front end serialises (and its prompt)
//   mode "check":  add every pack node, exercise the dynamic LoRA inputs, load
//                  the UI workflow given, queue it, wait, check the table and the
//                  heatmap preview render, collect console errors, screenshot.
//   mode "shots":  for each entry of the JSON plan given (name, UI file, files to
//                  pick, result node): load the template, pick the files, queue it,
//                  time it, screenshot the graph and the result node; then open
//                  the template browser on the pack's category and screenshot it.
import fs from "node:fs";
import path from "node:path";
import { launch, openComfy } from "./browser.mjs";

const [url, outDir, mode, ...files] = process.argv.slice(2);
if (!url || !outDir || !mode) {
  console.error("usage: node browser_check.mjs <comfy url> <out dir> export|check [files…]");
  process.exit(2);
}
const { page, close } = await launch(outDir, { width: 1800, height: 1100 });
const consoleErrors = [];
page.on("console", (msg) => {
  if (msg.type() === "error") consoleErrors.push({ text: msg.text(), url: msg.location()?.url || "" });
});
page.on("pageerror", (err) => consoleErrors.push({ text: String(err && err.stack || err), url: "pageerror" }));
const report = { mode, url, steps: [], consoleErrors };
const step = (name, data) => { report.steps.push({ name, ...data }); console.log(`[browser] ${name}`, JSON.stringify(data)); };

let failed = false;
function check(cond, what, data = {}) {
  step((cond ? "ok: " : "FAIL: ") + what, data);
  if (!cond) failed = true;
}

try {
  const templates = await (await fetch(`${url}/api/workflow_templates`)).json();
  const expected = JSON.parse(process.env.GRASSMANN_TEMPLATES || "[]").sort();
  // export writes the UI files the template browser lists: nothing to check before it
  if (mode !== "export") check(JSON.stringify((templates.grassmann_lora || []).sort()) === JSON.stringify(expected),
    "the example workflows are offered in ComfyUI's template browser", { grassmann_lora: templates.grassmann_lora, expected });
  for (const name of mode === "check" ? expected : []) {   // shots makes them
    // what the template browser fetches for a custom node's template: <name>.json and <name>.jpg
    const thumb = await fetch(`${url}/api/workflow_templates/grassmann_lora/${encodeURIComponent(name)}.jpg`);
    const type = thumb.headers.get("content-type") || "";
    check(thumb.ok && type.includes("jpeg"), `${name}: thumbnail served`, { status: thumb.status, type });
  }
  await openComfy(page, url, "GrassmannLoRALoad");
  const extLoaded = await page.evaluate(() =>
    performance.getEntriesByType("resource").some((e) => e.name.includes("/extensions/grassmann_lora/grassmann_lora.js")));
  check(extLoaded, "web/grassmann_lora.js was loaded by the front end");
  await page.evaluate(() => { window.__gl_app = window.app ?? window.comfyAPI.app.app; });

  if (mode === "export") {
    for (const file of files) {
      const api = JSON.parse(fs.readFileSync(file, "utf8"));
      const name = path.basename(file, ".json");
      const layoutFile = path.join(outDir, `${name}.layout.json`);
      const layout = fs.existsSync(layoutFile) ? JSON.parse(fs.readFileSync(layoutFile, "utf8")) : null;
      const result = await page.evaluate(async ({ api, name, layout }) => {
        const app = window.__gl_app;
        const LG = window.LiteGraph;
        await app.loadApiJson(api, name);
        await new Promise((r) => setTimeout(r, 500));     // dynamic-input normalisation runs deferred
        const g = app.rootGraph;
        if (!layout) {
          g.arrange?.();
        } else {
          for (const [id, [x, y, w]] of Object.entries(layout.nodes)) {
            const node = g.getNodeById(Number(id));
            if (!node) continue;
            node.pos = [x, y];
            node.size = [Math.max(w, node.computeSize()[0]), node.computeSize()[1]];
          }
          for (const [x, y, w, h, text] of layout.notes || []) {
            const note = LG.createNode("Note");
            g.add(note);
            note.pos = [x, y];
            note.size = [w, h];
            note.widgets[0].value = text;
          }
          for (const [title, x, y, w, h] of layout.groups || []) {
            const Group = LG.LGraphGroup;
            if (!Group) continue;
            const group = new Group(title);
            group.pos = [x, y];
            group.size = [w, h];
            g.add(group);
          }
        }
        // the same seed on every run: no "randomize" after generating
        for (const node of g._nodes) {
          for (const w of node.widgets || []) if (w.name === "control_after_generate") w.value = "fixed";
        }
        g.setDirtyCanvas?.(true, true);
        const workflow = g.serialize();
        const prompt = (await app.graphToPrompt()).output;
        return { workflow, prompt };
      }, { api, name, layout });
      fs.writeFileSync(path.join(outDir, `${name}.json`), JSON.stringify(result.workflow, null, 1) + "\n");
      fs.writeFileSync(path.join(outDir, `${name}.prompt.json`), JSON.stringify(result.prompt, null, 1) + "\n");
      const strip = (g) => Object.fromEntries(Object.entries(g).map(([k, v]) => [k, { class_type: v.class_type, inputs: v.inputs }]));
      const same = JSON.stringify(sortKeys(strip(result.prompt))) === JSON.stringify(sortKeys(strip(api)));
      check(same, `${name}: the front end's prompt equals the API graph`,
        same ? {} : { diff: diffGraphs(strip(api), strip(result.prompt)) });
    }
  } else if (mode === "shots") {
    const plan = JSON.parse(fs.readFileSync(files[0], "utf8"));
    for (const item of plan) {
      const workflow = JSON.parse(fs.readFileSync(item.ui, "utf8"));
      const run = await page.evaluate(async ({ item, workflow }) => {
        const app = window.__gl_app;
        await app.loadGraphData(workflow);
        await new Promise((r) => setTimeout(r, 800));
        const g = app.rootGraph;
        const missing = workflow.nodes.filter((n) => !g.getNodeById(n.id)).map((n) => `node ${n.id}`);
        if (missing.length) return { kind: "not loaded", seconds: 0, missing };
        for (const [id, widgets] of Object.entries(item.set)) {
          const node = g.getNodeById(Number(id));
          for (const [name, value] of Object.entries(widgets)) {
            const w = node?.widgets?.find((x) => x.name === name);
            if (!w) { missing.push(`${id}.${name}`); continue; }
            w.value = value;
            w.callback?.(value);
          }
        }
        const api = window.comfyAPI?.api?.api;
        const done = new Promise((resolve) => {
          const finish = (kind) => (e) => resolve({ kind, detail: e.detail });
          api.addEventListener("execution_success", finish("success"), { once: true });
          api.addEventListener("execution_error", finish("error"), { once: true });
          api.addEventListener("execution_interrupted", finish("interrupted"), { once: true });
          setTimeout(() => resolve({ kind: "timeout" }), item.timeout_ms || 1500000);
        });
        const t0 = performance.now();
        const queued = await app.queuePrompt(0, 1);
        // a prompt refused by validation never runs: no event would come
        const refused = app.lastNodeErrors && Object.keys(app.lastNodeErrors).length;
        if (queued === false || refused) {
          return { kind: "refused", seconds: 0, missing, detail: JSON.stringify(app.lastNodeErrors).slice(0, 2000) };
        }
        const r = await done;
        const seconds = (performance.now() - t0) / 1000;
        await new Promise((res) => setTimeout(res, 2500));   // previews load, tables lay out
        return { kind: r.kind, seconds, missing, detail: r.kind === "error" ? r.detail : undefined };
      }, { item, workflow });
      check(run.kind === "success" && run.missing.length === 0, `${item.name}: ran from the UI in ${run.seconds.toFixed(0)} s`, run);
      // the whole graph, then the result node
      for (const [suffix, ids] of [["graph", null], ["result", item.focus]]) {
        await page.evaluate((ids) => {
          const app = window.__gl_app;
          const g = app.rootGraph;
          const nodes = ids ? ids.map((id) => g.getNodeById(Number(id))).filter(Boolean) : g._nodes;
          app.canvas.selectItems?.(nodes);
          app.canvas.fitViewToSelectionAnimated?.({ duration: 1, zoom: 0.95 });
          app.canvas.deselectAll?.();
          app.canvas.setDirty(true, true);
        }, ids);
        await page.waitForTimeout(1500);
        await page.screenshot({ path: path.join(outDir, `${item.name}.${suffix}.png`) });
      }
      // the thumbnail: a square around the result node (the view is fitted to it)
      const box = await page.evaluate((ids) => {
        const app = window.__gl_app;
        const nodes = ids.map((id) => app.rootGraph.getNodeById(Number(id))).filter(Boolean);
        const rect = app.canvas.canvas.getBoundingClientRect();
        const ds = app.canvas.ds;
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        for (const n of nodes) {
          const [ax, ay] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - 30]);
          const [bx, by] = ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
          x0 = Math.min(x0, ax); y0 = Math.min(y0, ay); x1 = Math.max(x1, bx); y1 = Math.max(y1, by);
        }
        return { x: rect.x + x0, y: rect.y + y0, w: x1 - x0, h: y1 - y0, vw: innerWidth, vh: innerHeight };
      }, item.focus);
      const side = Math.min(box.vh, box.vw, Math.max(box.w, box.h) + 20);
      const cx = box.x + box.w / 2, cy = box.y + box.h / 2;
      const clip = { x: Math.max(0, Math.min(box.vw - side, cx - side / 2)),
        y: Math.max(0, Math.min(box.vh - side, cy - side / 2)), width: side, height: side };
      await page.screenshot({ path: item.thumb, type: "jpeg", quality: 85, clip });
      report.steps.push({ name: `timing ${item.name}`, seconds: run.seconds });
    }
    // the template browser, on the pack's category
    await page.evaluate(() => window.__gl_app.extensionManager.command.execute("Comfy.BrowseTemplates"));
    await page.waitForTimeout(2500);
    await page.getByText("grassmann_lora", { exact: true }).first().click().catch(() => {});
    await page.waitForTimeout(2500);
    // front end 1.49 marks the cards with no test id: find the thumbnails by their address
    const cards = await page.evaluate(() =>
      [...document.querySelectorAll("img")].map((img) => ({ src: img.getAttribute("src") || "", w: img.naturalWidth || 0 })));
    const ours = cards.filter((c) => c.src.includes("/workflow_templates/grassmann_lora/"));
    check(ours.length === plan.length && ours.every((c) => c.w > 0),
      "the template browser shows each template with its thumbnail", { cards: ours });
    await page.screenshot({ path: path.join(outDir, "template_browser.png") });
  } else {
    // 1. every pack node can be added; the LoRA-taking ones start with one lora slot
    const nodes = await page.evaluate(async () => {
      const app = window.__gl_app;
      app.rootGraph.clear();
      const types = Object.keys(window.LiteGraph.registered_node_types).filter((t) => t.startsWith("GrassmannLoRA"));
      const out = {};
      let x = 50;
      for (const t of types) {
        const node = window.LiteGraph.createNode(t);
        node.pos = [x, 80];
        x += 340;
        app.rootGraph.add(node);
        out[t] = node.id;
      }
      await new Promise((r) => setTimeout(r, 300));
      const slots = {};
      for (const [t, id] of Object.entries(out)) {
        slots[t] = app.rootGraph.getNodeById(id).inputs.filter((i) => /^lora_\d+$/.test(i.name)).map((i) => i.name);
      }
      return { types, slots };
    });
    // the server's list (every node class the pack registered in Python) is the reference
    const info = await (await fetch(`${url}/api/object_info`)).json();
    const served = Object.keys(info).filter((t) => t.startsWith("GrassmannLoRA")).sort();
    check(served.length > 0 && JSON.stringify([...nodes.types].sort()) === JSON.stringify(served),
      `all ${served.length} pack nodes of the server registered in the front end`, { types: nodes.types, served });
    check(JSON.stringify(nodes.slots.GrassmannLoRAKernelMatrix) === '["lora_1"]'
      && JSON.stringify(nodes.slots.GrassmannLoRAKarcherMerge) === '["lora_1"]',
      "dynamic LoRA inputs start with one empty slot", nodes.slots);

    // 2. connecting grows the slots, disconnecting renumbers them
    const dyn = await page.evaluate(async () => {
      const app = window.__gl_app;
      const g = app.rootGraph;
      const km = g.findNodesByType("GrassmannLoRAKernelMatrix")[0];
      const loads = [0, 1, 2].map((k) => {
        const n = window.LiteGraph.createNode("GrassmannLoRALoad");
        n.pos = [50 + 300 * k, 500];
        g.add(n);
        return n;
      });
      const names = () => km.inputs.filter((i) => /^lora_\d+$/.test(i.name)).map((i) => `${i.name}${i.link != null ? "*" : ""}`);
      const wait = () => new Promise((r) => setTimeout(r, 100));
      const seen = [];
      for (const n of loads) {
        const slot = km.inputs.findIndex((i) => i.name === `lora_${seen.length + 1}`);
        n.connect(0, km, slot);
        await wait();
        seen.push(names().join(","));
      }
      km.disconnectInput(km.inputs.findIndex((i) => i.name === "lora_1"));
      await wait();
      seen.push(names().join(","));
      const prompt = (await app.graphToPrompt()).output[String(km.id)].inputs;
      return { seen, promptLoras: Object.keys(prompt).filter((k) => k.startsWith("lora_")) };
    });
    check(JSON.stringify(dyn.seen) === JSON.stringify([
      "lora_1*,lora_2", "lora_1*,lora_2*,lora_3", "lora_1*,lora_2*,lora_3*,lora_4", "lora_1*,lora_2*,lora_3"]),
      "connecting adds the next slot; disconnecting renumbers", dyn);
    check(JSON.stringify(dyn.promptLoras) === '["lora_1","lora_2"]', "prompt carries the connected slots", dyn);

    // 3. workflow 3 from its UI file: load, queue, wait, look
    const workflow = JSON.parse(fs.readFileSync(files[0], "utf8"));
    const run = await page.evaluate(async (workflow) => {
      const app = window.__gl_app;
      await app.loadGraphData(workflow);
      await new Promise((r) => setTimeout(r, 500));
      const api = window.comfyAPI?.api?.api;
      const done = new Promise((resolve) => {
        const finish = (kind) => (e) => resolve({ kind, detail: e.detail });
        api.addEventListener("execution_success", finish("success"));
        api.addEventListener("execution_error", finish("error"));
        api.addEventListener("execution_interrupted", finish("interrupted"));
        setTimeout(() => resolve({ kind: "timeout" }), 240000);
      });
      await app.queuePrompt(0, 1);
      const r = await done;
      await new Promise((res) => setTimeout(res, 1500));   // let previews load and the canvas draw
      return { kind: r.kind, detail: r.kind === "error" ? r.detail : undefined };
    }, workflow);
    check(run.kind === "success", "the two-LoRA workflow ran from the UI", run);

    // fit the graph into view and draw
    await page.evaluate(() => {
      const app = window.__gl_app;
      const sim = app.rootGraph.findNodesByType("GrassmannLoRASimilarity")[0];
      app.canvas.selectItems?.([sim]);
      app.canvas.fitViewToSelectionAnimated?.({ duration: 1 });
      app.canvas.deselectAll?.();
      app.canvas.setDirty(true, true);
    });
    await page.waitForTimeout(1500);

    const look = await page.evaluate(async () => {
      const app = window.__gl_app;
      const sim = app.rootGraph.findNodesByType("GrassmannLoRASimilarity")[0];
      const box = document.querySelector(`.grassmann-lora-tables[data-node="${sim.id}"]`);
      const rect = box?.getBoundingClientRect();
      const style = box ? getComputedStyle(box) : null;
      const rows = box ? [...box.querySelectorAll("table tr")].map((tr) => [...tr.children].map((c) => c.textContent)) : [];
      const outputs = app.nodeOutputs?.[String(sim.id)] || {};
      const images = (outputs.images || []);
      const loaded = [];
      for (const im of images) {
        const u = `/api/view?filename=${encodeURIComponent(im.filename)}&type=${im.type}&subfolder=${encodeURIComponent(im.subfolder || "")}`;
        const ok = await new Promise((res) => {
          const el = new Image();
          el.onload = () => res({ w: el.naturalWidth, h: el.naturalHeight });
          el.onerror = () => res(null);
          el.src = u;
        });
        loaded.push(ok);
      }
      return {
        tableVisible: !!box && rect.width > 50 && rect.height > 30 && style.display !== "none" && style.visibility !== "hidden",
        rect: rect && { x: rect.x, y: rect.y, w: rect.width, h: rect.height },
        rows: rows.slice(0, 4), images: images.map((i) => i.filename), loaded,
        nodeImgs: (sim.imgs || []).map((i) => [i.naturalWidth, i.naturalHeight]),
        size: sim.size,
      };
    });
    check(look.tableVisible && look.rows.length >= 3 && look.rows[0][0] === "side",
      "similarity summary renders as a table on the node", look);
    check(look.loaded.length === 2 && look.loaded.every((x) => x && x.w > 100 && x.h > 100),
      "heatmap and φ-grid previews load", look);
    await page.screenshot({ path: path.join(outDir, "workflow3.png") });
    // a close-up of the similarity node
    if (look.rect) {
      await page.screenshot({ path: path.join(outDir, "similarity_node.png"), fullPage: false,
        clip: { x: Math.max(0, look.rect.x - 40), y: Math.max(0, look.rect.y - 420), width: Math.min(1000, look.rect.w + 500), height: 1000 } }).catch(() => {});
    }
  }
  const ours = consoleErrors.filter((e) => /grassmann/i.test(e.text + " " + e.url));
  check(ours.length === 0, "no console errors from the pack's web/ code", { ours, all: consoleErrors.length });
} catch (err) {
  failed = true;
  step("FAIL: exception", { error: String(err && err.stack || err) });
  await page.screenshot({ path: path.join(outDir, "failure.png") }).catch(() => {});
} finally {
  fs.writeFileSync(path.join(outDir, `report-${mode}.json`), JSON.stringify(report, null, 1));
  await close();
}
process.exit(failed ? 1 : 0);

function sortKeys(x) {
  if (Array.isArray(x)) return x.map(sortKeys);
  if (x && typeof x === "object") return Object.fromEntries(Object.keys(x).sort().map((k) => [k, sortKeys(x[k])]));
  return x;
}

function diffGraphs(a, b) {
  const out = [];
  for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
    if (JSON.stringify(sortKeys(a[k])) !== JSON.stringify(sortKeys(b[k]))) out.push({ id: k, api: a[k], ui: b[k] });
  }
  return out.slice(0, 6);
}
