// The Electron example's renderer.js, with tether.js in place of the whole ipcRenderer.
// The page reaches only the channels main exposes to role "web".
import { connect } from "/tether.js";

const sendButton = document.getElementById("sendButton");
const receivedButton = document.getElementById("receivedButton");
const messageToSend = document.getElementById("messageToSend");
const fromMain = document.getElementById("fromMain");
let ipc; // set once connected; Send Message stays disabled until then

sendButton.addEventListener("click", async () => {
  try {
    const response = await ipc.invoke("message-from-renderer", messageToSend.textContent, {
      timeout: 5000,
    });
    receivedButton.removeAttribute("disabled");
    receivedButton.textContent = response;
  } catch (err) {
    fromMain.textContent = `${err.name}: ${err.message}`;
  }
});

receivedButton.addEventListener("click", () => {
  console.log("Received message:", receivedButton.textContent);
});

try {
  ipc = await connect(); // same origin; the secret comes from this page's address
} catch (err) {
  fromMain.textContent = `Not connected: ${err.name}: ${err.message}`;
  throw err;
}
// Main can invoke the page (Electron's ipcRenderer cannot be invoked)...
ipc.handle("page.title", () => document.title);
// ...and push to it.
ipc.on("main-status", (text) => {
  fromMain.textContent = text;
});
sendButton.removeAttribute("disabled");
ipc.send("page-ready");
