// Screenshot of workflow 4 (LoRA Merge Fidelity beside the Compare Grid) after a
// real run in headless Chromium. Driven by fidelity_screenshot.py, which starts
// ComfyUI and passes the API graph (already shrunk to test size).
//
//   node fidelity_screenshot.mjs <comfy url> <api graph json> <out png>
import fs from "node:fs";
import path from "node:path";
import { launch, openComfy } from "./browser.mjs";

const [url, graphFile, outPng] = process.argv.slice(2);
const { page, close } = await launch(path.dirname(outPng), { width: 1100, height: 1200 });
let rc = 1;
try {
  await openComfy(page, url, "GrassmannLoRAMergeFidelity");
  const api = JSON.parse(fs.readFileSync(graphFile, "utf8"));
  const run = await page.evaluate(async (api) => {
    const app = window.app ?? window.comfyAPI.app.app;
    await app.loadApiJson(api, "4_merge_fidelity");
    await new Promise((r) => setTimeout(r, 500));
    const g = app.rootGraph;
    // the two result nodes side by side, far from the rest of the graph (whose
    // DOM widgets would float over them), wide enough for the table
    const grid = g.findNodesByType("GrassmannLoRACompareGrid")[0];
    const fid = g.findNodesByType("GrassmannLoRAMergeFidelity")[0];
    grid.pos = [20000, 40];
    grid.size = [360, 700];
    fid.pos = [20400, 40];
    fid.size = [900, 1300];
    const events = window.comfyAPI.api.api;
    const done = new Promise((resolve) => {
      const finish = (kind) => (e) => resolve({ kind, detail: e.detail });
      events.addEventListener("execution_success", finish("success"));
      events.addEventListener("execution_error", finish("error"));
      setTimeout(() => resolve({ kind: "timeout" }), 1500000);
    });
    await app.queuePrompt(0, 1);
    // a graph the server refuses never runs: no execution event would come
    const refused = app.lastNodeErrors && Object.keys(app.lastNodeErrors).length ? app.lastNodeErrors : null;
    const r = refused ? { kind: "error", detail: refused } : await done;
    await new Promise((res) => setTimeout(res, 2500));
    fid.size = [900, Math.max(1300, fid.size[1])];
    app.canvas.ds.scale = 0.75;
    app.canvas.ds.offset = [-20000 + 80, 120];
    app.canvas.setDirty(true, true);
    return { kind: r.kind, detail: r.kind === "error" ? r.detail : undefined };
  }, api);
  console.log("[shot] run", JSON.stringify(run));
  await page.waitForTimeout(2000);
  await page.screenshot({ path: outPng, clip: { x: 55, y: 95, width: 1000, height: 1080 } });
  rc = run.kind === "success" ? 0 : 1;
} finally {
  await close();
}
process.exit(rc);
