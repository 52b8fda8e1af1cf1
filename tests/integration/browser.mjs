// What every headless-Chromium script of the integration tests shares: the
// browser launch (a throw-away profile next to the script's output) and, for
// ComfyUI, opening the front end and waiting until the graph is ready.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

// playwright-core comes from the test machine's node_modules, not from this repository
const require = createRequire(path.join(process.env.PLAYWRIGHT_CORE_DIR || process.cwd(), "noop.js"));
const { chromium } = require("playwright-core");

const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--no-first-run"];

// A persistent context in a fresh profile under dir; close() also removes the profile.
export async function launch(dir, viewport) {
  fs.mkdirSync(dir, { recursive: true });
  const userDir = fs.mkdtempSync(path.join(dir, "chromium-profile-"));
  const context = await chromium.launchPersistentContext(userDir, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true, args: FLAGS, viewport,
  });
  const page = context.pages()[0] || (await context.newPage());
  const close = async () => {
    await context.close();
    fs.rmSync(userDir, { recursive: true, force: true });
  };
  return { context, page, close };
}

// Open ComfyUI as a returning user (no first-run template browser over the canvas)
// and wait until the graph is ready and nodeType is registered.
export async function openComfy(page, url, nodeType) {
  await fetch(`${url}/api/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" });
  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120000 });
  await page.waitForFunction((type) => {
    const app = window.app ?? window.comfyAPI?.app?.app;
    return app && app.isGraphReady && app.canvas && window.LiteGraph?.registered_node_types?.[type];
  }, nodeType, { timeout: 120000 });
  // let the start-up workflow finish loading before a script replaces the graph
  await page.waitForLoadState("networkidle", { timeout: 60000 }).catch(() => {});
  await page.waitForTimeout(1500);
}
