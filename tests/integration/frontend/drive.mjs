// Opens workflows in ComfyUI's real web frontend (headless Chromium) and reports what a user would see.
//
// Used by tests/integration/test_frontend.py: reads a plan as JSON on stdin, prints a report as JSON on
// stdout. The plan: {url, chromium, workflows: [{name, graph}], queue: [{name, graph, size, steps}]}.
// Per workflow the report has the node types the frontend found missing (its own list, the one its
// "missing nodes" dialog shows), the error and warning text it showed (toasts, dialogs, console errors,
// uncaught exceptions) and `app.graphToPrompt()`'s API prompt; per queued workflow, the answer of the
// POST /prompt that the frontend's own queue command sent after the sizes were shrunk in its widgets.
// With `screenshots` (a folder) in the plan, each opened workflow is also saved there as <name>.jpg, fitted
// to a 1600×900 window: the pictures in the README.
import { chromium } from "playwright-core";

const READY_TIMEOUT_MS = 120_000;
const SETTLE_MS = 400; // toasts and dialogs open on the next ticks after loadGraphData resolves
const VIEWPORT = { width: 1600, height: 900 };
// The probe's flags: without the background-networking ones Chromium keeps dialling Google on a closed network.
const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];
// A fresh user directory gets the new-user templates dialog; a test user has seen it. And frontend
// 1.27.10 throws at every start while its navigation mode is "legacy" (the default): that setting's
// onChange sets Comfy.Canvas.LeftMouseClickBehavior before registering it, with or without this pack.
const SETTINGS = { "Comfy.TutorialCompleted": true, "Comfy.Canvas.NavigationMode": "custom" };
// For pictures: node text at any zoom (LiteGraph drops it below 8 px) and no minimap over the graph.
const SCREENSHOT_SETTINGS = { "LiteGraph.Canvas.MinFontSizeForLOD": 0, "Comfy.Minimap.Visible": false };

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString("utf8"));
}

// Everything visible that tells a user something went wrong: toast messages and open dialogs.
async function visibleMessages(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll(".p-toast-message, .p-dialog")]
      .map((element) => element.innerText.trim())
      .filter(Boolean));
}

async function closeMessages(page) {
  await page.evaluate(() => {
    for (const button of document.querySelectorAll(
      ".p-toast-message .p-toast-close-button, .p-dialog .p-dialog-close-button")) button.click();
  });
  await page.waitForTimeout(SETTLE_MS);
}

async function open(page, problems, name, graph) {
  problems.length = 0;
  await closeMessages(page);
  const missing = await page.evaluate(async ({ name, graph }) => {
    window.__x2iMissing = null;
    await window.app.loadGraphData(graph, true, true, name);
    return window.__x2iMissing;
  }, { name, graph });
  await page.waitForTimeout(SETTLE_MS);
  return { missing, messages: [...(await visibleMessages(page)), ...problems] };
}

async function main() {
  const plan = await readStdin();
  const browser = await chromium.launch({ executablePath: plan.chromium, args: CHROMIUM_ARGS });
  const report = { opened: {}, queued: {} };
  try {
    // Pictures at 1.5× so node text stays legible in the README.
    const page = await browser.newPage({ viewport: VIEWPORT, deviceScaleFactor: plan.screenshots ? 1.5 : 1 });
    const problems = [];
    page.on("pageerror", (error) => problems.push(`uncaught: ${error.stack ?? error.message}`));
    page.on("console", (message) => {
      // Failed requests to hosts this closed network cannot reach are not the pack's doing.
      if (message.type() === "error" && !/ERR_(NAME_NOT_RESOLVED|INTERNET_DISCONNECTED|CONNECTION_REFUSED)|Failed to load resource/.test(message.text())) {
        problems.push(`console: ${message.text()}`);
      }
    });
    await page.request.post(`${plan.url}/api/settings`, { data: plan.screenshots ? { ...SETTINGS, ...SCREENSHOT_SETTINGS } : SETTINGS });
    await page.goto(plan.url);
    await page.waitForFunction(() => window.app && window.graph && window.app.vueAppReady, null, { timeout: READY_TIMEOUT_MS });
    // The frontend's own list of missing node types, handed to every extension after a graph loads.
    await page.evaluate(() => window.app.registerExtension({
      name: "X2I.Tests.MissingNodes",
      afterConfigureGraph(missingNodeTypes) { window.__x2iMissing = missingNodeTypes.map((t) => (typeof t === "object" ? t.type : t)); },
    }));
    report.startup = [...(await visibleMessages(page)), ...problems];

    for (const { name, graph } of plan.workflows) {
      const { missing, messages } = await open(page, problems, name, graph);
      const { output } = await page.evaluate(() => window.app.graphToPrompt());
      report.opened[name] = { missing, messages, prompt: output };
      if (plan.screenshots) {
        await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.Canvas.FitView"));
        await page.waitForTimeout(SETTLE_MS);
        await page.screenshot({ path: `${plan.screenshots}/${name.replace(/\.json$/, "")}.jpg`, type: "jpeg", quality: 80 });
      }
    }

    for (const { name, graph, size, steps } of plan.queue) {
      const { missing, messages } = await open(page, problems, name, graph);
      await page.evaluate(({ size, steps }) => {
        const set = (node, widget, value) => { node.widgets.find((w) => w.name === widget).value = value; };
        for (const node of window.app.graph.nodes) {
          if (node.type === "EmptyLatentImage") { set(node, "width", size); set(node, "height", size); }
          if (node.type === "KSampler") set(node, "steps", steps);
        }
      }, { size, steps });
      const answer = page.waitForResponse((r) => r.url().endsWith("/prompt") && r.request().method() === "POST");
      // The command the Queue button and Ctrl+Enter run.
      await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.QueuePrompt"));
      const response = await answer;
      report.queued[name] = { missing, messages, status: response.status(), body: await response.json() };
    }
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(report));
}

main().catch((error) => {
  process.stderr.write(`${error.stack ?? error}\n`);
  process.exit(1);
});
