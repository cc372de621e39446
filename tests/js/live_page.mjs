// A "page" in Node, for tests/test_tether_js.py: tether.js over a real WebSocket to a live Main.
// Usage: node live_page.mjs WS_URL TOKEN; prints one JSON line per step.
import { connect } from "../../src/tether/web/static/tether.js";

const [url, token] = process.argv.slice(2);
const out = (step, value) => console.log(JSON.stringify({ step, value }));
const failure = (e) => ({ name: e.name, message: e.message, remoteType: e.remoteType, path: e.path });

const ipc = await connect({ url, token, WebSocket, timeout: 10000 });
ipc.handle("page.title", () => "node page");
ipc.on("theme", (theme) => ipc.send("log", `theme is ${theme}`));
out("invoke", await ipc.invoke("message-from-renderer", "Hola, mundo!", { timeout: 5000 }));
for (const [ch, ...args] of [["local-only"], ["boom"], ["message-from-renderer", 5], ["nope"]]) {
  out(ch, await ipc.invoke(ch, ...args).catch(failure));
}
out("timeout", await ipc.invoke("slow", { timeout: 200 }).catch(failure));
out("ask", await ipc.invoke("ask"));
out("rtt", typeof (await ipc.ping()));
ipc.close("done");
out("closed", (await ipc.closed).name);
