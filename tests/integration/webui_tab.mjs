// Headless-Chromium check of the "Grassmann LoRA" tab in a running WebUI (gradio 3.41 or 4.x).
//   node webui_tab.mjs <webui url> <screenshot.png> [LoRA name…]
// Opens the UI, selects the tab (gradio 4 renders top tabs as role="tab", gradio 3 as
// buttons), waits for the Merge button, shows the Merge sub-tab and, given LoRA names, merges
// them from the UI (for a screenshot with a result; a failure there is only logged),
// then screenshots the page. Before that merge it asks for a bad name and prints the status line.
import path from "node:path";
import { launch } from "./browser.mjs";

const [url, shot, ...loras] = process.argv.slice(2);
const BAD_NAME = "a/b*c<d>";
const { page, close } = await launch(path.dirname(shot), { width: 1500, height: 1000 });
const errors = [];
page.on("pageerror", (e) => errors.push(`${e}\n${e.stack || ""}`));
let code = 0;
try {
  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 180000 });
  const tab = page.locator('[role="tab"], button').filter({ hasText: /^\s*Grassmann LoRA\s*$/ }).first();
  await tab.waitFor({ timeout: 180000 });
  await tab.click();
  const mergeTab = page.locator("#tab_grassmann_lora").locator('[role="tab"], button').filter({ hasText: /^\s*Merge\s*$/ }).first();
  await mergeTab.click();
  await page.locator("#grassmann_lora_merge_run").waitFor({ state: "visible", timeout: 60000 });
  const text = await page.locator("#tab_grassmann_lora").innerText();
  for (const want of ["Similarity", "Kernel matrix", "Merge", "Convert", "Compare", "Merge and save", "Auto rank",
                      "Block weights", "Normalise", "Method parameters"]) {
    if (!text.includes(want)) { console.log(`missing text: ${want}`); code = 1; }
  }
  if (loras.length) {
    try {
      const input = page.locator("#grassmann_lora_merge_loras input").first();
      for (const name of loras) {
        await input.click();
        await input.fill(name);
        await page.keyboard.press("Enter");
      }
      // a bad name: the status line (a Markdown block; gradio 3 repeats the id on its wrapper) shows it as typed
      const nameBox = page.getByLabel("Name (empty = new unique name)");
      const status = page.locator("#grassmann_lora_status").last();
      await nameBox.fill(BAD_NAME);
      await page.locator("#grassmann_lora_merge_run").click();
      await page.waitForFunction(() => [...document.querySelectorAll("#grassmann_lora_status")]
        .some((s) => s.innerText.includes("Error")), null, { timeout: 60000 });
      console.log(`status: ${(await status.innerText()).trim()}`);
      await nameBox.fill("");
      await page.locator("#grassmann_lora_merge_run").click();
      await page.waitForFunction(() => [...document.querySelectorAll("#tab_grassmann_lora textarea")]
        .some((t) => t.value.startsWith("<lora:")), null, { timeout: 240000 });
      console.log("merged from the UI");
    } catch (e) {
      console.log(`merge from the UI failed (screenshot without a result): ${e}`);
    }
  }
  await page.waitForTimeout(500);
  await page.screenshot({ path: shot, fullPage: false });
  console.log(`screenshot ${shot}; page errors: ${errors.length}`);
  for (const e of errors) console.log(`page error: ${e.slice(0, 500)}`);
} catch (e) {
  console.log(`FAIL: ${e}`);
  await page.screenshot({ path: shot }).catch(() => {});
  code = 1;
}
await close();
process.exit(code);
