import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { App } from "./App";
import { BASE, loadConfig } from "./config";
import "./styles.css";

if ("serviceWorker" in navigator && import.meta.env.PROD) {
  // The app shell works offline once this worker is installed (it caches this build's files).
  navigator.serviceWorker.register(`${BASE}sw.js`, { scope: BASE }).catch((e: unknown) => {
    console.warn("service worker not registered", e);
  });
}

loadConfig().then((config) => {
  createRoot(document.getElementById("root")!).render(
    <StrictMode>
      <App config={config} />
    </StrictMode>,
  );
});
